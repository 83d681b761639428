# Builds SeaweedFS's S3 identities file (/config/s3.json) from the policy documents mounted at
# /etc/offdpo/s3-policies (<identity>.json, IAM JSON: the same documents as components/s3-aws/iam/) and
# the keys of the Secrets offdpo-s3-<identity> (S3_ACCESS_KEY_<IDENTITY> / S3_SECRET_KEY_<IDENTITY>):
# one identity offdpo-<identity> per document, with exactly that policy (SeaweedFS evaluates it as IAM
# does: actions, resource ARNs, s3:prefix conditions). A document whose Secret is absent (the backfill's,
# without components/backfill) makes no identity. No identity has SeaweedFS's legacy "Admin"/"Write"
# actions. busybox sh + awk (the SeaweedFS image is Alpine).
set -eu
out=/config/s3.json
identities=""
policies=""
for doc in /etc/offdpo/s3-policies/*.json; do
  id="${doc##*/}"; id="${id%.json}"
  case "$id" in *[!a-z]*|"") echo "$doc: the document's name must be <lowercase name>.json"; exit 2;; esac
  ID="$(echo "$id" | tr a-z A-Z)"
  eval "key=\${S3_ACCESS_KEY_$ID:-}; secret=\${S3_SECRET_KEY_$ID:-}"
  if [ -z "$key" ] || [ -z "$secret" ]; then
    echo "no Secret offdpo-s3-$id: no identity for $doc"; continue
  fi
  case "$key$secret" in *[!A-Za-z0-9+/=._-]*) echo "offdpo-s3-$id: keys may hold only A-Za-z0-9+/=._-"; exit 2;; esac
  # the document as one JSON string (SeaweedFS's "content" field is a string)
  content="$(awk 'BEGIN { ORS = "" } { gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); gsub(/\t/, "\\t"); print $0 "\\n" }' "$doc")"
  identities="$identities${identities:+,}
    {\"name\": \"offdpo-$id\", \"credentials\": [{\"accessKey\": \"$key\", \"secretKey\": \"$secret\"}], \"policyNames\": [\"offdpo-$id\"]}"
  policies="$policies${policies:+,}
    {\"name\": \"offdpo-$id\", \"content\": \"$content\"}"
  echo "identity offdpo-$id with policy $doc"
done
[ -n "$identities" ] || { echo "no identity at all: create the Secrets offdpo-s3-<identity>"; exit 2; }
umask 077
printf '{\n  "identities": [%s\n  ],\n  "policies": [%s\n  ]\n}\n' "$identities" "$policies" > "$out"
