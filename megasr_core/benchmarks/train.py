"""Training throughput on random weights: stage-2 steps per second and peak memory.

    python -m megasr_core.benchmarks.train --preset tiny --crop 128 --batch 2 --steps 5

Builds a weights directory of the preset (tiny: random, nothing downloaded) and HR crops from
scikit-image photos, then times optimizer steps after one warm-up. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def run(preset: str, crop: int, batch: int, steps: int, mixed_precision: str, checkpointing: bool) -> dict:
    from PIL import Image
    from skimage import data

    from megasr_core.train import MegaSRTrainConfig, MegaSRTrainer
    from megasr_core.weights.tiny import init_tiny

    if preset != "tiny":
        raise SystemExit("only --preset tiny builds offline; for sd2-base pass a weights directory via the trainer")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init_tiny(tmp / "weights")
        (tmp / "hr").mkdir()
        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            Image.fromarray(getattr(data, name)()).save(tmp / "hr" / f"{name}.png")
        trainer = MegaSRTrainer(
            MegaSRTrainConfig(
                weights=str(tmp / "weights"),
                train_data=[str(tmp / "hr")],
                output_dir=str(tmp / "run"),
                crop_size=crop,
                batch_size=batch,
                max_steps=steps + 1,
                num_workers=0,
                checkpoint_every=10**9,
                log_every=10**9,
                mixed_precision=mixed_precision,
                gradient_checkpointing=checkpointing,
            )
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train(max_steps=1)  # warm-up (tag embeddings, allocator)
        start = time.perf_counter()
        trainer.train(max_steps=steps + 1)
        elapsed = time.perf_counter() - start
    result = {
        "benchmark": "train_megasr",
        "preset": preset,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
        "crop": crop,
        "batch": batch,
        "steps": steps,
        "mixed_precision": mixed_precision,
        "gradient_checkpointing": checkpointing,
        "steps_per_s": round(steps / elapsed, 4),
        "seconds_per_step": round(elapsed / steps, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    if torch.cuda.is_available():
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    print(
        json.dumps(
            run(args.preset, args.crop, args.batch, args.steps, args.mixed_precision, args.gradient_checkpointing),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
