"""Keyed pseudonyms for user ids that leave the worker (deltas, and so Redis; the HTTP lookup's answers).

Format: `hmac_sha256(key, user_id).hexdigest()` with the key and the id as UTF-8 bytes, i.e. 64 lower-case
hex characters. A keyed HMAC rather than a plain hash because user ids are guessable (a dictionary of
candidate ids would invert an unkeyed hash); without the key nobody, the worker included, can map a
pseudonym back. The same key gives the same pseudonym on every worker and after restarts, so a user's
delta versions continue; a new key is a new pseudonym space (replay into a new app id, docs/serving.md).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from functools import lru_cache

from pydantic import SecretStr

PSEUDONYM_HEX_CHARS = 64


def pseudonym(key: bytes, user_id: str) -> str:
    return hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()


def pseudonymiser(key: SecretStr | None) -> Callable[[str], str]:
    """The function every outgoing user id goes through: the identity when no key is configured."""
    if key is None:
        return _identity
    secret = key.get_secret_value().encode()

    # Each active user's id is pseudonymised once per delta: cache the hot ones.
    @lru_cache(maxsize=65536)
    def apply(user_id: str) -> str:
        return pseudonym(secret, user_id)

    return apply


def _identity(user_id: str) -> str:
    return user_id
