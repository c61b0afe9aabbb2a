"""Issue 12's tests of the Kubernetes manifests: every overlay under deploy/k8s/overlays builds with
`kubectl kustomize` (offline) and what it builds is valid and consistent with the code.

Schemas: the Kubernetes kinds with kubernetes-validate (strict: unknown fields fail) against
KUBERNETES_VERSIONS; Strimzi, CloudNativePG and Prometheus-operator resources with the Node
validator in crd/ (schemas compiled from the operators' CRDs, plus a check for fields the schema
does not declare). Tools and versions: tests/deploy/README.md.
"""

from __future__ import annotations

import base64
import functools
import importlib
import importlib.util
import json
import posixpath
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from services.senders.registry import CHANNELS
from shared.kafka import Topics
from shared.settings import Settings
from tests.deploy.conftest import (
    CUSTOM_GROUPS,
    K8S,
    TREE,
    Build,
    build,
    group_of,
    image_entrypoint,
    image_env,
    ref,
    validate_custom,
)
from tests.deploy.conftest import custom_results as _custom_results

# The oldest Kubernetes release the manifests must apply to (docs/deploy.md's prerequisite) and
# the newest that kubernetes-validate 1.37 bundles: an API removed since fails the second.
KUBERNETES_VERSIONS = ("1.30", "1.37")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
ALL_PLUGINS = "all-plugins"  # services/senders/__main__.py
# The health/metrics port each service reads (shared/settings.py) and the host it binds.
PORT_SETTING = {
    "services.ingest": "ingest_port",
    "services.router": "router_http_port",
    "services.senders": "sender_http_port",
    "services.tracker": "tracker_http_port",
}
LONG_RUNNING = frozenset(PORT_SETTING)
# Settings typed SecretStr: where they come from a ConfigMap or a literal env value, the value
# may hold no credentials.
SECRET_SETTINGS = frozenset(
    f"HERALD_{name.upper()}" for name, f in Settings.model_fields.items() if "SecretStr" in str(f.annotation)
)
SECRET_KEY = re.compile(r"(^|[_.-])(PASSWORD|PASSWD|PASS|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|ENCRYPTION_KEY|KEY)$", re.I)
# Exactly a placeholder (or empty): `CHANGE_ME-anything` is a value someone filled in.
PLACEHOLDER = re.compile(r"^(|CHANGE_?ME|REPLACE_?ME)$", re.I)
# Query parameters of a URL that carry a credential (libpq's password, tokens, keys).
SECRET_PARAM = re.compile(r"pass|secret|token|key|auth|sig", re.I)
# Services whose URL carries its token in the path (webhooks): no password, still a secret.
TOKEN_IN_PATH = re.compile(
    r"hooks\.slack\.com/|discord(app)?\.com/api/webhooks/|api\.telegram\.org/bot|outlook\.office\.com/webhook|"
    r"webhook\.office\.com/|chat\.googleapis\.com/.*[?&]key=",
    re.I,
)


# --- helpers ---------------------------------------------------------------------------------


def namespace(doc: dict) -> str | None:
    return (doc.get("metadata") or {}).get("namespace")


def cluster_of(doc: dict) -> str | None:
    """The Strimzi cluster a KafkaNodePool or KafkaTopic belongs to."""
    return ((doc.get("metadata") or {}).get("labels") or {}).get("strimzi.io/cluster")


def pod_template(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    if doc["kind"] == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    return spec.get("template") if doc["kind"] in WORKLOAD_KINDS else None


def workloads(build: Build) -> Iterator[tuple[dict, dict]]:
    """(workload, pod template) of every workload in the build."""
    for doc in build.docs:
        template = pod_template(doc)
        if template is not None:
            yield doc, template


def containers(template: dict, init: bool = True) -> list[dict]:
    spec = template.get("spec") or {}
    return list(spec.get("containers") or []) + (list(spec.get("initContainers") or []) if init else [])


def pod_labels(template: dict) -> dict:
    return (template.get("metadata") or {}).get("labels") or {}


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels/matchExpressions) applied to labels; {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def is_herald_image(image: str) -> bool:
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return "herald" in name


def argv(container: dict) -> list[str]:
    """The process a container runs: command/args over the image's ENTRYPOINT/CMD (Kubernetes'
    rules: command replaces ENTRYPOINT and drops CMD; args replaces CMD)."""
    entrypoint, cmd = image_entrypoint()
    if container.get("command"):
        return list(container["command"]) + list(container.get("args") or [])
    return entrypoint + list(container["args"] if "args" in container else cmd)


def python_module(args: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) of `python -m module ...` (after a tini/dumb-init wrapper)."""
    for i, word in enumerate(args[:-2]):
        if re.fullmatch(r"python(3(\.\d+)?)?", Path(word).name) and args[i + 1] == "-m":
            return args[i + 2], args[i + 3 :]
    return None


def herald_containers(build: Build) -> Iterator[tuple[dict, dict, dict, str, list[str]]]:
    """(workload, template, container, module, module args) of every container of the image."""
    for doc, template in workloads(build):
        for c in containers(template):
            if is_herald_image(c.get("image", "")):
                found = python_module(argv(c))
                assert found, f"{ref(doc)} container {c['name']}: {argv(c)} is not `python -m <module> ...`"
                yield doc, template, c, *found


def service_module(build: Build, doc: dict) -> str | None:
    """The Herald service a workload runs (its first container of the image)."""
    for d, _, _, module, _ in herald_containers(build):
        if d is doc:
            return module
    return None


def env_of(build: Build, doc: dict, container: dict) -> dict[str, str | None]:
    """The container's environment as far as the image and the build tell it (a value from a
    Secret: None)."""
    maps = {(namespace(d), d["metadata"]["name"]): d for d in build.of_kind("ConfigMap", "Secret")}
    env: dict[str, str | None] = dict(image_env()) if is_herald_image(container.get("image", "")) else {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            cm = maps.get((namespace(doc), source["configMapRef"]["name"]))
            assert cm or source["configMapRef"].get("optional"), (
                f"{ref(doc)} {container['name']}: envFrom names ConfigMap {source['configMapRef']['name']}, "
                "which the build does not have"
            )
            env.update({prefix + k: str(v) for k, v in ((cm or {}).get("data") or {}).items()})
        if "secretRef" in source:
            secret = maps.get((namespace(doc), source["secretRef"]["name"]))
            keys = list(((secret or {}).get("data") or {}) | ((secret or {}).get("stringData") or {}))
            env.update({prefix + k: None for k in keys})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "configMapKeyRef" in (item.get("valueFrom") or {}):
            key_ref = item["valueFrom"]["configMapKeyRef"]
            cm = maps.get((namespace(doc), key_ref["name"])) or {}
            env[item["name"]] = (cm.get("data") or {}).get(key_ref["key"])
        else:
            env[item["name"]] = None
    return env


def setting(env: dict[str, str | None], name: str) -> str:
    """A setting's value as the service reads it: HERALD_<NAME> (any case) or its default."""
    for key, value in env.items():
        if key.upper() == f"HERALD_{name.upper()}" and value is not None:
            return value
    return str(Settings.model_fields[name].default)


