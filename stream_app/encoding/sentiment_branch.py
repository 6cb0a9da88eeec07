"""Sentiment as a fine-tuned branch of the review encoder: a copy of the top transformer layer(s) plus a head.

The encoder runs all its layers once per forward batch, as before, for the profile embedding (so the embedding
is exactly the plain model's). The branch takes the hidden states *below* its layers, which that same pass
already computed, runs its own fine-tuned copy of the top layer(s), pools (a mean, or with `query_top` the top
copy computed for one pooled query: attention pooling at a sixth of a layer's cost) and classifies into
negative / neutral / positive. One resident model, one pass over the shared layers, up to k extra layers of
compute.

The score is P(positive) - P(negative) after temperature scaling, in [-1, 1].

Weights are a fp16 safetensors file whose header says which base model they were fine-tuned from (a hash of
its weight file) and its shape: a branch trained on another model would read hidden states it has never seen
and score nonsense silently, so a mismatch is refused at start-up instead.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stream_app.encoding.sentiment import CLASSES

FORMAT = "stream-app/sentiment-branch/1"
# Format 2: the header also says whether the top branch layer is a `QueryLayer` and whether the head reads the
# profile embedding too. A format-1 reader must refuse such a file: its tensors have format 1's names and shapes
# (query layer) but mean something else.
FORMAT_2 = "stream-app/sentiment-branch/2"
FORMATS = (FORMAT, FORMAT_2)
DEFAULT_BRANCH_PATH = Path(__file__).with_name("sentiment_branch.safetensors")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class SentimentBranchError(ValueError):
    """The branch weights are missing, malformed, or do not belong to the encoder's model."""


@dataclass(frozen=True)
class BaseShape:
    """What the branch needs to agree on with the encoder's model (from its config.json)."""

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_config(cls, config: Any) -> BaseShape:
        def get(key: str) -> Any:
            return config[key] if isinstance(config, dict) else getattr(config, key)

        return cls(int(get("hidden_size")), int(get("num_attention_heads")), int(get("intermediate_size")),
                   int(get("num_hidden_layers")), float(get("layer_norm_eps")), str(get("hidden_act")))

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BaseShape:
        return cls.from_config(json.loads((model_dir / "config.json").read_text()))


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of the model's weight file: same shape is not enough, the branch is tied to these weights."""
    for name in _WEIGHT_FILES:
        path = model_dir / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
    raise SentimentBranchError(f"no weight file ({', '.join(_WEIGHT_FILES)}) in {model_dir}")


class BranchLayer(nn.Module):
    """One post-LayerNorm BERT layer, written out so it does not depend on transformers' internal call
    signatures (they change between releases); `from_bert_layer` copies a BertLayer's weights exactly."""

    def __init__(self, shape: BaseShape, dropout: float = 0.0) -> None:
        super().__init__()
        if shape.hidden_act != "gelu":
            raise SentimentBranchError(f"branch layers implement BERT's erf GELU, the model uses {shape.hidden_act}")
        hidden = shape.hidden_size
        self.heads = shape.num_attention_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=shape.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, shape.intermediate_size)
        self.output = nn.Linear(shape.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=shape.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """hidden (batch, tokens, d); keep (batch, 1, 1, tokens) bool, True where a key may be attended."""
        batch, tokens, width = hidden.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        attended = nn.functional.scaled_dot_product_attention(
            split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden)), attn_mask=keep,
            dropout_p=self.dropout.p if self.training else 0.0,
        ).transpose(1, 2).reshape(batch, tokens, width)
        hidden = self.attention_norm(self.dropout(self.attention_out(attended)) + hidden)
        expanded = nn.functional.gelu(self.intermediate(hidden))
        return self.output_norm(self.dropout(self.output(expanded)) + hidden)

    @classmethod
    def from_bert_layer(cls, layer: Any, shape: BaseShape, dropout: float = 0.0) -> BranchLayer:
        copy = cls(shape, dropout)
        pairs: list[tuple[nn.Linear | nn.LayerNorm, Any]] = [
            (copy.query, layer.attention.self.query), (copy.key, layer.attention.self.key),
            (copy.value, layer.attention.self.value), (copy.attention_out, layer.attention.output.dense),
            (copy.attention_norm, layer.attention.output.LayerNorm), (copy.intermediate, layer.intermediate.dense),
            (copy.output, layer.output.dense), (copy.output_norm, layer.output.LayerNorm),
        ]
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight.float())
                mine.bias.copy_(theirs.bias.float())
        return copy


