"""Compile scopes on CPU with dynamo's eager backend: tracing, the MSFM hook exclusion, undo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megasr_core.pipelines.acceleration import compile_pipeline, uncompile_pipeline, use_compile_cache


@pytest.mark.parametrize("scope, expected", [("blocks", None), ("full", 3)])
def test_compiled_pipeline_matches_eager(pipeline, small_cat, scope, expected):
    """Both scopes trace the tiny pipeline (CSM tokens, MSFM hooks) and give the eager output."""
    eager = np.asarray(pipeline(small_cat, num_inference_steps=2, seed=3).images[0], dtype=np.float64)
    torch._dynamo.reset()
    wrapped = compile_pipeline(pipeline, scope=scope, backend="eager")
    try:
        if expected is not None:
            assert wrapped == expected  # UNet, ControlNet, VAE decoder
        else:
            assert wrapped > 10  # every ResnetBlock2D and BasicTransformerBlock, plus the VAE decoder
        assert pipeline.denoiser.unet._compiled_call_impl is not None or scope == "blocks"
        compiled = np.asarray(pipeline(small_cat, num_inference_steps=2, seed=3).images[0], dtype=np.float64)
    finally:
        uncompile_pipeline(pipeline)
        torch._dynamo.reset()
    assert np.abs(compiled - eager).mean() <= 0.5
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in pipeline.denoiser.modules())


def test_unknown_scope_is_refused(pipeline):
    with pytest.raises(ValueError, match="compile scope must be one of blocks, full"):
        compile_pipeline(pipeline, scope="everything")


def test_compile_cache_directories(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    root = use_compile_cache(tmp_path / "cache")
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(root / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(root / "triton")
    assert (root / "inductor").is_dir() and (root / "triton").is_dir()


def test_fused_self_attention_gives_the_same_images_and_can_be_undone(small_cat):
    from diffusers.models.attention import BasicTransformerBlock

    from megasr_core.pipelines import MegaSRPipeline
    from megasr_core.pipelines.acceleration import use_fused_qkv

    pipe = MegaSRPipeline.from_preset("tiny", seed=2)
    blocks = [m for net in (pipe.denoiser.unet, pipe.denoiser.controlnet) for m in net.modules()]
    blocks = [m for m in blocks if isinstance(m, BasicTransformerBlock)]
    before = pipe(small_cat, scale=4, seed=1, num_inference_steps=2).images[0]
    assert use_fused_qkv(pipe) == len(blocks) and use_fused_qkv(pipe) == 0  # once
    assert all(type(b.attn1.processor).__name__ == "FusedAttnProcessor2_0" for b in blocks)
    assert all(type(b.attn2.processor).__name__ == "CSMAttnProcessor" for b in blocks)  # the CSMs stay
    fused = pipe(small_cat, scale=4, seed=1, num_inference_steps=2).images[0]
    assert fused.tobytes() == before.tobytes()
    assert use_fused_qkv(pipe, enabled=False) == len(blocks)
    assert not any(hasattr(b.attn1, "to_qkv") for b in blocks)
    assert pipe(small_cat, scale=4, seed=1, num_inference_steps=2).images[0].tobytes() == before.tobytes()


def test_fp8_layers_are_not_fused():
    pytest.importorskip("torchao", reason="the [fp8] extra")
    from megasr_core.pipelines import MegaSRPipeline
    from megasr_core.pipelines.acceleration import use_fused_qkv

    pipe = MegaSRPipeline.from_preset("tiny", seed=2, precision="fp8")
    assert use_fused_qkv(pipe) == 0


def test_compiled_whole_nets_have_no_graph_break_and_take_pinned_csm_keys_as_inputs(small_cat):
    """The UNet and the ControlNet compiled whole, the step run from static buffers (CUDA graphs; on a
    CPU their eager bookkeeping): the run's first step, which fills the MSFM modulations, runs
    eagerly, and every later step is one graph per net, with no break at the 23 MSFM hooks; the CSMs'
    image keys/values enter it as inputs (no image-token projection in it). Same images as eager."""
    from megasr_core.pipelines import MegaSRPipeline
    from megasr_core.pipelines.acceleration import use_cuda_graphs
    from tests.models.helpers import perturb_zero_init

    pipe = MegaSRPipeline.from_preset("tiny", seed=2)
    perturb_zero_init(pipe.denoiser)
    eager = pipe(small_cat, scale=4, seed=1, num_inference_steps=3).images[0]
    codes: list[str] = []

    def recording(graph, inputs):
        codes.append(graph.code)
        return graph.forward

    torch._dynamo.reset()
    try:
        compile_pipeline(pipe, scope="full", backend=recording)
        use_cuda_graphs(pipe)
        graphed = pipe(small_cat, scale=4, seed=1, num_inference_steps=3).images[0]
    finally:
        uncompile_pipeline(pipe)
        torch._dynamo.reset()
    assert graphed.tobytes() == eager.tobytes()
    with_csm = [code for code in codes if "csm" in code]
    assert len(with_csm) == 2, len(codes)  # the ControlNet and the UNet, each one whole graph
    assert all("modulation_cache" in code for code in with_csm)  # the hooks' cached (γ, β) come in as inputs
    assert not any("connector" in code for code in with_csm)  # keys/values come in, pinned