def container_port(container: dict, port: int | str) -> int | None:
    for p in container.get("ports") or []:
        if port in (p.get("name"), p.get("containerPort")):
            return p["containerPort"]
    return None


def served_paths(module: str) -> set[str]:
    """The HTTP paths a service answers that a probe or a scrape may use."""
    if module == "services.ingest":
        from services.ingest.routes.health import router

        return {r.path for r in router.routes}
    from shared.health import HealthServer

    return {r.resource.canonical for r in HealthServer("127.0.0.1", 0, {})._app().router.routes()}


def replicas_floor(build: Build, doc: dict) -> int:
    """The fewest replicas a Deployment runs: its HPA's minReplicas, else spec.replicas."""
    for hpa in build.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if target["kind"] == doc["kind"] and target["name"] == doc["metadata"]["name"]:
            return int(hpa["spec"].get("minReplicas", 1))
    return int((doc.get("spec") or {}).get("replicas", 1))


# --- the build and the schemas ---------------------------------------------------------------


def test_overlay_builds(built: Build) -> None:
    assert built.docs, f"kubectl kustomize overlays/{built.env} built nothing"
    seen: set[tuple] = set()
    for doc in built.docs:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"not a resource: {doc!r:.200}"
        assert (doc.get("metadata") or {}).get("name"), f"{doc['kind']} without metadata.name"
        key = (group_of(doc["apiVersion"]), doc["kind"], namespace(doc), doc["metadata"]["name"])
        assert key not in seen, f"{ref(doc)} twice in overlays/{built.env}"
        seen.add(key)


def test_kubernetes_kinds_validate(built: Build) -> None:
    """Every resource not of an operator's group is a Kubernetes kind and valid (strict) for
    every Kubernetes version in KUBERNETES_VERSIONS; no schema = an unknown kind = failure."""
    errors = []
    for doc in built.docs:
        if group_of(doc["apiVersion"]) in CUSTOM_GROUPS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except SchemaNotFoundError as exc:
                errors.append(f"{ref(doc)}: unknown kind: {exc.message}")
            except ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{ref(doc)} (Kubernetes {exc.version}): {path}: {exc.message}")
    assert not errors, f"overlays/{built.env}:\n" + "\n".join(errors)


def test_custom_resources_validate(built: Build) -> None:
    """Strimzi, CloudNativePG and Prometheus-operator resources validate against the CRD schemas
    and hold no field those do not declare; an apiVersion/kind they do not know fails."""
    rc, lines = _custom_results(built.env)
    assert len(lines) == len(built.docs), f"validate.mjs answered {len(lines)} lines for {len(built.docs)} resources"
    errors = []
    for doc, line in zip(built.docs, lines, strict=True):
        assert (line["kind"], line["name"]) == (doc["kind"], doc["metadata"]["name"]), line
        custom = group_of(doc["apiVersion"]) in CUSTOM_GROUPS
        if custom and line["status"] != "ok":
            errors.append(f"{ref(doc)}: {'; '.join(line['errors'])} unknown fields: {line['unknownFields']}")
        elif not custom:
            assert line["status"] == "skipped", line
    assert not errors, f"overlays/{built.env}:\n" + "\n".join(errors)
    assert rc == 0


