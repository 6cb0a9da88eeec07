"""Per-stage timing of one event's way through a worker, for the bench only.

`python -m bench.stages` runs `stream-app worker` with timing wrappers put around the functions the agents
call at each stage boundary (admission, the by-user send, bundle decoding, the fold, the table write
confirmation, the delta send). Nothing in stream_app or agents knows about it: a worker started the normal
way runs without any of this, so the instrumentation costs nothing when off.

Per event it carries wall-clock stamps (time.time(), the clock Kafka record timestamps use) in a dict keyed by
event id, and turns them into stage durations when the event's delta is sent:

  input → ingest   record create time (the producer's) → the ingest agent gets its micro-batch: broker,
                   Faust's fetcher (fetch wait), stream buffer and the 50 ms batch window
  ingest agent     triage of the batch + bundling + hand-off of the bundles to the producer; for an event the
                   ingest agent folds itself (PROFILE_FOLD_AT_INGEST): triage until its fold starts
  by-user hop      bundle handed to the producer → the profile agent decodes it: linger, produce, broker,
                   second fetch, buffer and batch window (only events that take the hop)
  fold             fold + table writes handed to the producer (the fold's, charged to each event in it; from
                   when it holds the fold lock)
  write confirm    until the broker acknowledged the batch's table writes (and the previous batch's deltas)
  delta send       until the event's delta is handed to the producer (its record create time)

CPU per stage is the event-loop thread's CPU (time.thread_time) inside the wrapped calls, summed; the
process's other threads and Faust's own machinery between the calls show up in the per-thread totals the
bench reads from /proc. Summaries are written to $BENCH_STAGES_FILE when $BENCH_STAGES_FILE.request
appears (its content "reset" clears the counters after writing).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

STAGES = ("input_to_ingest", "ingest_agent", "by_user_hop", "fold", "write_confirm", "delta_send", "total")
# "loop_while_confirming" is the event-loop thread's CPU while the profile agent awaits its write confirmation:
# not the confirmation's cost, but the rest of the worker (Faust's streams, the ingest agent, producer and
# consumer callbacks) running meanwhile.
CPU_PARTS = ("admit", "bundle_send", "decode", "fold", "table_set", "loop_while_confirming", "delta_send")


class Recorder:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # event id -> [produced, ingest start, bundle sent or fold started, 1.0 if it took the by-user hop]
        self.events: dict[str, list[float]] = {}
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.batch: dict[str, float] = {}
        self.delta_events = 0

    def summary(self) -> dict[str, Any]:
        stages = {}
        for name in STAGES:
            values = sorted(self.durations.get(name, []))
            if values:
                stages[name] = {
                    "events": len(values), "mean_ms": round(1000 * sum(values) / len(values), 2),
                    "p50_ms": round(1000 * values[len(values) // 2], 2),
                    "p99_ms": round(1000 * values[min(len(values) - 1, int(0.99 * len(values)))], 2),
                }
        return {"stages": stages, "cpu_s": {k: round(v, 4) for k, v in self.cpu.items()}, "calls": dict(self.calls),
                "delta_events": self.delta_events}


REC = Recorder()


def _timed_cpu(part: str, started: float) -> None:
    REC.cpu[part] += time.thread_time() - started
    REC.calls[part] += 1


def install() -> None:
    """Wrap the stage boundaries; each wrapper calls the original and only takes notes."""
    import agents.ingest
    import agents.profiles
    import stream_app.core.fold
    import stream_app.worker.folding
    from stream_app.worker.publish import Output
    from stream_app.worker.tables import ProfileTable

    original_admit = agents.ingest.admit

    async def admit(settings: Any, output: Any, batch: Any, *args: Any) -> Any:
        now, cpu = time.time(), time.thread_time()
        admitted = await original_admit(settings, output, batch, *args)
        _timed_cpu("admit", cpu)
        for event, message in admitted:
            REC.events[event.event_id] = [message.timestamp, now, now, 0.0]
        return admitted

    agents.ingest.admit = admit  # type: ignore[assignment]

    original_events = Output.events

    async def events(self: Output, batch: Any) -> None:
        cpu = time.thread_time()
        await original_events(self, batch)
        _timed_cpu("bundle_send", cpu)
        now = time.time()
        for event in batch:
            stamps = REC.events.get(event.event_id)
            if stamps is not None:
                stamps[2], stamps[3] = now, 1.0

    Output.events = events  # type: ignore[method-assign,assignment]

    original_decode = agents.profiles.decode_bundle

    def decode_bundle(value: Any) -> Any:
        now, cpu = time.time(), time.thread_time()
        decoded = original_decode(value)
        _timed_cpu("decode", cpu)
        for event in decoded:
            stamps = REC.events.get(event.event_id)
            if stamps is not None:
                REC.durations["by_user_hop"].append(now - stamps[2])
        return decoded

    agents.profiles.decode_bundle = decode_bundle

    folding = stream_app.worker.folding
    original_rounds = folding.fold_in_rounds

    def fold_in_rounds(events: Any, *args: Any) -> Any:
        # Called once per fold, first thing under the fold lock: folds of both agents never overlap.
        now = time.time()
        REC.batch = {"fold_start": now}
        for event in events:
            stamps = REC.events.get(event.event_id)
            if stamps is not None and not stamps[3]:
                stamps[2] = now  # folded by the ingest agent: its stage ends here
        return original_rounds(events, *args)

    folding.fold_in_rounds = fold_in_rounds  # type: ignore[assignment]
    core_fold = stream_app.core.fold  # fold_in_rounds calls its module's fold_batch
    original_fold = core_fold.fold_batch

    def fold_batch(*args: Any, **kwargs: Any) -> Any:
        cpu = time.thread_time()
        folded = original_fold(*args, **kwargs)
        _timed_cpu("fold", cpu)
        return folded

    core_fold.fold_batch = fold_batch

    original_set: Callable[..., None] = ProfileTable.__setitem__

    def setitem(self: ProfileTable, key: Any, value: Any) -> None:
        cpu = time.thread_time()
        original_set(self, key, value)
        _timed_cpu("table_set", cpu)

    ProfileTable.__setitem__ = setitem  # type: ignore[method-assign,assignment]

    original_write_many = ProfileTable.write_many

    async def write_many(self: ProfileTable, *args: Any) -> None:  # the profile agent's writes (at least once)
        cpu = time.thread_time()
        await original_write_many(self, *args)
        _timed_cpu("table_set", cpu)

    ProfileTable.write_many = write_many  # type: ignore[method-assign,assignment]

    original_confirm = ProfileTable.confirm_writes

    async def confirm_writes(self: ProfileTable) -> None:
        REC.batch["fold_end"] = time.time()
        cpu = time.thread_time()
        await original_confirm(self)
        _timed_cpu("loop_while_confirming", cpu)
        REC.batch["confirmed"] = time.time()

    ProfileTable.confirm_writes = confirm_writes  # type: ignore[method-assign]

    original_deltas = Output.deltas

    async def deltas(self: Output, pairs: Any) -> Any:
        cpu = time.thread_time()
        result = await original_deltas(self, pairs)
        _timed_cpu("delta_send", cpu)
        now = time.time()
        batch = REC.batch
        if "confirmed" not in batch:
            return result
        for delta, redelivery in pairs:
            if redelivery:
                continue
            for event_id in delta["event_ids"]:
                stamps = REC.events.pop(event_id, None)
                if stamps is None:
                    continue
                produced, ingest_start, bundle_sent, _ = stamps
                d = REC.durations
                d["input_to_ingest"].append(ingest_start - produced)
                d["ingest_agent"].append(bundle_sent - ingest_start)
                d["fold"].append(batch["fold_end"] - batch["fold_start"])
                d["write_confirm"].append(batch["confirmed"] - batch["fold_end"])
                d["delta_send"].append(now - batch["confirmed"])
                d["total"].append(now - produced)
                REC.delta_events += 1
        return result

    Output.deltas = deltas  # type: ignore[method-assign,assignment]


SENSOR_HOOKS = ("on_message_in", "on_message_out", "on_stream_event_in", "on_stream_event_out", "on_table_get",
                "on_table_set", "on_send_initiated", "on_send_completed", "on_topic_buffer_full")


def silence_sensors() -> None:
    """BENCH_FAUST_SENSORS=off, to measure what Faust's per-message sensor calls cost (the monitor and the
    Prometheus one): every per-message hook becomes a no-op. A measurement switch, not a way to run."""
    from faust.sensors.monitor import Monitor
    from faust.sensors.prometheus import PrometheusMonitor

    def nothing(*_args: Any, **_kwargs: Any) -> None:
        return None

    for cls in (Monitor, PrometheusMonitor):
        for hook in SENSOR_HOOKS:
            if hook in vars(cls):
                setattr(cls, hook, nothing)


def _serve_requests(path: Path) -> None:
    request = path.with_name(path.name + ".request")
    while True:
        if request.exists():
            command = request.read_text().strip()
            summary = REC.summary()
            if command == "reset":
                REC.reset()
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(orjson.dumps(summary))
            tmp.replace(path)
            request.unlink()
        time.sleep(0.2)


def request_summary(path: Path, *, reset: bool = False, timeout_s: float = 30.0) -> dict[str, Any]:
    """From the bench: ask the instrumented worker for its summary (and to start counting afresh)."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".request").write_text("reset" if reset else "")
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no stage summary at {path} after {timeout_s} s")
        time.sleep(0.1)
    summary: dict[str, Any] = orjson.loads(path.read_bytes())
    return summary


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of a process: its main thread (Faust's event loop) and all other threads (Linux /proc)."""
    totals: dict[str, float] = defaultdict(float)
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main thread" if task.name == str(pid) else "other threads"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        totals[name] += (int(fields[11]) + int(fields[12])) / tick
    return dict(totals)


def main() -> int:
    from stream_app.cli import main as cli_main

    install()
    if os.environ.get("BENCH_FAUST_SENSORS") == "off":
        silence_sensors()
    path = Path(os.environ["BENCH_STAGES_FILE"])
    if os.environ.get("BENCH_CPROFILE"):  # for a look by hand: the event loop's profile, written at exit
        import atexit
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
        atexit.register(lambda: profile.dump_stats(os.environ["BENCH_CPROFILE"]))
    threading.Thread(target=_serve_requests, args=(path,), name="bench-stages", daemon=True).start()
    return cli_main(["worker"])


if __name__ == "__main__":
    raise SystemExit(main())
