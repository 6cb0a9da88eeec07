"""The fine-tuned sentiment branch: exact copy of the top layer, embedding unchanged, score range, weights file
checks at start-up, and that training and serving compute the same thing."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stream_app.encoding.bert_encoder import BertEncoder, EncoderConfigurationError, check_configuration
from stream_app.encoding.sentiment import CLASSES, SentimentHead
from stream_app.encoding.sentiment_branch import (
    DEFAULT_BRANCH_PATH,
    FORMAT,
    FORMAT_2,
    QueryLayer,
    SentimentBranch,
    SentimentBranchError,
    model_fingerprint,
)
from stream_app.encoding.sentiment_branch_training import (
    SharedStates,
    TrainConfig,
    binary_macro_f1,
    branch_logits,
    compute_shared_states,
    drug_split,
    polar_loss,
    rating_loss,
    reliability,
    train_branch,
)
from stream_app.ops.settings import Settings

REVIEWS = [
    "I love this dress, the fabric is soft and it fits perfectly. Wore it to a wedding and got compliments.",
    "Terrible quality. The seams came apart after one wash and the color faded. Returned it.",
    "It's okay. The color is nice but it runs a bit large.",
    "Great jeans!",
]
EXTREME = [
    "", "   ", "!!!!!!!!", "word " * 20_000, "😍😍😍🔥", "Ce pull est magnifique, je l'adore.",
    "Die Qualität ist schrecklich, nie wieder.", "这件衣服质量很差", "هذا الفستان رائع جدا", "\u200b\u0000\ufeff",
    "not bad " * 300, "<script>alert(1)</script>",
]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.fixture(scope="module")
def plain_encoder(real_encoder: BertEncoder) -> BertEncoder:
    """The encoder as it was before the branch: same model and precision, linear head on the pooled vector."""
    return BertEncoder(device="cpu", precision=real_encoder.precision, threads=2, warm_up=False,
                       sentiment_head=SentimentHead.load_default())


@pytest.fixture(scope="module")
def fresh_branch_file(tmp_path_factory: pytest.TempPathFactory, plain_encoder: BertEncoder) -> Path:
    """An untrained branch for this model (copied top layer, random head), saved like a trained one."""
    torch.manual_seed(0)
    branch = SentimentBranch.from_base_model(plain_encoder.model, 1)
    torch.nn.init.normal_(branch.head.weight, std=0.5)
    path = tmp_path_factory.mktemp("branch") / "branch.safetensors"
    branch.save(path, fingerprint=model_fingerprint(plain_encoder.model_dir))
    return path


def test_the_worker_uses_the_committed_branch(real_encoder: BertEncoder) -> None:
    assert real_encoder.branch is not None and real_encoder.sentiment is None
    assert DEFAULT_BRANCH_PATH.stat().st_size < 8 * 1024 * 1024  # fp16: two MiniLM layers are ~7.1 MB


def test_copied_layer_reproduces_the_models_top_layer_exactly(plain_encoder: BertEncoder) -> None:
    inputs = plain_encoder.collate(plain_encoder.tokenize(REVIEWS))
    branch = SentimentBranch.from_base_model(plain_encoder.model, 1).float()
    with torch.inference_mode():
        output = plain_encoder.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                     output_hidden_states=True)
        copied = branch.layers[0](output.hidden_states[branch.input_layer].float(),
                                  inputs.attention_mask.bool()[:, None, None, :])
    real = inputs.attention_mask.bool()
    assert torch.allclose(copied[real], output.last_hidden_state.float()[real], atol=1e-4)


def test_query_layer_is_the_top_layer_for_the_mean_token(plain_encoder: BertEncoder) -> None:
    """Copied from the top layer, the query-only layer gives what that layer gives a token whose input is the
    tokens' mean: exactly so when every token is that mean; and padding changes nothing."""
    inputs = plain_encoder.collate(plain_encoder.tokenize(REVIEWS))
    query = SentimentBranch.from_base_model(plain_encoder.model, 2, query_top=True).float().layers[1]
    assert isinstance(query, QueryLayer)
    full = SentimentBranch.from_base_model(plain_encoder.model, 1).float()
    mask = inputs.attention_mask
    with torch.inference_mode():
        hidden = plain_encoder.model(input_ids=inputs.input_ids, attention_mask=mask,
                                     output_hidden_states=True).hidden_states[5].float()
        weights = mask.unsqueeze(-1).float()
        mean = (hidden * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
        flat = mean.expand_as(hidden).contiguous()
        keep = mask.bool()[:, None, None, :]
        pooled = query.pool(flat, keep, mask)
        reference = full.layers[0](flat, keep)[:, 0]
        assert torch.allclose(pooled, reference, atol=1e-4)
        alone = query.pool(hidden[3:4, : int(mask[3].sum())], keep[3:4, ..., : int(mask[3].sum())],
                           mask[3:4, : int(mask[3].sum())])
        assert torch.allclose(query.pool(hidden, keep, mask)[3:4], alone, atol=1e-5)


def test_embedding_with_the_branch_equals_the_plain_models(real_encoder: BertEncoder,
                                                           plain_encoder: BertEncoder) -> None:
    texts = REVIEWS + EXTREME
    with_branch = torch.tensor([r.embedding for r in real_encoder.encode(texts)])
    before = torch.tensor([r.embedding for r in plain_encoder.encode(texts)])
    assert cosine(with_branch, before).min() >= 0.9999
    if real_encoder.precision != "fp32":
        return
    # And against transformers itself, no code of ours in between but the pooling.
    batch = real_encoder.tokenizer(texts, truncation=True, max_length=256, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = plain_encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                     ).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = (hidden * mask).sum(1) / mask.sum(1)
    assert cosine(with_branch, reference).min() >= 0.9999


def test_score_is_in_range_and_finite_on_extreme_inputs(real_encoder: BertEncoder) -> None:
    results = real_encoder.encode(EXTREME)
    assert all(math.isfinite(r.sentiment) and -1.0 <= r.sentiment <= 1.0 for r in results)
    assert all(len(r.embedding) == 384 for r in results)


def test_score_orders_clear_reviews(real_encoder: BertEncoder) -> None:
    positive, negative, mixed, short_positive = (r.sentiment for r in real_encoder.encode(REVIEWS))
    assert positive > 0.8 and short_positive > 0.5
    assert negative < -0.8
    assert negative < mixed < positive


def test_identical_input_gives_identical_output(real_encoder: BertEncoder) -> None:
    # Replay determinism rests on this: the same batch twice must give the same floats, not nearly the same.
    inputs = real_encoder.collate(real_encoder.tokenize(REVIEWS))
    assert real_encoder.forward(inputs) == real_encoder.forward(inputs)


def test_committed_weights_carry_the_report_that_produced_them(real_encoder: BertEncoder) -> None:
    assert real_encoder.branch is not None
    report = real_encoder.branch.metadata
    test = report["in_domain_test"]
    assert test["reviews"] > 4000 and report["split"]["seed"] == 20261125
    assert test["branch"]["macro_f1"] >= 0.65
    for metric in ("macro_f1", "pos_vs_neg_macro_f1"):
        assert test["branch"][metric] > max(test["old_linear_head"][metric], test["vader"][metric])


def test_fp16_file_round_trip(plain_encoder: BertEncoder, fresh_branch_file: Path) -> None:
    loaded = SentimentBranch.load(fresh_branch_file, plain_encoder.model_dir)
    original = SentimentBranch.from_base_model(plain_encoder.model, 1)
    for name, tensor in original.layers.state_dict().items():
        assert torch.allclose(loaded.layers.state_dict()[name], tensor.half().float())
    assert fresh_branch_file.stat().st_size < 4 * 1024 * 1024


def test_a_missing_branch_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SentimentBranchError, match="are missing: run `stream-app train-sentiment`"):
        BertEncoder(sentiment_branch=tmp_path / "nope.safetensors", warm_up=False)
    with pytest.raises(EncoderConfigurationError, match="PROFILE_SENTIMENT_BRANCH: .* are missing"):
        check_configuration(Settings(sentiment_branch=str(tmp_path / "nope.safetensors")))


