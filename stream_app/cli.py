"""The `stream-app` command. Settings come from PROFILE_* environment variables (docs/settings.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import orjson


def _cmd_broker(args: argparse.Namespace) -> int:
    from stream_app.kafka.embedded_broker import EmbeddedBroker

    broker = EmbeddedBroker(port=args.port, host=args.host).start()
    print(f"embedded broker on {broker.bootstrap}; export PROFILE_BROKER_URL={broker.url} "
          f"PROFILE_EMBEDDED_BROKER=true", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop and broker.running:
            time.sleep(0.2)
    finally:
        broker.stop()
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from stream_app.worker.run import run_worker

    run_worker()
    return 0


def _cmd_produce(args: argparse.Namespace) -> int:
    from stream_app.kafka.clients import ensure_topics
    from stream_app.ops.settings import get_settings
    from stream_app.tools.producer import produce_file

    settings = get_settings()
    asyncio.run(ensure_topics(settings))
    report = asyncio.run(produce_file(Path(args.file), settings, topic_override=args.topic,
                                      progress=not args.quiet, rate=args.rate))
    print(f"sent {report.sent} events {report.by_topic}; skipped {len(report.unroutable)} unroutable lines")
    return 0 if not report.unroutable else 1


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from stream_app.core.replica import ProfileReplicas
    from stream_app.ops.settings import get_settings
    from stream_app.serving.snapshot import read_deltas

    settings = get_settings()
    if args.topic:
        settings = settings.model_copy(update={"topic_deltas": args.topic})
    replicas = ProfileReplicas().apply_all(asyncio.run(read_deltas(settings)))
    for view in replicas.views(args.at):
        sys.stdout.write(orjson.dumps(view).decode() + "\n")
    if replicas.gaps:
        print(f"warning: {len(replicas.gaps)} version gaps, e.g. {replicas.gaps[:3]}", file=sys.stderr)
    return 0


def _cmd_subscribe(args: argparse.Namespace) -> int:
    from stream_app.ops.settings import get_settings
    from stream_app.serving.redis_sink import Backoff
    from stream_app.serving.subscribe import SubscribeOptions, group_id_for, run_subscriber

    settings = get_settings()
    options = SubscribeOptions(topic=args.topic or settings.topic_deltas, group_id=args.group or group_id_for(settings),
                               until_caught_up=args.until_caught_up,
                               backoff=Backoff(settings.sink_backoff_initial_s, settings.sink_backoff_max_s))
    run_subscriber(settings, options, redis_url=args.redis)
    return 0


def _cmd_redis_get(args: argparse.Namespace) -> int:
    from stream_app.core.pseudonym import pseudonymiser
    from stream_app.ops.settings import get_settings
    from stream_app.serving.subscribe import read_views

    settings = get_settings()
    users = [pseudonymiser(settings.pseudonym_key)(u) for u in args.users] if args.raw else args.users
    views = asyncio.run(read_views(settings, users or None, args.at, redis_url=args.redis, topic=args.topic))
    for view in views:
        sys.stdout.write(orjson.dumps(view).decode() + "\n")
    return 0 if len(views) == len(users) or not users else 1


def _cmd_replay(args: argparse.Namespace) -> int:
    from stream_app.ops.settings import get_settings
    from stream_app.tools.replay import ReplayPlan, run_replay

    plan = ReplayPlan.create(get_settings(), args.name, files=[Path(f) for f in args.files], since=args.since,
                             output_topic=args.output)
    report = run_replay(plan, progress=not args.quiet)
    print(orjson.dumps(report).decode())
    print(f"profiles: stream-app snapshot --topic {report['deltas_topic']}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from stream_app.tools.event_files import write_events
    from stream_app.tools.sample_data import sample_events

    events = sample_events(customers=args.customers)
    write_events(Path(args.out), events)
    print(f"wrote {len(events)} events to {args.out}")
    return 0


def _cmd_train_sentiment(args: argparse.Namespace) -> int:
    if args.linear_head:
        from stream_app.encoding.sentiment import DEFAULT_HEAD_PATH
        from stream_app.encoding.sentiment_training import train

        out = Path(args.out) if args.out else DEFAULT_HEAD_PATH
        report = train(out, limit=args.limit, progress=not args.quiet,
                       embeddings_cache=Path(args.embeddings_cache) if args.embeddings_cache else None)
    else:
        from stream_app.encoding import sentiment_branch_training as branch_training
        from stream_app.encoding.sentiment_branch import DEFAULT_BRANCH_PATH

        out = Path(args.out) if args.out else DEFAULT_BRANCH_PATH
        if args.rescore:
            report = branch_training.rescore(Path(args.rescore), out, progress=not args.quiet,
                                             cache_dir=Path(args.cache_dir) if args.cache_dir else None)
            print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
            print(f"wrote {out}")
            return 0
        defaults = branch_training.TrainConfig()
        config = branch_training.TrainConfig(
            branch_layers=args.branch_layers or defaults.branch_layers, epochs=args.epochs or defaults.epochs,
            layer_lr=args.layer_lr or defaults.layer_lr,
            polar_weight=defaults.polar_weight if args.polar_weight is None else args.polar_weight,
            label_smoothing=defaults.label_smoothing if args.label_smoothing is None else args.label_smoothing,
            class_weight_power=(defaults.class_weight_power if args.class_weight_power is None
                                else args.class_weight_power),
            drug_train_fraction=(defaults.drug_train_fraction if args.drug_train_fraction is None
                                 else args.drug_train_fraction),
            query_top=defaults.query_top if args.query_top is None else args.query_top,
            head_embedding=defaults.head_embedding if args.head_embedding is None else args.head_embedding,
            ema_decay=defaults.ema_decay if args.ema_decay is None else args.ema_decay,
            rating_weight=defaults.rating_weight if args.rating_weight is None else args.rating_weight)
        report = branch_training.train(out, limit=args.limit, progress=not args.quiet, config=config,
                                       device=args.device,
                                       cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from stream_app.tools.demo import run_demo

    return run_demo(customers=args.customers)


def read_time(text: str) -> float:
    """`--at`: a finite epoch time in seconds inside the accepted event-time range (1970..2200)."""
    from stream_app.core.decay import check_read_time

    try:
        return check_read_time(float(text))
    except ValueError as exc:
        detail = "not a number of epoch seconds" if "read time" not in str(exc) else str(exc)
        raise argparse.ArgumentTypeError(f"{text[:64]!r}: {detail}") from None


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="stream-app", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    broker = commands.add_parser("broker", help="run the embedded Kafka-compatible broker in the foreground")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--host", default="127.0.0.1")
    broker.set_defaults(func=_cmd_broker)

    worker = commands.add_parser("worker", help="run a profile worker (Faust)")
    worker.set_defaults(func=_cmd_worker)

    produce = commands.add_parser("produce", help="publish events (.jsonl[.gz], .csv, .parquet) to their topics")
    produce.add_argument("file")
    produce.add_argument("--rate", type=float, default=None, help="events per second (default: unlimited)")
    produce.add_argument("--topic", help="send every line to this topic instead of routing by type")
    produce.add_argument("--quiet", action="store_true", help="no progress bar")
    produce.set_defaults(func=_cmd_produce)

    snapshot = commands.add_parser("snapshot", help="rebuild profiles from profile-deltas, one JSON line each")
    snapshot.add_argument("--at", type=read_time, default=None, help="age values to this epoch time (seconds)")
    snapshot.add_argument("--topic", help="delta topic to read (default PROFILE_TOPIC_DELTAS), e.g. a replay's")
    snapshot.set_defaults(func=_cmd_snapshot)

    subscribe = commands.add_parser("subscribe",
                                    help="materialise profile-deltas into Redis (profile:{topic}:{user_id})")
    subscribe.add_argument("--redis", default=None, help="Redis URL (default PROFILE_REDIS_URL)")
    subscribe.add_argument("--topic", help="delta topic to read (default PROFILE_TOPIC_DELTAS)")
    subscribe.add_argument("--group", help="consumer group (default <PROFILE_APP_ID>-redis-sink)")
    subscribe.add_argument("--until-caught-up", action="store_true",
                           help="stop once everything the topic held at start is in Redis (default: run until SIGTERM)")
    subscribe.set_defaults(func=_cmd_subscribe)

    redis_get = commands.add_parser("redis-get", help="profiles from Redis in snapshot's format (all if no USER)")
    redis_get.add_argument("users", nargs="*", metavar="USER", help="user id as on the delta topic")
    redis_get.add_argument("--at", type=read_time, default=None, help="age values to this epoch time (seconds)")
    redis_get.add_argument("--redis", default=None, help="Redis URL (default PROFILE_REDIS_URL)")
    redis_get.add_argument("--raw", action="store_true", help="USER is a real id: pseudonymise it first")
    redis_get.add_argument("--topic", help="delta topic whose subscriber wrote them (default PROFILE_TOPIC_DELTAS)")
    redis_get.set_defaults(func=_cmd_redis_get)

    replay = commands.add_parser("replay", help="rebuild profiles from history under a new app id")
    replay.add_argument("--name", required=True, help="names the replay's app id and output topic")
    replay.add_argument("--files", nargs="*", default=[], help="replay these event files instead of the topics")
    replay.add_argument("--since", type=float, default=None,
                        help="start the topics at this epoch time (Kafka timestamps = event time)")
    replay.add_argument("--output", default=None, help="delta topic (default: <deltas>-replay-<name>)")
    replay.add_argument("--quiet", action="store_true")
    replay.set_defaults(func=_cmd_replay)

    sample = commands.add_parser("sample", help="write sample events derived from real data (docs/sample-data.md)")
    sample.add_argument("--customers", type=int, default=50)
    sample.add_argument("--out", default="sample-events.jsonl", help=".jsonl, .jsonl.gz, .csv or .parquet")
    sample.set_defaults(func=_cmd_sample)

    train = commands.add_parser("train-sentiment",
                                help="fine-tune the sentiment branch on real reviews; report vs VADER and the old head")
    train.add_argument("--out", default=None,
                       help="weights file (default: the committed sentiment_branch.safetensors, or "
                            "sentiment_head.json with --linear-head)")
    train.add_argument("--limit", type=int, default=None, help="use only the first N reviews (quick runs)")
    train.add_argument("--epochs", type=int, default=None, help="default: the committed branch's")
    train.add_argument("--branch-layers", type=int, default=None,
                       help="top encoder layers copied into the branch (default: the committed branch's)")
    train.add_argument("--layer-lr", type=float, default=None, help="learning rate of the branch's layer(s)")
    train.add_argument("--polar-weight", type=float, default=None,
                       help="weight of the auxiliary positive-vs-negative loss")
    train.add_argument("--label-smoothing", type=float, default=None)
    train.add_argument("--class-weight-power", type=float, default=None,
                       help="class weights = inverse class frequency to this power")
    train.add_argument("--drug-train-fraction", type=float, default=None,
                       help="share of the drug reviews to train on (0: keep them out of domain)")
    train.add_argument("--query-top", action=argparse.BooleanOptionalAction, default=None,
                       help="the top branch layer computes one pooled query only (attention pooling)")
    train.add_argument("--head-embedding", action=argparse.BooleanOptionalAction, default=None,
                       help="the head also reads the profile embedding")
    train.add_argument("--ema-decay", type=float, default=None,
                       help="keep (and choose the epoch on) a moving average of the weights; 0: off")
    train.add_argument("--rating-weight", type=float, default=None,
                       help="weight of the auxiliary 5-star rating loss (training-only head); 0: off")
    train.add_argument("--rescore", default=None, metavar="FILE",
                       help="do not train: score a branch file trained elsewhere (e.g. on a GPU) with this "
                            "machine's encoder on the held-out data and write it, stamped for this model, to --out")
    train.add_argument("--device", default="cpu", help="where the branch trains and the shared layers run "
                                                       "(cpu, cuda); same code, same seeds")
    train.add_argument("--cache-dir", default=None,
                       help="reuse/save the frozen layers' outputs here (about 1.4 GB for the full data)")
    train.add_argument("--linear-head", action="store_true",
                       help="fit the old logistic-regression head on the pooled embedding instead")
    train.add_argument("--embeddings-cache", default=None, help="--linear-head: reuse/save embeddings here (.pt)")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=_cmd_train_sentiment)

    demo = commands.add_parser("demo", help="embedded broker + worker + sample events, end to end")
    demo.add_argument("--customers", type=int, default=40)
    demo.set_defaults(func=_cmd_demo)
    return root


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = parser().parse_args(argv)
    if args.command != "worker":
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        return int(args.func(args))
    except ValidationError as error:
        # A settings error is a configuration problem, not a crash: the reasons without a traceback. The
        # settings hide every rejected value (hide_input_in_errors), so no secret is printed here.
        print(f"stream-app {args.command}: invalid settings: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
