"""The components a platform team adds to prod (deploy/README.md, "Components"): every combination renders,
validates (core kinds with kubernetes-validate, custom resources against their CRDs: crd_schemas.py) and
keeps the checks every overlay gets; then what each component promises: Strimzi resources generated from
the least-privilege tables, cert-manager Certificates for every TLS Secret a workload mounts, KEDA scaling
on the worker's lag within the partitions with an identity that can only describe, alerts whose runbooks
exist, Kueue admission below refscore's priority."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tests.deploy import crd_schemas
from tests.deploy import test_rendered as checks
from tests.deploy.conftest import COMBOS, render
from tests.deploy.test_least_privilege import _configmap, kafka_allowed, parse_acls, table_acls
from tests.deploy.test_rendered import (
    DEPLOY,
    KAFKA_CA_SECRET,
    by_kind,
    container_env,
    containers,
    env_value,
    get,
    get_container,
    kafka_topics,
    pod_spec,
    workloads,
)

README = (DEPLOY / "README.md").read_text()


# -- every combination ----------------------------------------------------------------------------------------
def test_each_combination_is_valid_and_locked_down(combo):
    name, objs = combo
    if "kubeflow-trainer" in COMBOS[name]:  # the checks below look at the pods the operator makes from it
        objs = [*objs, trainjob_as_job(objs, trainer_runtime())]
    rendered = ("prod", objs)
    checks.test_objects_validate_strict(rendered)
    checks.test_every_container_has_resources_and_locked_down_security_context(rendered)
    if "backfill" not in COMBOS[name]:  # the archiver's OFFDPO_ARCHIVE_GROUP is outside refscore's contract
        checks.test_containers_get_exactly_the_variables_their_service_reads(rendered)
    checks.test_namespaces_enforce_restricted_pod_security(rendered)
    checks.test_network_policies_deny_by_default_and_allow_the_pipeline(rendered)
    checks.test_kafka_is_strimzi_kraft_with_dedicated_controllers_and_brokers(rendered)
    checks.test_refscore_scaling_is_bounded_by_partitions(rendered)


def test_every_component_is_documented_and_rendered(combos):
    tested = {c for cs in COMBOS.values() for c in cs} | {"backfill", "rounds"}
    for path in sorted((DEPLOY / "components").iterdir()):
        assert f"components/{path.name}" in README, f"deploy/README.md does not describe components/{path.name}"
        if (path / "kustomization.yaml").exists() and "kind: Component" in (path / "kustomization.yaml").read_text():
            assert path.name in tested or path.name in ("gpu", "network-policies", "autoscaling", "kafka-strimzi"), path


def test_the_validators_refuse_what_the_crds_refuse():
    """The checks above can fail: a misspelt field and a wrong enum are caught on each path."""
    bad_topic = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaTopic",
        "metadata": {"name": "t"},
        "spec": {"partitions": 0, "replica": 3},
    }
    assert len(crd_schemas.vendored_errors(bad_topic)) == 2
    bad_queue = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": "q"},
        "spec": {"clusterQueue": "x", "clusterqueue": "y"},
    }
    assert crd_schemas.vendored_errors(bad_queue)
    bad = [
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {"name": "c"},
            "spec": {"secretName": "s", "issuerRef": {"name": "i"}, "privateKey": {"algorithm": "DSA"}},
        },
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": "s"},
            "spec": {"scaleTargetRef": {"name": "d"}, "minReplicaCount": "two", "triggers": []},
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "r"},
            "spec": {"groups": [{"rules": [{"alert": "A"}]}]},
        },
    ]
    try:
        errors = crd_schemas.npm_errors(bad)
    except crd_schemas.SetupError as exc:
        pytest.skip(str(exc))
    assert all(errors[(o["kind"], o["metadata"]["name"])] for o in bad), errors


# -- Strimzi: generated from the tables ---------------------------------------------------------------------------
def test_generated_strimzi_resources_are_current():
    out = subprocess.run(
        [sys.executable, str(DEPLOY / "tools" / "gen_strimzi.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, f"stale generated files: run python deploy/tools/gen_strimzi.py\n{out.stderr}"


def test_the_generator_refuses_a_bad_table(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_strimzi", DEPLOY / "tools" / "gen_strimzi.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    (tmp_path / "base" / "config").mkdir(parents=True)
    (tmp_path / "base" / "config" / "kafka-client.env").write_text("OFFDPO_TOPIC_PAIRS=p\n")
    monkeypatch.setattr(gen, "DEPLOY", tmp_path)
    for line, says in [
        ("offdpo-x Read topic literal OFFDPO_TOPIC_NOPE", "OFFDPO_TOPIC_NOPE"),
        ("offdpo-x All topic literal OFFDPO_TOPIC_PAIRS", "All"),
        ("admin Read topic literal OFFDPO_TOPIC_PAIRS", "offdpo-<lowercase name>"),
        ("offdpo-x Read topic", "5 columns"),
    ]:
        (tmp_path / "t.tsv").write_text(line + "\n")
        with pytest.raises(gen.TableError, match=re.escape(says)):
            gen.users_yaml("t.tsv", gen.client_env())
    (tmp_path / "t.tsv").write_text(
        "offdpo-x Read topic literal OFFDPO_TOPIC_PAIRS\noffdpo-x Describe topic literal OFFDPO_TOPIC_PAIRS\n"
    )
    (user,) = yaml.safe_load_all(gen.users_yaml("t.tsv", gen.client_env()))
    assert user["spec"]["authorization"]["acls"] == [
        {
            "resource": {"type": "topic", "name": "p", "patternType": "literal"},
            "operations": ["Read", "Describe"],
            "host": "*",
        }
    ]


# -- cert-manager --------------------------------------------------------------------------------------------------
# The server certificates of in-cluster object storage: issued with cert-manager, mounted only where that
# store's component is enabled.
IN_CLUSTER_S3_TLS = {"offdpo-minio-tls", "offdpo-seaweedfs-tls"}


@pytest.mark.parametrize(
    "name", ["prod+cert-manager", "prod+cert-manager+s3-minio", "prod+cert-manager+s3-seaweedfs+backfill"]
)
def test_cert_manager_issues_every_tls_secret_the_workloads_mount(combos, name):
    objs = combos[name]
    ns = by_kind(objs, "Namespace")[0]["metadata"]["name"]
    certs = {c["spec"]["secretName"]: c for c in by_kind(objs, "Certificate")}
    issuers = {i["metadata"]["name"]: i for i in by_kind(objs, "Issuer")}
    mounted = {
        v["secret"]["secretName"]
        for w in workloads(objs)
        for v in pod_spec(w).get("volumes", [])
        if "secret" in v and v["secret"]["secretName"].endswith("-tls")
    }
    store = {
        "prod+cert-manager+s3-minio": {"offdpo-minio-tls"},
        "prod+cert-manager+s3-seaweedfs+backfill": {"offdpo-seaweedfs-tls"},
    }
    assert mounted == {"offdpo-refscore-tls", "offdpo-labeler-tls"} | store.get(name, set()), mounted
    assert mounted | {"offdpo-ca", "offdpo-annotate-tls"} | IN_CLUSTER_S3_TLS == set(certs)
    services = {s["metadata"]["name"] for s in by_kind(objs, "Service")}
    for secret, cert in certs.items():
        spec = cert["spec"]
        assert spec["issuerRef"]["name"] in issuers and spec["issuerRef"].get("kind", "Issuer") == "Issuer"
        assert spec["privateKey"]["encoding"] == "PKCS8" and spec["privateKey"]["algorithm"] == "ECDSA"
        if secret == "offdpo-ca":
            assert spec["isCA"] is True and "selfSigned" in issuers[spec["issuerRef"]["name"]]["spec"]
            continue
        assert (
            spec["issuerRef"]["name"] == "offdpo-ca" and issuers["offdpo-ca"]["spec"]["ca"]["secretName"] == "offdpo-ca"
        )
        assert spec["privateKey"]["rotationPolicy"] == "Always"
        host = spec["dnsNames"][0]
        assert f"{host}.{ns}.svc" in spec["dnsNames"], spec["dnsNames"]
        if secret != "offdpo-annotate-tls" and (secret not in IN_CLUSTER_S3_TLS or secret in mounted):
            assert host in services, f"{secret}: {host} is no Service"
    # the CA's key is in offdpo-ca: every client mounts its ca.crt only
    for w in workloads(objs):
        for v in pod_spec(w).get("volumes", []):
            if v.get("secret", {}).get("secretName") == "offdpo-ca":
                assert v["secret"].get("items") == [{"key": "ca.crt", "path": "ca.crt"}], w["metadata"]["name"]


# -- KEDA ----------------------------------------------------------------------------------------------------------
def test_keda_scales_the_worker_on_its_lag_within_the_partitions(combos):
    objs = combos["prod+keda"]
    ns = by_kind(objs, "Namespace")[0]["metadata"]["name"]
    (so,) = by_kind(objs, "ScaledObject")
    assert not by_kind(objs, "HorizontalPodAutoscaler"), "KEDA's ScaledObject replaces the HPA"
    d = get(objs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    c = get_container(d, "refscore")
    assert c["args"] == ["worker"], "the target runs the stream worker alone (never the API)"
    (trigger,) = so["spec"]["triggers"]
    meta = trigger["metadata"]
    client = _configmap(objs, "offdpo-kafka-client")
    host, port = client["OFFDPO_KAFKA_BOOTSTRAP"].split(":")
    assert trigger["type"] == "kafka" and meta["bootstrapServers"] == f"{host}.{ns}.svc:{port}"
    assert meta["consumerGroup"] == env_value(objs, c, "OFFDPO_REFSCORE_GROUP")
    assert meta["topic"] == client["OFFDPO_TOPIC_PAIRS"]
    assert meta["allowIdleConsumers"] == "false"
    partitions = kafka_topics(objs)[meta["topic"]]["spec"]["partitions"]
    checks.check_refscore_scaling("prod", objs, partitions)
    # its identity: the TriggerAuthentication's Secrets and ConfigMap exist or are Strimzi's
    auth = get(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    params = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"] + auth["spec"]["configMapTargetRef"]}
    assert params["password"]["name"] == "offdpo-keda" and params["ca"]["name"] == KAFKA_CA_SECRET
    for p in ("username", "sasl", "tls"):
        cm = get(objs, "ConfigMap", params[p]["name"])  # exact name: KEDA does not follow kustomize's hashes
        assert params[p]["key"] in cm["data"]
    cm = get(objs, "ConfigMap", params["username"]["name"])["data"]
    assert (cm["username"], cm["sasl"], cm["tls"]) == ("offdpo-keda", "scram_sha512", "enable")
    # offdpo-keda can describe the group's offsets and the topic's end offsets, and nothing else
    acls = parse_acls(objs)
    group, topic = meta["consumerGroup"], meta["topic"]
    assert kafka_allowed(acls, "offdpo-keda", "Describe", "group", group)
    assert kafka_allowed(acls, "offdpo-keda", "Describe", "topic", topic)
    for op, res, target in [
        ("Read", "group", group),
        ("Read", "topic", topic),
        ("Write", "topic", topic),
        ("Describe", "topic", client["OFFDPO_TOPIC_CANDIDATES"]),
        ("Describe", "group", "offdpo-labeler"),
    ]:
        assert not kafka_allowed(acls, "offdpo-keda", op, res, target), (op, res, target)
    keda_rows = [a for a in acls if a["principal"] == "offdpo-keda"]
    assert sorted(map(str, keda_rows)) == sorted(map(str, table_acls(objs, "components/keda/security/kafka-acls.tsv")))
    # KEDA's operator reaches the listener (Strimzi generates the policy from the peers)
    (kafka,) = by_kind(objs, "Kafka")
    peers = kafka["spec"]["kafka"]["listeners"][0]["networkPolicyPeers"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
        "podSelector": {"matchLabels": {"app": "keda-operator"}},
    } in peers


# -- observability ---------------------------------------------------------------------------------------------------
def _github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")  # as GitHub does


def _exported_metrics() -> set[str]:
    """Series names the services export (from their code), plus the exporters' families the rules use."""
    from types import SimpleNamespace

    from prometheus_client import Counter, Gauge, Histogram

    from services.refscore import metrics as refscore_metrics
    from services.trainer import metrics as trainer_metrics

    names = set()
    for m in vars(refscore_metrics).values():
        if isinstance(m, Counter):
            names.add(m._name + "_total")
        elif isinstance(m, Histogram):
            names |= {m._name + s for s in ("_bucket", "_sum", "_count")}
        elif isinstance(m, Gauge):
            names.add(m._name)
    names |= {"offdpo_trainer_" + k.replace("/", "_") for k in trainer_metrics.KEYS} | {"offdpo_trainer_step"}
    status = SimpleNamespace(errors_total=0, backoff_s=0.0, waiting_since=None)
    for fam in trainer_metrics._InfraCollector(status).collect():
        names |= {s.name for s in fam.samples}
    # Strimzi's Kafka Exporter and kube-state-metrics
    names |= {"kafka_consumergroup_lag", "kafka_topic_partition_current_offset"}
    names |= {"kube_deployment_spec_replicas", "kube_deployment_status_replicas_available"}
    return names


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    words = set(re.findall(r"\b[a-zA-Z_][a-zA-Z0-9_]*\b", expr))
    return {w for w in words if w.startswith(("refscore_", "offdpo_", "kafka_", "kube_"))}


