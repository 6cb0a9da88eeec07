"""The review encoder: the resident BERT-family model, its tokenizer/forward threads, the sentiment head."""

from __future__ import annotations

from collections.abc import MutableMapping


def prefer_passive_omp_threads(environ: MutableMapping[str, str]) -> None:
    """Let torch's OpenMP threads sleep between parallel regions unless the operator chose otherwise.

    By default they spin for a while after each region; on a small machine that spinning takes the cores the
    event loop, the tokenizer thread and the broker need, and those then take them back from torch in the
    middle of a forward pass. Measured on 2 cores, fp32, 600 reviews through a worker with 2 torch threads:
    48-54 reviews/s with the default, 29-31 with OMP_WAIT_POLICY=ACTIVE, 52-60 with PASSIVE; the encoder alone
    is unchanged (57-68/s). libgomp reads the variable once, when torch loads it: call before importing torch.
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
