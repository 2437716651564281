"""Output, working and batch-bucket sizes of a job, and the bounds on them. Pure Python, no torch.

The pipeline runs every image on a canvas that can be much larger than its output: a short side
that would end below the model's native resolution (:data:`MIN_WORK_SIDE`, 512 px, for SD2-base)
is enlarged to it first (SeeSR), so a 1×4096 input becomes a 512×2,097,152 canvas. The API (which
never imports torch) and the pipeline share this one rule, so a job the API admits is a job the
pipeline can run, and a job that would exhaust a GPU is refused before it is queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: SD2-base runs on canvases whose short side is at least this many pixels (SeeSR's rule: its
#: native resolution, the UNet's sample size × the VAE factor); a pipeline takes its own model's
MIN_WORK_SIDE = 512
#: pixel multiple of the production SD2 model: VAE factor 8 × 2 ** (4 UNet down blocks − 1)
SD2_SIZE_MULTIPLE = 64
#: default ceiling on output and working-canvas pixels in the pipeline (8192²): generous, but a bound
DEFAULT_MAX_OUTPUT_PIXELS = 8192 * 8192

Size = tuple[int, int]


@dataclass(frozen=True)
class Canvas:
    """Sizes as (height, width): the output, the canvas the model runs at, and that canvas padded
    to the model's multiple (images with the same bucket can share a batch)."""

    target: Size
    work: Size
    bucket: Size


class WorkBoundsError(ValueError):
    """A job asks for more work than allowed. ``code`` is a stable error code; ``setting`` names
    the limit (a ``Settings`` field) so callers can point at the knob; ``limit`` is its value."""

    code = "work_too_large"
    setting = "max_output_pixels"

    def __init__(self, message: str, limit: float) -> None:
        super().__init__(message)
        self.limit = limit


class AspectRatioError(WorkBoundsError):
    """The input is too long and thin (its canvas would be huge after the short-side rule)."""

    code = "aspect_ratio"
    setting = "max_aspect_ratio"


def canvas(size: Size, scale: float, multiple: int, min_side: int = MIN_WORK_SIDE) -> Canvas:
    """The :class:`Canvas` of an input of ``size`` = (width, height), PIL's order, upscaled by
    ``scale`` on a canvas whose short side is at least ``min_side``."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"an image needs at least one pixel per side, got {width}×{height}")
    if multiple < 1:
        raise ValueError(f"the size multiple must be positive, got {multiple}")
    if min_side < 1:
        raise ValueError(f"the minimum working side must be positive, got {min_side}")
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    work_scale = max(scale, min_side / min(height, width))
    work = (max(target[0], round(height * work_scale)), max(target[1], round(width * work_scale)))
    bucket = (math.ceil(work[0] / multiple) * multiple, math.ceil(work[1] / multiple) * multiple)
    return Canvas(target=target, work=work, bucket=bucket)


def check_work_bounds(
    size: Size,
    scale: float,
    multiple: int,
    max_output_pixels: int,
    max_aspect_ratio: float | None = None,
    min_side: int = MIN_WORK_SIDE,
) -> Canvas:
    """The :class:`Canvas` of the job, or :class:`WorkBoundsError` when its output or working
    canvas would exceed ``max_output_pixels`` or the input's long/short side ``max_aspect_ratio``."""
    width, height = size
    if max_aspect_ratio is not None and width >= 1 and height >= 1:
        ratio = max(width, height) / min(width, height)
        if ratio > max_aspect_ratio:
            raise AspectRatioError(
                f"the image is {width}×{height}, a side ratio of {ratio:.4g}:1; the limit is {max_aspect_ratio:g}:1",
                max_aspect_ratio,
            )
    result = canvas(size, scale, multiple, min_side)
    (th, tw), (wh, ww) = result.target, result.work
    if th * tw > max_output_pixels:
        raise WorkBoundsError(
            f"a {width}×{height} image at scale {scale:g} makes a {tw}×{th} = {tw * th:,} pixel output; "
            f"the limit is {max_output_pixels:,} pixels",
            max_output_pixels,
        )
    if wh * ww > max_output_pixels:
        raise WorkBoundsError(
            f"a {width}×{height} image at scale {scale:g} runs on a {ww}×{wh} = {ww * wh:,} pixel canvas "
            f"(short side enlarged to {min_side}); the limit is {max_output_pixels:,} pixels",
            max_output_pixels,
        )
    return result
