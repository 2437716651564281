"""Speed paths for a loaded pipeline: ``torch.compile`` scopes, channels_last, a persistent cache.

Two compile scopes, chosen by measurement (``megasr bench gpu`` times both):

- ``blocks`` (regional): every ``ResnetBlock2D`` and ``BasicTransformerBlock`` (with its CSM) of
  the UNet and the ControlNet is compiled on its own. Blocks of one class share their compiled
  code, so compiling is quick and new shapes cost little; the Python glue between blocks and the
  MSFM hooks stay eager.
- ``full``: the UNet and the ControlNet are compiled whole, one graph each. The first forward
  of a run fills the MSFM modulation cache (resizing the maps, in code kept out of tracing) and
  runs eagerly (``MegaSRDenoiser``); every later step reads the cached (γ, β), and the CSMs'
  pinned keys/values, as graph inputs, with no graph break at the hooks.

The VAE decoder is compiled whole in both scopes (it has no hooks). Compilation is lazy: the
first call of each new (batch, size) shape pays for it, which is why the worker warms up its
shapes before it reports ready. :func:`use_compile_cache` points Inductor's and Triton's caches
at a directory that outlives the process (a mounted volume), so a restarted worker reloads
kernels instead of recompiling them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

if TYPE_CHECKING:
    from .pipeline_megasr import MegaSRPipeline

CompileScope = Literal["blocks", "full"]
COMPILE_SCOPES: tuple[str, ...] = ("blocks", "full")
#: block classes compiled one by one in the ``blocks`` scope
REGIONAL_BLOCKS: tuple[type[nn.Module], ...] = (ResnetBlock2D, BasicTransformerBlock)
#: dynamo keeps this many compiled variants per code object (the default 8 is too few when one
#: block class runs at four resolutions and several batch sizes)
CACHE_SIZE_LIMIT = 64


def use_compile_cache(directory: str | Path) -> Path:
    """Keep Inductor's FX-graph/autotune cache and Triton's kernels under ``directory``.

    Must run before the first compilation in the process. Returns the directory.
    """
    root = Path(directory).expanduser().resolve()
    (root / "inductor").mkdir(parents=True, exist_ok=True)
    (root / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return root


def _compiled_modules(pipeline: MegaSRPipeline, scope: str) -> list[nn.Module]:
    nets = (pipeline.denoiser.unet, pipeline.denoiser.controlnet)
    if scope == "full":
        chosen: list[nn.Module] = list(nets)
    else:
        chosen = [m for net in nets for m in net.modules() if isinstance(m, REGIONAL_BLOCKS)]
    return [*chosen, pipeline.vae.decoder]


def compile_pipeline(
    pipeline: MegaSRPipeline,
    scope: CompileScope = "blocks",
    mode: str | None = None,
    backend: str = "inductor",
    dynamic: bool | None = False,
) -> int:
    """Compile the pipeline's hot modules in place; returns how many modules were wrapped.

    ``mode`` is ``torch.compile``'s (``None`` = default; ``max-autotune-no-cudagraphs`` tunes
    matmuls longer). ``dynamic=False``: every shape gets kernels specialized to it (batches are
    padded to ``batching.BATCH_BUCKETS`` meanwhile, so the shapes are few and the worker's warm-up
    compiles them); ``None`` is dynamo's default, which recompiles the second batch size with
    symbolic shapes. Whole-pipeline CUDA graphs (``reduce-overhead``) are not offered: the
    sampler's Python loop, tiling and cancel checks sit between the compiled calls.
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE_LIMIT)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4 * CACHE_SIZE_LIMIT
        )
    uncompile_pipeline(pipeline)
    modules = _compiled_modules(pipeline, scope)
    for module in modules:
        module.compile(mode=mode, backend=backend, dynamic=dynamic)
    pipeline.compiled_scope = scope
    _static_batches(pipeline)
    return len(modules)


def uncompile_pipeline(pipeline: MegaSRPipeline) -> None:
    """Back to eager everywhere (compiled code stays in dynamo's cache until ``torch._dynamo.reset()``)."""
    for net in (pipeline.denoiser, pipeline.vae):
        for module in net.modules():
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
    pipeline.compiled_scope = None
    _static_batches(pipeline)


def use_cuda_graphs(pipeline: MegaSRPipeline, enabled: bool = True, max_graphs: int = 16) -> None:
    """Replay the denoiser step from CUDA graphs, one per static shape (see ``denoiser_graphs``).

    On a CPU the same static-buffer path runs eagerly (no capture), which only tests it.
    Combines with either compile scope: compiled code is captured after its warm-up runs. While
    on, batches are padded to ``batching.BATCH_BUCKETS`` (so are they under compile).
    """
    from .denoiser_graphs import DenoiserGraphs

    if pipeline.denoiser_graphs is not None:
        pipeline.denoiser_graphs.reset()
    pipeline.denoiser_graphs = DenoiserGraphs(pipeline.denoiser, max_graphs=max_graphs) if enabled else None
    _static_batches(pipeline)


def _static_batches(pipeline: MegaSRPipeline) -> None:
    """Pad batches to ``BATCH_BUCKETS`` while CUDA graphs or compiled code serve the pipeline: each
    new batch size would cost a capture or a compilation, a padding row costs one image's compute."""
    from .batching import BATCH_BUCKETS

    static = pipeline.denoiser_graphs is not None or getattr(pipeline, "compiled_scope", None) is not None
    pipeline.batch_buckets = BATCH_BUCKETS if static else None


def use_fused_qkv(pipeline: MegaSRPipeline, enabled: bool = True) -> int:
    """One GEMM for the query, key and value of every self-attention (``attn1``) of the UNet and the
    ControlNet, through diffusers' ``Attention.fuse_projections`` and its fused SDPA processor
    (``enabled=False``: back to the separate projections). Returns how many were changed.

    The cross-attentions keep their processors: the CSM's wraps them (and in the UNet already
    shares one query projection between its text and visual branches). Layers already converted
    to fp8 stay separate (their weights are not plain tensors). On the CPU the output is the same
    bit for bit (tested); on a GPU the fused GEMM may round differently.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    changed = 0
    for net in (pipeline.denoiser.unet, pipeline.denoiser.controlnet):
        for module in net.modules():
            if not isinstance(module, BasicTransformerBlock):
                continue
            attn = module.attn1
            fused = getattr(attn, "fused_projections", False)
            if enabled and not fused:
                if any(type(layer.weight) is not nn.Parameter for layer in (attn.to_q, attn.to_k, attn.to_v)):
                    continue
                attn.fuse_projections(fuse=True)
                attn.set_processor(FusedAttnProcessor2_0())
                changed += 1
            elif not enabled and fused:
                del attn.to_qkv
                attn.fused_projections = False
                attn.set_processor(AttnProcessor2_0())
                changed += 1
    if changed and pipeline.denoiser_graphs is not None:
        pipeline.denoiser_graphs.reset()  # captured with the other projections
    return changed


def use_channels_last(pipeline: MegaSRPipeline) -> None:
    """NHWC weights for the convolutional nets (faster cuDNN convolutions on tensor cores)."""
    for net in (pipeline.denoiser.unet, pipeline.denoiser.controlnet, pipeline.vae):
        net.to(memory_format=torch.channels_last)