def _rewrite_header(source: Path, target: Path, **changes: str) -> None:
    raw = source.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


@pytest.mark.parametrize(("changes", "message"), [
    ({"base_fingerprint": "0" * 64}, "fine-tuned from other weights"),
    ({"base_shape": json.dumps({"hidden_size": 768})}, "trained for a model shaped"),
    ({"classes": json.dumps(["bad", "good"])}, "classes"),
    ({"format": "something-else"}, "format"),
    ({"branch_layers": "2"}, "tensors do not match a 2-layer branch"),
])
def test_a_mismatched_branch_file_is_refused_with_the_reason(tmp_path: Path, fresh_branch_file: Path,
                                                            changes: dict[str, str], message: str) -> None:
    broken = tmp_path / "broken.safetensors"
    _rewrite_header(fresh_branch_file, broken, **changes)
    with pytest.raises(SentimentBranchError, match=message):
        BertEncoder(sentiment_branch=broken, warm_up=False)


def test_a_file_that_is_not_safetensors_is_refused_at_configuration(tmp_path: Path) -> None:
    junk = tmp_path / "branch.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(EncoderConfigurationError, match="not a readable safetensors file"):
        check_configuration(Settings(sentiment_branch=str(junk)))


def test_a_branch_from_a_fresh_file_loads_and_scores(fresh_branch_file: Path) -> None:
    encoder = BertEncoder(device="cpu", sentiment_branch=fresh_branch_file, warm_up=False, threads=2)
    assert encoder.branch is not None and encoder.branch.temperature.item() == 1.0
    assert all(-1.0 <= r.sentiment <= 1.0 for r in encoder.encode(REVIEWS))


