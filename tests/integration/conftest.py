"""Integration harness: one embedded broker per test session, a fresh app id and topics per test.

Workers run as real `stream-app worker` subprocesses; events are produced with confluent-kafka
(librdkafka), an independent client whose default partitioner differs from aiokafka's, so these tests
also prove that the worker re-keys by user id.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_app.core.profile import ProfileState
from stream_app.core.replica import ProfileReplicas
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.kafka.reading import read_topic
from stream_app.serving.snapshot import read_deltas
from stream_app.worker.process import Deployment

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=str(log)) as running:
        yield running


class Stack(Deployment):
    """One isolated deployment on the shared broker, with the producing and reading helpers tests need."""

    def __init__(self, broker: EmbeddedBroker, workdir: Path, **overrides: str) -> None:
        super().__init__(broker.url, workdir, prefix="it", **{
            "PROFILE_PARTITIONS": "3", "PROFILE_INPUT_PARTITIONS": "2", "PROFILE_LOG_LEVEL": "INFO", **overrides,
        })
        self._producer: Any = None
        # librdkafka's default (CRC32 of the key): most events land off their user's by-user partition and take
        # the hop. "murmur2_random" is the Java client's and aiokafka's: with input topics as wide as the by-user
        # topic every event is already where its user's profile is, and the ingest agent folds it.
        self.partitioner = "consistent_random"

    def worker_log(self, index: int = -1) -> str:
        logs = sorted(self.workdir.glob("worker-*.log"))
        return logs[index].read_text(errors="replace")[-4000:] if logs else ""

    # -- producing ----------------------------------------------------------------------------------
    def produce(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        topics = self.settings.input_topics
        sent = []
        for event in events:
            self.produce_raw(topics[event["type"]], orjson.dumps(event), event["user_id"].encode(),
                             timestamp_ms=int(float(event["ts"]) * 1000) if isinstance(event["ts"], int | float) else 0)
            sent.append(event)
        self.flush()
        return sent

    def produce_raw(self, topic: str, value: bytes | None, key: bytes | None = None, timestamp_ms: int = 0) -> None:
        if self._producer is None:
            from confluent_kafka import Producer

            self._producer = Producer({"bootstrap.servers": self.settings.bootstrap_servers[0],
                                       "linger.ms": 5, "enable.idempotence": False,
                                       "partitioner": self.partitioner})
        self._producer.produce(topic, value=value, key=key, timestamp=timestamp_ms)
        self._producer.poll(0)

    def flush(self) -> None:
        if self._producer is not None:
            remaining = self._producer.flush(30)
            assert remaining == 0, f"{remaining} messages not delivered"

    # -- reading ------------------------------------------------------------------------------------
    def deltas(self, topic: str | None = None) -> list[dict[str, Any]]:
        """Deltas of the stack's delta topic, or of another one (a replay's)."""
        settings = self.settings if topic is None else self.settings.model_copy(update={"topic_deltas": topic})
        return asyncio.run(read_deltas(settings))

    def records(self, topic: str) -> list[Any]:
        return asyncio.run(read_topic(self.settings, topic))

    def table(self) -> dict[str, ProfileState]:
        """The worker's table as its changelog holds it (last value per key wins)."""
        latest: dict[str, ProfileState] = {}
        for record in self.records(f"{self.settings.app_id}-profiles-changelog"):
            if record.value is not None:
                latest[record.key.decode()] = ProfileState.from_dict(orjson.loads(record.value))
        return latest

    def wait_for_events(self, event_ids: set[str], timeout_s: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            deltas = self.deltas()
            missing = event_ids - {eid for d in deltas for eid in d["event_ids"]}
            if not missing:
                return deltas
            for process in self.workers:
                if process.poll() not in (None, -signal.SIGKILL, -signal.SIGTERM, 0):
                    pytest.fail(f"worker exited with {process.returncode}:\n{self.worker_log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{len(missing)} events never reached a delta, e.g. {sorted(missing)[:3]}\n"
                            f"{self.worker_log()}")
            time.sleep(0.3)

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout_s: float = 300) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "stream_app.cli", *args], cwd=ROOT, env={**self.env, **(env or {})},
            capture_output=True, timeout=timeout_s,
        )
        if result.returncode != 0:
            pytest.fail(f"stream-app {' '.join(args)} failed ({result.returncode}):\n{result.stderr.decode()[-3000:]}")
        return result.stdout.decode()

    def snapshot_cli(self, *args: str) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.cli("snapshot", *args).splitlines() if line.strip()]

    def replicas(self) -> ProfileReplicas:
        return ProfileReplicas().apply_all(self.deltas())

    def close(self) -> None:
        self.flush()
        self._producer = None
        self.stop(signal.SIGKILL)


def http_get(port: int, path: str) -> tuple[int, Any]:
    """Status and JSON body of a GET on a worker's HTTP port (error statuses too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:  # noqa: S310
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


def eventually(check: Callable[[], None], timeout_s: float = 60.0, interval_s: float = 1.0) -> None:
    """Run `check` until it passes; after `timeout_s` its last AssertionError (or OSError) is raised."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(interval_s)


@pytest.fixture
def stack(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Stack]:
    deployment = Stack(broker, tmp_path)
    try:
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
def make_stack(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Any]:
    made: list[Stack] = []

    def factory(**overrides: str) -> Stack:
        deployment = Stack(broker, tmp_path / f"stack-{len(made)}", **overrides)
        made.append(deployment)
        return deployment

    try:
        yield factory
    finally:
        for deployment in made:
            deployment.close()
