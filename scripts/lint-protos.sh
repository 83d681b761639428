#!/usr/bin/env bash
# The protos as a governed API: `buf lint` (style, buf.yaml) and `buf breaking` against the last
# released offdpo.v1 (protos/v1-baseline.binpb, a buf image of the 0.1.0 descriptors). `make lint` runs it.
#
#   scripts/lint-protos.sh                 # lint + breaking in the repository
#   scripts/lint-protos.sh --root DIR      # the same in DIR (a copy holding buf.yaml and protos/)
#   scripts/lint-protos.sh --print-buf     # install buf if missing and print its path (tests use it)
#   OFFDPO_BUF_AGAINST=REF ...             # compare with another buf input, e.g. '.git#tag=v0.1.0,subdir=protos'
#
# buf itself comes from the npm registry (@bufbuild/buf, pinned below), installed into .cache/buf
# (gitignored) on first use; npm's output goes to .cache/buf/install.log, shown only when it fails.
# After a release that changes the API, refresh the baseline (docs/api-compatibility.md):
#   "$(scripts/lint-protos.sh --print-buf)" build --exclude-source-info -o protos/v1-baseline.binpb
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

BUF_VERSION=1.75.0
BUF_DIR=${OFFDPO_BUF_DIR:-$repo/.cache/buf}
BUF="$BUF_DIR/node_modules/.bin/buf"
root=$repo
print_buf=false
while [ $# -gt 0 ]; do
  case $1 in
    --root) root=$(cd "$2" && pwd); shift 2 ;;
    --print-buf) print_buf=true; shift ;;
    *) echo "lint-protos.sh: unknown argument '$1' (use --root DIR or --print-buf)" >&2; exit 2 ;;
  esac
done

install_buf() {
  mkdir -p "$BUF_DIR"
  # One installer at a time: `make lint` and the tests may start together.
  exec 9>"$BUF_DIR/.install.lock"
  flock 9
  if [ "$("$BUF" --version 2>/dev/null)" = "$BUF_VERSION" ]; then
    return 0
  fi
  command -v npm >/dev/null || { echo "lint-protos.sh: npm is not installed; buf comes from the npm registry (@bufbuild/buf)" >&2; exit 3; }
  local log="$BUF_DIR/install.log"
  if ! npm install --prefix "$BUF_DIR" --no-save --no-audit --no-fund --loglevel=error \
    "@bufbuild/buf@$BUF_VERSION" >"$log" 2>&1; then
    echo "lint-protos.sh: could not install @bufbuild/buf@$BUF_VERSION from the npm registry; $log ends:" >&2
    tail -n 20 "$log" >&2
    exit 3
  fi
  [ "$("$BUF" --version 2>/dev/null)" = "$BUF_VERSION" ] \
    || { echo "lint-protos.sh: npm installed $BUF_DIR but $BUF does not report version $BUF_VERSION" >&2; exit 3; }
}

install_buf
if $print_buf; then
  echo "$BUF"
  exit 0
fi

cd "$root"
against=${OFFDPO_BUF_AGAINST:-protos/v1-baseline.binpb}
"$BUF" lint
"$BUF" breaking --against "$against"
echo "protos: buf lint and buf breaking (against $against) pass"
