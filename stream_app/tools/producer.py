"""`stream-app produce`: publish JSONL events to their topics, keyed by user, stamped with event time."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from tqdm import tqdm

from schemas.events import InvalidEvent, parse_ts
from stream_app.kafka.clients import producer
from stream_app.ops.settings import Settings
from stream_app.tools.event_files import count_events, read_events


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    timestamp_ms: int | None


@dataclass
class ProduceReport:
    sent: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)
    unroutable: list[str] = field(default_factory=list)


def route(line: bytes, settings: Settings, topic_override: str | None = None) -> Outgoing | str:
    """Where one JSONL line goes, or why it cannot be routed. The value is sent byte for byte."""
    topics = settings.input_topics
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        doc = None
    key = timestamp_ms = None
    if isinstance(doc, dict):
        user_id = doc.get("user_id")
        key = user_id.encode() if isinstance(user_id, str) else None
        try:
            timestamp_ms = int(parse_ts(doc.get("ts")) * 1000)
        except InvalidEvent:
            timestamp_ms = None
    if topic_override is not None:
        return Outgoing(topic_override, key, line, timestamp_ms)
    if not isinstance(doc, dict):
        return "not a JSON object (use --topic to send it anyway)"
    topic = topics.get(doc.get("type"))  # type: ignore[arg-type]
    if topic is None:
        return f"unknown type {doc.get('type')!r} (use --topic to send it anyway)"
    return Outgoing(topic, key, line, timestamp_ms)


async def produce_lines(
    lines: Iterable[bytes], settings: Settings, *, topic_override: str | None = None,
    progress: bool = True, total: int | None = None, rate: float | None = None,
) -> ProduceReport:
    """Send events; with `rate`, at that many events per second (paced against a monotonic clock)."""
    report = ProduceReport()
    client = producer(settings)
    await client.start()
    started = time.monotonic()
    try:
        pending = []
        for number, line in enumerate(tqdm(lines, total=total, unit="ev", disable=not progress), start=1):
            if rate is not None:
                ahead = started + (number - 1) / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            routed = route(line, settings, topic_override)
            if isinstance(routed, str):
                report.unroutable.append(f"line {number}: {routed}")
                continue
            pending.append(
                await client.send(routed.topic, routed.value, key=routed.key, timestamp_ms=routed.timestamp_ms)
            )
            report.sent += 1
            report.by_topic[routed.topic] = report.by_topic.get(routed.topic, 0) + 1
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await client.stop()
    return report


async def produce_file(
    path: Path, settings: Settings, *, topic_override: str | None = None, progress: bool = True,
    rate: float | None = None,
) -> ProduceReport:
    """Publish a JSONL (optionally .gz), CSV or Parquet file of events, preserving event time."""
    report = await produce_lines(
        read_events(path), settings, topic_override=topic_override, progress=progress,
        total=count_events(path) if progress else None, rate=rate,
    )
    for problem in report.unroutable[:20]:
        print(f"skipped {problem}", file=sys.stderr)
    return report
