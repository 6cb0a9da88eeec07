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


#: Entries in each of torch's two CPU kernel caches (oneDNN's primitives, ideep's) unless the operator sets one.
KERNEL_CACHE_ENTRIES = "64"


def bound_kernel_caches(environ: MutableMapping[str, str]) -> None:
    """Keep fewer of the CPU kernels oneDNN builds per batch shape unless the operator chose a number.

    Both caches default to 1,024 entries, and each entry held ~1-2 MiB here (bf16 on an AMX CPU): a review worker
    at a steady 40 reviews/s, batch shapes bounded (`shapes.py`), went 487 → 1,124 MiB in 300 s, still rising;
    with 64 entries each it went 486 → 714 MiB and stayed there from 105 to 150 s, at 144 s of CPU against 152.
    Read once, when torch first uses oneDNN: call before importing torch.
    """
    environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE_ENTRIES)
    environ.setdefault("LRU_CACHE_CAPACITY", KERNEL_CACHE_ENTRIES)


def torch_process_defaults(environ: MutableMapping[str, str]) -> None:
    """Every default above, for a process that will run the encoder: call before importing torch."""
    prefer_passive_omp_threads(environ)
    bound_kernel_caches(environ)
