"""A `stream-app worker` child process with its own settings, for the demo, replay and benchmarks."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        from stream_app.embedded_broker import free_port

        # Several workers share a machine in demos and tests: each gets its own HTTP port.
        self.env = {"PROFILE_WEB_PORT": str(free_port()), **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own entry point
                [sys.executable, "-m", "stream_app.cli", "worker"], env=self.env, stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"worker exited with {self.process.returncode}; log {self.log_path}:\n{tail}")

    def stop(self, timeout_s: float = 30.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
