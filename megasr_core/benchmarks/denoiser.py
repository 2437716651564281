"""Time one MegaSR denoiser forward (ControlNet + UNet with CSM and MSFM) on random weights.

    python -m megasr_core.benchmarks.denoiser --preset tiny --size 128 --batch 2 --device cpu

Prints one JSON object: build time, median/p90 forward time with all MegaSR inputs, the same
with a prepared conditioning (as a sampler runs it: MSFM modulation computed once), the same
without image tokens and guidance (the plain SD2 + ControlNet cost), and peak memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

from megasr_core.models import MegaSRDenoiser, get_preset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def run(preset: str, size: int, batch: int, device: str, dtype: str, iters: int, warmup: int) -> dict:
    dev = torch.device(device)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    spec = get_preset(preset)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = MegaSRDenoiser.from_preset(preset, device=dev, dtype=torch_dtype).eval()
    build_s = time.perf_counter() - start
    latent = size // 8
    cfg = spec.megasr
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g).to(dev, torch_dtype)

    inputs = {
        "latents": rand(batch, 4, latent, latent),
        "timestep": torch.full((batch,), 501, device=dev),
        "encoder_hidden_states": rand(batch, 77, spec.unet["cross_attention_dim"]),
        "image_embeds": rand(batch, cfg.num_image_tokens, cfg.image_embed_dim),
        "guidance": {
            "hed": rand(batch, 1, size, size),
            "depth": rand(batch, 1, size, size),
            "seg": rand(batch, 3, size, size),
        },
        "control_image": rand(batch, 3, size, size),
    }
    plain = {**inputs, "image_embeds": None, "guidance": None}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        full = _time(lambda: model(**inputs), dev, iters, warmup)
        base = _time(lambda: model(**plain), dev, iters, warmup)
        # What a sampler does: prepare once, then every step reuses the MSFM modulation.
        prepared = model.prepare_conditioning(inputs["image_embeds"], inputs["guidance"], batch)
        rest = {k: v for k, v in inputs.items() if k not in ("image_embeds", "guidance")}
        reuse = _time(lambda: model(**rest, conditioning=prepared), dev, iters, warmup)
    counts = model.parameter_counts()["total"]
    result = {
        "benchmark": "denoiser_forward",
        "preset": preset,
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": dtype,
        "batch": batch,
        "image_size": size,
        "latent_size": latent,
        "torch": torch.__version__,
        "build_s": round(build_s, 3),
        "forward_ms_median": round(1000 * statistics.median(full), 2),
        "forward_ms_p90": round(1000 * sorted(full)[int(0.9 * (len(full) - 1))], 2),
        "forward_prepared_ms_median": round(1000 * statistics.median(reuse), 2),
        "plain_controlnet_unet_ms_median": round(1000 * statistics.median(base), 2),
        "megasr_overhead_pct": round(100 * (statistics.median(full) / statistics.median(base) - 1), 1),
        "megasr_overhead_prepared_pct": round(100 * (statistics.median(reuse) / statistics.median(base) - 1), 1),
        "parameters": counts,
    }
    if dev.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    else:
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    print(json.dumps(run(args.preset, args.size, args.batch, args.device, dtype, args.iters, args.warmup), indent=2))


if __name__ == "__main__":
    main()