def test_validators_reject_what_they_should() -> None:
    """The validators are not vacuous: an unknown field, a wrong type, an unknown kind fail."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "x", "image": "x", "livenessProbe": {"bogus": 1}}]},
            },
        },
    }
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "example.com/v1", "kind": "Thing"}, KUBERNETES_VERSIONS[0])
    bad = [
        {
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaTopic",
            "metadata": {"name": "a"},
            "spec": {"partitions": 3, "retentionMs": 1},
        },  # fmt: skip
        {
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaTopic",
            "metadata": {"name": "b"},
            "spec": {"partitions": "3"},
        },  # fmt: skip
        {"apiVersion": "kafka.strimzi.io/v1", "kind": "KafkaTopics", "metadata": {"name": "c"}},
        {"apiVersion": "postgresql.cnpg.io/v9", "kind": "Cluster", "metadata": {"name": "d"}},
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "e"},
            "spec": {"selector": {}, "endpoints": [{"port": "http", "pathh": "/metrics"}]},
        },  # fmt: skip
    ]
    good = {"apiVersion": "kafka.strimzi.io/v1", "kind": "KafkaTopic", "metadata": {"name": "f"},
            "spec": {"partitions": 3, "replicas": 1, "config": {"cleanup.policy": "compact"}}}  # fmt: skip
    rc, lines = validate_custom(yaml.safe_dump_all([*bad, good]))
    assert rc == 1
    assert [line["status"] for line in lines] == ["invalid"] * len(bad) + ["ok"], lines
    assert lines[0]["unknownFields"] == ["/spec/retentionMs"]
    assert lines[4]["unknownFields"] == ["/spec/endpoints/0/pathh"]


# --- the code the manifests run --------------------------------------------------------------


def test_every_command_runs_a_module_of_the_code(built: Build) -> None:
    """Every container of the image runs `python -m services.X ...` for a module that exists, with
    arguments it accepts; together they run ingest, router, tracker and a sender for every
    channel, and a Job runs the migrations."""
    modules: dict[str, list[list[str]]] = {}
    for doc, _, c, module, args in herald_containers(built):
        where = f"{ref(doc)} container {c['name']}"
        assert module.startswith(("services.", "shared.")), f"{where}: runs {module}, not Herald's"
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        assert spec is not None, f"{where}: no module {module}"
        importlib.import_module(f"{module}.__main__" if spec.submodule_search_locations is not None else module)
        if module == "services.senders":
            assert args, f"{where}: services.senders needs the channels it sends"
            unknown = sorted(set(args) - {*CHANNELS, ALL_PLUGINS})
            assert not unknown, f"{where}: no channel {unknown} (channels: {CHANNELS})"
        elif module == "services.admin":
            from services.admin.__main__ import _parser

            try:
                _parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"{where}: services.admin does not accept {args}")
        else:
            assert not args, f"{where}: {module} takes no arguments, got {args}"
        if doc["kind"] == "Deployment":
            modules.setdefault(module, []).append(args)
    for module in ("services.ingest", "services.router", "services.tracker", "services.senders"):
        assert module in modules, f"overlays/{built.env}: no Deployment runs {module}"
    sent = {ch for args in modules["services.senders"] for a in args
            for ch in ([c for c in CHANNELS if c != "email"] if a == ALL_PLUGINS else [a])}  # fmt: skip
    assert sent == set(CHANNELS), f"overlays/{built.env}: no sender Deployment for {sorted(set(CHANNELS) - sent)}"
    jobs = [m for d, _, _, m, _ in herald_containers(built) if d["kind"] == "Job"]
    assert jobs, f"overlays/{built.env}: no migration Job"


MIGRATE = ["-m", "services.admin", "migrate"]


def test_migration_job_runs_exactly_migrate(built: Build) -> None:
    """The migration Job runs exactly `python -m services.admin migrate` (HERALD_RUN_MIGRATIONS
    is false in the services: nothing else applies migrations/), and no other Job of the image
    runs something else."""
    jobs = []
    for doc, template in workloads(built):
        if doc["kind"] != "Job":
            continue
        for c in containers(template):
            if not is_herald_image(c.get("image", "")):
                continue
            process = argv(c)
            python = bool(process) and re.fullmatch(r"python(3(\.\d+)?)?", Path(process[0]).name)
            exact = python and process[1:] == MIGRATE
            assert exact, f"{ref(doc)} container {c['name']} runs {process}, not `python -m services.admin migrate`"
            jobs.append(doc)
    assert jobs, f"overlays/{built.env}: no Job runs `python -m services.admin migrate`"
    for doc, template in workloads(built):
        if doc["kind"] == "Job":
            continue
        for c in containers(template):
            if is_herald_image(c.get("image", "")) and python_module(argv(c)) == ("services.admin", ["migrate"]):
                pytest.fail(f"{ref(doc)} container {c['name']} migrates: only the Job does")


def test_probes_hit_the_health_endpoints(built: Build) -> None:
    """Liveness and readiness probes (and startup, if any) GET a path the service serves, on the
    port the container declares, which is the HERALD_*_PORT the service reads; the Services
    forward to declared ports."""
    for doc, _, c, module, _ in herald_containers(built):
        if doc["kind"] != "Deployment":
            continue
        where = f"{ref(doc)} container {c['name']}"
        assert module in PORT_SETTING, f"{where}: a Deployment of {module}, which serves no health endpoint"
        env = env_of(built, doc, c)
        port = int(setting(env, PORT_SETTING[module]))
        if module == "services.ingest":
            host = setting(env, "ingest_host")
            assert host in ("0.0.0.0", "::"), f"{where}: HERALD_INGEST_HOST={host}: the kubelet cannot reach it"
        paths = served_paths(module)
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = c.get(kind)
            if probe is None:
                assert kind == "startupProbe", f"{where}: no {kind}"
                continue
            get = probe.get("httpGet")
            assert get, f"{where}: {kind} is not an httpGet on the health endpoints"
            assert get.get("path") in paths, f"{where}: {kind} path {get.get('path')} is not one of {sorted(paths)}"
            declared = container_port(c, get["port"])
            assert declared is not None, f"{where}: {kind} port {get['port']} is not a declared containerPort"
            assert declared == port, f"{where}: {kind} port {declared}, but {module} listens on {port}"
        assert c["livenessProbe"]["httpGet"]["path"] != "/health/ready", (
            f"{where}: liveness on /health/ready restarts the pod whenever a dependency is down"
        )
    for svc in built.of_kind("Service"):
        selector = (svc.get("spec") or {}).get("selector")
        if not selector:
            continue  # headless/external: nothing to forward to here
        pods = [(d, t) for d, t in workloads(built) if namespace(d) == namespace(svc) and selects(
            {"matchLabels": selector}, pod_labels(t))]  # fmt: skip
        assert pods, f"{ref(svc)} selects no pod of overlays/{built.env}"
        for port in svc["spec"].get("ports") or []:
            target = port.get("targetPort", port["port"])
            for d, t in pods:
                assert any(container_port(c, target) for c in containers(t, init=False)), (
                    f"{ref(svc)} port {port.get('name', port['port'])}: targetPort {target} not declared by {ref(d)}"
                )


# --- Kafka topics ----------------------------------------------------------------------------


def test_every_topic_has_a_kafka_topic(built: Build) -> None:
    topics = {}
    for kt in built.of_kind("KafkaTopic"):
        spec = kt.get("spec") or {}
        unknown = set(spec) - {"topicName", "partitions", "replicas", "config"}
        assert not unknown, f"{ref(kt)}: spec has {sorted(unknown)} (topic settings go under spec.config)"
        name = spec.get("topicName") or kt["metadata"]["name"]
        assert name not in topics, f"two KafkaTopics for {name}"
        topics[name] = kt
    missing = sorted(set(Topics.all()) - set(topics))
    assert not missing, f"overlays/{built.env}: no KafkaTopic for {missing} (shared.kafka.Topics)"

    kafkas = {(namespace(k), k["metadata"]["name"]): k for k in built.of_kind("Kafka")}
    brokers: dict[tuple, int] = {}
    for pool in built.of_kind("KafkaNodePool"):
        if "broker" in pool["spec"].get("roles", []):
            key = (namespace(pool), cluster_of(pool))
            brokers[key] = brokers.get(key, 0) + int(pool["spec"]["replicas"])
    for name, kt in sorted(topics.items()):
        if name not in Topics.all():
            continue
        spec, where = kt.get("spec") or {}, ref(kt)
        config = spec.get("config") or {}
        policy = str(config.get("cleanup.policy", "delete"))
        if name in Topics.COMPACTED:
            assert "compact" in policy.split(","), f"{where}: {name} must be compacted (Topics.COMPACTED)"
        else:
            assert policy == "delete", f"{where}: {name} is not compacted in the code, here cleanup.policy={policy}"
            assert "retention.ms" in config or "retention.bytes" in config, f"{where}: no retention set"
        assert isinstance(spec.get("partitions"), int) and spec["partitions"] >= 1, f"{where}: partitions not set"
        assert isinstance(spec.get("replicas"), int) and spec["replicas"] >= 1, f"{where}: replicas not set"
        cluster = cluster_of(kt)
        assert cluster, f"{where}: no strimzi.io/cluster label (the topic operator ignores it)"
        if kafkas:
            assert (namespace(kt), cluster) in kafkas, f"{where}: no Kafka {cluster} in overlays/{built.env}"
            count = brokers.get((namespace(kt), cluster))
            if count is not None:
                assert spec["replicas"] <= count, f"{where}: {spec['replicas']} replicas on {count} brokers"
                isr = int(config.get("min.insync.replicas", 1))
                assert isr <= spec["replicas"], f"{where}: min.insync.replicas {isr} > replicas {spec['replicas']}"


def test_kafka_is_kraft_with_node_pools(built: Build) -> None:
    for kafka in built.of_kind("Kafka"):
        annotations = kafka["metadata"].get("annotations") or {}
        assert annotations.get("strimzi.io/node-pools") == "enabled", f"{ref(kafka)}: node pools not enabled"
        if kafka["apiVersion"].endswith("/v1beta2"):
            assert annotations.get("strimzi.io/kraft") == "enabled", f"{ref(kafka)}: not KRaft"
        assert "zookeeper" not in kafka["spec"], f"{ref(kafka)}: ZooKeeper, not KRaft"
        name = kafka["metadata"]["name"]
        pools = [p for p in built.of_kind("KafkaNodePool") if cluster_of(p) == name]
        roles = {r for p in pools for r in p["spec"].get("roles", [])}
        assert {"controller", "broker"} <= roles, f"{ref(kafka)}: node pools have roles {sorted(roles)}"


# Apache Kafka's broker defaults (Strimzi keeps them) for the settings Kafka.spec.kafka.config may
# omit: with fewer brokers than offsets.topic.replication.factor, consumer groups never start.
BROKER_DEFAULTS = {
    "default.replication.factor": 1,
    "min.insync.replicas": 1,
    "offsets.topic.replication.factor": 3,
    "transaction.state.log.replication.factor": 3,
    "transaction.state.log.min.isr": 2,
}
BOOTSTRAP_SUFFIX = "-kafka-bootstrap"


def brokers_of(build: Build, kafka: dict) -> list[dict]:
    """The KafkaNodePools with the broker role of a Kafka."""
    return [
        p for p in build.of_kind("KafkaNodePool")
        if namespace(p) == namespace(kafka) and cluster_of(p) == kafka["metadata"]["name"]
        and "broker" in (p["spec"].get("roles") or [])
    ]  # fmt: skip


def broker_count(build: Build, kafka: dict) -> int:
    return sum(int(p["spec"].get("replicas", 0)) for p in brokers_of(build, kafka))


def bootstrap_addresses(build: Build, doc: dict, container: dict) -> list[tuple[str, int | None, dict | None]]:
    """(address, port, the Kafka of the build whose `<name>-kafka-bootstrap` Service it names) of
    every HERALD_KAFKA_BOOTSTRAP_SERVERS entry the container reads."""
    found = []
    for address in setting(env_of(build, doc, container), "kafka_bootstrap_servers").split(","):
        address = address.strip().removeprefix("kafka://")
        host, _, port = address.rpartition(":")
        name, _, domain = host.partition(".")
        parts = domain.split(".") if domain else []
        ns = parts[0] if parts else namespace(doc)
        in_cluster = len(parts) <= 1 or parts[1] == "svc"  # <svc>, <svc>.<ns>, <svc>.<ns>.svc[.<cluster domain>]
        kafka = None
        if in_cluster and name.endswith(BOOTSTRAP_SUFFIX):
            kafka = next((k for k in build.of_kind("Kafka") if namespace(k) == ns
                          and k["metadata"]["name"] == name.removesuffix(BOOTSTRAP_SUFFIX)), None)  # fmt: skip
        found.append((address, int(port) if port.isdigit() else None, kafka))
    return found


def test_kafka_bootstrap_is_a_listener_of_the_kafka(built: Build) -> None:
    """HERALD_KAFKA_BOOTSTRAP_SERVERS of every Herald container is `<name>-kafka-bootstrap:<port>`
    of a Kafka of the build, on a port one of its listeners declares: an internal one (the
    Service `<name>-kafka-bootstrap` serves those) without TLS or authentication (Herald's client
    settings have neither)."""
    errors = []
    for doc, _, c, _, _ in herald_containers(built):
        for address, port, kafka in bootstrap_addresses(built, doc, c):
            where = f"{ref(doc)} container {c['name']}: HERALD_KAFKA_BOOTSTRAP_SERVERS {address}"
            if kafka is None:
                kafkas = [k["metadata"]["name"] + BOOTSTRAP_SUFFIX for k in built.of_kind("Kafka")]
                errors.append(f"{where}: not the bootstrap Service of a Kafka of the build ({kafkas})")
                continue
            listeners = (kafka["spec"].get("kafka") or {}).get("listeners") or []
            usable = [
                lst["port"] for lst in listeners
                if lst.get("type") == "internal" and not lst.get("tls") and not lst.get("authentication")
            ]  # fmt: skip
            if port not in usable:
                errors.append(f"{where}: port {port} is not a plain internal listener of {ref(kafka)} ({usable})")
    assert not errors, f"overlays/{built.env}:\n" + "\n".join(errors)


def test_broker_settings_fit_the_brokers(built: Build) -> None:
    """Kafka.spec.kafka.config's replication settings (or Kafka's defaults where it omits them) are
    at most the brokers of its node pools; so is HERALD_KAFKA_REPLICATION_FACTOR (the services
    create a missing topic with it)."""
    errors = []
    kafkas = built.of_kind("Kafka")
    for kafka in kafkas:
        count = broker_count(built, kafka)
        config = BROKER_DEFAULTS | ((kafka["spec"].get("kafka") or {}).get("config") or {})
        if count < 1:
            errors.append(f"{ref(kafka)}: no broker (KafkaNodePool with the broker role)")
            continue
        for key in BROKER_DEFAULTS:
            if int(config[key]) > count:
                errors.append(f"{ref(kafka)}: {key} = {config[key]} > {count} broker(s)")
        if int(config["min.insync.replicas"]) > int(config["default.replication.factor"]):
            errors.append(f"{ref(kafka)}: min.insync.replicas > default.replication.factor")
        if int(config["transaction.state.log.min.isr"]) > int(config["transaction.state.log.replication.factor"]):
            errors.append(f"{ref(kafka)}: transaction.state.log.min.isr > transaction.state.log.replication.factor")
    for doc, _, c, _, _ in herald_containers(built):
        factor = int(setting(env_of(built, doc, c), "kafka_replication_factor"))
        for _, _, kafka in bootstrap_addresses(built, doc, c):
            if kafka is not None and factor > broker_count(built, kafka):
                errors.append(f"{ref(doc)} {c['name']}: HERALD_KAFKA_REPLICATION_FACTOR {factor} > "
                              f"{broker_count(built, kafka)} broker(s) of {ref(kafka)}")  # fmt: skip
    assert kafkas, f"overlays/{built.env}: no Kafka"
    assert not errors, f"overlays/{built.env}:\n" + "\n".join(sorted(set(errors)))


# --- secrets ---------------------------------------------------------------------------------


def placeholder(value: str) -> bool:
    """Empty or exactly a placeholder (PLACEHOLDER), or a URL whose password is one and that holds
    no other credential (query parameter, webhook token): a Secret's value may be nothing else."""
    value = value.strip()
    if PLACEHOLDER.match(value):
        return True
    if "://" not in value or credential_in(value):
        return False
    try:
        password = urlsplit(value).password
    except ValueError:
        return False
    return password is not None and bool(PLACEHOLDER.match(password)) and password != ""


