"""Extractors in fp16 on CUDA (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu


@torch.no_grad()
def test_fp16_on_cuda_matches_fp32(tiny_extractors, photos):
    images = photos["batch"]
    reference = tiny_extractors(images)
    gpu = copy.deepcopy(tiny_extractors).to("cuda", torch.float16)
    out = gpu(images.cuda())
    for name in ("hed", "depth", "image_tokens"):
        value = getattr(out, name)
        assert value.dtype == torch.float16 and value.is_cuda
        assert torch.allclose(value.float().cpu(), getattr(reference, name), atol=5e-2, rtol=5e-2), name
    assert out.seg.shape == reference.seg.shape
