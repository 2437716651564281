"""What a worker adds to the pipeline per batch, in the GPU suite: decoding the inputs and encoding the results.

The worker (``worker.tasks``) fetches and decodes a batch's inputs side by side before the pipeline
call, and encodes and uploads its results side by side after it, in up to ``THREADS`` threads;
the GPU waits meanwhile. Section ``worker_overhead`` times exactly that CPU work on the suite's
machine: the suite's LR photos as PNG bytes decoded with Pillow, and the pipeline's outputs of the
largest batch encoded with the worker's encoder (``megasr_core.output_formats``), in turn and in
the thread pool, and estimates the service's images/s per GPU as the batch over pipeline +
decode + encode time, against the pipeline's own. Redis and storage round trips are left out
(sub-millisecond on a local network, and storage puts overlap in the same pool).
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from PIL import Image

from megasr_core.output_formats import encode

if TYPE_CHECKING:
    from .gpu_suite import GPUSuite

#: the worker's threads per batch (``worker.tasks.STORE_THREADS``)
THREADS = 8


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def run_worker_overhead(suite: GPUSuite) -> dict[str, Any]:
    """Decode and encode times of the largest batch, in turn and in the pool, and the service estimate."""
    batch = suite.batches[-1]
    photos, kwargs = suite.batch_inputs(batch)
    inputs = [encode(photo, "png") for photo in photos]  # as uploads arrive: PNG bytes
    suite.pipeline(photos, num_inference_steps=2, **kwargs)  # warm-up
    pipeline_s, out = suite.clock.time(lambda: suite.pipeline(photos, num_inference_steps=suite.steps, **kwargs))
    outputs = out.images

    def decode(data: bytes) -> Image.Image:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")

    row: dict[str, Any] = {"batch": batch, "threads": THREADS, "pipeline_s": round(pipeline_s, 4)}
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for name, work, items in (("decode", decode, inputs), ("encode_png", lambda im: encode(im, "png"), outputs)):
            row[f"{name}_serial_s"] = round(_timed(lambda: [work(item) for item in items]), 4)
            row[f"{name}_pooled_s"] = round(_timed(lambda: list(pool.map(work, items))), 4)
    cpu_s = row["decode_pooled_s"] + row["encode_png_pooled_s"]
    row["pipeline_images_per_s"] = round(batch / pipeline_s, 3)
    row["service_images_per_s_estimate"] = round(batch / (pipeline_s + cpu_s), 3)
    row["service_share_of_pipeline"] = round(pipeline_s / (pipeline_s + cpu_s), 4)
    row["serial_share_of_pipeline"] = round(
        pipeline_s / (pipeline_s + row["decode_serial_s"] + row["encode_png_serial_s"]), 4
    )
    return row
