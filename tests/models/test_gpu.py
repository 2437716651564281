"""GPU checks (skipped without CUDA): fp16 forward matches fp32, and meta → CUDA loading."""

from __future__ import annotations

import pytest
import torch

from tests.models.helpers import build_denoiser, make_inputs, perturb_zero_init

pytestmark = pytest.mark.gpu


@torch.no_grad()
def test_fp16_on_cuda_matches_fp32(tiny_base):
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    inputs = make_inputs(seed=0)
    reference = model(**inputs)
    model = model.to("cuda", torch.float16)

    def to_cuda(value):
        if isinstance(value, dict):
            return {k: to_cuda(v) for k, v in value.items()}
        return value.to("cuda", torch.float16 if value.is_floating_point() else value.dtype)

    out = model(**{k: to_cuda(v) for k, v in inputs.items()})
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float().cpu(), reference, atol=5e-2, rtol=5e-2)


def test_sd2_base_builds_directly_on_cuda_in_fp16():
    from megasr_core.models import MegaSRDenoiser

    model = MegaSRDenoiser.from_preset("sd2-base", device="cuda", dtype=torch.float16)
    assert next(model.parameters()).is_cuda
    del model
    torch.cuda.empty_cache()
