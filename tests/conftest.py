"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os

import pytest

# Belt and braces: the encoder loads with local_files_only, and nothing may reach for a hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_encoder():  # type: ignore[no-untyped-def]
    """The real default encoder (all-MiniLM-L6-v2 from its package folder), loaded once per session."""
    from stream_app.encoding.bert_encoder import BertEncoder

    # PROFILE_ENCODER_PRECISION=fp32 runs the suite as a CPU without native bf16 does, on any machine. The CPU
    # even where there is a GPU: these tests compare against CPU tensors; tests/gpu covers the CUDA path.
    return BertEncoder(device="cpu", threads=2, precision=os.environ.get("PROFILE_ENCODER_PRECISION", "auto"))
