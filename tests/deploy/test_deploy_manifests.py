"""docker-compose.yml, the Dockerfile, the health check script and the Kubernetes manifests.

No container engine is needed: the files are parsed with PyYAML and checked
for the wiring that would otherwise only fail at `docker compose up` or
`kubectl apply` time (probes, env, ports, names that must agree).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

WORKER_ENV = (
    "LEAKWATCH_BROKERS",
    "LEAKWATCH_RULES_PATH",
    "LEAKWATCH_ESCALATION_SEVERITY",
    "LEAKWATCH_MAIL_SMTP_HOST",
    "LEAKWATCH_MAIL_SMTP_PORT",
    "LEAKWATCH_MAIL_HOTLINE",
    "LEAKWATCH_WEB_PORT",
    "LEAKWATCH_PSEUDONYM_KEY",
)
SECRET_ENV = "LEAKWATCH_PSEUDONYM_KEY"

def _mail_env() -> set[str]:
    """Variables of the mail section (streams.mail_settings.MailSettings)."""
    import dataclasses

    from streams.mail_settings import MailSettings

    return {f"LEAKWATCH_MAIL_{f.name.upper()}" for f in dataclasses.fields(MailSettings)}


#: Settings the deployment passes that belong to the mail section, not the core.
MAIL_ENV = _mail_env()


def compose_v2_command() -> list[str] | None:
    """The Docker Compose v2 command line: $DOCKER_COMPOSE, else the docker plugin; None if absent."""
    candidates = []
    if os.environ.get("DOCKER_COMPOSE"):
        candidates.append([os.environ["DOCKER_COMPOSE"]])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for command in candidates:
        try:
            probe = subprocess.run(
                [*command, "version"], capture_output=True, text=True, check=False, timeout=30
            )
        except OSError:
            continue
        if probe.returncode == 0 and "version 1." not in probe.stdout:
            return command
    return None


def core_settings(env: dict[str, str]) -> Any:
    """Load the worker's core settings from ``env`` exactly as the worker does."""
    from streams.config import Settings, load_settings

    return load_settings(Settings, env=env)


def unknown_settings(env: dict[str, str]) -> set[str]:
    """LEAKWATCH_* variables in ``env`` the worker does not know (typos)."""
    import dataclasses

    from streams.config import Settings

    known = {f"LEAKWATCH_{field.name.upper()}" for field in dataclasses.fields(Settings)}
    return {key for key in env if key.startswith("LEAKWATCH_")} - known - MAIL_ENV


TOPICS = {
    "access-events",
    "operation-events",
    "events-dlq",
    "leak-alerts",
    "escalations",
    "acks",
    "audit",
    "leakwatch-checkpoints",
}

_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def compose_default(value: Any) -> str:
    """Resolve compose ``${VAR:-default}`` interpolation to its default (``${VAR:?err}`` stays)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(2) == "-":
            return match.group(3)
        return match.group(0)

    return _INTERPOLATION.sub(replace, str(value))


@pytest.fixture(scope="module")
def compose(deploy_dir: Path, yaml_file: Callable[[Path], Any]) -> dict[str, Any]:
    """The parsed docker-compose.yml (YAML anchors and merge keys resolved)."""
    document: dict[str, Any] = yaml_file(deploy_dir / "docker-compose.yml")
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    """The compose services by name."""
    found: dict[str, Any] = compose["services"]
    return found


@pytest.fixture(scope="module")
def workers(services: dict[str, Any]) -> dict[str, Any]:
    """The leakwatch worker services."""
    found = {name: svc for name, svc in services.items() if re.fullmatch(r"worker\d+", name)}
    assert found, "no worker services"
    return found


@pytest.fixture(scope="module")
def kafka_nodes(services: dict[str, Any]) -> dict[str, Any]:
    """The Kafka broker services."""
    return {name: svc for name, svc in services.items() if re.fullmatch(r"kafka\d+", name)}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (list or mapping form)."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def healthcheck_command(service: dict[str, Any]) -> str:
    """A service's healthcheck test as one string."""
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