def credential_in(value: str) -> bool:
    """A URL holding a credential: a password, a secret-looking query parameter that is not a
    placeholder, or a webhook whose token is its path."""
    value = value.strip()
    try:
        url = urlsplit(value)
        password = url.password
    except ValueError:
        return False
    if not url.scheme or not url.netloc:
        return False
    if password and not PLACEHOLDER.match(password):
        return True
    if any(SECRET_PARAM.search(k) and not PLACEHOLDER.match(v) for k, v in parse_qsl(url.query)):
        return True
    return bool(TOKEN_IN_PATH.search(value))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("", True),
        ("CHANGE_ME", True),
        ("postgresql://herald:CHANGE_ME@CHANGE_ME:5432/herald", True),
        ("redis://:CHANGE_ME@CHANGE_ME:6379/0", True),
        ("CHANGE_ME-anything", False),
        ("changeme2024", False),
        ("hunter2", False),
        ("postgresql://host/db?password=hunter2", False),
        ("postgresql://herald:CHANGE_ME@host/db?sslpassword=hunter2", False),
        ("postgresql://herald:hunter2@host/db", False),
        ("redis://redis:6379/0", False),  # a URL in a Secret carries a placeholder password
        ("https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX", False),
        ("https://:CHANGE_ME@hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX", False),
    ],
)
def test_placeholder_rule(value: str, ok: bool) -> None:
    """What counts as a placeholder in a Secret (the rule the Secret checks below apply)."""
    assert placeholder(value) is ok


