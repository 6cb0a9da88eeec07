"""Log output: text lines for people, JSON lines for log shippers; never secrets, never message payloads.

Payload safety is by construction first: no code path logs a message value (triage and the dead-letter
path log reasons and kinds only). The filter is the second line: every `SecretStr` setting is masked
wherever it appears, and `bytes` arguments (message values are bytes everywhere in this engine) are
replaced by their length, so an accidental `log.info("%r", message.value)` cannot leak review text.
"""

from __future__ import annotations

import atexit
import logging
import logging.config
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson
from pydantic import SecretStr

from stream_app.ops.settings import Settings

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK: Final = "[redacted]"
# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName",
}


def secrets_of(settings: Settings) -> list[str]:
    """The values of all `SecretStr` settings (SASL password, and any key added later)."""
    values = (getattr(settings, name) for name in type(settings).model_fields)
    return [value.get_secret_value() for value in values if isinstance(value, SecretStr) and value.get_secret_value()]


class RedactingFilter(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so that a secret containing another one is masked whole.
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_safe_arg(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _safe_arg(arg) for key, arg in record.args.items()}
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # A format/argument mismatch must not lose the record; str() of args is already safe.
            message = f"{record.msg} {record.args}"
        record.msg, record.args = self.scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        for name in set(record.__dict__) - _STANDARD_ATTRS:
            value = _safe_arg(record.__dict__[name])
            record.__dict__[name] = self.scrub(value) if isinstance(value, str) else value
        return True


def _safe_arg(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO-8601), level, logger, message, then `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in sorted(set(record.__dict__) - _STANDARD_ATTRS):
            doc.setdefault(name, record.__dict__[name])
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def logging_config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict; also handed to Faust's Worker, which applies it as is."""
    level = settings.log_level.upper()
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if settings.log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"redact": {"()": f"{__name__}.RedactingFilter", "secrets": secrets_of(settings)}},
        "handlers": {"default": {"class": "logging.StreamHandler", "stream": log_stream(),
                                 "formatter": "default", "filters": ["redact"], "level": level}},
        "root": {"level": level, "handlers": ["default"]},
    }


def configure_logging(settings: Settings) -> None:
    if _relay is not None:
        _relay.redactor.secrets = RedactingFilter(secrets_of(settings)).secrets
    logging.config.dictConfig(logging_config(settings))
    # `warnings.warn` output becomes a record (logger py.warnings): one format, and redacted.
    logging.captureWarnings(True)


# Lines longer than this are split over several records: a log shipper's line limit is usually 16-64 KiB.
MAX_RELAYED_CHARS: Final = 8192
_THIRD_PARTY_QUIET: Final = {
    # Read at import by huggingface_hub and transformers: no download/"Loading weights" bars.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # tqdm >= 4.66 takes constructor defaults from TQDM_* variables: every other bar is off too.
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",  # else the tokenizers library prints a fork warning
}


class StdioRelay:
    """Makes file descriptors 1 and 2 pipes whose lines come out as JSON log records.

    Libraries print where they like: tqdm bars, `print`, the interpreter's own tracebacks, C++ code writing
    to fd 2. Turning each off one by one never ends, so in JSON mode everything that reaches stdout or stderr
    is read back and re-emitted as `{"ts", "level", "logger": "stdout"|"stderr", "message"}`, through the
    same redaction as every other record. Carriage returns (progress bars) end lines too.
    """

    def __init__(self, output: int) -> None:
        self.redactor = RedactingFilter()
        self._output = os.fdopen(output, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> StdioRelay:
        for fd, name, level in ((1, "stdout", "INFO"), (2, "stderr", "WARNING")):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            thread = threading.Thread(target=self._pump, args=(read_end, name, level), daemon=True,
                                      name=f"{name}-json-relay")
            thread.start()
            self._threads.append(thread)
        return self

    def drain(self, timeout: float = 2.0) -> None:
        """At exit: relay everything written so far, then end the pumps.

        Pointing fds 1 and 2 at /dev/null closes the pipes' write ends, so each pump reads what is left, then
        end-of-file, and returns: joining them is the only reliable "all written" (a pump may hold a chunk it
        has read but not yet written). What the interpreter prints after this, while it shuts down, is dropped
        rather than written as a line that is not JSON.
        """
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in (1, 2):
                os.dup2(null, fd)
        finally:
            os.close(null)
        for thread in self._threads:
            thread.join(timeout)
        self._output.flush()

    def _pump(self, read_end: int, name: str, level: str) -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                self.emit(name, level, line)
            if len(pending) > MAX_RELAYED_CHARS:
                self.emit(name, level, pending)
                pending = b""
        self.emit(name, level, pending)
        os.close(read_end)

    def emit(self, name: str, level: str, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()
        if not text:
            return
        for start in range(0, len(text), MAX_RELAYED_CHARS):
            record = logging.LogRecord(name, logging.getLevelName(level), "", 0,
                                       text[start:start + MAX_RELAYED_CHARS], None, None)
            self.redactor.filter(record)
            with self._lock:
                self._output.write(JsonFormatter().format(record) + "\n")


_relay: StdioRelay | None = None
_private_stderr: TextIO | None = None


def log_stream() -> TextIO:
    """Where log records go: stderr, or under the relay a private copy of it (records are JSON already)."""
    return _private_stderr if _private_stderr is not None else sys.stderr


def quiet_third_party_output(environ: dict[str, str] | None = None) -> None:
    """Before transformers/tokenizers are imported: no progress bars, no advisory prints."""
    target = os.environ if environ is None else environ
    for name, value in _THIRD_PARTY_QUIET.items():
        target.setdefault(name, value)


def start_json_stdio(environ: Mapping[str, str]) -> bool:
    """From the first line of a JSON-logging process on, every line on fds 1 and 2 is a JSON object.

    Decided from the raw environment because it must hold before `Settings` is parsed: a settings error is
    written as JSON too.
    """
    global _relay, _private_stderr
    if environ.get("PROFILE_LOG_FORMAT", "").strip().lower() != "json" or _relay is not None:
        return False
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    private_stderr = os.dup(2)
    _relay = StdioRelay(private_stderr).start()
    _private_stderr = os.fdopen(private_stderr, "w", buffering=1, encoding="utf-8", errors="replace")
    # Until dictConfig runs, a record would go to logging's last-resort handler: make it JSON on our stream.
    fallback = logging.StreamHandler(_private_stderr)
    fallback.setFormatter(JsonFormatter())
    logging.lastResort = fallback
    atexit.register(_relay.drain)
    return True