@pytest.mark.parametrize(("query_top", "head_embedding"), [(True, False), (True, True), (False, True)])
def test_query_and_embedding_branches_round_trip_with_format_2(tmp_path: Path, plain_encoder: BertEncoder,
                                                               query_top: bool, head_embedding: bool) -> None:
    torch.manual_seed(0)
    branch = SentimentBranch.from_base_model(plain_encoder.model, 2, query_top=query_top,
                                             head_embedding=head_embedding)
    torch.nn.init.normal_(branch.head.weight, std=0.5)
    path = tmp_path / "branch.safetensors"
    branch.save(path, fingerprint=model_fingerprint(plain_encoder.model_dir))
    encoder = BertEncoder(device="cpu", sentiment_branch=path, warm_up=False, threads=2, precision="fp32")
    assert encoder.branch is not None
    assert (encoder.branch.query_top, encoder.branch.head_embedding) == (query_top, head_embedding)
    scores = [r.sentiment for r in encoder.encode(REVIEWS + EXTREME)]
    assert all(math.isfinite(s) and -1.0 <= s <= 1.0 for s in scores)
    states = compute_shared_states(encoder, REVIEWS, encoder.branch.input_layer, progress=False)
    from_cache = encoder.branch.score(branch_logits(encoder.branch, states, range(len(REVIEWS))))
    assert torch.allclose(from_cache, torch.tensor(scores[: len(REVIEWS)]), atol=2e-3)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format"] == FORMAT_2
    # A format-1 file is the plain architecture: a 768-wide head in one is refused, not misread.
    if head_embedding:
        broken = tmp_path / "as-format-1.safetensors"
        _rewrite_header(path, broken, format=FORMAT, head_embedding="0")
        with pytest.raises(SentimentBranchError, match="tensors do not match"):
            BertEncoder(sentiment_branch=broken, warm_up=False)


def test_training_reads_the_same_hidden_states_the_worker_scores(real_encoder: BertEncoder) -> None:
    """No train/serve skew: logits from the cached shared states equal the encoder's own forward pass."""
    branch = real_encoder.branch
    assert branch is not None
    states = compute_shared_states(real_encoder, REVIEWS, branch.input_layer, progress=False)
    from_cache = branch.score(branch_logits(branch, states, range(len(REVIEWS))))
    served = torch.tensor([r.sentiment for r in real_encoder.encode(REVIEWS)])
    # The cache is fp16; a bf16 encoder rounds more.
    assert torch.allclose(from_cache, served, atol=2e-3 if real_encoder.precision == "fp32" else 5e-2)


def train_twice(encoder: BertEncoder, input_layer: int, config: TrainConfig) -> list[tuple[SentimentBranch, dict]]:
    """Two trainings of the same configuration on the same 48 Women's reviews (40 train, 8 validate)."""
    from stream_app.encoding.sentiment import label_of_rating
    from stream_app.tools.sample_data import womens_reviews

    rows = womens_reviews(48)
    states = compute_shared_states(encoder, [r["Review Text"] for r in rows], input_layer, progress=False)
    labels = torch.tensor([label_of_rating(int(r["Rating"])) for r in rows])
    stars = torch.tensor([int(r["Rating"]) for r in rows])
    return [train_branch(encoder.model, states, labels, list(range(40)), list(range(40, 48)), config=config,
                         stars=stars, progress=False) for _ in range(2)]


def test_training_is_reproducible(plain_encoder: BertEncoder) -> None:
    plain = TrainConfig(branch_layers=1, epochs=1, query_top=False, head_embedding=False, ema_decay=0.0)
    _assert_same_runs(train_twice(plain_encoder, 5, plain))


def test_training_a_query_branch_with_averaged_weights_is_reproducible(plain_encoder: BertEncoder) -> None:
    config = TrainConfig(branch_layers=2, epochs=2, query_top=True, head_embedding=True, ema_decay=0.9)
    runs = train_twice(plain_encoder, 4, config)
    _assert_same_runs(runs)
    branch = runs[0][0]
    assert branch.query_top and branch.head_embedding and branch.head.weight.abs().sum() > 0