SECRET_TEMPLATE = "base/secret.example.yaml"
# SecretStr settings a deployment may leave unset (so the template may name them in a comment
# only): the JWT key (derived from the encryption key), the bootstrap mailbox's SMTP password,
# ClickHouse's URL (HERALD_STATS_BACKEND=clickhouse only).
OPTIONAL_SECRETS = frozenset({"HERALD_JWT_SECRET", "HERALD_SMTP_PASSWORD", "HERALD_CLICKHOUSE_URL"})


def test_secret_template_holds_every_secret_setting() -> None:
    """deploy/k8s/base/secret.example.yaml has a key for every SecretStr setting of
    shared/settings.py (an optional one at least named in a comment) and no other key."""
    assert OPTIONAL_SECRETS <= SECRET_SETTINGS, f"not SecretStr settings: {sorted(OPTIONAL_SECRETS - SECRET_SETTINGS)}"
    path = K8S / SECRET_TEMPLATE
    assert path.exists(), f"no deploy/k8s/{SECRET_TEMPLATE}"
    text = path.read_text()
    docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict) and d.get("kind") == "Secret"]
    assert len(docs) == 1, f"deploy/k8s/{SECRET_TEMPLATE}: {len(docs)} Secrets"
    keys = set(docs[0].get("stringData") or {}) | set(docs[0].get("data") or {})
    comments = " ".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    mentioned = set(re.findall(r"\bHERALD_[A-Z0-9_]+\b", comments))
    extra = sorted(keys - SECRET_SETTINGS)
    missing = sorted(SECRET_SETTINGS - keys - (OPTIONAL_SECRETS & mentioned))
    assert not extra, f"deploy/k8s/{SECRET_TEMPLATE}: {extra} are not secret settings (shared/settings.py SecretStr)"
    assert not missing, (
        f"deploy/k8s/{SECRET_TEMPLATE}: no key for {missing} (SecretStr settings of shared/settings.py"
        f"; optional ones, {sorted(OPTIONAL_SECRETS)}, may be a comment)"
    )


