"""`stream-app demo`: embedded broker + worker + real sample events, profiles and deltas on screen."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from stream_app.core.replica import ProfileReplicas
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.ops.settings import Settings
from stream_app.serving.snapshot import read_deltas
from stream_app.tools.producer import produce_file
from stream_app.tools.sample_data import sample_events
from stream_app.worker.process import WorkerProcess


async def wait_for_events(
    settings: Settings, event_ids: set[str], timeout_s: float, worker: WorkerProcess | None = None
) -> list[dict[str, Any]]:
    """Read deltas until every event id has been counted by some delta."""
    deadline = time.monotonic() + timeout_s
    while True:
        deltas = await read_deltas(settings)
        covered = {eid for d in deltas for eid in d["event_ids"]}
        if event_ids <= covered:
            return deltas
        if worker is not None:
            worker.check_alive()
        if time.monotonic() > deadline:
            missing = len(event_ids - covered)
            raise TimeoutError(f"{missing} of {len(event_ids)} events have no delta after {timeout_s} s")
        await asyncio.sleep(0.5)


def _short(profile: dict[str, Any]) -> dict[str, Any]:
    shown = dict(profile)
    for name in ("interests", "keywords"):
        shown[name] = {k: round(v, 4) for k, v in list(profile[name].items())[:5]}
    shown["activity"] = {k: round(v, 4) for k, v in profile["activity"].items()}
    if profile["embedding"] is not None:
        shown["embedding"] = [round(x, 4) for x in profile["embedding"][:4]] + ["..."]
    return shown


def run_demo(customers: int = 40) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="stream-app-demo-"))
    with EmbeddedBroker() as broker:
        env = dict(os.environ)
        env.update({
            "PROFILE_BROKER_URL": broker.url,
            "PROFILE_EMBEDDED_BROKER": "true",
            "PROFILE_APP_ID": "profiles-demo",
            "PROFILE_DATA_DIR": str(workdir / "faust"),
        })
        settings = Settings(broker_url=broker.url, embedded_broker=True, app_id="profiles-demo")
        print(f"embedded broker (Tansu) on {broker.bootstrap}")
        events = sample_events(customers=customers)
        sample = workdir / "sample-events.jsonl"
        sample.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
        from stream_app.kafka.clients import ensure_topics

        asyncio.run(ensure_topics(settings))
        print(f"producing {len(events)} events of {customers} CDNOW customers (see docs/sample-data.md)")
        asyncio.run(produce_file(sample, settings, progress=True))

        started = time.monotonic()
        with WorkerProcess(env, workdir / "worker.log") as worker:
            first = asyncio.run(_first_delta(settings, worker, timeout_s=120))
            print(f"worker: first delta {first - started:.1f} s after start (includes group join)")
            deltas = asyncio.run(wait_for_events(settings, {e["event_id"] for e in events}, 180, worker))
            print(f"worker: all {len(events)} events in profiles after {time.monotonic() - started:.1f} s, "
                  f"{len(deltas)} deltas\n")
    print("== three deltas from topic profile-deltas (stored values relative to 'landmark') ==")
    for delta in deltas[:3]:
        print(orjson.dumps(delta).decode()[:400])
    replicas = ProfileReplicas().apply_all(deltas)
    print(f"\n== profiles rebuilt from deltas: {len(replicas.profiles)} users, first three ==")
    for view in list(replicas.views())[:3]:
        print(orjson.dumps(_short(view), option=orjson.OPT_INDENT_2).decode())
    print(f"\nlogs and sample file: {workdir}")
    return 0


async def _first_delta(settings: Settings, worker: WorkerProcess, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await read_deltas(settings):
            return time.monotonic()
        worker.check_alive()
        await asyncio.sleep(0.2)
    raise TimeoutError("no delta from the worker")
