"""Log lines: JSON shape, and no secrets or payload bytes in any part of a record."""

from __future__ import annotations

import io
import logging
import logging.config
import os
import subprocess
import sys

import orjson
import pytest

from stream_app.ops.logging_setup import MASK, logging_config, secrets_of, start_json_stdio
from stream_app.ops.settings import Settings

PASSWORD = "hunter2-sasl-Pw"  # noqa: S105 - a fake secret that must never reach the log


def capture(settings: Settings) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    config = logging_config(settings)
    config["handlers"]["default"].update(stream=stream, level="DEBUG")
    config["root"] = {"level": "DEBUG", "handlers": []}
    config["loggers"] = {"t": {"level": "DEBUG", "handlers": ["default"], "propagate": False}}
    logging.config.dictConfig(config)
    return logging.getLogger("t"), stream


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    # dictConfig replaces the root logger's level and handlers: later tests must not inherit DEBUG.
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    yield
    logging.getLogger("t").handlers.clear()
    root.setLevel(level)
    root.handlers[:] = handlers


def json_settings() -> Settings:
    return Settings(log_format="json", sasl_password=PASSWORD)


def test_secret_settings_are_collected() -> None:
    assert secrets_of(json_settings()) == [PASSWORD]
    assert secrets_of(Settings()) == []


def test_json_lines_carry_ts_level_logger_message_and_extra_fields() -> None:
    log, out = capture(json_settings())
    log.warning("rebalanced %d partitions", 3, extra={"generation": 7})
    [line] = out.getvalue().splitlines()
    doc = orjson.loads(line)
    assert doc["level"] == "WARNING" and doc["logger"] == "t" and doc["message"] == "rebalanced 3 partitions"
    assert doc["generation"] == 7
    assert doc["ts"].endswith("+00:00") and "T" in doc["ts"]


def test_secrets_are_masked_in_message_args_extras_and_tracebacks() -> None:
    log, out = capture(json_settings())
    log.info(f"connecting with {PASSWORD}")
    log.info("password=%s", PASSWORD)
    log.info("x", extra={"creds": f"user:{PASSWORD}"})
    try:
        raise RuntimeError(f"auth failed for {PASSWORD}")
    except RuntimeError:
        log.exception("broker refused us")
    text = out.getvalue()
    assert PASSWORD not in text
    docs = [orjson.loads(line) for line in text.splitlines()]
    assert [d["message"] for d in docs] == [f"connecting with {MASK}", f"password={MASK}", "x", "broker refused us"]
    assert docs[2]["creds"] == f"user:{MASK}"
    assert "RuntimeError: auth failed for [redacted]" in docs[3]["exc"]


def test_message_values_are_logged_as_their_length_only() -> None:
    log, out = capture(json_settings())
    value = b'{"type":"review","text":"my private review"}'
    log.warning("dead letter %r", value)
    log.warning("dead letter", extra={"value": value})
    assert "private" not in out.getvalue()
    first, second = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == f"dead letter '<{len(value)} bytes>'"
    assert second["value"] == f"<{len(value)} bytes>"


def test_text_format_is_for_people() -> None:
    log, out = capture(Settings(sasl_password=PASSWORD))
    log.error("lost %s", PASSWORD)
    assert out.getvalue().rstrip().endswith(f"ERROR t: lost {MASK}")


RELAYED_PROGRAM = r"""
import logging, os, sys, warnings
from stream_app.ops.logging_setup import configure_logging, start_json_stdio
from stream_app.ops.settings import Settings

assert start_json_stdio(os.environ)
configure_logging(Settings())
print("a plain print")
os.write(2, b"native code writing to fd 2\n")
sys.stderr.write("progress 10%\rprogress 100%\n")
warnings.warn("a library warning")
logging.getLogger("engine").warning("a record")
print("password=" + os.environ["PROFILE_SASL_PASSWORD"])
print("x" * 20000)
raise RuntimeError("dying loudly")
"""


def test_json_mode_turns_every_output_line_into_a_json_record() -> None:
    env = {**os.environ, "PROFILE_LOG_FORMAT": "json", "PROFILE_SASL_PASSWORD": PASSWORD}
    done = subprocess.run([sys.executable, "-c", RELAYED_PROGRAM], env=env, capture_output=True, timeout=60,
                          check=False)
    assert done.returncode == 1
    assert done.stdout == b""  # stdout is relayed too, as records on stderr
    docs = [orjson.loads(line) for line in done.stderr.decode().splitlines()]
    messages = [doc["message"] for doc in docs]
    assert {"a plain print", "native code writing to fd 2", "progress 10%", "progress 100%", "a record",
            "password=" + MASK} <= set(messages)
    assert any("a library warning" in m for m in messages if m)  # via logging.captureWarnings
    assert ["x" * 8192, "x" * 8192, "x" * 3616] == [m for m in messages if m.startswith("xxx")]
    assert any(m.startswith("RuntimeError: dying loudly") for m in messages)  # the interpreter's traceback
    assert all({"ts", "level", "logger", "message"} <= set(doc) for doc in docs)
    assert PASSWORD not in done.stderr.decode()
    by_message = {doc["message"]: doc for doc in docs}
    assert by_message["a plain print"]["logger"] == "stdout"
    assert by_message["native code writing to fd 2"]["logger"] == "stderr"


def test_text_mode_leaves_stdout_and_stderr_alone() -> None:
    assert not start_json_stdio({"PROFILE_LOG_FORMAT": "text"})
