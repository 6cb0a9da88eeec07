"""Log output: text lines for people, JSON lines for log shippers; never secrets, never message payloads.

Payload safety is by construction first: no code path logs a message value (triage and the dead-letter
path log reasons and kinds only). The filter is the second line: every `SecretStr` setting is masked
wherever it appears, and `bytes` arguments (message values are bytes everywhere in this engine) are
replaced by their length, so an accidental `log.info("%r", message.value)` cannot leak review text.
"""

from __future__ import annotations

import logging
import logging.config
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from pydantic import SecretStr

from stream_app.settings import Settings

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
        "handlers": {"default": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                 "formatter": "default", "filters": ["redact"], "level": level}},
        "root": {"level": level, "handlers": ["default"]},
    }


def configure_logging(settings: Settings) -> None:
    logging.config.dictConfig(logging_config(settings))
