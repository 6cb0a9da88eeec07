"""Event files in every supported format give the same events; the producer routes them by type."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from schemas.events import validate_event
from stream_app.ops.settings import Settings
from stream_app.tools.event_files import UnsupportedFile, read_events, write_events
from stream_app.tools.producer import Outgoing, route
from stream_app.tools.sample_data import sample_events


@pytest.mark.parametrize("name", ["events.jsonl", "events.jsonl.gz", "events.csv", "events.parquet"])
def test_every_format_round_trips_real_sample_events(tmp_path: Path, name: str) -> None:
    events = sample_events(customers=5)
    path = tmp_path / name
    write_events(path, events)
    read_back = [orjson.loads(line) for line in read_events(path)]
    assert [validate_event(e, max_text_chars=10_000) for e in read_back] == [
        validate_event(e, max_text_chars=10_000) for e in events
    ]


def test_jsonl_lines_pass_through_byte_for_byte_even_when_malformed(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n{broken\n\n\xff\n')
    assert list(read_events(path)) == [b'{"a": 1}', b"{broken", b"\xff"]


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFile, match=".jsonl, .jsonl.gz, .csv or .parquet"):
        list(read_events(tmp_path / "events.xlsx"))


def test_route_by_type_key_by_user_and_stamp_event_time() -> None:
    settings = Settings()
    line = orjson.dumps({"event_id": "e", "user_id": "u7", "ts": "2024-01-01T00:00:01Z", "type": "search",
                         "query": "q"})
    assert route(line, settings) == Outgoing("searches", b"u7", line, 1704067201000)
    assert route(b"{oops", settings) == "not a JSON object (use --topic to send it anyway)"
    assert route(b'{"type": "view"}', settings).startswith("unknown type 'view'")  # type: ignore[union-attr]
    assert route(b"{oops", settings, topic_override="clicks") == Outgoing("clicks", None, b"{oops", None)