class QueryLayer(BranchLayer):
    """A BERT layer computed for one query only (attention pooling): keys and values for every token, but the
    query, the attention output and the feed-forward part only for the masked mean of the tokens. Same weights
    as a `BranchLayer` (copied from the model's top layer it is that layer applied to the mean token), about a
    sixth of a full layer's compute: the K/V projections are 2 of a layer's 12 d^2 multiply-adds per token."""

    def pool(self, hidden: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, d): the layer's output for the pooled query."""
        batch, tokens, width = hidden.shape
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1.0)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], self.heads, width // self.heads).transpose(1, 2)

        attended = nn.functional.scaled_dot_product_attention(
            split(self.query(mean)), split(self.key(hidden)), split(self.value(hidden)), attn_mask=keep,
            dropout_p=self.dropout.p if self.training else 0.0,
        ).transpose(1, 2).reshape(batch, 1, width)
        pooled = self.attention_norm(self.dropout(self.attention_out(attended)) + mean)
        expanded = nn.functional.gelu(self.intermediate(pooled))
        return self.output_norm(self.dropout(self.output(expanded)) + pooled).squeeze(1)


# The profile embedding is L2-normalised (entries ~0.05); scaled by sqrt(d) its entries are of the order of the
# branch's pooled hidden state's, so one head learning rate and weight decay suit both halves of the head input.
def embedding_scale(shape: BaseShape) -> float:
    return math.sqrt(shape.hidden_size)


class SentimentBranch(nn.Module):
    temperature: torch.Tensor

    def __init__(self, shape: BaseShape, branch_layers: int, *, query_top: bool = False,
                 head_embedding: bool = False, dropout: float = 0.0) -> None:
        """`query_top`: the top branch layer is a `QueryLayer` (attention pooling) instead of a full layer and
        a mean pool. `head_embedding`: the head reads the profile embedding (computed anyway) next to the
        branch's pooled output."""
        super().__init__()
        if not 1 <= branch_layers <= shape.num_hidden_layers:
            raise SentimentBranchError(f"branch_layers must be 1..{shape.num_hidden_layers}, got {branch_layers}")
        self.shape = shape
        self.branch_layers = branch_layers
        self.query_top = query_top
        self.head_embedding = head_embedding
        self.layers = nn.ModuleList(
            (QueryLayer if query_top and i == branch_layers - 1 else BranchLayer)(shape, dropout)
            for i in range(branch_layers))
        self.head = nn.Linear(shape.hidden_size * (2 if head_embedding else 1), len(CLASSES))
        self.head_dropout = nn.Dropout(dropout)
        # Fitted after training on held-out data so that probabilities (and the score) are calibrated.
        self.register_buffer("temperature", torch.ones(()))
        self.metadata: dict[str, Any] = {}

    @property
    def input_layer(self) -> int:
        """Index into the encoder's hidden_states tuple (0 = embeddings) that the branch reads."""
        return self.shape.num_hidden_layers - self.branch_layers

    def logits(self, hidden: torch.Tensor, mask: torch.Tensor, embedding: torch.Tensor | None = None,
               ) -> torch.Tensor:
        """Uncalibrated logits from the shared hidden states below the branch; mask (batch, tokens) 0/1;
        `embedding` (batch, d): the profile embedding, needed when the head reads it."""
        return self.classify(self.features(hidden, mask, embedding))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits from `features` (what `features` returns)."""
        return self.head(self.head_dropout(features))

    def features(self, hidden: torch.Tensor, mask: torch.Tensor, embedding: torch.Tensor | None = None,
                 ) -> torch.Tensor:
        """What the head reads: the pooled branch output (and the profile embedding, if the head reads it).
        Training may put an auxiliary head on it too."""
        keep = mask.bool()[:, None, None, :]
        full = self.layers[:-1] if self.query_top else self.layers
        for layer in full:
            hidden = layer(hidden, keep)
        top = self.layers[-1]
        if isinstance(top, QueryLayer):
            pooled = top.pool(hidden, keep, mask)
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        if self.head_embedding:
            if embedding is None:
                raise ValueError("this branch's head reads the profile embedding: pass it")
            pooled = torch.cat([pooled, embedding.to(pooled.dtype) * embedding_scale(self.shape)], dim=-1)
        return pooled

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature.float(), dim=-1)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.probabilities(logits)
        return (p[:, CLASSES.index("positive")] - p[:, CLASSES.index("negative")]).clamp(-1.0, 1.0)

    @classmethod
    def from_base_model(cls, model: Any, branch_layers: int, *, query_top: bool = False,
                        head_embedding: bool = False, dropout: float = 0.0) -> SentimentBranch:
        """A branch initialised as an exact copy of the model's top layer(s) and a zero head."""
        shape = BaseShape.from_config(model.config)
        branch = cls(shape, branch_layers, query_top=query_top, head_embedding=head_embedding, dropout=dropout)
        top = list(model.encoder.layer)[shape.num_hidden_layers - branch_layers:]
        branch.layers = nn.ModuleList(
            (QueryLayer if query_top and i == len(top) - 1 else BranchLayer).from_bert_layer(layer, shape, dropout)
            for i, layer in enumerate(top))
        nn.init.zeros_(branch.head.weight)
        nn.init.zeros_(branch.head.bias)
        return branch

    # -- weights file --------------------------------------------------------------------------------------
    def save(self, path: Path, *, fingerprint: str) -> None:
        from safetensors.torch import save_file

        tensors = {name: value.detach().to(torch.float16).contiguous() for name, value in self.state_dict().items()}
        tensors["temperature"] = self.temperature.detach().float().reshape(1)  # fp16 would round it
        header = {
            "format": FORMAT, "classes": json.dumps(list(CLASSES)), "branch_layers": str(self.branch_layers),
            "base_fingerprint": fingerprint, "base_shape": json.dumps(self.shape.__dict__),
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        if self.query_top or self.head_embedding:
            header.update(format=FORMAT_2, query_top=str(int(self.query_top)),
                          head_embedding=str(int(self.head_embedding)))
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: Path, model_dir: Path, *, fingerprint: str | None = None) -> SentimentBranch:
        """Load for the model in `model_dir`; SentimentBranchError says why a file cannot serve it."""
        from safetensors.torch import load_file

        header = read_header(path, model_dir, fingerprint=fingerprint)
        branch = cls.for_header(header, BaseShape.from_model_dir(model_dir))
        tensors = load_file(str(path))
        temperature = tensors.pop("temperature").reshape(())
        expected = {k: v.shape for k, v in branch.state_dict().items() if k != "temperature"}
        found = {k: v.shape for k, v in tensors.items()}
        if expected != found:
            missing = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
            raise SentimentBranchError(f"{path}: tensors do not match a {header['branch_layers']}-layer branch "
                                       f"of this model (first differences: {missing[:4]})")
        branch.load_state_dict({**{k: v.float() for k, v in tensors.items()}, "temperature": temperature.float()})
        if not math.isfinite(float(branch.temperature)) or float(branch.temperature) <= 0:
            raise SentimentBranchError(f"{path}: temperature must be a positive number")
        branch.metadata = json.loads(header.get("metadata", "{}"))
        return branch.eval()

    @classmethod
    def for_header(cls, header: dict[str, str], shape: BaseShape) -> SentimentBranch:
        """An untrained branch of the architecture a weights file's header describes (format 1: the plain one)."""
        extended = header.get("format") == FORMAT_2
        return cls(shape, int(header["branch_layers"]), query_top=extended and header.get("query_top") == "1",
                   head_embedding=extended and header.get("head_embedding") == "1")