def test_alerts_name_runbooks_that_exist_and_metrics_that_are_exported(combos):
    objs = combos["prod+observability"]
    anchors = {_github_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", README, re.M)}
    exported = _exported_metrics()
    (rule,) = by_kind(objs, "PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    wanted = {"lag", "dead", "infrastructure", "not-serving", "checkpoint", "quota"}
    seen = set()
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "deploy/README.md" and anchor in anchors, (
            f"{alert['alert']}: no section #{anchor} in deploy/README.md"
        )
        assert anchor.startswith("runbook-")
        seen |= {w for w in wanted if w in anchor}
        used = _metric_names(alert["expr"])
        assert used and used <= exported, f"{alert['alert']}: {used - exported} is exported by nothing"
        assert alert["labels"]["severity"] in ("info", "warning", "critical")
    assert seen == wanted, f"alerts missing for {wanted - seen}"
    import json

    dash = json.loads(
        get(
            objs,
            "ConfigMap",
            next(
                c["metadata"]["name"]
                for c in by_kind(objs, "ConfigMap")
                if c["metadata"]["name"].startswith("offdpo-grafana-dashboard")
            ),
        )["data"]["offdpo.json"]
    )
    assert dash["panels"]
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used = _metric_names(target["expr"])
            assert used and used <= exported, f"panel {panel['title']}: {used - exported}"


def test_monitors_select_every_service_that_serves_metrics(combos):
    objs = combos["prod+observability"]
    (sm,) = by_kind(objs, "ServiceMonitor")
    svc = next(
        s
        for s in by_kind(objs, "Service")
        if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()
    )
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    pods = {p["metadata"]["name"]: p for p in by_kind(objs, "PodMonitor")}
    trainer = get(objs, "Job", "offdpo-trainer")
    assert (
        pods["offdpo-trainer"]["spec"]["selector"]["matchLabels"].items()
        <= trainer["spec"]["template"]["metadata"]["labels"].items()
    )
    ports = {p["name"] for c in containers(trainer) for p in c.get("ports", [])}
    assert {e["port"] for e in pods["offdpo-trainer"]["spec"]["podMetricsEndpoints"]} <= ports
    strimzi = checks.strimzi_pod_labels(objs)
    sel = pods["offdpo-kafka"]["spec"]["selector"]["matchLabels"]
    assert all(sel.items() <= labels.items() for labels in strimzi.values())
    # every workload serving a `metrics` port is scraped
    for w in workloads(objs):
        if any(p.get("name") == "metrics" for c in containers(w) for p in c.get("ports", [])):
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert any(m["spec"]["selector"]["matchLabels"].items() <= labels.items() for m in pods.values()) or (
                sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
            ), w["metadata"]["name"]


# -- Kueue -------------------------------------------------------------------------------------------------------
def test_kueue_queues_the_trainer_below_refscore(combos, tmp_path):
    objs = combos["prod+kueue"]
    trainer, refscore = get(objs, "Job", "offdpo-trainer"), get(objs, "Deployment", "offdpo-refscore")
    (lq,) = by_kind(objs, "LocalQueue")
    assert trainer["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == lq["metadata"]["name"]
    assert "suspend" not in trainer["spec"], "Kueue's webhook suspends it; re-applying suspend: true would stop a run"
    prio = {p["metadata"]["name"]: p["value"] for p in by_kind(objs, "PriorityClass")}
    t, r = pod_spec(trainer)["priorityClassName"], pod_spec(refscore)["priorityClassName"]
    assert prio[r] > prio[t], "refscore above training"
    # the example cluster-scoped objects: valid, and the queue admits the whole trainer Job at once
    cluster = render(DEPLOY / "components" / "kueue" / "cluster")
    for o in cluster:
        assert "namespace" not in o["metadata"], "cluster-scoped"
        assert not crd_schemas.vendored_errors(o), crd_schemas.vendored_errors(o)
    (cq,) = by_kind(cluster, "ClusterQueue")
    assert lq["spec"]["clusterQueue"] == cq["metadata"]["name"]
    flavors = {f["metadata"]["name"] for f in by_kind(cluster, "ResourceFlavor")}
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers(trainer, init=False))
    quota = {
        r["name"]: r["nominalQuota"]
        for g in cq["spec"]["resourceGroups"]
        for f in g["flavors"]
        if f["name"] in flavors
        for r in f["resources"]
    }
    assert gpus * trainer["spec"]["parallelism"] <= int(quota["nvidia.com/gpu"])


def test_readme_lists_the_install_order_and_the_runbook():
    order = README.index("## Install order")
    assert order < README.index("## Components")
    for operator in ("Strimzi", "cert-manager", "KEDA", "Kueue", "Prometheus Operator"):
        assert operator in README[order : README.index("## Components")], operator
    assert "## Runbook" in README


# -- Kubeflow Trainer ----------------------------------------------------------------------------------------------
TRAINER_OPERATOR = "Kubeflow Trainer v2.3.0"  # tests/deploy/schemas/kubeflow-trainer-v2.3.0.json


def trainer_runtime() -> dict:
    (runtime,) = render(DEPLOY / "components" / "kubeflow-trainer" / "cluster")
    return runtime


def trainjob_as_job(objs, runtime) -> dict:
    """The batch Job (one per replicated Job) the operator makes from the TrainJob `offdpo-trainer` on the
    runtime, as Kubeflow Trainer v2.3.0's plugins build it (pkg/runtime/framework/plugins: plainml sets the
    node count from spec.trainer.numNodes, else the runtime's mlPolicy.numNodes, else 1; jobset puts the
    TrainJob's image, command/args, resourcesPerNode and env (upserted by name) into the container `node` of
    the replicated Job labelled trainjob-ancestor-step=trainer; JobSet sets completions = parallelism and the
    pods' subdomain, the TrainJob's name). Named like base's Job, so the checks written for it apply. The
    operator's PET_* variables are left out: they are torchrun's, outside the services' env contract."""
    import copy

    tj = get(objs, "TrainJob", "offdpo-trainer")
    assert tj["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    assert tj["spec"]["runtimeRef"].get("kind", "ClusterTrainingRuntime") == "ClusterTrainingRuntime"
    trainer = tj["spec"]["trainer"]
    (rjob,) = [
        r
        for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]
        if r["template"]["metadata"]["labels"].get("trainer.kubeflow.org/trainjob-ancestor-step") == "trainer"
    ]
    spec = copy.deepcopy(rjob["template"]["spec"])
    nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
    spec.update(completions=nodes, parallelism=nodes, completionMode="Indexed")
    pod = spec["template"]["spec"]
    pod["subdomain"] = tj["metadata"]["name"]
    (node,) = [c for c in pod["containers"] if c["name"] == "node"]
    node["image"] = trainer.get("image", node["image"])
    for key in ("command", "args"):
        if key in trainer:
            node[key] = trainer[key]
    if "resourcesPerNode" in trainer:
        node["resources"] = trainer["resourcesPerNode"]
    env = {e["name"]: e for e in node.get("env", [])}
    env.update({e["name"]: e for e in trainer.get("env", [])})
    node["env"] = list(env.values())
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": tj["metadata"]["name"], "namespace": tj["metadata"]["namespace"]},
        "spec": spec,
    }


def test_the_trainjob_runs_the_trainer_command_with_one_node_count(combos):
    objs = combos["prod+kubeflow-trainer"]
    runtime = trainer_runtime()
    assert "namespace" not in runtime["metadata"], "cluster-scoped"
    for o in (runtime, get(objs, "TrainJob", "offdpo-trainer")):
        assert not crd_schemas.vendored_errors(o), crd_schemas.vendored_errors(o)
    assert not [j for j in by_kind(objs, "Job") if j["metadata"]["name"] == "offdpo-trainer"] and not [
        s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "offdpo-trainer"
    ], "base's Job and its headless Service go (JobSet makes a Service named after the TrainJob)"
    assert "torch" in runtime["spec"]["mlPolicy"]
    tj = get(objs, "TrainJob", "offdpo-trainer")
    job = trainjob_as_job(objs, runtime)
    c = get_container(job, "node")
    base_job = get(render(DEPLOY / "overlays" / "prod"), "Job", "offdpo-trainer")
    base = get_container(base_job, "trainer")
    # the same command, without the node count and ranks per node, which torchrun takes from PET_NNODES and
    # PET_NPROC_PER_NODE (the torch plugin sets them from numNodes and the GPUs); rendezvous at node 0
    same = [a for a in base["args"] if not a.startswith(("--nnodes", "--nproc-per-node", "--rdzv-endpoint"))]
    assert c["command"] == base["command"] == ["torchrun"]
    assert sorted(c["args"]) == sorted([*same, "--rdzv-endpoint=$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"])
    assert not any(a.startswith(("--nnodes", "--nproc-per-node", "--node-rank")) for a in c["args"])
    # one place sets the number of nodes: the TrainJob (the runtime has no mlPolicy.numNodes, nothing else
    # in the TrainJob names a count, and no PET_* variable is set by hand: the webhook refuses those)
    assert "numNodes" not in runtime["spec"]["mlPolicy"]
    assert tj["spec"]["trainer"]["numNodes"] == job["spec"]["parallelism"] == job["spec"]["completions"] >= 1
    assert "numProcPerNode" not in tj["spec"]["trainer"], "auto: one rank per GPU of resourcesPerNode"
    assert not [e for e in tj["spec"]["trainer"]["env"] if e["name"].startswith("PET_")]
    # the same pod as base's Job in prod: security, volumes, probes, ports, identities, labels, GPUs
    bpod, pod = pod_spec(base_job), pod_spec(job)
    by_name = lambda items: sorted(items or [], key=lambda v: v["name"])  # noqa: E731 (strategic merge: order is not kept)
    assert by_name(pod["volumes"]) == by_name(bpod["volumes"])
    for key in (
        "securityContext",
        "serviceAccountName",
        "automountServiceAccountToken",
        "restartPolicy",
        "terminationGracePeriodSeconds",
        "affinity",
        "nodeSelector",
        "tolerations",
    ):
        assert pod.get(key) == bpod.get(key), key
    for key in ("securityContext", "volumeMounts", "ports", "readinessProbe", "resources", "image"):
        assert c.get(key) == base.get(key), key
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert base_job["spec"]["template"]["metadata"]["labels"].items() <= labels.items()
    assert job["spec"]["podFailurePolicy"] == base_job["spec"]["podFailurePolicy"]
    # the environment: exactly the keys of the ConfigMaps base's Job takes whole, each from its ConfigMap
    # (kustomize's hashed names reach the TrainJob), and the same Secret references
    want = {
        k: src["configMapRef"]["name"]
        for src in base["envFrom"]
        for k in checks.configmap_data(objs, src["configMapRef"]["name"])
    }
    refs = {
        e["name"]: e["valueFrom"]["configMapKeyRef"] for e in c["env"] if "configMapKeyRef" in e.get("valueFrom", {})
    }
    assert set(refs) == set(want), set(refs) ^ set(want)
    for name, ref in refs.items():
        assert ref["name"] == want[name] and ref["key"] == name, (name, ref)
    assert [e for e in c["env"] if name_of_env_source(e) != "configMap"] == base["env"]
    assert (
        env_value(objs, base, "OFFDPO_TRAINER_RUN_NAME")
        == checks.configmap_data(objs, refs["OFFDPO_TRAINER_RUN_NAME"]["name"])["OFFDPO_TRAINER_RUN_NAME"]
    )


def name_of_env_source(e: dict) -> str:
    return "configMap" if "configMapKeyRef" in e.get("valueFrom", {}) else "other"


def test_the_nccl_rdma_patch_applies_and_validates(tmp_path, combos):
    """The documented example (components/kubeflow-trainer/nccl-rdma), enabled as deploy/README.md says: still
    a valid TrainJob, with the NCCL variables and the RDMA and hugepages resources, its hugepages volume merged
    by name into the runtime's."""
    from tests.deploy.conftest import _prod_with

    objs = _prod_with(["kubeflow-trainer", "kubeflow-trainer/nccl-rdma"], tmp_path)
    tj = get(objs, "TrainJob", "offdpo-trainer")
    assert not crd_schemas.vendored_errors(tj), crd_schemas.vendored_errors(tj)
    env = {e["name"]: e.get("value") for e in tj["spec"]["trainer"]["env"]}
    assert {"NCCL_IB_HCA", "NCCL_SOCKET_IFNAME"} <= set(env)
    assert "OFFDPO_TRAINER_RUN_NAME" in env, "appended, not replaced"
    res = tj["spec"]["trainer"]["resourcesPerNode"]
    for key in ("rdma/rdma_shared_device_a", "hugepages-2Mi", "nvidia.com/gpu"):
        assert res["requests"][key] == res["limits"][key], key
    (rp,) = tj["spec"]["runtimePatches"]
    (rjob,) = rp["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    runtime_jobs = {r["name"] for r in trainer_runtime()["spec"]["template"]["spec"]["replicatedJobs"]}
    assert rjob["name"] in runtime_jobs and "/" in rp["manager"]
    (c,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    assert c["name"] == "node" and "env" not in c, "the webhook refuses env for `node` in runtimePatches"
    # and not applied by default
    assert "NCCL_IB_HCA" not in str(get(combos["prod+kubeflow-trainer"], "TrainJob", "offdpo-trainer"))


def test_the_validator_refuses_a_bad_trainjob():
    bad = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "t"},
        "spec": {"runtimeRef": {"name": "r"}, "trainer": {"numNodes": "two", "nodes": 2}},
    }
    assert len(crd_schemas.vendored_errors(bad)) == 2, crd_schemas.vendored_errors(bad)


# -- GPUs: refscore asks for as many as its layout uses --------------------------------------------------------------
def test_refscore_gpus_equal_tensor_times_pipeline_parallel(overlays, combos, backfill_prod, rounds_prod):
    rendered = {**overlays, **combos, "prod+backfill": backfill_prod, "prod+rounds": rounds_prod}
    seen = 0
    for name, objs in rendered.items():
        for w in workloads(objs):
            for c in containers(w):
                if checks.service_of(c) != "refscore":
                    continue
                what = f"{name}: {w['metadata']['name']}/{c['name']}"
                if "OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE" not in container_env(objs, c):  # no engine (the archiver)
                    assert checks.gpu_limit(c) == 0, what
                    continue
                tp = int(env_value(objs, c, "OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE"))
                pp = int(env_value(objs, c, "OFFDPO_REFSCORE_PIPELINE_PARALLEL_SIZE"))
                gpus = checks.gpu_limit(c)
                if gpus == 0:  # CPU (dev): the transformers engine refuses a split
                    assert tp * pp == 1, what
                else:
                    assert gpus == tp * pp, f"{what}: nvidia.com/gpu {gpus} != TP {tp} x PP {pp}"
                    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
                seen += 1
    assert seen >= 2 * len(rendered), "every refscore container of every rendering was checked"
