"""Faust codecs of our own: UTF-8 keys.

Keys go on the wire as the plain UTF-8 bytes of the user id, so every client's partitioner (ours, the
table's changelog, a Java or librdkafka producer) hashes the same bytes.
"""

from __future__ import annotations

from typing import Any

from faust.serializers import codecs


class Utf8(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        return obj.encode() if isinstance(obj, str) else bytes(obj)

    def _loads(self, s: bytes) -> str:
        return s.decode()


def register() -> None:
    codecs.register("utf8", Utf8())
