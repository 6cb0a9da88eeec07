"""`stream-app worker` child processes, and isolated deployments of them, for the demo, replay, tests and benches.

One way to spawn a worker for every caller: each gets its own HTTP port and data directory, its output goes
to a log file, and stopping it is SIGTERM first (a clean leave), SIGKILL where a test wants a crash.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from stream_app.ops.settings import Settings


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, *, cwd: Path | None = None) -> None:
        from stream_app.kafka.embedded_broker import free_port

        # Several workers share a machine in demos and tests: each gets its own HTTP port.
        self.env = {"PROFILE_WEB_PORT": str(free_port()), **env}
        self.web_port = int(self.env["PROFILE_WEB_PORT"])
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own entry point
                [sys.executable, "-m", "stream_app.cli", "worker"], env=self.env, cwd=self.cwd, stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"  # noqa: S101
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def send_signal(self, sig: int) -> None:
        if self.process is not None:
            self.process.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process.returncode}; log {self.log_path}:\n"
                               f"{self.log()[-2000:]}")

    def stop(self, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> None:
        """End the worker with `sig` (SIGKILL: a crash, no leave) and wait for it; kill it if it lingers."""
        if self.poll() is None:
            self.send_signal(sig)
            self.wait(timeout_s)

    def wait(self, timeout_s: float) -> None:
        """Wait for the worker to exit; kill it if it has not after `timeout_s`."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def isolated_env(broker_url: str, tag: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a deployment that shares a broker with others: its own app id and topics."""
    env = dict(os.environ)
    env.update({
        "PROFILE_BROKER_URL": broker_url,
        "PROFILE_EMBEDDED_BROKER": "true",
        "PROFILE_APP_ID": f"{tag}",
        "PROFILE_TOPIC_CLICKS": f"clicks-{tag}",
        "PROFILE_TOPIC_SEARCHES": f"searches-{tag}",
        "PROFILE_TOPIC_REVIEWS": f"reviews-{tag}",
        "PROFILE_TOPIC_DEAD_LETTERS": f"dead-letters-{tag}",
        "PROFILE_TOPIC_DELTAS": f"profile-deltas-{tag}",
    })
    env.update(overrides or {})
    return env


def settings_of(env: dict[str, str]) -> Settings:
    return Settings.model_validate({k[len("PROFILE_"):].lower(): v for k, v in env.items() if k.startswith("PROFILE_")})


class Deployment:
    """One isolated deployment (app id, topics, a data dir per worker) on a shared broker: tests and benches."""

    def __init__(self, broker_url: str, workdir: Path, *, prefix: str = "it", **overrides: str) -> None:
        from stream_app.kafka.clients import ensure_topics

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = isolated_env(broker_url, f"{prefix}-{uuid.uuid4().hex[:8]}", overrides)
        self.settings = settings_of(self.env)
        self.workers: list[WorkerProcess] = []
        asyncio.run(ensure_topics(self.settings))

    @property
    def web_ports(self) -> list[int]:
        return [worker.web_port for worker in self.workers]

    def start_worker(self, **overrides: str) -> WorkerProcess:
        index = len(self.workers)
        env = {**self.env, "PROFILE_DATA_DIR": str(self.workdir / f"faust-{index}"), **overrides}
        worker = WorkerProcess(env, self.workdir / f"worker-{index}.log").start()
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: WorkerProcess, sig: int = signal.SIGTERM) -> None:
        worker.stop(sig=sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Signal every worker at once (they leave the group together), then wait for each."""
        running = [worker for worker in self.workers if worker.poll() is None]
        for worker in running:
            worker.send_signal(sig)
        for worker in running:
            worker.wait(timeout_s)