class TestDockerCompose:
    """The single-host stack is complete and its pieces agree with each other."""

    def test_expected_services(self, services: dict[str, Any]) -> None:
        """Kafka x3, topic init, two workers, Prometheus, Grafana and a mail catcher are defined."""
        expected = {
            "kafka1",
            "kafka2",
            "kafka3",
            "kafka-init",
            "worker1",
            "worker2",
            "prometheus",
            "grafana",
            "mailpit",
        }
        assert expected <= set(services), sorted(expected - set(services))

    def test_images_pinned(self, services: dict[str, Any]) -> None:
        """Every image has an explicit version tag (no implicit or explicit `latest`)."""
        for name, service in services.items():
            image = service.get("image")
            assert image, f"{name}: no image"
            repository, _, tag = image.rpartition(":")
            assert repository and tag and "/" not in tag, f"{name}: image {image!r} is not pinned"
            assert tag != "latest", f"{name}: image {image!r} uses latest"

    def test_kafka_kraft_cluster(self, kafka_nodes: dict[str, Any]) -> None:
        """Three apache/kafka 4.x nodes form one KRaft quorum with distinct node ids."""
        assert len(kafka_nodes) == 3
        cluster_ids, node_ids = set(), set()
        for name, node in kafka_nodes.items():
            assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", node["image"]), node["image"]
            env = env_of(node)
            cluster_ids.add(compose_default(env["CLUSTER_ID"]))
            node_ids.add(env["KAFKA_NODE_ID"])
            assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
            voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
            assert sorted(voters) == sorted(f"{n[-1]}@{n}:9093" for n in kafka_nodes)
            assert f"{name}:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
            assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
            assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
            assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
            assert "healthcheck" in node
        assert len(cluster_ids) == 1, "all nodes must share one CLUSTER_ID"
        assert node_ids == {"1", "2", "3"}

    def test_cluster_id_is_a_kafka_uuid(self, kafka_nodes: dict[str, Any]) -> None:
        """CLUSTER_ID is a 22-character URL-safe base64 UUID, as kafka-storage format requires."""
        import base64

        cluster_id = compose_default(env_of(next(iter(kafka_nodes.values())))["CLUSTER_ID"])
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id), cluster_id
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16

    def _created_topics(self, services: dict[str, Any]) -> dict[str, tuple[int, str]]:
        """topic -> (partitions, rest of the create line) as run by kafka-init."""
        init = services["kafka-init"]
        script = (
            "\n".join(init["command"]) if isinstance(init["command"], list) else init["command"]
        )
        script = re.sub(r"\\\n\s*", " ", script)
        partitions_default = compose_default(env_of(init)["PARTITIONS"])
        topics = {}
        for match in re.finditer(r"^\s*create\s+(\S+)\s+(\S+)(.*)$", script, re.MULTILINE):
            name, partitions, rest = match.groups()
            partitions = partitions.strip('"').replace("$$PARTITIONS", partitions_default)
            topics[name] = (int(partitions), rest)
        return topics

    def test_topic_init_creates_all_topics(self, services: dict[str, Any]) -> None:
        """kafka-init creates every topic the pipeline uses, idempotently, with RF 3."""
        topics = self._created_topics(services)
        assert set(topics) == TOPICS
        script = " ".join(services["kafka-init"]["command"])
        assert "--if-not-exists" in script
        assert "--replication-factor 3" in script
        assert "min.insync.replicas=2" in script

    def test_input_topics_have_12_partitions(self, services: dict[str, Any]) -> None:
        """access-events and operation-events have 12 partitions, like every user-keyed topic."""
        topics = self._created_topics(services)
        assert topics["access-events"][0] == 12
        assert topics["operation-events"][0] == 12
        for name in ("leak-alerts", "escalations", "acks", "leakwatch-checkpoints"):
            assert topics[name][0] == topics["access-events"][0], f"{name} is not co-partitioned"

    def test_checkpoint_topic_compacted(self, services: dict[str, Any]) -> None:
        """leakwatch-checkpoints uses cleanup.policy=compact and no other topic does."""
        topics = self._created_topics(services)
        assert "cleanup.policy=compact" in topics["leakwatch-checkpoints"][1]
        for name, (_, rest) in topics.items():
            if name != "leakwatch-checkpoints":
                assert "compact" not in rest, name

    def test_topic_init_waits_for_healthy_brokers(
        self, services: dict[str, Any], kafka_nodes: dict[str, Any]
    ) -> None:
        """kafka-init starts only when every broker is healthy and is not restarted."""
        depends = services["kafka-init"]["depends_on"]
        assert {name: dep["condition"] for name, dep in depends.items()} == {
            name: "service_healthy" for name in kafka_nodes
        }
        assert str(services["kafka-init"].get("restart", "no")) == "no"

    def test_workers_build_from_dockerfile(
        self, workers: dict[str, Any], deploy_dir: Path, repo_root: Path
    ) -> None:
        """Workers build deploy/Dockerfile with the repository root as context."""
        for name, worker in workers.items():
            context = (deploy_dir / worker["build"]["context"]).resolve()
            assert context == repo_root, name
            assert (
                context / worker["build"]["dockerfile"]
            ).resolve() == deploy_dir / "Dockerfile", name

    def test_workers_env(self, workers: dict[str, Any]) -> None:
        """Each worker gets every LEAKWATCH_* setting."""
        for name, worker in workers.items():
            env = env_of(worker)
            missing = [key for key in WORKER_ENV if not env.get(key)]
            assert not missing, f"{name}: missing {missing}"

    def test_worker_settings_load(self, workers: dict[str, Any], deploy_dir: Path) -> None:
        """The worker accepts the compose environment (example key) and listens on all interfaces."""
        example = (deploy_dir / ".env.example").read_text(encoding="utf-8")
        (key,) = re.findall(rf"^{SECRET_ENV}=(.+)$", example, re.MULTILINE)
        for name, worker in workers.items():
            env = {k: compose_default(v) for k, v in env_of(worker).items()}
            env[SECRET_ENV] = key
            assert not unknown_settings(env), f"{name}: unknown settings {unknown_settings(env)}"
            settings = core_settings(env)
            assert settings.web_host == "0.0.0.0", name
            assert settings.worker_name == name
            assert settings.create_topics is False, "topics belong to kafka-init"
            assert settings.data_dir == "/var/lib/leakwatch"
            mounts = {volume.split(":")[1] for volume in worker["volumes"]}
            assert settings.data_dir in mounts, f"{name}: state directory is not a volume"

    def test_secret_not_hardcoded(self, workers: dict[str, Any]) -> None:
        """The pseudonymisation key comes from the environment and compose refuses to start without it."""
        for name, worker in workers.items():
            value = env_of(worker)[SECRET_ENV]
            assert re.fullmatch(rf"\$\{{{SECRET_ENV}:\?[^}}]+\}}", value), (
                f"{name}: {SECRET_ENV}={value!r}"
            )

    def test_env_example_documents_secret(self, deploy_dir: Path) -> None:
        """.env.example names the secret with a placeholder and deploy/.env is git-ignored."""
        example = (deploy_dir / ".env.example").read_text(encoding="utf-8")
        assert re.search(rf"^{SECRET_ENV}=CHANGE-ME", example, re.MULTILINE)
        ignored = (deploy_dir / ".gitignore").read_text(encoding="utf-8").split()
        assert ".env" in ignored

    def test_workers_healthcheck(self, workers: dict[str, Any]) -> None:
        """Worker health checks hit /healthz and /readyz."""
        for name, worker in workers.items():
            command = healthcheck_command(worker)
            assert "/healthz" in command and "/readyz" in command, f"{name}: {command}"

    def test_workers_start_after_topics(self, workers: dict[str, Any]) -> None:
        """Workers start after kafka-init completed successfully."""
        for name, worker in workers.items():
            assert (
                worker["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
            ), name

    def test_brokers_setting_points_at_kafka(
        self, workers: dict[str, Any], kafka_nodes: dict[str, Any]
    ) -> None:
        """LEAKWATCH_BROKERS lists every broker on its internal PLAINTEXT listener."""
        for name, worker in workers.items():
            brokers = env_of(worker)["LEAKWATCH_BROKERS"].split(",")
            assert sorted(brokers) == sorted(f"{node}:19092" for node in kafka_nodes), name

    def test_smtp_points_at_mail_catcher(
        self, workers: dict[str, Any], services: dict[str, Any]
    ) -> None:
        """Workers mail the hotline through the mailpit service's SMTP port."""
        mailpit = services["mailpit"]
        assert mailpit["image"].startswith("axllent/mailpit:")
        for name, worker in workers.items():
            env = env_of(worker)
            assert env["LEAKWATCH_MAIL_SMTP_HOST"] == "mailpit", name
            assert env["LEAKWATCH_MAIL_SMTP_PORT"] in {str(port) for port in mailpit["expose"]}, name

    def test_escalation_severity_is_valid(self, workers: dict[str, Any]) -> None:
        """The default escalation severity is one of the alert severities."""
        from schemas.alert import SEVERITIES

        for name, worker in workers.items():
            assert compose_default(env_of(worker)["LEAKWATCH_ESCALATION_SEVERITY"]) in SEVERITIES, (
                name
            )

    def test_prometheus_scrapes_the_workers(
        self, workers: dict[str, Any], deploy_dir: Path, yaml_file: Callable[[Path], Any]
    ) -> None:
        """Prometheus' leakwatch targets are exactly the worker services on LEAKWATCH_WEB_PORT."""
        config = yaml_file(deploy_dir / "prometheus" / "prometheus.yml")
        job = next(job for job in config["scrape_configs"] if job["job_name"] == "leakwatch")
        targets = sorted(target for static in job["static_configs"] for target in static["targets"])
        expected = sorted(
            f"{name}:{env_of(worker)['LEAKWATCH_WEB_PORT']}" for name, worker in workers.items()
        )
        assert targets == expected

    def test_health_checks_everywhere(self, services: dict[str, Any]) -> None:
        """Every long-running service has a health check (kafka-init is a one-shot job)."""
        for name, service in services.items():
            if name == "kafka-init":
                continue
            assert "healthcheck" in service, name
            assert service["healthcheck"]["test"], name

    def test_published_ports_are_local(self, services: dict[str, Any]) -> None:
        """Published ports bind to 127.0.0.1 only."""
        for name, service in services.items():
            for port in service.get("ports", []):
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"

    def test_bind_mounts_exist(self, services: dict[str, Any], deploy_dir: Path) -> None:
        """Every relative bind mount source exists in the repository."""
        for name, service in services.items():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("."):
                    assert (deploy_dir / source).exists(), f"{name}: {source}"

    def test_prometheus_mounts_config(self, services: dict[str, Any]) -> None:
        """Prometheus runs deploy/prometheus/prometheus.yml (rules alongside it)."""
        prometheus = services["prometheus"]
        assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
        assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]

    def test_compose_config_if_available(self, deploy_dir: Path, tmp_path: Path) -> None:
        """`docker compose config` accepts the file when Compose v2 is installed (skipped otherwise)."""
        compose_cmd = compose_v2_command()
        if compose_cmd is None:
            pytest.skip(
                "Docker Compose v2 not installed (`docker compose` plugin or $DOCKER_COMPOSE); "
                "the structure is checked by the other tests"
            )
        env_file = tmp_path / "test.env"
        env_file.write_text(f"{SECRET_ENV}=test-only-key-0123456789\n", encoding="utf-8")
        compose_file = str(deploy_dir / "docker-compose.yml")
        result = subprocess.run(
            [*compose_cmd, "-f", compose_file, "--env-file", str(env_file), "config", "-q"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        empty_env = tmp_path / "empty.env"
        empty_env.write_text("", encoding="utf-8")
        missing = subprocess.run(
            [*compose_cmd, "-f", compose_file, "--env-file", str(empty_env), "config"],
            capture_output=True,
            text=True,
            check=False,
            env={key: value for key, value in os.environ.items() if key != SECRET_ENV},
        )
        assert missing.returncode != 0, "compose must refuse to start without the pseudonym key"
        assert SECRET_ENV in missing.stderr


@pytest.fixture(scope="module")
def instructions(deploy_dir: Path) -> list[tuple[str, str]]:
    """deploy/Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = (deploy_dir / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


class TestDockerfile:
    """deploy/Dockerfile builds the worker image the compose file and manifests expect."""

    def test_base_image(self, instructions: list[tuple[str, str]]) -> None:
        """Every stage is based on python:3.11-slim."""
        args = dict(
            rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
        )
        bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
        assert bases
        for base in bases:
            resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
            assert resolved == "python:3.11-slim", base

    def test_installs_project(self, instructions: list[tuple[str, str]]) -> None:
        """The project is installed with pip (built from the repository root)."""
        runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
        assert re.search(r"pip (wheel|install)\b.*\s\.(\s|$)", runs)
        assert re.search(r"pip install\b.*\bleakwatch\b", runs)

    def test_entrypoint(self, instructions: list[tuple[str, str]], repo_root: Path) -> None:
        """The entrypoint is `leakwatch worker`, a console script the project declares."""
        (entrypoint,) = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
        assert entrypoint == '["leakwatch", "worker"]'
        pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
        assert "leakwatch" in pyproject["project"]["scripts"]

    def test_runs_unprivileged_and_exposes_web_port(
        self, instructions: list[tuple[str, str]]
    ) -> None:
        """The image runs as a non-root user and exposes port 6066."""
        users = [rest for keyword, rest in instructions if keyword == "USER"]
        assert users and not users[-1].startswith(("root", "0")), users
        assert ("EXPOSE", "6066") in instructions

    def test_healthcheck_script_copied(
        self, instructions: list[tuple[str, str]], deploy_dir: Path
    ) -> None:
        """The health check script the compose file calls is copied into the image."""
        copies = [rest for keyword, rest in instructions if keyword == "COPY"]
        assert "deploy/healthcheck.py /usr/local/bin/leakwatch-healthcheck" in copies
        assert (deploy_dir / "healthcheck.py").is_file()

    def test_dockerignore_keeps_secrets_and_venv_out(self, deploy_dir: Path) -> None:
        """The Dockerfile-specific ignore file excludes .venv, .git and .env files."""
        patterns = (deploy_dir / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
        for pattern in (".venv", ".git", "**/.env"):
            assert pattern in patterns


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves fixed status codes per path."""

    statuses: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        status = self.statuses.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


@pytest.fixture
def fake_worker() -> Iterator[tuple[int, dict[str, int]]]:
    """A local HTTP server standing in for the worker's web port: (port, path -> status)."""
    statuses: dict[str, int] = {}
    handler = type("Handler", (_Handler,), {"statuses": statuses})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], statuses
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(deploy_dir: Path, port: int, *paths: str) -> subprocess.CompletedProcess[str]:
    """Run deploy/healthcheck.py against 127.0.0.1:port."""
    return subprocess.run(
        [sys.executable, str(deploy_dir / "healthcheck.py"), *paths],
        env={"LEAKWATCH_WEB_PORT": str(port), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class TestHealthcheckScript:
    """deploy/healthcheck.py exits 0 only when every endpoint answers 2xx."""

    def test_healthy_and_ready(
        self, deploy_dir: Path, fake_worker: tuple[int, dict[str, int]]
    ) -> None:
        """Both endpoints 200: exit 0."""
        port, statuses = fake_worker
        statuses.update({"/healthz": 200, "/readyz": 200})
        assert run_healthcheck(deploy_dir, port).returncode == 0

    def test_not_ready(self, deploy_dir: Path, fake_worker: tuple[int, dict[str, int]]) -> None:
        """/readyz 503: exit 1 naming the endpoint."""
        port, statuses = fake_worker
        statuses.update({"/healthz": 200, "/readyz": 503})
        result = run_healthcheck(deploy_dir, port)
        assert result.returncode == 1
        assert "/readyz: HTTP 503" in result.stderr

    def test_only_requested_paths(
        self, deploy_dir: Path, fake_worker: tuple[int, dict[str, int]]
    ) -> None:
        """Only the paths given on the command line are checked."""
        port, statuses = fake_worker
        statuses.update({"/healthz": 200, "/readyz": 503})
        assert run_healthcheck(deploy_dir, port, "/healthz").returncode == 0

    def test_nothing_listening(self, deploy_dir: Path) -> None:
        """No server on the port: exit 1."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        assert run_healthcheck(deploy_dir, port).returncode == 1


@pytest.fixture(scope="module")
def k8s(
    deploy_dir: Path, yaml_docs: Callable[[Path], list[Any]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s/ keyed by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((deploy_dir / "k8s").glob("*.yaml")):
        for doc in yaml_docs(path):
            if doc.get("kind") == "Kustomization":
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"duplicate {key}"
            objects[key] = {**doc, "_file": path.name}
    return objects


class TestKubernetesManifests:
    """The manifests under deploy/k8s/ are consistent and production-shaped."""

    def _deployment(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
        (deployment,) = [obj for (kind, _), obj in k8s.items() if kind == "Deployment"]
        return deployment

    def _container(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
        (container,) = self._deployment(k8s)["spec"]["template"]["spec"]["containers"]
        found: dict[str, Any] = container
        return found

    def _configmap(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
        (configmap,) = [obj for (kind, _), obj in k8s.items() if kind == "ConfigMap"]
        return configmap

    def test_expected_kinds(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """Namespace, ConfigMap, Secret, Deployment, Service and PodMonitor are defined."""
        kinds = {kind for kind, _ in k8s}
        assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodMonitor"} <= kinds

    def test_namespaced_objects_in_leakwatch(
        self, k8s: dict[tuple[str, str], dict[str, Any]]
    ) -> None:
        """Every namespaced object lives in the leakwatch namespace, which is defined."""
        assert ("Namespace", "leakwatch") in k8s
        for (kind, name), obj in k8s.items():
            if kind != "Namespace":
                assert obj["metadata"].get("namespace") == "leakwatch", f"{kind}/{name}"

    def test_probes(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """Readiness probes /readyz, liveness (and startup) probe /healthz, on the named web port."""
        container = self._container(k8s)
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        port_names = {port["name"] for port in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in port_names, probe

    def test_web_port_matches_setting(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """The container port, scrape annotation and LEAKWATCH_WEB_PORT agree."""
        container = self._container(k8s)
        web_port = int(self._configmap(k8s)["data"]["LEAKWATCH_WEB_PORT"])
        (port,) = [p for p in container["ports"] if p["name"] == "web"]
        assert port["containerPort"] == web_port
        annotations = self._deployment(k8s)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == web_port
        assert annotations["prometheus.io/path"] == "/metrics"

    def test_all_settings_provided(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """Every LEAKWATCH_* setting reaches the container: ConfigMap via envFrom, the key from the Secret."""
        container = self._container(k8s)
        configmap = self._configmap(k8s)
        from_configmap = set()
        for source in container["envFrom"]:
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] == configmap["metadata"]["name"]
                from_configmap |= set(configmap["data"])
        explicit = {item["name"]: item for item in container.get("env", [])}
        provided = from_configmap | set(explicit)
        missing = [key for key in WORKER_ENV if key not in provided]
        assert not missing, missing
        secret_ref = explicit[SECRET_ENV]["valueFrom"]["secretKeyRef"]
        assert ("Secret", secret_ref["name"]) in k8s
        assert secret_ref["key"] in k8s[("Secret", secret_ref["name"])]["stringData"]

    def test_worker_settings_load(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """The worker accepts the ConfigMap plus the example Secret and listens on all interfaces."""
        env = dict(self._configmap(k8s)["data"])
        (secret,) = [obj for (kind, _), obj in k8s.items() if kind == "Secret"]
        env.update(secret["stringData"])
        env["LEAKWATCH_WORKER_NAME"] = "leakwatch-worker-abc12"
        assert not unknown_settings(env), unknown_settings(env)
        settings = core_settings(env)
        assert settings.web_host == "0.0.0.0"
        assert settings.create_topics is False
        mounts = {mount["mountPath"] for mount in self._container(k8s)["volumeMounts"]}
        assert settings.data_dir in mounts

    def test_secret_kept_out_of_configmap(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """The pseudonymisation key is never a ConfigMap value."""
        assert SECRET_ENV not in self._configmap(k8s)["data"]

    def test_secret_is_a_marked_placeholder(
        self, k8s: dict[tuple[str, str], dict[str, Any]], deploy_dir: Path
    ) -> None:
        """The example Secret holds only clearly marked placeholders and is not applied by kustomize."""
        (secret,) = [obj for (kind, _), obj in k8s.items() if kind == "Secret"]
        for key, value in secret["stringData"].items():
            assert "CHANGE-ME" in value and "PLACEHOLDER" in value, key
        text = (deploy_dir / "k8s" / secret["_file"]).read_text(encoding="utf-8")
        assert "EXAMPLE ONLY" in text
        assert secret["_file"].endswith(".example.yaml")

    def test_escalation_severity_is_valid(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """The configured escalation severity is one of the alert severities."""
        from schemas.alert import SEVERITIES

        assert self._configmap(k8s)["data"]["LEAKWATCH_ESCALATION_SEVERITY"] in SEVERITIES

    def test_resources(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """CPU and memory requests and a memory limit are set."""
        resources = self._container(k8s)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]

    def test_hardened_pod(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """The pod runs as non-root with a read-only root filesystem and a writable state volume."""
        pod = self._deployment(k8s)["spec"]["template"]["spec"]
        container = self._container(k8s)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert "/var/lib/leakwatch" in mounts
        assert pod["terminationGracePeriodSeconds"] >= 30

    def test_selectors_match_pods(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """Deployment, Service, PodDisruptionBudget and PodMonitor select the worker pods and their web port."""
        deployment = self._deployment(k8s)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selectors = {
            "Deployment": deployment["spec"]["selector"]["matchLabels"],
            **{
                kind: obj["spec"]["selector"]
                if kind == "Service"
                else obj["spec"]["selector"]["matchLabels"]
                for (kind, _), obj in k8s.items()
                if kind in {"Service", "PodDisruptionBudget", "PodMonitor"}
            },
        }
        assert set(selectors) == {"Deployment", "Service", "PodDisruptionBudget", "PodMonitor"}
        for kind, selector in selectors.items():
            assert selector.items() <= pod_labels.items(), kind
        port_names = {port["name"] for port in self._container(k8s)["ports"]}
        (service,) = [obj for (kind, _), obj in k8s.items() if kind == "Service"]
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
        (monitor,) = [obj for (kind, _), obj in k8s.items() if kind == "PodMonitor"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in port_names
            assert endpoint["path"] == "/metrics"

    def test_podmonitor_job_label_matches_alerts(
        self, k8s: dict[tuple[str, str], dict[str, Any]]
    ) -> None:
        """The PodMonitor yields job="leakwatch", the job the alert rules select."""
        (monitor,) = [obj for (kind, _), obj in k8s.items() if kind == "PodMonitor"]
        pod_labels = self._deployment(k8s)["spec"]["template"]["metadata"]["labels"]
        assert pod_labels[monitor["spec"]["jobLabel"]] == "leakwatch"

    def test_kustomization(self, deploy_dir: Path, yaml_file: Callable[[Path], Any]) -> None:
        """kustomization.yaml lists existing files and leaves out the example Secret."""
        kustomization = yaml_file(deploy_dir / "k8s" / "kustomization.yaml")
        resources = kustomization["resources"]
        for resource in resources:
            assert (deploy_dir / "k8s" / resource).is_file(), resource
        assert not any("secret" in resource for resource in resources)
        assert "deployment.yaml" in resources

    def test_image_reference(self, k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
        """The worker image is pinned to a version tag, not latest."""
        image = self._container(k8s)["image"]
        tag = image.rpartition(":")[2]
        assert tag and tag != "latest" and "/" not in tag, image