def test_the_rating_loss_changes_training_but_not_the_file(plain_encoder: BertEncoder, tmp_path: Path) -> None:
    config = TrainConfig(branch_layers=2, epochs=1, query_top=True, head_embedding=False, ema_decay=0.0)
    (plain, _), _ = train_twice(plain_encoder, 4, config)
    runs = train_twice(plain_encoder, 4, replace(config, rating_weight=1.0))
    _assert_same_runs(runs)
    rated = runs[0][0]
    # The auxiliary head is training-only: same tensors, same format, but other weights.
    assert rated.state_dict().keys() == plain.state_dict().keys()
    assert not torch.equal(rated.head.weight, plain.head.weight)
    rated.save(tmp_path / "rated.safetensors", fingerprint=model_fingerprint(plain_encoder.model_dir))
    loaded = SentimentBranch.load(tmp_path / "rated.safetensors", plain_encoder.model_dir)
    assert loaded.query_top and torch.allclose(loaded.head.weight, rated.head.weight, atol=1e-2)


def test_rating_loss_needs_the_stars_and_ignores_unrated(plain_encoder: BertEncoder) -> None:
    logits = torch.tensor([[4.0, 0, 0, 0, 0], [0, 0, 0, 0, 4.0]])
    assert float(rating_loss(logits, torch.tensor([-1, -1]))) == 0.0
    assert float(rating_loss(logits, torch.tensor([0, -1]))) < float(rating_loss(logits, torch.tensor([4, -1])))
    assert float(rating_loss(logits, torch.tensor([0, 4]))) == pytest.approx(
        float(rating_loss(logits[:1], torch.tensor([0]))))
    states = SharedStates(torch.zeros(4, 384, dtype=torch.float16), torch.tensor([0, 2, 4]), torch.zeros(2, 384))
    with pytest.raises(ValueError, match="star ratings"):
        train_branch(plain_encoder.model, states, torch.tensor([0, 2]), [0], [1],
                     config=TrainConfig(branch_layers=1, epochs=1, query_top=False, rating_weight=1.0),
                     progress=False)


def _assert_same_runs(runs: list[tuple[SentimentBranch, dict]]) -> None:
    (first, first_report), (second, second_report) = runs
    for report in (first_report, second_report):
        for epoch in report["epochs"]:
            epoch.pop("seconds")
    assert first_report == second_report
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_evaluation_helpers() -> None:
    assert binary_macro_f1([True, False, True, False], [True, False, True, False]) == 1.0
    assert binary_macro_f1([True] * 4, [True, True, False, False]) == pytest.approx((2 / 3 + 0) / 2)
    certain = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    table = reliability(certain, [CLASSES.index("positive"), CLASSES.index("negative")])
    assert table["top_class_ece"] == 0.0 and table["top_class"][0]["count"] == 2


def test_packed_states_batch_and_concat() -> None:
    hidden = torch.arange(7 * 2, dtype=torch.float16).reshape(7, 2)
    states = SharedStates(hidden, torch.tensor([0, 3, 4, 7]), torch.zeros(3, 2))
    padded, mask = states.batch([1, 0])
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert padded[0, 0].tolist() == hidden[3].float().tolist() and padded[0, 1:].abs().sum() == 0
    assert torch.equal(padded[1], hidden[0:3].float())
    both = SharedStates.concat([states, states])
    assert both.lengths == [3, 1, 3, 3, 1, 3]
    assert torch.equal(both.batch([5])[0], states.batch([2])[0])


def test_drug_split_is_fixed_disjoint_and_all_test_without_training() -> None:
    train, val, test = drug_split(979, 0.4)
    assert (len(train), len(val), len(test)) == (391, 97, 491)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert (train, val, test) == drug_split(979, 0.4)
    assert drug_split(979, 0.0) == ([], [], list(range(979)))


def test_polar_loss_trains_the_sign_and_ignores_neutral() -> None:
    negative, neutral, positive = (CLASSES.index(c) for c in ("negative", "neutral", "positive"))
    weights = torch.ones(3)
    only_neutral = torch.zeros(2, 3)
    assert float(polar_loss(only_neutral, torch.tensor([neutral, neutral]), weights)) == 0.0
    right = torch.zeros(2, 3)
    right[0, positive], right[1, negative] = 3.0, 3.0
    target = torch.tensor([positive, negative])
    assert float(polar_loss(right, target, weights)) < float(polar_loss(-right, target, weights))