def read_header(path: Path, model_dir: Path, *, fingerprint: str | None = None) -> dict[str, str]:
    """The file's header, checked against the model without loading any tensor (cheap: for start-up checks)."""
    from safetensors import safe_open

    if not path.is_file():
        raise SentimentBranchError(f"sentiment branch weights {path} are missing: run `stream-app train-sentiment` "
                                   "or set PROFILE_SENTIMENT_BRANCH")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise SentimentBranchError(f"{path} is not a readable safetensors file: {exc}") from exc
    if header.get("format") not in FORMATS:
        raise SentimentBranchError(f"{path}: format {header.get('format')!r}, expected one of {list(FORMATS)}")
    if json.loads(header.get("classes", "[]")) != list(CLASSES):
        raise SentimentBranchError(f"{path}: classes {header.get('classes')}, expected {list(CLASSES)}")
    shape = BaseShape.from_model_dir(model_dir)
    if json.loads(header.get("base_shape", "{}")) != shape.__dict__:
        raise SentimentBranchError(f"{path} was trained for a model shaped {header.get('base_shape')}, "
                                   f"{model_dir} is shaped {json.dumps(shape.__dict__)}")
    actual = fingerprint if fingerprint is not None else model_fingerprint(model_dir)
    if header.get("base_fingerprint") != actual:
        trained_on = str(header.get("base_fingerprint"))[:12]
        raise SentimentBranchError(
            f"{path} was fine-tuned from other weights than {model_dir} (sha256 {trained_on}... vs "
            f"{actual[:12]}...): retrain with `stream-app train-sentiment` for this model"
        )
    return header