def test_no_secret_holds_a_real_value(built: Build) -> None:
    """Secrets (including secretGenerator's) hold placeholders only; ConfigMaps and literal env
    values hold no secret-looking key and no URL with a password."""
    errors = []
    for secret in built.of_kind("Secret"):
        values = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (secret.get("data") or {}).items()}
        values |= {k: str(v) for k, v in (secret.get("stringData") or {}).items()}
        errors += [
            f"{ref(secret)} {k}: not a placeholder ({len(v)} characters)"
            for k, v in values.items()
            if not placeholder(v)
        ]
    for cm in built.of_kind("ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            if SECRET_KEY.search(key):
                errors.append(f"{ref(cm)}: key {key} looks like a secret: put it in the Secret")
            elif key.upper() in SECRET_SETTINGS and credential_in(str(value)):
                errors.append(f"{ref(cm)}: {key} holds a password: put it in the Secret")
            elif credential_in(str(value)) and len(str(value)) < 2000:
                errors.append(f"{ref(cm)}: {key} holds a URL with a password")
    for doc, template in workloads(built):
        for c in containers(template):
            for item in c.get("env") or []:
                if "value" not in item:
                    continue
                value = str(item["value"])
                if (SECRET_KEY.search(item["name"]) and not PLACEHOLDER.match(value)) or credential_in(value):
                    errors.append(f"{ref(doc)} {c['name']}: env {item['name']} is a literal secret: use a secretKeyRef")
    assert not errors, f"overlays/{built.env}:\n" + "\n".join(errors)


@functools.cache
def secret_templates() -> tuple[tuple[Path, dict], ...]:
    """Every Secret written anywhere under deploy/k8s, in a kustomization or not (templates)."""
    found = []
    for path in sorted(K8S.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                found.append((path, doc))
    return tuple(found)


def test_secret_templates_hold_placeholders_only() -> None:
    """The Secret templates beside the manifests (outside the build: applying the overlay must not
    overwrite real values) validate and hold placeholders; no kustomization's secretGenerator has a
    literal value."""
    errors = []
    for path, doc in secret_templates():
        where = f"{path.relative_to(TREE)} {ref(doc)}"
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except ValidationError as exc:
                errors.append(f"{where} (Kubernetes {exc.version}): {exc.message}")
        values = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (doc.get("data") or {}).items()}
        values |= {k: str(v) for k, v in (doc.get("stringData") or {}).items()}
        errors += [f"{where} {k}: not a placeholder" for k, v in values.items() if not placeholder(v)]
    for path in sorted(K8S.rglob("kustomization.y*ml")):
        for gen in (yaml.safe_load(path.read_text()) or {}).get("secretGenerator") or []:
            for literal in gen.get("literals") or []:
                key, _, value = literal.partition("=")
                if not placeholder(value):
                    errors.append(f"{path.relative_to(TREE)} secretGenerator {gen.get('name')}: {key} has a value")
    assert not errors, "\n".join(errors)


def test_secret_references_resolve(built: Build) -> None:
    """Every Secret a pod reads is in the build, a template beside the manifests, or one that an
    operator of the build creates (CloudNativePG's <cluster>-app / -superuser)."""
    known = {(namespace(d), d["metadata"]["name"]) for d in built.of_kind("Secret")}
    templates = {doc["metadata"]["name"] for _, doc in secret_templates()}
    operators = {
        f"{c['metadata']['name']}-{suffix}" for c in built.of_kind("Cluster") for suffix in ("app", "superuser")
    }
    for doc, template in workloads(built):
        for c in containers(template):
            names = [s["secretRef"]["name"] for s in c.get("envFrom") or [] if "secretRef" in s]
            names += [
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in c.get("env") or []
                if "secretKeyRef" in (e.get("valueFrom") or {})
            ]
            for name in names:
                assert (namespace(doc), name) in known or name in templates or name in operators, (
                    f"{ref(doc)} {c['name']}: reads Secret {name}, which nothing provides"
                )


# --- workloads -------------------------------------------------------------------------------


def test_workloads_are_hardened(built: Build) -> None:
    """Every Herald Deployment and Job: resources, probes (Deployments), non-root, no privilege
    escalation, all capabilities dropped."""
    errors = []
    for doc, template in workloads(built):
        if doc["kind"] not in ("Deployment", "Job") or not any(
            is_herald_image(c.get("image", "")) for c in containers(template)
        ):
            continue
        pod_sc = (template.get("spec") or {}).get("securityContext") or {}
        for c in containers(template):
            where = f"{ref(doc)} container {c['name']}"
            sc = c.get("securityContext") or {}
            resources = c.get("resources") or {}
            for part in ("requests", "limits"):
                if not (resources.get(part) or {}).get("memory"):
                    errors.append(f"{where}: no resources.{part}.memory")
            if not (resources.get("requests") or {}).get("cpu"):
                errors.append(f"{where}: no resources.requests.cpu")
            if doc["kind"] == "Deployment" and c in containers(template, init=False):
                errors += [f"{where}: no {p}" for p in ("livenessProbe", "readinessProbe") if not c.get(p)]
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                errors.append(f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                errors.append(f"{where}: runAsUser 0")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                errors.append(f"{where}: privileged")
            drop = ((sc.get("capabilities") or {}).get("drop")) or []
            if "ALL" not in drop:
                errors.append(f"{where}: capabilities.drop is not [ALL]")
            if (sc.get("capabilities") or {}).get("add"):
                errors.append(f"{where}: adds capabilities {sc['capabilities']['add']}")
    assert not errors, f"overlays/{built.env}:\n" + "\n".join(errors)


def test_written_paths_are_mounted(built: Build) -> None:
    """Where a Herald container's root filesystem is read-only, what it writes is on a writable
    volume: HOME and faust's data directory (image ENV or the build's env: /tmp), and
    HERALD_DATA_DIR for ingest and the email sender (the attachments)."""
    errors = []
    for doc, template, c, module, args in herald_containers(built):
        if not (c.get("securityContext") or {}).get("readOnlyRootFilesystem"):
            continue
        volumes = {v["name"]: v for v in (template.get("spec") or {}).get("volumes") or []}
        mounts = [m["mountPath"].rstrip("/") for m in c.get("volumeMounts") or []
                  if not m.get("readOnly") and not any(k in volumes.get(m["name"], {})
                                                       for k in ("configMap", "secret", "projected"))]  # fmt: skip
        env = env_of(built, doc, c)
        paths = {"HOME": env.get("HOME") or "/"}
        if module == "services.router":
            paths["faust's data directory"] = env.get("F_DATADIR") or env.get("FAUST_DATADIR")
        if module == "services.ingest" or (module == "services.senders" and "email" in args):
            paths["HERALD_DATA_DIR"] = setting(env, "data_dir")
        for what, path in paths.items():
            norm = posixpath.normpath(path) if path else ""
            ok = norm.startswith("/") and any(norm == m or norm.startswith(m + "/") for m in mounts)
            if not ok:
                errors.append(f"{ref(doc)} {c['name']}: {what} {path!r} is on the read-only root (mounts: {mounts})")
    assert not errors, f"overlays/{built.env}:\n" + "\n".join(errors)


def test_every_deployment_has_a_pdb_and_scalable_ones_an_hpa(built: Build) -> None:
    pdbs = built.of_kind("PodDisruptionBudget")
    hpas = built.of_kind("HorizontalPodAutoscaler")
    deployments = {(namespace(d), d["metadata"]["name"]): d for d in built.of_kind("Deployment")}
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        key = (namespace(hpa), target["name"])
        assert target["kind"] == "Deployment" and key in deployments, f"{ref(hpa)}: targets no Deployment: {target}"
        assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"], f"{ref(hpa)}: bounds"
        for metric in hpa["spec"].get("metrics") or []:
            if metric["type"] == "Resource":
                res = metric["resource"]["name"]
                for c in containers(deployments[key]["spec"]["template"], init=False):
                    assert ((c.get("resources") or {}).get("requests") or {}).get(res), (
                        f"{ref(hpa)} scales on {res}, which {target['name']}/{c['name']} requests nothing of"
                    )
    for pdb in pdbs:
        assert any(namespace(d) == namespace(pdb) and selects(pdb["spec"].get("selector"), pod_labels(t))
                   for d, t in workloads(built)), f"{ref(pdb)} selects no pod"  # fmt: skip
    for (ns, name), dep in deployments.items():
        module = service_module(built, dep)
        if module is None:
            continue  # not Herald's (an in-cluster Redis): its own chart's business
        labels = pod_labels(dep["spec"]["template"])
        own = [p for p in pdbs if namespace(p) == ns and selects(p["spec"].get("selector"), labels)]
        assert own, f"overlays/{built.env}: no PodDisruptionBudget for Deployment {name}"
        floor = replicas_floor(built, dep)
        for pdb in own:
            min_available, max_unavailable = pdb["spec"].get("minAvailable"), pdb["spec"].get("maxUnavailable")
            blocks = (
                (isinstance(min_available, int) and min_available >= floor)
                or min_available == "100%"
                or (max_unavailable in (0, "0%"))
            )
            assert not blocks, f"{ref(pdb)}: with {floor} replica(s) of {name} no pod may ever be evicted (drain hangs)"
        if module in ("services.ingest", "services.senders"):
            assert any(h["spec"]["scaleTargetRef"]["name"] == name and namespace(h) == ns for h in hpas), (
                f"overlays/{built.env}: no HorizontalPodAutoscaler for Deployment {name} ({module})"
            )


def operator_pods(build: Build, ns: str | None, selector: dict) -> bool:
    """Whether a selector names the pods of an operator-managed resource of the build: Strimzi's
    (strimzi.io/cluster: <Kafka>) or CloudNativePG's (cnpg.io/cluster: <Cluster>)."""
    labels = selector.get("matchLabels") or {}
    owners = {"strimzi.io/cluster": "Kafka", "cnpg.io/cluster": "Cluster"}
    named = [(kind, labels[key]) for key, kind in owners.items() if key in labels]
    return bool(named) and all(
        any(namespace(d) == ns and d["metadata"]["name"] == name for d in build.of_kind(kind)) for kind, name in named
    )


def test_network_policies_select_existing_pods(built: Build) -> None:
    pods = [(namespace(d), pod_labels(t)) for d, t in workloads(built)]
    for np in built.of_kind("NetworkPolicy"):
        selector = np["spec"].get("podSelector") or {}
        assert operator_pods(built, namespace(np), selector) or any(
            ns == namespace(np) and selects(selector, labels) for ns, labels in pods
        ), f"{ref(np)}: podSelector {selector} selects no pod of overlays/{built.env}"
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in np["spec"].get(direction) or []:
                for peer in rule.get(peers_key) or []:
                    if "podSelector" not in peer or "namespaceSelector" in peer:
                        continue  # other namespaces' pods (or ipBlock): not in this build
                    peer_sel = peer["podSelector"] or {}
                    assert operator_pods(built, namespace(np), peer_sel) or any(
                        ns == namespace(np) and selects(peer_sel, labels) for ns, labels in pods
                    ), f"{ref(np)}: {direction} peer {peer_sel} selects no pod of overlays/{built.env}"


# Where DNS answers: kube-dns/CoreDNS pods in kube-system (or a node-local cache by address).
DNS_PODS = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
EXTERNAL = {"namespace": None, "labels": {}}  # a managed service outside the cluster


def port_allowed(rule_ports: list[dict] | None, port: int, protocol: str, names: frozenset[str]) -> bool:
    """Whether a rule's ports admit port/protocol (a named port: one the destination declares)."""
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str) and not want.isdigit():
            if want in names:
                return True
            continue
        if int(want) <= port <= int(p.get("endPort", want)):
            return True
    return False


def peer_allowed(peer: dict, policy_ns: str | None, dest: dict) -> bool:
    """Whether a NetworkPolicy egress peer admits a destination ({"namespace": ns or None for
    outside the cluster, "labels": pod labels})."""
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        everything = block.get("cidr") in ("0.0.0.0/0", "::/0") and not block.get("except")
        return dest["namespace"] is None or dest is DNS_PODS or everything
    if dest["namespace"] is None:
        return False
    if "namespaceSelector" in peer:
        ns_labels = {"kubernetes.io/metadata.name": dest["namespace"]}
        return selects(peer["namespaceSelector"], ns_labels) and selects(peer.get("podSelector"), dest["labels"])
    return dest["namespace"] == policy_ns and selects(peer.get("podSelector"), dest["labels"])


def egress_allowed(build: Build, doc: dict, template: dict, port: int, protocol: str, dest: dict,
                   names: frozenset[str] = frozenset()) -> bool:  # fmt: skip
    """Whether the NetworkPolicies of the build let a workload's pods reach dest on port/protocol
    (no policy restricting their egress: everything)."""
    mine = [
        np for np in build.of_kind("NetworkPolicy")
        if "Egress" in (np["spec"].get("policyTypes") or []) and namespace(np) == namespace(doc)
        and selects(np["spec"].get("podSelector"), pod_labels(template))
    ]  # fmt: skip
    if not mine:
        return True
    return any(
        port_allowed(rule.get("ports"), port, protocol, names)
        and (not rule.get("to") or any(peer_allowed(peer, namespace(np), dest) for peer in rule["to"]))
        for np in mine
        for rule in np["spec"].get("egress") or []
    )


def broker_pods(build: Build, kafka: dict) -> list[dict]:
    """The labels Strimzi gives the broker pods of a Kafka's node pools."""
    name = kafka["metadata"]["name"]
    return [
        {"namespace": namespace(kafka), "labels": {
            "strimzi.io/cluster": name, "strimzi.io/kind": "Kafka", "strimzi.io/name": f"{name}-kafka",
            "strimzi.io/component-type": "kafka", "strimzi.io/pool-name": pool["metadata"]["name"],
            "strimzi.io/broker-role": "true",
            "strimzi.io/controller-role": str("controller" in pool["spec"].get("roles", [])).lower(),
            "app.kubernetes.io/name": "kafka", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/part-of": f"strimzi-{name}", "app.kubernetes.io/managed-by": "strimzi-cluster-operator",
        }}
        for pool in brokers_of(build, kafka)
    ]  # fmt: skip


def template_url(key: str) -> str:
    """A URL of the Secret template (managed services): where the services connect by default."""
    for _, doc in secret_templates():
        value = (doc.get("stringData") or {}).get(key)
        if value:
            return str(value)
    return ""


def data_destinations(build: Build, doc: dict, container: dict, key: str, default_port: int) -> list[tuple]:
    """(port, destination, port names) of the PostgreSQL (key HERALD_DATABASE_URL) or Redis
    (HERALD_REDIS_URL) a Herald container reaches: an in-cluster Service's pods when its URL names
    one, CloudNativePG's primary for PostgreSQL when the build has a Cluster, else a managed
    service on the port of the Secret template's URL."""
    value = env_of(build, doc, container).get(key)
    if value:
        url = urlsplit(value)
        svc = next((s for s in build.of_kind("Service") if s["metadata"]["name"] == (url.hostname or "").split(".")[0]
                    and namespace(s) == namespace(doc)), None)  # fmt: skip
        if svc is not None:
            port = next((p for p in svc["spec"]["ports"] if p["port"] == (url.port or default_port)), None)
            assert port is not None, f"{ref(doc)} {container['name']}: {key} names {ref(svc)}, which has no such port"
            found = []
            for d, t in workloads(build):
                if namespace(d) == namespace(svc) and selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(t)):
                    target = port.get("targetPort", port["port"])
                    number = next(filter(None, (container_port(c, target) for c in containers(t, init=False))), None)
                    assert number is not None, f"{ref(svc)}: targetPort {target} not declared by {ref(d)}"
                    names = frozenset(p.get("name") for c in containers(t, init=False) for p in c.get("ports") or []
                                      if p.get("containerPort") == number and p.get("name"))  # fmt: skip
                    found.append((number, {"namespace": namespace(d), "labels": pod_labels(t)}, names))
            return found
    if key == "HERALD_DATABASE_URL":
        clusters = [c for c in build.of_kind("Cluster") if namespace(c) == namespace(doc)]
        if clusters:
            return [(5432, {"namespace": namespace(c), "labels": {
                "cnpg.io/cluster": c["metadata"]["name"], "cnpg.io/instanceRole": "primary", "role": "primary",
                "cnpg.io/podRole": "instance"}}, frozenset({"postgresql"})) for c in clusters]  # fmt: skip
    return [(urlsplit(template_url(key)).port or default_port, EXTERNAL, frozenset())]


