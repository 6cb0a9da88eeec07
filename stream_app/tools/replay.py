"""`stream-app replay`: rebuild profiles from history into a fresh state, beside the live worker.

A replay is an ordinary worker under its own app id (so its consumer group, table and changelog are new)
whose deltas go to their own topic. It reads either the live input topics from the beginning (or from a
timestamp, via offsets-for-times) or files that it first publishes to input topics of its own. It stops by
itself once its consumer group has committed everything that was in its input when it started, and the
by-user topic and deltas behind it have drained.

Profiles are a function of the set of events (forward decay in event time; dedup by event id), so a replay
gives the live run's profiles whatever the order or partitioning (bounds: docs/semantics.md, "Bounds").
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka.structs import TopicPartition
from pydantic import SecretStr
from tqdm import tqdm

from stream_app.kafka.clients import ensure_topics
from stream_app.kafka.reading import committed_offsets, end_offsets, read_topic, seed_group_offsets
from stream_app.ops.settings import Settings
from stream_app.tools.producer import produce_file
from stream_app.worker.process import WorkerProcess


@dataclass(frozen=True)
class ReplayPlan:
    name: str
    source_settings: Settings  # where the history is (the live deployment's topics)
    replay_settings: Settings  # the replay's own app id, output and (for files) input topics
    files: tuple[Path, ...] = ()
    since: float | None = None

    @classmethod
    def create(
        cls, live: Settings, name: str, *, files: Sequence[Path] = (), since: float | None = None,
        output_topic: str | None = None,
    ) -> ReplayPlan:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name):
            raise ValueError(f"replay name {name!r}: use letters, digits, '.', '_' or '-'")
        overrides: dict[str, Any] = {
            "app_id": f"{live.app_id}-replay-{name}",
            "topic_deltas": output_topic or f"{live.topic_deltas}-replay-{name}",
            "topic_dead_letters": f"{live.topic_dead_letters}-replay-{name}",
        }
        if files:
            overrides.update(
                topic_clicks=f"{live.topic_clicks}-replay-{name}",
                topic_searches=f"{live.topic_searches}-replay-{name}",
                topic_reviews=f"{live.topic_reviews}-replay-{name}",
            )
        replay = live.model_copy(update=overrides)
        if replay.topic_deltas == live.topic_deltas:
            raise ValueError("a replay must not write to the live delta topic")
        return cls(name, live, replay, tuple(files), since)

    @property
    def input_topics(self) -> list[str]:
        return list(self.replay_settings.input_topics.values())

    def worker_env(self, data_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        # The replay worker runs beside the live one: its HTTP port is its own (WorkerProcess picks a free one).
        private = {"web_port", "web_canonical_url"}
        for name, value in self.replay_settings.model_dump().items():
            if name in private:
                env.pop(f"PROFILE_{name.upper()}", None)
            elif isinstance(value, SecretStr):
                env[f"PROFILE_{name.upper()}"] = value.get_secret_value()
            elif value is not None:
                env[f"PROFILE_{name.upper()}"] = str(value)
        env["PROFILE_DATA_DIR"] = str(data_dir)
        return env


def _behind(targets: dict[TopicPartition, int], committed: dict[TopicPartition, int]) -> int:
    return sum(max(0, end - committed.get(tp, 0)) for tp, end in targets.items())


async def _wait_until_committed(
    settings: Settings, group: str, targets: dict[TopicPartition, int], worker: WorkerProcess,
    timeout_s: float, bar: Any = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    total = sum(targets.values())
    while True:
        behind = _behind(targets, await committed_offsets(settings, group, list(targets)))
        if bar is not None:
            bar.n = total - behind
            bar.refresh()
        if behind == 0:
            return
        worker.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"replay still {behind} messages behind after {timeout_s} s")
        await asyncio.sleep(0.5)


async def live_future_refusals(live: Settings) -> set[tuple[str, int, int]]:
    """(topic, partition, offset) of every input record the live run dead-lettered as future_timestamp."""
    refused = set()
    for record in await read_topic(live, live.topic_dead_letters):
        headers = {name: value.decode() for name, value in record.headers or ()}
        if headers.get("dlq.kind") == "future_timestamp" and headers.get("dlq.topic") in live.input_topics.values():
            refused.add((headers["dlq.topic"], int(headers["dlq.partition"]), int(headers["dlq.offset"])))
    return refused


def run_replay(plan: ReplayPlan, *, progress: bool = True, timeout_s: float = 3600.0) -> dict[str, Any]:
    replay = plan.replay_settings
    asyncio.run(ensure_topics(replay))
    for path in plan.files:
        asyncio.run(produce_file(path, replay, progress=progress))
    started = time.monotonic()
    if plan.since is not None:
        asyncio.run(seed_group_offsets(replay, replay.app_id, plan.input_topics, plan.since))
    targets = {tp: end for tp, end in asyncio.run(end_offsets(replay, plan.input_topics)).items() if end > 0}
    workdir = Path(tempfile.mkdtemp(prefix=f"replay-{plan.name}-"))
    env = plan.worker_env(workdir / "faust")
    if not plan.files:
        # Replaying the live topics: what live refused as future_timestamp is refused again (admission.py).
        refusals = asyncio.run(live_future_refusals(plan.source_settings))
        (workdir / "refusals.json").write_bytes(orjson.dumps(sorted(refusals)))
        env["PROFILE_REPLAY_REFUSALS"] = str(workdir / "refusals.json")
    bar = tqdm(total=sum(targets.values()), unit="msg", desc=f"replay {plan.name}", disable=not progress)
    with WorkerProcess(env, workdir / "worker.log") as worker:
        asyncio.run(_wait_until_committed(replay, replay.app_id, targets, worker, timeout_s, bar))
        # Then the internal hop: everything the inputs produced must be folded into the table.
        by_user = replay.topic_events_by_user
        internal = {tp: end for tp, end in asyncio.run(end_offsets(replay, [by_user])).items() if end > 0}
        asyncio.run(_wait_until_committed(replay, replay.app_id, internal, worker, timeout_s))
    bar.close()
    return {
        "name": plan.name, "app_id": replay.app_id, "deltas_topic": replay.topic_deltas,
        "input_messages": sum(targets.values()), "seconds": round(time.monotonic() - started, 2),
        "worker_log": str(workdir / "worker.log"),
    }
