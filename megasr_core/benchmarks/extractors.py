"""Time each guidance extractor on random weights of a preset.

    python -m megasr_core.benchmarks.extractors --preset tiny --size 128 --batch 2 --device cpu

Prints one JSON object: per-extractor median milliseconds and parameter counts. ``--preset
real`` builds the real upstream shapes (Depth-Anything-V2-L, Mask2Former Swin-L, CLIP ViT-H/14).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megasr_core.extractors import GuidanceExtractors, real_preset, tiny_preset
from megasr_core.weights.tiny import write_tiny_tokenizer


def run(preset: str, size: int, batch: int, device: str, dtype: str, iters: int) -> dict:
    dev = torch.device(device)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tiny_tokenizer(Path(tmp)) if preset == "tiny" else None
        with torch.device(dev):
            extractors = GuidanceExtractors.from_preset(tiny_preset() if preset == "tiny" else real_preset(), tokenizer)
    extractors = extractors.to(dev, torch_dtype).eval()
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    timings = {}
    with torch.inference_mode():
        for name in extractors.available:

            def call() -> None:
                extractors(images, enabled=[name])
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)

            call()  # warm-up (and the tagger's one-off text embeddings)
            samples = []
            for _ in range(iters):
                start = time.perf_counter()
                call()
                samples.append(time.perf_counter() - start)
            timings[name] = round(1000 * statistics.median(samples), 2)
    return {
        "benchmark": "extractors",
        "preset": preset,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": dtype,
        "batch": batch,
        "image_size": size,
        "median_ms": timings,
        "parameters": extractors.parameter_counts(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--size", type=int, default=128, help="LR image side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    print(json.dumps(run(args.preset, args.size, args.batch, args.device, dtype, args.iters), indent=2))


if __name__ == "__main__":
    main()
