"""Event files for `produce` and `replay`: JSONL (optionally gzipped), CSV and Parquet.

Every format yields one JSON document (bytes) per event. JSONL lines are passed through byte for byte,
so malformed lines still reach the worker and its dead-letter topic. CSV cells are strings: empty cells
are left out, and the numeric fields (`ts` when numeric, `rating`, `dwell_ms`) are converted.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

NUMERIC_FIELDS = ("ts", "rating", "dwell_ms")


class UnsupportedFile(ValueError):
    pass


def file_format(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in ((".jsonl.gz", "jsonl.gz"), (".ndjson.gz", "jsonl.gz"), (".jsonl", "jsonl"),
                         (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    raise UnsupportedFile(f"{path}: unknown format; use .jsonl, .jsonl.gz, .csv or .parquet")


def read_events(path: Path) -> Iterator[bytes]:
    kind = file_format(path)
    if kind == "jsonl":
        with path.open("rb") as handle:
            yield from _lines(handle)
    elif kind == "jsonl.gz":
        with gzip.open(path, "rb") as handle:
            yield from _lines(handle)
    elif kind == "csv":
        with path.open(newline="", encoding="utf-8") as text:
            for row in csv.DictReader(text):
                yield orjson.dumps(_typed({k: v for k, v in row.items() if k and v not in ("", None)}))
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            for row in batch.to_pylist():
                yield orjson.dumps({k: v for k, v in row.items() if v is not None})


def count_events(path: Path) -> int:
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    return sum(1 for _ in read_events(path))


def _lines(handle: io.BufferedIOBase | Any) -> Iterator[bytes]:
    for raw in handle:
        line = raw.rstrip(b"\r\n")
        if line.strip():
            yield line


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    for name in NUMERIC_FIELDS:
        value = row.get(name)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                continue  # an ISO timestamp, or garbage the worker will dead-letter with a reason
            row[name] = int(number) if number.is_integer() and name != "ts" else number
    return row


def write_events(path: Path, events: list[dict[str, Any]]) -> None:
    """Write events in the format the file name says (used by `sample` and the tests)."""
    kind = file_format(path)
    if kind in ("jsonl", "jsonl.gz"):
        payload = b"".join(orjson.dumps(e) + b"\n" for e in events)
        path.write_bytes(gzip.compress(payload) if kind == "jsonl.gz" else payload)
    elif kind == "csv":
        columns = sorted({k for e in events for k in e})
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(events)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = sorted({k for e in events for k in e})
        pq.write_table(pa.table({c: [e.get(c) for e in events] for c in columns}), path)
