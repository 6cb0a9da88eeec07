"""The CUDA path: model resident on the GPU in fp16, pinned inputs, same answers as fp32 on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from stream_app.encoding.bert_encoder import BertEncoder
from tests.unit.test_bert_encoder import REVIEWS, cosine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_cuda_encoder_is_fp16_on_the_gpu_and_agrees_with_cpu_fp32() -> None:
    gpu = BertEncoder(device="auto")
    assert gpu.device.type == "cuda" and gpu.precision == "fp16"
    assert next(gpu.model.parameters()).dtype == torch.float16
    assert next(gpu.model.parameters()).is_cuda
    inputs = gpu.collate(gpu.tokenize(REVIEWS))
    assert inputs.input_ids.is_pinned()
    cpu = BertEncoder(device="cpu", precision="fp32", warm_up=False)
    for a, b in zip(gpu.forward(inputs), cpu.encode(REVIEWS), strict=True):
        assert math.isclose(sum(x * x for x in a.embedding), 1.0, rel_tol=1e-3)
        assert cosine(a.embedding, b.embedding) > 0.999
        assert abs(a.sentiment - b.sentiment) < 0.02
