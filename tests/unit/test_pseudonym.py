"""Pseudonyms: keyed HMAC-SHA256, hex; the identity without a key; the key is a secret setting."""

from __future__ import annotations

import re

import pytest
from pydantic import SecretStr, ValidationError

from stream_app.core.pseudonym import PSEUDONYM_HEX_CHARS, pseudonym, pseudonymiser
from stream_app.ops.settings import Settings

KEY = SecretStr("a-test-key-of-some-length")


def test_rfc4231_vector() -> None:
    # RFC 4231, test case 2: HMAC-SHA256(key="Jefe", "what do ya want for nothing?").
    assert pseudonym(b"Jefe", "what do ya want for nothing?") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_deterministic_key_dependent_and_not_the_raw_id() -> None:
    first, again = pseudonymiser(KEY), pseudonymiser(SecretStr(KEY.get_secret_value()))
    other = pseudonymiser(SecretStr("another-key-of-some-length"))
    ids = ["cdnow-00001", "cdnow-00002", "u1", "ü-ñ"]
    out = [first(u) for u in ids]
    assert out == [again(u) for u in ids]
    assert all(a != b for a, b in zip(out, [other(u) for u in ids], strict=True))
    assert len(set(out)) == len(ids)
    for raw, alias in zip(ids, out, strict=True):
        assert raw not in alias
        assert re.fullmatch(f"[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}", alias)


def test_without_a_key_ids_pass_unchanged() -> None:
    assert pseudonymiser(None)("cdnow-00001") == "cdnow-00001"


def test_the_key_is_a_secret_of_useful_length() -> None:
    settings = Settings(pseudonym_key=KEY)
    assert KEY.get_secret_value() not in repr(settings)
    assert Settings().pseudonym_key is None
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(pseudonym_key=SecretStr("short"))