def test_egress_reaches_dns_kafka_and_data(built: Build) -> None:
    """A Herald pod whose egress some policy restricts may still reach DNS on UDP 53 and TCP 53, the
    brokers of the Kafka it bootstraps from on that listener's port, PostgreSQL and Redis (the
    in-cluster pods, or a managed service's port to any address)."""
    errors = []
    for doc, template, c, _, _ in herald_containers(built):
        where = f"{ref(doc)} container {c['name']}"
        for protocol in ("UDP", "TCP"):
            if not egress_allowed(built, doc, template, 53, protocol, DNS_PODS):
                errors.append(f"{where}: no egress to DNS on {protocol} 53 (kube-system k8s-app=kube-dns)")
        for address, port, kafka in bootstrap_addresses(built, doc, c):
            if kafka is None or port is None:
                continue  # test_kafka_bootstrap_is_a_listener_of_the_kafka
            for dest in broker_pods(built, kafka):
                if not egress_allowed(built, doc, template, port, "TCP", dest):
                    errors.append(f"{where}: no egress to the brokers of {ref(kafka)} on TCP {port} ({address})")
        for key, default in (("HERALD_DATABASE_URL", 5432), ("HERALD_REDIS_URL", 6379)):
            for port, dest, names in data_destinations(built, doc, c, key, default):
                if not egress_allowed(built, doc, template, port, "TCP", dest, names):
                    target = "a managed service" if dest is EXTERNAL else f"pods {dest['labels']}"
                    errors.append(f"{where}: no egress for {key} to {target} on TCP {port}")
    assert not errors, f"overlays/{built.env}:\n" + "\n".join(errors)


# --- monitoring ------------------------------------------------------------------------------


