"""fp8 linear layers for the denoiser (opt-in): torchao's float8 quantization, applied in place.

``use_precision(pipe, "fp8")`` converts the UNet's and the ControlNet's ``nn.Linear`` layers
(attention projections, feed-forwards, the CSMs' projections; the ones whose sides are multiples
of 16, as float8 kernels need, and without an all-zero output row) to torchao float8 tensors:

* on a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell): dynamic float8
  activations and float8 weights, per-row scales, so the matmuls run on the fp8 tensor cores;
* on a CPU: float8 weights only (half the memory of the layers; the matmul runs in the
  pipeline's dtype), which is how the tests run the conversion;
* on an older GPU: refused with the reason (no fp8 tensor cores).

Convolutions, norms, the VAE, the text encoder and the extractors keep their dtype. fp8 changes
the output: the GPU suite's ``fast_presets`` section reports its drift from the full-precision
output; ``megasr eval`` on real weights says whether it matters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..parameters import FP8, FULL, precision_problem

if TYPE_CHECKING:
    from .pipeline_megasr import MegaSRPipeline

#: float8 GEMMs need both sides of a layer to be multiples of this
FP8_MULTIPLE = 16
#: the first CUDA compute capability with float8 tensor cores
FP8_CAPABILITY = (8, 9)


def fp8_problem(device: torch.device) -> str | None:
    """Why fp8 cannot run on ``device`` here, or None."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "precision fp8 needs torchao: pip install 'megasr[fp8]'"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            return (
                f"precision fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); {name} is "
                f"{capability[0]}.{capability[1]}"
            )
        return None
    if device.type == "cpu":
        return None
    return f"precision fp8 runs on CUDA GPUs and the CPU, not on {device.type}"


def _fp8_ready(module: nn.Module, _fqn: str) -> bool:
    """A linear layer float8 kernels take, whose every output row has a non-zero weight: a zero row
    (zero-initialised projections, e.g. an untrained CSM's output) would get a zero scale."""
    return (
        isinstance(module, nn.Linear)
        and module.in_features % FP8_MULTIPLE == 0
        and module.out_features % FP8_MULTIPLE == 0
        and bool(module.weight.detach().abs().amax(dim=1).min() > 0)
    )


def use_precision(pipeline: MegaSRPipeline, precision: str) -> int:
    """Convert the denoiser's linear layers to ``precision`` in place; returns how many were converted.

    ``full`` leaves them as loaded. Raises ``ValueError`` when the precision cannot run here.
    """
    message = precision_problem(precision)
    if message is not None:
        raise ValueError(f"precision {message}")
    if precision == FULL:
        return 0
    device = pipeline.denoiser.device
    problem = fp8_problem(device)
    if problem is not None:
        raise ValueError(problem)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    config = (
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        if device.type == "cuda"
        else Float8WeightOnlyConfig()
    )
    nets = (pipeline.denoiser.unet, pipeline.denoiser.controlnet)
    count = sum(1 for net in nets for name, module in net.named_modules() if _fp8_ready(module, name))
    for net in nets:
        quantize_(net, config, filter_fn=_fp8_ready)
    pipeline.precision = FP8
    if pipeline.denoiser_graphs is not None:
        pipeline.denoiser_graphs.reset()  # captured with the old weights
    return count
