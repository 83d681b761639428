"""Least privilege in the rendered manifests (issue #18): one S3 identity and one Kafka identity per
service, each able to reach exactly its prefixes and topics, and every client pointed at TLS.

Offline: the MinIO policy documents are read from the rendered ConfigMap the S3 setup Job applies
(deploy/base/security/), the Kafka ACLs from the rendered KafkaUsers Strimzi's User Operator applies
(generated from deploy/base/security/kafka-acls.tsv and the components' tables by
deploy/tools/gen_strimzi.py), tied to the identities through the Secrets each workload reads, and
evaluated here with a small IAM-style evaluator (explicit Deny wins, otherwise an Allow whose action,
resource and conditions all match) and an ACL matcher (literal or prefixed patterns; Read and Write
imply Describe, as in Kafka).

deploy/components/backfill (the pairs archiver and the rescore Job) is checked on prod with the component
enabled (conftest.backfill_prod): each has its own identities with exactly the access its code uses (its
real S3 calls recorded over an in-memory store), and the live services still cannot reach archive/.
The S3 setup Job's script is also run with bash against a stubbed mc.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import re

import pytest

from tests.deploy.test_rendered import (
    KAFKA_CA_SECRET,
    KAFKA_CLUSTER,
    by_kind,
    configmap_data,
    container_env,
    containers,
    env_value,
    get,
    get_container,
    pod_spec,
    service_of,
    workload,
    workloads,
)

SERVICES = ("labeler", "refscore", "trainer")
S3_SERVICES = ("refscore", "trainer")  # the labeler never touches object storage
# deploy/components/backfill: workload -> its identity (MinIO user / Kafka principal offdpo-<identity>)
BACKFILL = {"offdpo-pairs-archiver": "archiver", "offdpo-rescore": "rescore"}
# What offdpo.s3.ObjectStore sends for each method the services call, as S3 policy actions.
S3_ACTIONS = {
    "ensure_bucket": "s3:HeadBucket",  # bucket_exists (MinIO checks s3:HeadBucket, then s3:ListBucket)
    "list_keys": "s3:ListBucket",
    "get_bytes": "s3:GetObject",  # stat_object (HEAD) and get_object
    "exists": "s3:GetObject",
    "put_bytes": "s3:PutObject",  # single and multipart uploads
    "delete": "s3:DeleteObject",
}
KNOWN_S3_ACTIONS = set(S3_ACTIONS.values()) | {"s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}


# -- rendered objects ---------------------------------------------------------------------------------
def _configmap_object(objs, prefix: str) -> dict:
    found = [c for c in by_kind(objs, "ConfigMap") if re.fullmatch(rf"{prefix}(-[a-z0-9]+)?", c["metadata"]["name"])]
    assert len(found) == 1, f"one ConfigMap {prefix}, found {[c['metadata']['name'] for c in found]}"
    return found[0]


def _configmap(objs, prefix: str) -> dict[str, str]:
    """A generated ConfigMap's data (its name carries kustomize's hash suffix)."""
    return _configmap_object(objs, prefix)["data"]


def _configmap_name(objs, prefix: str) -> str:
    return _configmap_object(objs, prefix)["metadata"]["name"]


def _service_containers(objs) -> list[tuple[dict, dict, str]]:
    """The live services' containers (the backfill component's workloads have identities of their own)."""
    return [
        (w, c, svc)
        for w in workloads(objs)
        if w["metadata"]["name"] not in BACKFILL
        for c in containers(w, init=False)
        if (svc := service_of(c))
    ]


def _secret_ref(objs, c, var: str) -> str | None:
    src = container_env(objs, c).get(var)
    if src is None:
        return None
    ref = src.get("valueFrom", {}).get("secretKeyRef")
    assert ref, f"{c['name']}: {var} must come from a Secret"
    return ref["name"]


def _volume_for(w, c, path: str) -> dict | None:
    """The volume mounted (read-only) at the directory holding `path` in container c."""
    volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
    mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return None
    m = max(mounts, key=lambda m: len(m["mountPath"]))  # the innermost mount holds the file
    assert m.get("readOnly") is True, f"{m['mountPath']} must be mounted read-only"
    return volumes[m["name"]]


def _script(c) -> str:
    return "\n".join(c.get("args", []))


# -- a small IAM policy evaluator (the subset MinIO policies use here) ---------------------------------
def _matches(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value, pattern)  # '*' and '?' as in IAM (no '[' in our documents)


def _conditions_hold(cond: dict, context: dict[str, str]) -> bool:
    for operator, tests in cond.items():
        for key, wanted in tests.items():
            wanted = [wanted] if isinstance(wanted, str) else wanted
            if operator == "Null":  # "true": the request does not carry the key; "false": it does
                if (key not in context) != (wanted == ["true"]):
                    return False
                continue
            if key not in context:
                return False  # IAM: a condition on a key the request does not carry does not match
            if operator == "StringLike":
                ok = any(_matches(w, context[key]) for w in wanted)
            elif operator == "StringEquals":
                ok = context[key] in wanted
            else:
                pytest.fail(f"condition operator {operator} not understood by this evaluator: extend it")
            if not ok:
                return False
    return True


def s3_allowed(policy: dict, action: str, bucket: str, key: str | None = None, prefix: str | None = None) -> bool:
    """Would MinIO allow `action` on bucket (key) for a user with only this policy?"""
    resource = f"arn:aws:s3:::{bucket}" + (f"/{key}" if key is not None else "")
    context = {"s3:prefix": prefix} if prefix is not None else {}
    verdict = False
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if not any(_matches(a, action) for a in actions) or not any(_matches(r, resource) for r in resources):
            continue
        if not _conditions_hold(st.get("Condition", {}), context):
            continue
        if st["Effect"] == "Deny":
            return False
        verdict = verdict or st["Effect"] == "Allow"
    return verdict


# -- a Kafka ACL matcher ----------------------------------------------------------------------------------
def parse_acls(objs) -> list[dict]:
    """Every ACL of the rendered KafkaUsers (what Strimzi's User Operator applies), one row per
    operation, pattern types in kafka-acls.sh's words (Strimzi's `prefix` is `prefixed`)."""
    rows = []
    for user in by_kind(objs, "KafkaUser"):
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == KAFKA_CLUSTER, user["metadata"]["name"]
        authz = user["spec"]["authorization"]
        assert authz["type"] == "simple"
        for acl in authz["acls"]:
            assert acl.get("type", "allow") == "allow" and acl.get("host", "*") == "*", acl
            res = acl["resource"]
            pattern = {"literal": "literal", "prefix": "prefixed"}[res.get("patternType", "literal")]
            for operation in acl["operations"]:
                rows.append(
                    {
                        "principal": user["metadata"]["name"],
                        "operation": operation,
                        "resource": res["type"],
                        "pattern": pattern,
                        "name": res.get("name", "*"),
                    }
                )
    return rows


def table_acls(objs, *tables: str) -> list[dict]:
    """The rows of ACL tables (deploy/<table>), topic variables resolved from the rendered client ConfigMap."""
    from tests.deploy.test_rendered import DEPLOY

    client = _configmap(objs, "offdpo-kafka-client")
    rows = []
    for table in tables:
        for line in (DEPLOY / table).read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            principal, operation, resource, pattern, name = line.split()
            if name.startswith("OFFDPO_"):
                name = client[name]
            rows.append(
                {"principal": principal, "operation": operation, "resource": resource, "pattern": pattern, "name": name}
            )
    return rows


def kafka_allowed(acls: list[dict], principal: str, operation: str, resource: str, name: str) -> bool:
    implied = {"Describe": {"Describe", "Read", "Write"}}.get(operation, {operation})
    for a in acls:
        if a["principal"] != principal or a["resource"] != resource or a["operation"] not in implied:
            continue
        if a["pattern"] == "literal" and a["name"] == name:
            return True
        if a["pattern"] == "prefixed" and name.startswith(a["name"]):
            return True
    return False


# -- identities -----------------------------------------------------------------------------------------------
def _identities(objs) -> dict[str, dict[str, set[str]]]:
    """service -> {'s3': Secrets of its S3 keys, 'kafka': Secrets of its SASL user} over all its pods."""
    out: dict[str, dict[str, set[str]]] = {svc: {"s3": set(), "kafka": set()} for svc in SERVICES}
    for _, c, svc in _service_containers(objs):
        for var in ("OFFDPO_S3_ACCESS_KEY", "OFFDPO_S3_SECRET_KEY"):
            if (name := _secret_ref(objs, c, var)) is not None:
                out[svc]["s3"].add(name)
        if (name := _secret_ref(objs, c, "OFFDPO_KAFKA_SASL_PASSWORD")) is not None:
            out[svc]["kafka"].add(name)
            # the user name is the KafkaUser whose Secret holds the password
            assert env_value(objs, c, "OFFDPO_KAFKA_SASL_USERNAME") == name, (c["name"], name)
            ref = container_env(objs, c)["OFFDPO_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == "password", "the key Strimzi's User Operator writes"
    return out


def test_each_service_has_its_own_identities_and_the_labeler_no_s3_one(rendered):
    _, objs = rendered
    ids = _identities(objs)
    for svc in SERVICES:
        assert ids[svc]["kafka"] == {f"offdpo-{svc}"}, (svc, ids[svc])
        assert ids[svc]["s3"] == ({f"offdpo-s3-{svc}"} if svc in S3_SERVICES else set()), (svc, ids[svc])
    users = {u["metadata"]["name"] for u in by_kind(objs, "KafkaUser")}
    assert {f"offdpo-{svc}" for svc in SERVICES} <= users
    # no workload of the pipeline holds MinIO's root credentials or another identity's Kafka password
    for w in workloads(objs):
        for c in containers(w):
            refs = {
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            }
            if w["metadata"]["name"] not in ("offdpo-ensure-bucket", "offdpo-minio"):
                assert "offdpo-minio-root" not in refs, f"{w['metadata']['name']} holds MinIO's root credentials"
            svc = service_of(c)
            if svc:
                assert not (refs & users) - {f"offdpo-{svc}"}, f"{w['metadata']['name']} holds another Kafka identity"
    # the labeler's pods cannot even reach MinIO (network policy label)
    for w in workloads(objs):
        if w["metadata"]["name"].startswith("offdpo-labeler"):
            assert w["spec"]["template"]["metadata"]["labels"].get("offdpo.io/s3-client") != "true"


def test_dev_s3_secrets_are_one_user_per_service(overlays):
    """(prod's Secrets are created out of band; Kafka's are Strimzi's in both overlays: none rendered)"""
    objs = overlays["dev"]
    assert not [s for s in by_kind(objs, "Secret") if s["metadata"]["name"].startswith("offdpo-kafka")]
    keys = {base64.b64decode(get(objs, "Secret", f"offdpo-s3-{svc}")["data"]["access-key"]) for svc in S3_SERVICES}
    root = base64.b64decode(get(objs, "Secret", "offdpo-minio-root")["data"]["root-user"])
    assert len(keys) == len(S3_SERVICES) and root not in keys, "each service its own MinIO user, none the root"


# -- S3: policies ---------------------------------------------------------------------------------------------
def _s3_setup(objs):
    job = get(objs, "Job", "offdpo-ensure-bucket")
    return job, get_container(job, "s3-setup")


def _policies(objs) -> dict[str, dict]:
    """identity -> its policy document (MinIO's IAM dialect): one per document <identity>.json of the
    offdpo-s3-policies ConfigMap (base; a component adds its own). Where MinIO's setup Job is rendered
    (components/s3-minio), it attaches exactly these documents, one user each: checked here too."""
    docs = _configmap(objs, "offdpo-s3-policies")
    if not [j for j in by_kind(objs, "Job") if j["metadata"]["name"] == "offdpo-ensure-bucket"]:
        return {f.removesuffix(".json"): json.loads(d) for f, d in docs.items()}
    job, c = _s3_setup(objs)
    script = _script(c)
    assert "for policy in /etc/offdpo/s3-policies/*.json; do" in script
    assert 'svc="${policy##*/}"; svc="${svc%.json}"' in script
    vol = _volume_for(job, c, "/etc/offdpo/s3-policies/x.json")
    assert vol and "configMap" in vol and "items" not in vol["configMap"], "every document of the generated ConfigMap"
    assert vol["configMap"]["name"] == _configmap_name(objs, "offdpo-s3-policies")
    assert '$mc admin policy create offdpo "offdpo-$svc" "$policy"' in script
    assert '$mc admin user add offdpo "${!key_var}" "${!secret_var}"' in script
    assert '$mc admin policy attach offdpo "offdpo-$svc" --user "${!key_var}"' in script
    env = container_env(objs, c)
    out = {}
    for filename, doc in docs.items():
        svc = filename.removesuffix(".json")
        assert filename.endswith(".json") and re.fullmatch(r"[a-z]+", svc), filename
        # the user the Job creates is the one the identity's pods authenticate as
        for var in (f"S3_ACCESS_KEY_{svc.upper()}", f"S3_SECRET_KEY_{svc.upper()}"):
            assert var in env, f"the S3 setup Job has no {var} for the policy {filename}"
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == f"offdpo-s3-{svc}", var
        out[svc] = json.loads(doc)
    keys = {n.removeprefix("S3_ACCESS_KEY_").lower() for n in env if n.startswith("S3_ACCESS_KEY_")}
    assert keys == set(out), f"S3 keys in the setup Job without a policy: {keys - set(out)}"
    return out


def test_the_setup_job_gives_exactly_the_s3_services_a_policy(rendered):
    _, objs = rendered
    policies = _policies(objs)
    assert set(policies) == set(S3_SERVICES)
    assert set(_configmap(objs, "offdpo-s3-policies")) == {f"{s}.json" for s in S3_SERVICES}
    bucket = configmap_data(
        objs,
        next(
            c["metadata"]["name"]
            for c in by_kind(objs, "ConfigMap")
            if c["metadata"]["name"].startswith("offdpo-s3-client")
        ),
    )["OFFDPO_S3_BUCKET"]
    for svc, policy in policies.items():
        for st in policy["Statement"]:
            actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
            assert set(actions) <= KNOWN_S3_ACTIONS, f"{svc}: unexpected or wildcard actions {actions}"
            for r in [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]:
                assert r == f"arn:aws:s3:::{bucket}" or r.startswith(f"arn:aws:s3:::{bucket}/"), (svc, r)
                assert r != f"arn:aws:s3:::{bucket}/*", f"{svc}: the whole bucket"
            assert "Principal" not in st, "identity policies name no principal"


# (service, ObjectStore method, key or list prefix, allowed?)
S3_MATRIX = [
    # refscore: writes shards under scores/, lists and reads them to skip shards written before a crash
    ("refscore", "ensure_bucket", None, True),
    ("refscore", "put_bytes", "scores/fp/offdpo.pairs.v1/id-x/p0000-0-9.parquet", True),
    ("refscore", "get_bytes", "scores/fp/offdpo.pairs.v1/id-x/p0000-0-9.parquet", True),
    ("refscore", "list_keys", "scores/fp/offdpo.pairs.v1/id-x/p0000-000000000000-", True),
    ("refscore", "get_bytes", "runs/r/latest", False),
    ("refscore", "put_bytes", "runs/r/latest", False),
    ("refscore", "put_bytes", "runs/r/checkpoints/step-1/model/model.safetensors", False),
    ("refscore", "list_keys", "runs/", False),
    ("refscore", "list_keys", "", False),
    ("refscore", "delete", "scores/fp/x.parquet", False),
    ("refscore", "put_bytes", "scores-elsewhere/x", False),
    ("refscore", "put_bytes", "x", False),
    # trainer: reads shards, writes and reads its checkpoints and metrics under runs/
    ("trainer", "ensure_bucket", None, True),
    ("trainer", "list_keys", "scores/", True),
    ("trainer", "get_bytes", "scores/fp/offdpo.pairs.v1/id-x/p0000-0-9.parquet", True),
    ("trainer", "exists", "runs/r/latest", True),
    ("trainer", "get_bytes", "runs/r/latest", True),
    ("trainer", "put_bytes", "runs/r/latest", True),
    ("trainer", "put_bytes", "runs/r/checkpoints/step-1/optimizer.safetensors", True),
    ("trainer", "list_keys", "runs/r/checkpoints/step-1", True),
    ("trainer", "put_bytes", "scores/fp/offdpo.pairs.v1/id-x/p0000-0-9.parquet", False),
    ("trainer", "delete", "scores/fp/x.parquet", False),
    ("trainer", "delete", "runs/r/latest", False),
    ("trainer", "list_keys", "", False),
    ("trainer", "put_bytes", "x", False),
]


def _s3_request(policy, method: str, bucket: str, arg: str | None) -> bool:
    action = S3_ACTIONS[method]
    if method == "ensure_bucket":
        return s3_allowed(policy, action, bucket)
    if method == "list_keys":
        return s3_allowed(policy, action, bucket, prefix=arg)
    return s3_allowed(policy, action, bucket, key=arg)


@pytest.mark.parametrize("svc,method,arg,allowed", S3_MATRIX)
def test_each_s3_identity_reaches_only_its_prefixes(overlays, svc, method, arg, allowed):
    for name, objs in overlays.items():
        policy = _policies(objs)[svc]
        bucket = _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_BUCKET"]
        assert _s3_request(policy, method, bucket, arg) is allowed, f"{name}: {svc} {method}({arg!r})"
        # another bucket is never reachable
        assert not _s3_request(policy, method, bucket + "-other", arg), f"{name}: {svc} {method} on another bucket"


def test_refscores_real_shard_keys_are_within_its_policy(overlays):
    """The keys and list prefixes the stream worker builds (offdpo.records), not hand-written ones."""
    from offdpo import records

    fp = "a" * 16
    put = records.shard_key(fp, "offdpo.pairs.v1", 3, 100, 163, topic_id="AAAAAAAAAAAAAAAAAAAAAA")
    listed = records.shard_key_prefix(fp, "offdpo.pairs.v1", 3, 100, topic_id="AAAAAAAAAAAAAAAAAAAAAA")
    for name, objs in overlays.items():
        policy, bucket = _policies(objs)["refscore"], _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_BUCKET"]
        calls = [("ensure_bucket", None), ("put_bytes", put), ("list_keys", listed), ("get_bytes", put)]
        for method, arg in calls:
            assert _s3_request(policy, method, bucket, arg), f"{name}: refscore {method}({arg!r}) would be denied"


_RECORDED = {
    "ensure_bucket": "ensure_bucket",
    "put": "put_bytes",
    "get": "get_bytes",
    "stat": "exists",
    "list": "list_keys",
}


def test_the_trainers_real_s3_calls_are_within_its_policy(overlays, tiny_model, tmp_path, monkeypatch):
    """A replay run with checkpoints, then a resumed run, over a store that records every call the
    trainer makes: each is allowed by the trainer's rendered policy, and it wrote only under runs/."""
    from services.trainer import train
    from services.trainer.config import TrainerConfig
    from tests.fakes import FakeObjectStore
    from tests.trainer.conftest import reference_fingerprint, scored_pairs, synthetic_tokens, upload_shards

    objs = overlays["prod"]
    policy, bucket = _policies(objs)["trainer"], _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_BUCKET"]
    store = FakeObjectStore(bucket=bucket)
    monkeypatch.setattr(train, "ObjectStore", lambda cfg: store)
    fp = reference_fingerprint(tiny_model)
    upload_shards(store, scored_pairs(tiny_model, synthetic_tokens(16, seed=5), fp), fp, "lp", per_shard=8)
    store.calls.clear()  # the shards above stand for refscore's; from here on every call is the trainer's
    base = dict(
        model=str(tiny_model),
        run_name="least-privilege",
        prefix=_configmap(objs, "offdpo-trainer")["OFFDPO_TRAINER_PREFIX"],
        log_dir=str(tmp_path / "runs"),
        progress=False,
        global_batch_size=8,
        micro_batch_size=4,
        save_every=1,
        resume=True,
    )
    train.run(TrainerConfig(**base, max_steps=1))
    train.run(TrainerConfig(**base, max_steps=2))  # resumes from runs/<run>/latest
    ops = {op for op, _ in store.calls}
    assert {"put", "get", "list"} <= ops, store.calls
    assert ("get", "runs/least-privilege/latest") in store.calls, "the second run resumed from the first"
    for op, key in store.calls:
        assert op in _RECORDED, f"an object-store call this test does not map to an action: {op}"
        method = _RECORDED[op]
        assert _s3_request(policy, method, bucket, None if method == "ensure_bucket" else key), (
            f"the trainer's {method}({key!r}) would be denied by its policy"
        )
        if op == "put":
            assert key.startswith("runs/"), key


def test_the_evaluator_denies_and_conditions_as_iam_does():
    policy = {
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::b/*", "arn:aws:s3:::b"]},
            {"Effect": "Deny", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::b/locked/*"]},
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": ["arn:aws:s3:::c"],
                "Condition": {"StringLike": {"s3:prefix": ["a/*"]}},
            },
        ]
    }
    assert s3_allowed(policy, "s3:PutObject", "b", key="open/x")
    assert not s3_allowed(policy, "s3:PutObject", "b", key="locked/x")
    assert s3_allowed(policy, "s3:ListBucket", "c", prefix="a/")
    assert not s3_allowed(policy, "s3:ListBucket", "c", prefix="b/")
    assert not s3_allowed(policy, "s3:ListBucket", "c")  # no prefix in the request: the condition fails
    assert not s3_allowed(policy, "s3:GetObject", "c", key="a/x")
    assert kafka_allowed(
        [{"principal": "p", "operation": "Read", "resource": "group", "pattern": "prefixed", "name": "g-"}],
        "p",
        "Describe",
        "group",
        "g-1",
    )


# -- Kafka: users and ACLs --------------------------------------------------------------------------------------
def _configured_groups(objs) -> dict[str, str]:
    groups = {}
    for _, c, svc in _service_containers(objs):
        env = container_env(objs, c)
        if svc == "labeler":
            groups[svc] = env_value(objs, c, "OFFDPO_LABELER_GROUP")
        elif svc == "refscore":
            groups[svc] = env_value(objs, c, "OFFDPO_REFSCORE_GROUP")
        else:
            explicit = (
                env_value(objs, c, "OFFDPO_TRAINER_CONSUMER_GROUP") if "OFFDPO_TRAINER_CONSUMER_GROUP" in env else ""
            )
            groups[svc] = explicit or f"offdpo-trainer-{env_value(objs, c, 'OFFDPO_TRAINER_RUN_NAME')}"
    return groups


def test_one_scram_kafka_user_per_service_with_exactly_its_table(rendered):
    _, objs = rendered
    _check_kafka_users(objs, SERVICES)
    assert sorted(map(_acl_key, parse_acls(objs))) == sorted(
        map(_acl_key, table_acls(objs, "base/security/kafka-acls.tsv"))
    ), "the rendered KafkaUsers are the table (deploy/tools/gen_strimzi.py)"


def _acl_key(a: dict) -> tuple:
    return (a["principal"], a["operation"], a["resource"], a["pattern"], a["name"])


def _check_kafka_users(objs, identities) -> None:
    """One KafkaUser per identity (SCRAM-SHA-512, in the cluster), each the principal of its ACLs and
    the Secret (written by Strimzi) its workload reads."""
    users = {u["metadata"]["name"]: u for u in by_kind(objs, "KafkaUser")}
    assert set(users) == {f"offdpo-{i}" for i in identities}, sorted(users)
    for name, user in users.items():
        assert user["spec"]["authentication"] == {"type": "scram-sha-512"}, name
        assert "password" not in user["spec"]["authentication"], "Strimzi generates the password"
    assert {a["principal"] for a in parse_acls(objs)} == set(users)


def test_the_brokers_deny_what_no_acl_allows(rendered):
    _, objs = rendered
    (kafka,) = by_kind(objs, "Kafka")
    spec = kafka["spec"]["kafka"]
    assert spec["authorization"]["type"] == "simple" and not spec["authorization"].get("superUsers")
    assert str(spec["config"].get("allow.everyone.if.no.acl.found", "false")).lower() == "false"
    for listener in spec["listeners"]:
        assert listener["tls"] is True and listener["authentication"]["type"] == "scram-sha-512", listener
    principals = {a["principal"] for a in parse_acls(objs)}
    assert principals == {f"offdpo-{s}" for s in SERVICES}, "ACLs only for the services; components add theirs"


def _kafka_matrix(objs):
    client = _configmap(objs, "offdpo-kafka-client")
    t = {k: client[f"OFFDPO_TOPIC_{k.upper()}"] for k in ("candidates", "pairs", "shards", "deadletter")}
    groups = _configured_groups(objs)
    yes = {
        "labeler": [
            ("Read", "topic", t["candidates"]),
            ("Read", "group", groups["labeler"]),
            ("Write", "topic", t["pairs"]),
        ],
        "refscore": [
            ("Read", "topic", t["pairs"]),
            ("Read", "group", groups["refscore"]),
            ("Write", "topic", t["shards"]),
            ("Describe", "topic", t["pairs"]),
        ],  # end offsets for the lag metric
        "trainer": [("Read", "topic", t["shards"]), ("Read", "group", groups["trainer"])],
    }
    for svc in SERVICES:
        yes[svc].append(("Write", "topic", t["deadletter"]))
    no = {
        "labeler": [
            ("Write", "topic", t["shards"]),
            ("Read", "topic", t["pairs"]),
            ("Read", "topic", t["shards"]),
            ("Write", "topic", t["candidates"]),
            ("Read", "group", groups["refscore"]),
            ("Read", "topic", t["deadletter"]),
        ],
        "refscore": [
            ("Write", "topic", t["pairs"]),
            ("Read", "topic", t["candidates"]),
            ("Read", "topic", t["shards"]),
            ("Read", "group", groups["trainer"]),
            ("Read", "topic", t["deadletter"]),
        ],
        "trainer": [
            ("Write", "topic", t["shards"]),
            ("Write", "topic", t["pairs"]),
            ("Read", "topic", t["pairs"]),
            ("Read", "group", groups["refscore"]),
            ("Read", "topic", t["deadletter"]),
        ],
    }
    for svc in SERVICES:
        no[svc] += [
            ("Delete", "topic", t["pairs"]),
            ("Alter", "topic", t["shards"]),
            ("Create", "topic", t["pairs"]),
            ("Read", "group", "another-teams-group"),
        ]
    return yes, no


def test_each_kafka_identity_reaches_only_its_topics_and_group(rendered):
    name, objs = rendered
    acls = parse_acls(objs)
    for a in acls:
        assert a["name"] not in ("*", "") and a["resource"] in ("topic", "group"), a
        assert a["operation"] in ("Read", "Write"), a
        assert a["pattern"] in ("literal", "prefixed"), a
    yes, no = _kafka_matrix(objs)
    for svc in SERVICES:
        principal = f"offdpo-{svc}"
        for op, res, target in yes[svc]:
            assert kafka_allowed(acls, principal, op, res, target), f"{name}: {svc} cannot {op} {res} {target}"
        for op, res, target in no[svc]:
            assert not kafka_allowed(acls, principal, op, res, target), f"{name}: {svc} may {op} {res} {target}"
        assert not any(a["resource"] == "cluster" for a in acls)


# -- TLS everywhere --------------------------------------------------------------------------------------------
def _kafka_clients(objs):
    for w in workloads(objs):
        for c in containers(w, init=False):
            if "OFFDPO_KAFKA_SECURITY_PROTOCOL" in container_env(objs, c):
                yield w, c


def _s3_clients(objs):
    for w in workloads(objs):
        for c in containers(w, init=False):
            if "OFFDPO_S3_SECURE" in container_env(objs, c):
                yield w, c


def test_every_client_authenticates_and_prod_clients_use_tls(rendered):
    name, objs = rendered
    _check_clients_tls(name, objs)


def _check_clients_tls(name: str, objs) -> None:
    kafka_clients = list(_kafka_clients(objs))
    assert {service_of(c) for _, c in kafka_clients} >= set(SERVICES)
    for w, c in kafka_clients:
        what = f"{w['metadata']['name']}/{c['name']}"
        protocol = env_value(objs, c, "OFFDPO_KAFKA_SECURITY_PROTOCOL")
        assert protocol.startswith("SASL_"), f"{what}: every Kafka client authenticates ({protocol})"
        assert env_value(objs, c, "OFFDPO_KAFKA_SASL_MECHANISM") == "SCRAM-SHA-512"
        # Strimzi's listener is TLS in every overlay (it issues the certificates itself)
        assert protocol == "SASL_SSL", what
        ca = env_value(objs, c, "OFFDPO_KAFKA_SSL_CAFILE")
        vol = _volume_for(w, c, ca)
        assert vol and vol.get("secret", {}).get("secretName") == KAFKA_CA_SECRET, (
            f"{what}: CA {ca} from Strimzi's {KAFKA_CA_SECRET} Secret"
        )
    s3_clients = list(_s3_clients(objs))
    assert {service_of(c) for _, c in s3_clients if service_of(c)} == set(S3_SERVICES)
    if [j for j in by_kind(objs, "Job") if j["metadata"]["name"] == "offdpo-ensure-bucket"]:
        assert any(c["name"] == "s3-setup" for _, c in s3_clients)
    for w, c in s3_clients:
        what = f"{w['metadata']['name']}/{c['name']}"
        secure = env_value(objs, c, "OFFDPO_S3_SECURE") == "true"
        ca = env_value(objs, c, "OFFDPO_S3_CA_FILE")
        if name == "prod":
            assert secure, f"{what}: S3 over HTTPS"
        if secure and ca:
            vol = _volume_for(w, c, ca)
            assert vol and vol.get("secret", {}).get("secretName") == "offdpo-ca", (
                f"{what}: CA {ca} from the offdpo-ca Secret"
            )
        elif secure:  # the system CAs: only for an external S3 (an in-cluster one has the deployment's CA)
            assert not [w for w in workloads(objs) if w["metadata"]["name"] in ("offdpo-minio", "offdpo-seaweedfs")]
        else:
            assert name == "dev" and not ca, f"{what}: plain HTTP only in dev, explicitly"


def test_prod_servers_serve_tls_from_secrets(combos):
    objs = combos["prod+s3-minio"]
    (kafka,) = by_kind(objs, "Kafka")
    assert all(listener["tls"] is True for listener in kafka["spec"]["kafka"]["listeners"])
    minio = get(objs, "StatefulSet", "offdpo-minio")
    mc = get_container(minio, "minio")
    certs_dir = mc["args"][mc["args"].index("--certs-dir") + 1]
    vol = _volume_for(minio, mc, f"{certs_dir}/public.crt")
    assert vol["secret"]["secretName"] == "offdpo-minio-tls"
    assert {i["path"] for i in vol["secret"]["items"]} >= {"public.crt", "private.key"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert mc[probe]["httpGet"]["scheme"] == "HTTPS"
    assert all(not a.startswith("http://") for a in mc["args"]), "distributed MinIO nodes talk HTTPS"
    assert not by_kind(objs, "Secret"), "prod creates every Secret out of band"


# -- deploy/components/backfill: the pairs archiver and the rescore Job ----------------------------------------
# Rendered as an operator enables it (the prod overlay plus the component: conftest.backfill_prod). Each
# workload has its own MinIO user and Kafka SCRAM user with exactly the access its code uses:
#   archiver (offdpo/archive.py): Kafka: read the pairs topic in its own group; S3: HeadBucket, list
#     archive/pairs/<topic>/.../pNNNN-<first>- (ranges already written), put archive/pairs/... objects.
#   rescore (services/refscore/backfill.py): S3: HeadBucket, list + read the source (scores/<old fp>/ or
#     archive/pairs/), stat/read/put scores/<new fp>/..., stat/put the markers backfill/<fp>/announced/...;
#     Kafka: write ShardReady events (no consumer group: it reads S3).
BACKFILL_IDS = tuple(BACKFILL.values())


def test_backfill_workloads_hold_their_own_identities_only(backfill_prod):
    objs = backfill_prod
    for name, identity in BACKFILL.items():
        w = workload(objs, name)
        spec = pod_spec(w)
        assert spec["serviceAccountName"] == f"offdpo-{name.removeprefix('offdpo-')}", "a ServiceAccount of its own"
        sa = get(objs, "ServiceAccount", spec["serviceAccountName"])
        assert sa["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False
        (c,) = containers(w)
        secrets = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert secrets == {
            "OFFDPO_S3_ACCESS_KEY": f"offdpo-s3-{identity}",
            "OFFDPO_S3_SECRET_KEY": f"offdpo-s3-{identity}",
            "OFFDPO_KAFKA_SASL_PASSWORD": f"offdpo-{identity}",
        }, f"{name}: its own S3 and Kafka identities and no other Secret"
        assert env_value(objs, c, "OFFDPO_KAFKA_SASL_USERNAME") == f"offdpo-{identity}"
        # the server-side Secrets of refscore stay with refscore: the backfill serves no gRPC
        mounted = {v.get("secret", {}).get("secretName") for v in spec.get("volumes", [])} - {None}
        assert mounted == {"offdpo-ca", KAFKA_CA_SECRET}, f"{name} mounts {mounted}"
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert labels.get("offdpo.io/kafka-client") == "true" and labels.get("offdpo.io/s3-client") == "true"
    # nothing uses the shared credential of before, and the live services keep theirs
    for w in workloads(objs):
        for c in containers(w):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                assert not ref or ref["name"] != "offdpo-s3", f"{w['metadata']['name']}: the shared offdpo-s3 Secret"
    ids = _identities(objs)
    for svc in SERVICES:
        assert ids[svc]["kafka"] == {f"offdpo-{svc}"}, (svc, ids[svc])
        assert ids[svc]["s3"] == ({f"offdpo-s3-{svc}"} if svc in S3_SERVICES else set()), (svc, ids[svc])
    # the archiver's consumer group is the one its ACL names
    archiver = get_container(workload(objs, "offdpo-pairs-archiver"), "pairs-archiver")
    assert env_value(objs, archiver, "OFFDPO_ARCHIVE_GROUP") == "offdpo-archiver"


def test_the_backfill_identities_exist_only_with_the_component(backfill_prod, overlays):
    objs = backfill_prod
    policies = _policies(objs)
    assert set(policies) == set(S3_SERVICES) | set(BACKFILL_IDS)
    _check_kafka_users(objs, SERVICES + BACKFILL_IDS)
    assert sorted(map(_acl_key, parse_acls(objs))) == sorted(
        map(_acl_key, table_acls(objs, "base/security/kafka-acls.tsv", "components/backfill/security/kafka-acls.tsv"))
    )
    # the live services' documents are the same with or without the component
    backfill_principals = {f"offdpo-{i}" for i in BACKFILL_IDS}
    live_acls = [a for a in parse_acls(objs) if a["principal"] not in backfill_principals]
    assert live_acls == parse_acls(overlays["prod"])
    for name, base in overlays.items():
        assert _policies(base) == {k: policies[k] for k in S3_SERVICES}, name
        assert not backfill_principals & {a["principal"] for a in parse_acls(base)}, name
    bucket = _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_BUCKET"]
    for identity in BACKFILL_IDS:
        for st in policies[identity]["Statement"]:
            assert st["Effect"] == "Allow" and "Principal" not in st
            assert set(st["Action"]) <= KNOWN_S3_ACTIONS, (identity, st["Action"])
            for r in st["Resource"]:
                assert r == f"arn:aws:s3:::{bucket}" or r.startswith(f"arn:aws:s3:::{bucket}/"), (identity, r)
                assert r != f"arn:aws:s3:::{bucket}/*", f"{identity}: the whole bucket"


def test_backfill_clients_authenticate_over_tls(backfill_prod):
    _check_clients_tls("prod", backfill_prod)
    kafka = {w["metadata"]["name"] for w, _ in _kafka_clients(backfill_prod)}
    s3 = {w["metadata"]["name"] for w, _ in _s3_clients(backfill_prod)}
    assert set(BACKFILL) <= kafka and set(BACKFILL) <= s3


_SHARD = "scores/fpnew/offdpo.pairs.v1/id-AAAA/p0003-000000000100-000000000163.parquet"
_OLD_SHARD = "scores/fpold/offdpo.pairs.v1/id-AAAA/p0003-000000000100-000000000163.parquet"
_ARCHIVED = "archive/pairs/offdpo.pairs.v1/id-AAAA/p0003-000000000100-000000000163.parquet"
_MARKER = "backfill/fpnew/announced/offdpo.pairs.v1/id-AAAA/p0003-000000000100-000000000163.parquet"
# (identity, ObjectStore method, key or list prefix, allowed?)
BACKFILL_S3_MATRIX = [
    ("archiver", "ensure_bucket", None, True),
    ("archiver", "list_keys", "archive/pairs/offdpo.pairs.v1/id-AAAA/p0003-000000000100-", True),
    ("archiver", "put_bytes", _ARCHIVED, True),
    ("archiver", "get_bytes", _ARCHIVED, False),  # it never reads the archive back
    ("archiver", "delete", _ARCHIVED, False),
    ("archiver", "list_keys", "archive/", False),
    ("archiver", "put_bytes", "archive/other/x", False),
    ("archiver", "put_bytes", _SHARD, False),
    ("archiver", "get_bytes", _OLD_SHARD, False),
    ("archiver", "list_keys", "scores/", False),
    ("archiver", "put_bytes", _MARKER, False),
    ("archiver", "get_bytes", "runs/r/latest", False),
    ("archiver", "list_keys", "", False),
    ("rescore", "ensure_bucket", None, True),
    ("rescore", "list_keys", "scores/fpold/", True),
    ("rescore", "list_keys", "archive/pairs/", True),
    ("rescore", "list_keys", "archive/pairs/offdpo.pairs.v1/", True),
    ("rescore", "get_bytes", _OLD_SHARD, True),
    ("rescore", "get_bytes", _ARCHIVED, True),
    ("rescore", "exists", _SHARD, True),
    ("rescore", "get_bytes", _SHARD, True),
    ("rescore", "put_bytes", _SHARD, True),
    ("rescore", "exists", _MARKER, True),
    ("rescore", "put_bytes", _MARKER, True),
    ("rescore", "put_bytes", _ARCHIVED, False),  # the archive is the archiver's
    ("rescore", "delete", _ARCHIVED, False),
    ("rescore", "delete", _OLD_SHARD, False),
    ("rescore", "list_keys", "backfill/", False),
    ("rescore", "list_keys", "", False),
    ("rescore", "get_bytes", "runs/r/latest", False),
    ("rescore", "put_bytes", "runs/r/latest", False),
    ("rescore", "list_keys", "runs/", False),
    ("rescore", "put_bytes", "x", False),
    # the live services' identities cannot touch the archive or the backfill's markers
    *[
        (svc, method, key, False)
        for svc in S3_SERVICES
        for method, key in [
            ("list_keys", "archive/"),
            ("list_keys", "archive/pairs/offdpo.pairs.v1/"),
            ("get_bytes", _ARCHIVED),
            ("exists", _ARCHIVED),
            ("put_bytes", _ARCHIVED),
            ("delete", _ARCHIVED),
            ("get_bytes", _MARKER),
            ("put_bytes", _MARKER),
        ]
    ],
]


@pytest.mark.parametrize("identity,method,arg,allowed", BACKFILL_S3_MATRIX)
def test_each_backfill_s3_identity_reaches_only_its_prefixes(backfill_prod, overlays, identity, method, arg, allowed):
    renders = {"prod+backfill": backfill_prod}
    if identity in S3_SERVICES:
        renders.update(overlays)  # without the component too
    for name, objs in renders.items():
        policy = _policies(objs)[identity]
        bucket = _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_BUCKET"]
        assert _s3_request(policy, method, bucket, arg) is allowed, f"{name}: {identity} {method}({arg!r})"
        assert not _s3_request(policy, method, bucket + "-other", arg), f"{name}: {identity} on another bucket"


def test_each_backfill_kafka_identity_reaches_only_its_topics(backfill_prod):
    objs = backfill_prod
    acls = parse_acls(objs)
    for a in acls:
        assert a["operation"] in ("Read", "Write") and a["resource"] in ("topic", "group"), a
        assert a["pattern"] in ("literal", "prefixed") and a["name"] not in ("*", ""), a
    client = _configmap(objs, "offdpo-kafka-client")
    t = {k: client[f"OFFDPO_TOPIC_{k.upper()}"] for k in ("candidates", "pairs", "shards", "deadletter")}
    archiver = get_container(workload(objs, "offdpo-pairs-archiver"), "pairs-archiver")
    group = env_value(objs, archiver, "OFFDPO_ARCHIVE_GROUP")
    groups = _configured_groups(objs)
    yes = {
        "archiver": [("Read", "topic", t["pairs"]), ("Describe", "topic", t["pairs"]), ("Read", "group", group)],
        "rescore": [("Write", "topic", t["shards"]), ("Describe", "topic", t["shards"])],
    }
    no = {
        "archiver": [
            ("Write", "topic", t["pairs"]),
            ("Write", "topic", t["shards"]),
            ("Write", "topic", t["deadletter"]),
            ("Read", "topic", t["shards"]),
            ("Read", "topic", t["candidates"]),
            ("Read", "group", groups["refscore"]),  # it never takes partitions from refscore's group
            ("Read", "group", groups["trainer"]),
        ],
        "rescore": [
            ("Read", "topic", t["pairs"]),  # it reads S3, not the topic
            ("Read", "topic", t["shards"]),
            ("Write", "topic", t["pairs"]),
            ("Write", "topic", t["deadletter"]),
            ("Read", "group", groups["refscore"]),
            ("Read", "group", group),
            ("Write", "topic", "another-shards-topic"),  # --shards-topic elsewhere is refused
        ],
    }
    for identity in BACKFILL_IDS:
        no[identity] += [
            ("Delete", "topic", t["pairs"]),
            ("Create", "topic", t["shards"]),
            ("Alter", "topic", t["pairs"]),
        ]
        for op, res, target in yes[identity]:
            assert kafka_allowed(acls, f"offdpo-{identity}", op, res, target), f"{identity} cannot {op} {res} {target}"
        for op, res, target in no[identity]:
            assert not kafka_allowed(acls, f"offdpo-{identity}", op, res, target), f"{identity} may {op} {res} {target}"
    # the live services' ACLs still hold with the component: none reaches the archiver's group
    yes_live, no_live = _kafka_matrix(objs)
    for svc in SERVICES:
        for op, res, target in yes_live[svc]:
            assert kafka_allowed(acls, f"offdpo-{svc}", op, res, target), f"{svc} cannot {op} {res} {target}"
        for op, res, target in [*no_live[svc], ("Read", "group", group)]:
            assert not kafka_allowed(acls, f"offdpo-{svc}", op, res, target), f"{svc} may {op} {res} {target}"


# -- the backfill's real calls, against its rendered identities ----------------------------------------------
_S3_OPS = {
    "ensure_bucket": "ensure_bucket",
    "put": "put_bytes",
    "get": "get_bytes",
    "stat": "exists",
    "list": "list_keys",
}


def _rendered_environ(objs, c) -> dict[str, str]:
    """The container's variables as the pod gets them (Secrets as placeholders)."""
    out = {}
    for var, src in container_env(objs, c).items():
        out[var] = "placeholder-from-a-secret" if "valueFrom" in src else env_value(objs, c, var)
    return out


def _assert_calls_allowed(objs, identity: str, calls: list[tuple[str, str]]) -> None:
    policy, bucket = _policies(objs)[identity], _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_BUCKET"]
    for op, key in calls:
        assert op in _S3_OPS, f"an object-store call this test does not map to an action: {op}"
        method = _S3_OPS[op]
        assert _s3_request(policy, method, bucket, None if method == "ensure_bucket" else key), (
            f"the {identity}'s {method}({key!r}) would be denied by its policy"
        )


class _Consumer:
    """What Archiver.process uses of a KafkaConsumer."""

    def __init__(self):
        self.committed: dict = {}

    def commit(self, offsets) -> None:
        self.committed.update({tp: o.offset for tp, o in offsets.items()})

    def seek(self, tp, offset) -> None:
        pass


class _Producer:
    def __init__(self):
        self.topics: list[str] = []

    def send(self, topic, key=None, value=None):
        from tests.fakes import FakeFuture

        self.topics.append(topic)
        return FakeFuture(result=None)

    def flush(self, timeout=None) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


class _Scorer:
    """What Backfill uses of a Scorer: a fixed fingerprint and log-probs (the engine is not under test)."""

    def __init__(self, fp):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(model_dir="/models/new-reference")
        self._model = SimpleNamespace(fingerprint=fp)

    def model(self):
        return self._model

    def prepare_pair(self, pair):
        from services.refscore.scorer import PreparedPair

        return PreparedPair(pair, [1, 2, 3], [4, 5], [6])

    def submit_score(self, items, caller):
        from concurrent.futures import Future

        future: Future = Future()
        future.set_result([[-1.0] * len(item.answer_ids) for item in items])
        return future

    def engine_alive(self) -> bool:
        return True


def _fingerprint(model_id: str):
    from offdpo import records
    from offdpo.v1 import records_pb2

    return records.with_fingerprint_id(records_pb2.ReferenceFingerprint(model_id=model_id, dtype="float32"))


def test_the_backfills_real_calls_are_within_its_identities(backfill_prod, monkeypatch):
    """The archiver archives two batches (one redone after a crash before its commit), then the rescore
    Job rescores that archive and a scores/ prefix, is rerun: every S3 call each makes is allowed by its
    own rendered policy, and its Kafka group and topics by its own ACLs, with the settings its pod gets."""
    from offdpo import archive, records
    from offdpo.config import KafkaConfig
    from services.refscore import backfill
    from services.refscore.scorer import PreparedPair, ScoredRow
    from tests.fakes import FakeObjectStore, FakeRecord

    objs = backfill_prod
    acls = parse_acls(objs)
    bucket = _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_BUCKET"]
    store = FakeObjectStore(bucket=bucket)

    # -- the archiver
    environ = _rendered_environ(objs, get_container(workload(objs, "offdpo-pairs-archiver"), "pairs-archiver"))
    kafka, cfg = KafkaConfig.from_env(environ), archive.ArchiveConfig.from_env(environ)
    archiver = archive.Archiver(kafka, None, cfg, store=store)  # type: ignore[arg-type]
    for topic in archiver.topics:
        assert kafka_allowed(acls, "offdpo-archiver", "Read", "topic", topic), topic
    assert kafka_allowed(acls, "offdpo-archiver", "Read", "group", archiver.cfg.group_id)
    pairs = [records.make_pair(records.text_prompt(f"prompt {i}"), f"good {i}", f"bad {i}") for i in range(12)]
    batch = [
        FakeRecord(kafka.pairs_topic, i % 2, i // 2, None, p.SerializeToString(), timestamp=1)
        for i, p in enumerate(pairs)
    ]
    archiver.store.ensure_bucket()
    consumer = _Consumer()
    archiver.process(consumer, batch[:8])  # type: ignore[arg-type]
    archiver.process(consumer, batch[:8])  # type: ignore[arg-type]  # redone: finds its objects, skips them
    archiver.process(consumer, batch[8:])  # type: ignore[arg-type]
    assert (
        archiver.objects_written == 4 and ("list", archive.archive_key_prefix(kafka.pairs_topic, 0, 0)) in store.calls
    )
    _assert_calls_allowed(objs, "archiver", store.calls)
    assert all(key.startswith("archive/pairs/") for op, key in store.calls if op == "put")

    # -- the rescore Job: from the archive, and from an older reference's shards
    old_fp, new_fp = _fingerprint("old-reference"), _fingerprint("new-reference")
    old_rows = [ScoredRow(PreparedPair(p, [1, 2], [3], [4]), [-2.0], [-3.0]).to_record(old_fp) for p in pairs[:4]]
    old_key = records.shard_key(old_fp.fingerprint_id, kafka.pairs_topic, 0, 0, 3, topic_id="AAAAAAAAAAAAAAAAAAAAAA")
    store.put_bytes(old_key, records.scored_pairs_to_parquet(old_rows, old_fp))
    store.calls.clear()  # from here on every call is the rescore Job's
    environ = _rendered_environ(objs, get_container(workload(objs, "offdpo-rescore"), "rescore"))
    kafka = KafkaConfig.from_env(environ)
    producers: list[_Producer] = []
    monkeypatch.setattr(
        backfill, "make_producer", lambda cfg, client_id: producers.append(_Producer()) or producers[-1]
    )
    for source in (archive.ARCHIVE_PREFIX, f"scores/{old_fp.fingerprint_id}/"):
        for _ in range(2):  # the rerun finds every shard written and announced
            backfill.Backfill(_Scorer(new_fp), store, kafka, progress_out=open(os.devnull, "w")).run(source)  # noqa: SIM115
    ops = {op for op, _ in store.calls}
    assert {"ensure_bucket", "list", "get", "stat", "put"} <= ops, ops
    _assert_calls_allowed(objs, "rescore", store.calls)
    puts = [key for op, key in store.calls if op == "put"]
    assert any(k.startswith(f"scores/{new_fp.fingerprint_id}/") for k in puts)
    assert any(k.startswith("backfill/") for k in puts)
    assert all(k.startswith((f"scores/{new_fp.fingerprint_id}/", "backfill/")) for k in puts), puts
    topics = {t for p in producers for t in p.topics}
    assert topics == {kafka.shards_topic}
    assert kafka_allowed(acls, "offdpo-rescore", "Write", "topic", kafka.shards_topic)


# -- the setup Jobs' scripts, run ----------------------------------------------------------------------------
_STUB = """#!/bin/sh
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\\037%s' "$a"; done; printf '\\n'; } >> "$STUB_LOG"
"""


def _secret_value(name: str, key: str) -> str:
    """Made-up Secret values."""
    return f"{name}-{key}"


def _run_setup(objs, job: str, container: str, tmp_path, drop: str | None = None):
    """Run a setup Job's script with bash: its ConfigMap volumes as files, its Secrets as made-up values,
    mc replaced by a stub that log their arguments. -> (exit code, output, logged calls)."""
    import shutil
    import subprocess

    w = get(objs, "Job", job)
    c = get_container(w, container)
    root = tmp_path / job
    etc, tools, tmp = root / "etc", root / "bin", root / "tmp"
    for d in (etc, tools, tmp):
        d.mkdir(parents=True)
    for tool in ("mc",):
        (tools / tool).write_text(_STUB)
        (tools / tool).chmod(0o755)
    volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
    for m in c["volumeMounts"]:
        target = etc / m["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        vol = volumes[m["name"]]
        if "configMap" in vol:
            for key, data in configmap_data(objs, vol["configMap"]["name"]).items():
                (target / key).write_text(data)
        elif vol.get("secret", {}).get("secretName") == "offdpo-ca":
            (target / "ca.crt").write_text("a CA certificate")

    def local(text: str) -> str:
        return text.replace("/tmp/", f"{tmp}/").replace("/etc/offdpo/", f"{etc}/etc/offdpo/")

    environ = {"PATH": f"{tools}:/usr/bin:/bin", "STUB_LOG": str(root / "calls.log")}
    for var, src in container_env(objs, c).items():
        if var == drop:
            continue
        ref = src.get("valueFrom", {}).get("secretKeyRef")
        environ[var] = _secret_value(ref["name"], ref["key"]) if ref else local(str(env_value(objs, c, var)))
    script = local(_script(c))
    assert c["command"] == ["/bin/bash", "-ec"]
    bash = shutil.which("bash")
    assert bash, "bash is needed to run the setup scripts"
    out = subprocess.run([bash, "-ec", script], env=environ, capture_output=True, text=True, timeout=60)
    log = root / "calls.log"
    calls = [line.split("\x1f") for line in log.read_text().splitlines()] if log.exists() else []
    return out.returncode, out.stdout + out.stderr, calls


def _flag(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


@pytest.mark.parametrize("which", ["dev", "prod+s3-minio", "prod+backfill"])
def test_the_s3_setup_script_creates_exactly_the_documented_identities(
    overlays, combos, backfill_prod, tmp_path, which
):
    objs = {"dev": overlays["dev"], "prod+s3-minio": combos["prod+s3-minio"], "prod+backfill": backfill_prod}[which]
    # S3: one MinIO user per policy document, with the keys of its own Secret and that document
    code, output, calls = _run_setup(objs, "offdpo-ensure-bucket", "s3-setup", tmp_path)
    assert code == 0, output
    mc = [c[1:] for c in calls if c[0] == "mc"]
    mc = [c[c.index("--quiet") + 1 :] if "--quiet" in c else c for c in mc]
    docs = _configmap(objs, "offdpo-s3-policies")
    s3_ids = set(S3_SERVICES) | (set(BACKFILL_IDS) if which == "prod+backfill" else set())
    created = {c[4]: c[5] for c in mc if c[:3] == ["admin", "policy", "create"]}
    assert set(created) == {f"offdpo-{i}" for i in s3_ids}
    for i in s3_ids:
        assert json.loads(open(created[f"offdpo-{i}"]).read()) == json.loads(docs[f"{i}.json"])
        key, secret = _secret_value(f"offdpo-s3-{i}", "access-key"), _secret_value(f"offdpo-s3-{i}", "secret-key")
        assert ["admin", "user", "add", "offdpo", key, secret] in mc
        assert ["admin", "policy", "attach", "offdpo", f"offdpo-{i}", "--user", key] in mc
    attached = [c for c in mc if c[:3] == ["admin", "policy", "attach"]]
    assert len(attached) == len(s3_ids), "no user gets a second policy"


def test_the_s3_setup_script_stops_on_an_identity_without_its_secret(backfill_prod, tmp_path):
    code, output, calls = _run_setup(
        backfill_prod, "offdpo-ensure-bucket", "s3-setup", tmp_path, drop="S3_SECRET_KEY_RESCORE"
    )
    assert code == 2 and "offdpo-s3-rescore" in output, output
    assert not any(c[:4] == ["mc", "--config-dir"] and "attach" in c for c in calls)


def test_the_backfill_render_is_valid_and_locked_down(backfill_prod):
    """The checks every overlay gets (tests/deploy/test_rendered.py), on prod with the component."""
    from tests.deploy import test_rendered as checks

    rendered = ("prod", backfill_prod)
    checks.test_objects_validate_strict(rendered)
    checks.test_every_container_has_resources_and_locked_down_security_context(rendered)
    checks.test_network_policies_deny_by_default_and_allow_the_pipeline(rendered)
    (ns,) = by_kind(backfill_prod, "Namespace")
    for name in BACKFILL:
        assert workload(backfill_prod, name)["metadata"]["namespace"] == ns["metadata"]["name"]
    # the backfill pods reach Kafka and MinIO through the same network policies as the services
    for name in BACKFILL:
        labels = workload(backfill_prod, name)["spec"]["template"]["metadata"]["labels"]
        dst = next(w for w in workloads(backfill_prod) if w["metadata"]["name"] == "offdpo-minio")
        peer = dst["spec"]["template"]["metadata"]["labels"]
        for direction in ("egress", "ingress"):
            assert checks._allowed(backfill_prod, labels, peer, 9000, direction), (name, "minio", direction)
    checks.check_kafka_flows(backfill_prod, list(BACKFILL))


# -- deploy/components/rounds: refscore serves a trainer checkpoint from S3 ---------------------------------
class _ModelSourceStore:
    """What services/refscore/model_source.py uses of an ObjectStore (`client.list_objects`, `_retry`,
    `get_bytes`, `bucket`) over a FakeObjectStore's objects; each call recorded as (op, key or prefix)."""

    def __init__(self, objects: dict[str, bytes], bucket: str):
        self.objects, self.bucket, self.cfg = objects, bucket, None
        self.client = self  # model_source lists through the minio client
        self.calls: list[tuple[str, str]] = []

    def _retry(self, what, fn):
        return fn()

    def list_objects(self, bucket, prefix, recursive=False):
        import hashlib
        from types import SimpleNamespace

        assert bucket == self.bucket and recursive
        self.calls.append(("list", prefix))
        return [
            SimpleNamespace(object_name=k, size=len(v), etag=f'"{hashlib.md5(v).hexdigest()}"')
            for k, v in sorted(self.objects.items())
            if k.startswith(prefix)
        ]

    def get_bytes(self, key, max_bytes=None):
        self.calls.append(("get", key))
        return self.objects[key]


@pytest.fixture(scope="module")
def rounds_checkpoint(tiny_model):
    """A real trainer checkpoint (services/trainer/checkpoint.py's save_checkpoint: model/, optimizer and
    RNG state, state.json, then `latest`) of the run and step rounds_prod points refscore at.
    -> (the store holding it, the checkpoint's prefix)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.trainer.checkpoint import save_checkpoint
    from tests.deploy.conftest import ROUNDS_RUN, ROUNDS_STEP
    from tests.fakes import FakeObjectStore

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's moments: a real optimizer.safetensors
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    store = FakeObjectStore(bucket="offdpo")
    prefix = save_checkpoint(
        store, ROUNDS_RUN, ROUNDS_STEP, model, tokenizer, optimizer.state_dict(), scheduler, {"consumed": []}
    )
    return store, prefix


def _rounds_calls(objs, store, tmp_path):
    """refscore's model download (model_source.fetch_model) of the checkpoint its rendered
    OFFDPO_REFSCORE_MODEL_DIR names: -> (the parsed URI, the calls it made, the downloaded folder)."""
    from services.refscore import model_source

    c = get_container(workload(objs, "offdpo-refscore"), "refscore")
    uri = model_source.parse_s3_uri(env_value(objs, c, "OFFDPO_REFSCORE_MODEL_DIR"))
    recorder = _ModelSourceStore(store.objects, uri.bucket)
    folder = model_source.fetch_model(uri, tmp_path / "model-cache", store=recorder)  # type: ignore[arg-type]
    return uri, recorder.calls, folder


def test_the_rounds_component_lets_refscore_read_a_checkpoints_model_and_nothing_else(
    rounds_prod, overlays, rounds_checkpoint, tmp_path
):
    """With the component, refscore's real model download (list the checkpoint's model/, get each object)
    of a real trainer checkpoint is allowed by its rendered policy; writing there, the run's `latest`, the
    optimizer and RNG state, state.json and the metrics are not. Without it (the plain overlays) the same
    download is denied."""
    from services.trainer.checkpoint import run_prefix
    from tests.deploy.conftest import ROUNDS_RUN

    store, prefix = rounds_checkpoint
    objs = rounds_prod
    bucket = _configmap(objs, "offdpo-s3-client")["OFFDPO_S3_BUCKET"]
    policy = _policies(objs)["refscore"]
    uri, calls, folder = _rounds_calls(objs, store, tmp_path)
    # the rendered URI names the bucket refscore's policy covers and the trainer's real layout
    assert uri.bucket == bucket and uri.prefix == f"{prefix}/model/", (uri, prefix)
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    model_keys = sorted(k for k in store.objects if k.startswith(uri.prefix))
    assert ("list", uri.prefix) in calls and sorted(k for op, k in calls if op == "get") == model_keys
    assert {op for op, _ in calls} == {"list", "get"}, calls
    for op, key in calls:
        method = {"list": "list_keys", "get": "get_bytes"}[op]
        assert _s3_request(policy, method, bucket, key), f"with the component, refscore's {method}({key!r}) is denied"
        assert not _s3_request(policy, method, bucket + "-other", key), f"{method}({key!r}) in another bucket"
    for key in model_keys:  # stat (HEAD) is s3:GetObject too; nothing that changes the checkpoint
        assert _s3_request(policy, "exists", bucket, key), key
        assert not _s3_request(policy, "put_bytes", bucket, key), f"refscore may overwrite {key}"
        assert not _s3_request(policy, "delete", bucket, key), f"refscore may delete {key}"
    assert not _s3_request(policy, "put_bytes", bucket, f"{uri.prefix}extra.safetensors")
    # the rest of the run: every other object the trainer wrote, and its metrics
    others = sorted(set(store.objects) - set(model_keys)) + [f"{run_prefix(ROUNDS_RUN)}/metrics.jsonl"]
    for name in ("latest", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert any(k.endswith("/" + name) for k in others), f"the checkpoint has no {name}: {others}"
    for key in others:
        for method in ("get_bytes", "exists", "put_bytes", "delete"):
            assert not _s3_request(policy, method, bucket, key), f"with the component, refscore may {method}({key!r})"
    for listed in ("", "runs/", f"{run_prefix(ROUNDS_RUN)}/", f"{run_prefix(ROUNDS_RUN)}/checkpoints/", f"{prefix}/"):
        assert not _s3_request(policy, "list_keys", bucket, listed), f"refscore may list {listed!r}"
    # refscore's base access is unchanged by the component
    for svc, method, arg, allowed in S3_MATRIX:
        if svc == "refscore":
            assert _s3_request(policy, method, bucket, arg) is allowed, f"with the component: {method}({arg!r})"
    # without the component, the checkpoint stays out of refscore's reach
    for name, plain in overlays.items():
        base = _policies(plain)["refscore"]
        for op, key in calls:
            method = {"list": "list_keys", "get": "get_bytes"}[op]
            assert not _s3_request(base, method, bucket, key), f"{name}: refscore {method}({key!r}) without rounds"


def test_the_rounds_component_changes_only_refscores_policy(rounds_prod, overlays, tmp_path):
    """Same identities, same trainer policy and ACLs; refscore's policy is base's plus read-only statements
    on checkpoints' model/ only; the setup Job attaches exactly that document to refscore's user."""
    objs, prod = rounds_prod, overlays["prod"]
    rounds, base = _policies(objs), _policies(prod)
    assert set(rounds) == set(base) == set(S3_SERVICES)
    assert rounds["trainer"] == base["trainer"], "the trainer's policy must not change"
    assert parse_acls(objs) == parse_acls(prod)
    assert all(st in rounds["refscore"]["Statement"] for st in base["refscore"]["Statement"])
    added = [st for st in rounds["refscore"]["Statement"] if st not in base["refscore"]["Statement"]]
    assert added, "the component grants nothing"
    for st in added:
        assert st["Effect"] == "Allow" and "Principal" not in st, st
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if actions == ["s3:ListBucket"]:
            assert resources == ["arn:aws:s3:::offdpo"], st
            assert st["Condition"] == {"StringLike": {"s3:prefix": ["runs/*/checkpoints/*/model/*"]}}, st
        else:
            assert actions == ["s3:GetObject"], st
            assert resources == ["arn:aws:s3:::offdpo/runs/*/checkpoints/*/model/*"], st
    # the S3 setup Job, run against a stubbed mc: refscore's user gets the component's document
    code, output, calls = _run_setup(objs, "offdpo-ensure-bucket", "s3-setup", tmp_path)
    assert code == 0, output
    mc = [c[1:] for c in calls if c[0] == "mc"]
    mc = [c[c.index("--quiet") + 1 :] if "--quiet" in c else c for c in mc]
    created = {c[4]: c[5] for c in mc if c[:3] == ["admin", "policy", "create"]}
    assert set(created) == {f"offdpo-{s}" for s in S3_SERVICES}
    with open(created["offdpo-refscore"]) as f:
        assert json.load(f) == rounds["refscore"]


def test_the_rounds_render_is_valid_and_refscore_can_cache_the_checkpoint(rounds_prod):
    """The checks every overlay gets, on prod with the component and refscore pointed at a checkpoint; the
    download cache (OFFDPO_REFSCORE_MODEL_CACHE left at <tmp>/offdpo-refscore-models) is on a writable
    emptyDir: the root filesystem is read-only, so no volume of its own is needed."""
    from tests.deploy import test_rendered as checks

    rendered = ("prod", rounds_prod)
    checks.test_objects_validate_strict(rendered)
    checks.test_every_container_has_resources_and_locked_down_security_context(rendered)
    checks.test_containers_get_exactly_the_variables_their_service_reads(rendered)
    checks.test_network_policies_deny_by_default_and_allow_the_pipeline(rendered)
    w = workload(rounds_prod, "offdpo-refscore")
    c = get_container(w, "refscore")
    env = container_env(rounds_prod, c)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "OFFDPO_REFSCORE_MODEL_CACHE" not in env and "TMPDIR" not in env, "the cache is <tmp>/..."
    assert "TMPDIR" not in (checks.DEPLOY / "docker" / "Dockerfile").read_text(), "the image's tmp is /tmp"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert not mount.get("readOnly")
    volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory", volume
