"""The real encoder, loaded offline from a local folder: shapes, normalisation, batching invariance, limits."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stream_app.encoding.bert_encoder import (
    BertEncoder,
    EncoderConfigurationError,
    check_configuration,
    cpu_layout,
    default_model_dir,
    resolve_precision,
    usable_cores,
)
from stream_app.encoding.pipeline import EncoderPipeline
from stream_app.encoding.sentiment import SentimentHead
from stream_app.ops.settings import Settings

REVIEWS = [
    "I love this dress, the fabric is soft and it fits perfectly. Wore it to a wedding and got compliments.",
    "Terrible quality. The seams came apart after one wash and the color faded. Returned it.",
    "It's okay. The color is nice but it runs a bit large.",
    "Great jeans!",
]


def cosine(a: tuple[float, ...] | list[float], b: tuple[float, ...] | list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_are_384_d_unit_vectors_with_meaningful_similarity(real_encoder: BertEncoder) -> None:
    first, second, third, fourth = real_encoder.encode(REVIEWS)
    for result in (first, second, third, fourth):
        assert len(result.embedding) == 384
        assert math.isclose(math.sqrt(sum(x * x for x in result.embedding)), 1.0, rel_tol=1e-5)
    paraphrase = real_encoder.encode(["This dress is lovely, soft material and a perfect fit."])[0]
    assert cosine(first.embedding, paraphrase.embedding) > cosine(first.embedding, fourth.embedding) + 0.2


def test_sentiment_separates_clearly_positive_from_clearly_negative(real_encoder: BertEncoder) -> None:
    positive, negative, neutral, _ = real_encoder.encode(REVIEWS)
    assert positive.sentiment > 0.5
    assert negative.sentiment < -0.5
    assert negative.sentiment < neutral.sentiment < positive.sentiment
    assert all(-1.0 <= r.sentiment <= 1.0 for r in (positive, negative, neutral))


def test_results_do_not_depend_on_batch_company_or_order(real_encoder: BertEncoder) -> None:
    together = real_encoder.encode(REVIEWS)
    alone = [real_encoder.encode([text])[0] for text in REVIEWS]
    reversed_batch = list(reversed(real_encoder.encode(list(reversed(REVIEWS)))))
    for a, b, c in zip(together, alone, reversed_batch, strict=True):
        assert cosine(a.embedding, b.embedding) > 0.999  # padding differs; bf16 rounding may too
        assert cosine(a.embedding, c.embedding) > 0.999
        assert abs(a.sentiment - b.sentiment) < 0.02


def test_huge_and_empty_texts_are_truncated_or_encoded(real_encoder: BertEncoder) -> None:
    huge = "word " * 20_000
    ids = real_encoder.tokenize([huge, "", "   "])
    assert len(ids[0]) == real_encoder.max_length == 256
    assert len(ids[1]) == len(ids[2]) == 2  # [CLS] [SEP]
    results = real_encoder.encode([huge, "", "   "])
    assert all(len(r.embedding) == 384 and all(math.isfinite(x) for x in r.embedding) for r in results)


async def test_pipeline_with_real_model_matches_direct_encoding(real_encoder: BertEncoder) -> None:
    pipeline = EncoderPipeline(real_encoder, max_batch_tokens=256, max_batch_size=3).start()
    try:
        through_pipeline = await pipeline.encode(REVIEWS * 3)
    finally:
        pipeline.stop()
    assert pipeline.stats.forward_passes >= 4  # the budget split the 12 texts
    direct = real_encoder.encode(REVIEWS * 3)
    for a, b in zip(through_pipeline, direct, strict=True):
        assert cosine(a.embedding, b.embedding) > 0.999


async def test_two_passes_at_once_give_what_one_at_a_time_gives(real_encoder: BertEncoder,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    texts = REVIEWS * 6
    sequential = EncoderPipeline(real_encoder, max_batch_tokens=256, max_batch_size=2).start()
    try:
        one_at_a_time = await sequential.encode(texts)
    finally:
        sequential.stop()
    monkeypatch.setattr(real_encoder, "concurrent_passes", 2)
    concurrent = EncoderPipeline(real_encoder, max_batch_tokens=256, max_batch_size=2).start()
    try:
        two_at_once = await concurrent.encode(texts)
    finally:
        concurrent.stop()
    assert concurrent.forward_threads == 2 and concurrent.stats.forward_passes >= 12
    # The same batches through the same kernels: equal, not merely close, whichever thread ran them.
    assert two_at_once == one_at_a_time


@pytest.mark.parametrize(("cores", "streams", "threads", "layout"), [
    (1, None, None, (1, 1)),
    (2, None, None, (2, 1)),  # the measured case: two single-threaded passes
    (16, None, None, (2, 8)),
    (2, None, 2, (1, 2)),  # an operator who asks for 2 threads per pass on 2 cores gets one pass at a time
    (2, 1, None, (1, 2)),
    (8, 4, None, (4, 2)),
    (4, 3, 3, (3, 3)),  # both set: taken as given, even oversubscribed
])
def test_cpu_layout_fills_in_what_is_not_set(cores: int, streams: int | None, threads: int | None,
                                             layout: tuple[int, int]) -> None:
    assert cpu_layout(cores, streams, threads) == layout


def test_the_layout_counts_the_cores_this_process_may_use_not_the_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # taskset -c 3 on a host of any size
    assert usable_cores() == 1
    encoder = BertEncoder.from_settings(Settings(encoder_device="cpu", encoder_precision="fp32",
                                                 encoder_max_length=64))
    assert encoder.concurrent_passes == 1 and torch.get_num_threads() == 1


def test_loads_from_any_local_folder_named_in_settings(tmp_path: Path) -> None:
    copy = tmp_path / "my-minilm"
    shutil.copytree(default_model_dir(), copy)
    settings = Settings(encoder_model=str(copy), encoder_device="cpu", encoder_precision="fp32", encoder_max_length=64,
                        encoder_threads=1)
    encoder = BertEncoder.from_settings(settings)
    assert encoder.model_dir == copy and encoder.precision == "fp32" and encoder.max_length == 64
    assert encoder.concurrent_passes == min(2, usable_cores())  # PROFILE_ENCODER_STREAMS unset: the default
    assert len(encoder.encode(["hello"])[0].embedding) == 384


def test_a_folder_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Hugging Face model"):
        BertEncoder(tmp_path, warm_up=False)


def test_a_missing_model_file_fails_instead_of_downloading(tmp_path: Path) -> None:
    copy = tmp_path / "partial"
    shutil.copytree(default_model_dir(), copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(OSError):
        BertEncoder(copy, warm_up=False)


def test_bf16_on_cpu_stays_close_to_fp32(real_encoder: BertEncoder) -> None:
    if real_encoder.device.type != "cpu" or real_encoder.precision != "bf16":
        pytest.skip("this CPU has no native bf16: the encoder runs fp32 here, nothing to compare")
    fp32 = BertEncoder(device="cpu", precision="fp32", warm_up=False)
    for a, b in zip(real_encoder.encode(REVIEWS), fp32.encode(REVIEWS), strict=True):
        assert cosine(a.embedding, b.embedding) > 0.999


def test_shape_buckets_pad_a_cpu_batch_and_change_no_result() -> None:
    texts = (REVIEWS * 4)[:11]
    exact = BertEncoder(device="cpu", precision="fp32", warm_up=False, threads=2)
    padded = BertEncoder(device="cpu", precision="fp32", warm_up=False, threads=2, shape_buckets=True)
    token_ids = exact.tokenize(texts)
    longest = max(len(ids) for ids in token_ids)
    inputs = padded.collate(token_ids)
    assert inputs.rows == 11 and tuple(inputs.input_ids.shape) == (12, -(-longest // 8) * 8)
    assert tuple(exact.collate(token_ids).input_ids.shape) == (11, longest)
    # The filler row is a copy of a real text, never a fully masked one.
    assert inputs.attention_mask[11].tolist() == inputs.attention_mask[0].tolist()
    got, want = padded.forward(inputs), exact.forward(exact.collate(token_ids))
    assert len(got) == 11
    for a, b in zip(got, want, strict=True):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-5
        assert abs(a.sentiment - b.sentiment) < 1e-5


def test_precision_rules() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(RuntimeError, match="fp16 is for CUDA"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_by_name_on_a_cpu_without_it_runs_but_says_why_it_is_slow(
    native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("stream_app.encoding.bert_encoder.cpu_supports_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="stream_app.encoding.bert_encoder"):
        encoder = BertEncoder(device="cpu", precision="bf16", warm_up=False)
    assert encoder.precision == "bf16"
    emulated = [r.getMessage() for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(emulated) == (0 if native else 1)


def test_sentiment_head_rejects_a_mismatched_dimension(tmp_path: Path) -> None:
    small = SentimentHead(torch.zeros(3, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="expects 8-d embeddings"):
        BertEncoder(sentiment_head=small, warm_up=False)
    path = tmp_path / "head.json"
    small.save(path)
    assert SentimentHead.load(path).dimension == 8


@pytest.mark.parametrize(("env", "message"), [
    ({"PROFILE_ENCODER_MODEL": "/nonexistent/model"}, "PROFILE_ENCODER_MODEL: no Hugging Face model"),
    ({"PROFILE_SENTIMENT_HEAD": "/nonexistent/head.json"}, "PROFILE_SENTIMENT_HEAD: no such file"),
    ({"PROFILE_SENTIMENT_BRANCH": "/nonexistent/branch.safetensors"}, "PROFILE_SENTIMENT_BRANCH: sentiment branch"),
    ({"PROFILE_ENCODER_DEVICE": "cpu", "PROFILE_ENCODER_PRECISION": "fp16"}, "fp16 is for CUDA"),
])
def test_a_worker_with_a_bad_encoder_setting_exits_at_once_with_the_reason(env: dict[str, str], message: str) -> None:
    # No broker at this URL: the check must come before anything talks to Kafka.
    result = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "worker"], capture_output=True, timeout=120,
        env={**os.environ, "PROFILE_BROKER_URL": "kafka://127.0.0.1:9", **env},
    )
    assert result.returncode != 0
    assert message in result.stderr.decode()


def test_cuda_without_a_gpu_is_a_configuration_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EncoderConfigurationError, match="torch sees no CUDA device"):
        check_configuration(Settings(encoder_device="cuda"))