def test_monitoring_matches_the_repository(built: Build) -> None:
    """PrometheusRule = deploy/prometheus/alerts.yml; dashboard ConfigMaps = deploy/grafana/*.json;
    monitors scrape /metrics on a port the selected pods/Services declare."""
    rules = built.of_kind("PrometheusRule")
    dashboards = [
        cm for cm in built.of_kind("ConfigMap") if "grafana_dashboard" in (cm["metadata"].get("labels") or {})
    ]
    monitors = built.of_kind("ServiceMonitor", "PodMonitor")
    if not (rules or dashboards or monitors):
        assert built.env != "prod", "overlays/prod has no monitoring (ServiceMonitor/PodMonitor, PrometheusRule)"
        return
    assert rules, f"overlays/{built.env}: monitors but no PrometheusRule"
    alerts = yaml.safe_load((TREE / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert [g for r in rules for g in r["spec"]["groups"]] == alerts["groups"], (
        "the PrometheusRule's groups differ from deploy/prometheus/alerts.yml "
        "(regenerate: deploy/k8s/gen_monitoring.py)"
    )
    wanted = {p.name: json.loads(p.read_text()) for p in sorted((TREE / "deploy" / "grafana").glob("*.json"))}
    got = {k: json.loads(v) for cm in dashboards for k, v in (cm.get("data") or {}).items()}
    assert got == wanted, (
        f"dashboard ConfigMaps hold {sorted(got)}, deploy/grafana has {sorted(wanted)} "
        "(or their contents differ; regenerate: deploy/k8s/gen_monitoring.py)"
    )
    services = built.of_kind("Service")
    for mon in monitors:
        spec = mon["spec"]
        endpoints = spec.get("endpoints") or spec.get("podMetricsEndpoints") or []
        assert endpoints, f"{ref(mon)}: no endpoints"
        if mon["kind"] == "ServiceMonitor":
            chosen = [s for s in services if selects(spec["selector"], s["metadata"].get("labels") or {})]
            ports = {p.get("name") for s in chosen for p in s["spec"].get("ports") or []}
        else:
            chosen = [t for _, t in workloads(built) if selects(spec["selector"], pod_labels(t))]
            ports = {p.get("name") for t in chosen for c in containers(t, init=False) for p in c.get("ports") or []}
        assert chosen, f"{ref(mon)}: selects nothing in overlays/{built.env}"
        for ep in endpoints:
            assert ep.get("port") in ports, f"{ref(mon)}: port {ep.get('port')} not among {sorted(ports - {None})}"
            assert ep.get("path", "/metrics") == "/metrics", f"{ref(mon)}: path {ep.get('path')}, not /metrics"


@pytest.mark.parametrize("script", ["gen_monitoring.py", "gen_base.py"])
def test_generated_files_are_current(script: str) -> None:
    """The generators beside the manifests (when the tree has them) find their files up to date:
    gen_monitoring.py (PrometheusRule and dashboard ConfigMaps from deploy/prometheus and
    deploy/grafana), gen_base.py (Deployments and KafkaTopics from the code)."""
    path = K8S / script
    if not path.exists():
        return  # test_monitoring_matches_the_repository compares the built resources directly
    done = subprocess.run([sys.executable, str(path), "--check"], capture_output=True, text=True, timeout=60, cwd=TREE)
    assert done.returncode == 0, f"{script} --check:\n{done.stdout}\n{done.stderr}"


# --- the first review's fixes (issue 12) -------------------------------------------------------


def test_kafka_listener_peers_admit_every_client(built: Build) -> None:
    """A listener with `networkPolicyPeers` admits only those peers (Strimzi's generated
    NetworkPolicy): every pod template (Deployments', the Job's) whose containers bootstrap from
    that listener must be selected by one of its peers (a peer without namespaceSelector is the
    Kafka's namespace)."""
    errors = []
    checked = 0
    for doc, template, c, _, _ in herald_containers(built):
        for address, port, kafka in bootstrap_addresses(built, doc, c):
            if kafka is None:
                continue
            listener = next((lst for lst in (kafka["spec"].get("kafka") or {}).get("listeners") or []
                             if lst.get("port") == port), None)  # fmt: skip
            if listener is None or "networkPolicyPeers" not in listener:
                continue
            checked += 1
            labels = pod_labels(template)
            admitted = any(
                "ipBlock" not in peer
                and (("namespaceSelector" in peer) or namespace(doc) == namespace(kafka))
                and selects(peer.get("podSelector"), labels)
                for peer in listener["networkPolicyPeers"] or []
            )
            if not admitted:
                errors.append(f"{ref(doc)} container {c['name']} ({address}, labels {labels}): no peer of listener "
                              f"{listener['name']} of {ref(kafka)} selects it")  # fmt: skip
    assert checked, f"overlays/{built.env}: no Herald container bootstraps from a listener with networkPolicyPeers"
    assert any(d["kind"] == "Job" for d, *_ in herald_containers(built))
    assert not errors, f"overlays/{built.env}:\n" + "\n".join(errors)


def test_herald_pdbs_allow_evicting_unhealthy_pods(built: Build) -> None:
    """Every Herald PodDisruptionBudget evicts unhealthy pods whatever the budget (AlwaysAllow):
    a crash-looping pod must not block a node drain."""
    pdbs = [p for p in built.of_kind("PodDisruptionBudget")
            if any(selects(p["spec"].get("selector"), pod_labels(t)) and service_module(built, d)
                   for d, t in workloads(built))]  # fmt: skip
    assert pdbs, f"overlays/{built.env}: no PodDisruptionBudget of Herald"
    wrong = [ref(p) for p in pdbs if p["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow"]
    assert not wrong, f"overlays/{built.env}: without unhealthyPodEvictionPolicy AlwaysAllow: {wrong}"


def test_workers_roll_without_surge(built: Build) -> None:
    """The workers (router, tracker, senders) consume shares of their topics' partitions: a surged
    pod beyond the partition count gets none (and a sender never becomes ready), so they roll with
    maxSurge 0; ingest surges (it serves through its Service)."""
    workers = []
    for dep in built.of_kind("Deployment"):
        module = service_module(built, dep)
        if module is None or module == "services.ingest":
            continue
        workers.append(dep["metadata"]["name"])
        strategy = dep["spec"].get("strategy") or {}
        rolling = strategy.get("rollingUpdate") or {}
        assert strategy.get("type", "RollingUpdate") == "RollingUpdate", ref(dep)
        assert str(rolling.get("maxSurge")) in ("0", "0%"), f"{ref(dep)}: maxSurge {rolling.get('maxSurge')}"
        assert str(rolling.get("maxUnavailable", "25%")) not in ("0", "0%"), f"{ref(dep)}: cannot roll"
    names = set(workers)
    assert {"router", "tracker", "sender-email"} <= names, names
    assert any(n.startswith("sender-") and n != "sender-email" for n in names), names


def test_single_instance_postgres_has_no_pdb() -> None:
    """dev's CloudNativePG Cluster has one instance: its operator PDB (minAvailable 1) would block
    every node drain, so it is disabled; a Cluster with more instances keeps it."""
    clusters = build("dev").of_kind("Cluster")
    assert clusters, "overlays/dev: no CloudNativePG Cluster"
    for cluster in clusters:
        if cluster["spec"].get("instances", 1) == 1:
            assert cluster["spec"].get("enablePDB") is False, f"{ref(cluster)}: one instance with enablePDB"
