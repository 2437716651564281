"""``megasr upscale``: super-resolve image files and folders on this machine, one pipeline call each.

Output naming follows Real-ESRGAN's rule: never onto an input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from megasr_core.parameters import default_steps

from .common import fail, quiet_loading, resolve_weights
from .option_checks import check_device, check_dtype, check_precision, check_sampling, parse_cfg_interval

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def collect_inputs(inputs: list[Path], recursive: bool = False) -> list[tuple[Path, Path]]:
    """(image, folder relative to its input root) pairs; only folders walked with --recursive have sub-folders.

    Without --recursive a folder's sub-folders are left out, and said so."""
    files: list[tuple[Path, Path]] = []
    for path in inputs:
        if path.is_dir():
            walk = sorted(path.rglob("*") if recursive else path.iterdir())
            found = [p for p in walk if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            subfolders = [] if recursive else [p.name for p in walk if p.is_dir()]
            if subfolders:
                typer.echo(
                    f"skipped {len(subfolders)} sub-folder(s) of {path} (pass -r to include them): "
                    + ", ".join(subfolders),
                    err=True,
                )
            if not found:
                fail(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += [(p, p.parent.relative_to(path)) for p in found]
        elif path.is_file():
            files.append((path, Path()))
        else:
            fail(f"no such file or folder: {path}")
    return files


def drop_previous_outputs(
    files: list[tuple[Path, Path]], output: Path, fmt: str | None, suffix: str | None, scale: float
) -> list[tuple[Path, Path]]:
    """The inputs without those that are another input's output: a previous run into the same
    folder (``cat.png`` and its ``cat_x4.png``) is never upscaled again as a new input."""
    # by name without extension: a previous run in another --format is a previous run too
    made_by = {
        target.resolve().with_suffix(""): file.resolve()
        for (file, _), (target, _) in zip(files, _targets(files, output, fmt, suffix, scale))
    }
    kept, dropped = [], []
    for file, rel in files:
        source = made_by.get(file.resolve().with_suffix("")) if file.suffix.lower().lstrip(".") in FORMATS else None
        (dropped if source is not None and source != file.resolve() else kept).append((file, rel))
    if dropped:
        typer.echo(
            f"left out {len(dropped)} file(s) that are outputs of the other inputs (a previous run): "
            + ", ".join(str(file) for file, _ in dropped),
            err=True,
        )
    return kept


def output_paths(
    files: list[tuple[Path, Path]], output: Path, fmt: str | None, suffix: str | None, scale: float
) -> list[tuple[Path, str]]:
    """Where each input goes. Never onto an input: writing into an input's own folder adds ``_x{scale}``
    to the names unless --suffix says otherwise (Real-ESRGAN's rule), and a target that still is an
    input is refused."""
    paths = _targets(files, output, fmt, suffix, scale)
    sources = {file.resolve() for file, _ in files}
    for target, _ in paths:
        if target.resolve() in sources:
            fail(f"refusing to overwrite the input {target}: choose another --output or a --suffix")
    return paths


def _targets(
    files: list[tuple[Path, Path]], output: Path, fmt: str | None, suffix: str | None, scale: float
) -> list[tuple[Path, str]]:
    """(output path, PIL format) of each input, by the naming rule of :func:`output_paths`."""
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
    return paths


def announce_model(pipeline, weights_dir: Path) -> None:
    """Name the model that will run, and warn when its weights are untrained (the demo weights
    already had their warning from resolve_weights)."""
    from megasr_core.weights.layout import default_demo_weights

    identity = pipeline.identity
    typer.echo(
        f"model: {identity.title} (weights {identity.weights}, {identity.dtype}"
        f"{', fp8 linear layers' if identity.precision == 'fp8' else ''}{'' if identity.trained else ', untrained'})",
        err=True,
    )
    warning = identity.warning()
    if warning and Path(weights_dir).resolve() != default_demo_weights().resolve():
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)


def upscale(
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (or file, for one input).")],
    weights: Annotated[
        str | None,
        typer.Option(
            help="MegaSR weights: a folder, hf://org/name or hf://org/name@revision (default: $MEGASR_WEIGHTS)."
        ),
    ] = None,
    scale: Annotated[float, typer.Option(help="Upscaling factor, 1 to 8.")] = 4.0,
    steps: Annotated[
        int | None,
        typer.Option(help="Denoising steps (default: the model's: 50 for MegaSR and SeeSR, 2 for SeeSR-Turbo)."),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Classifier-free guidance scale (default: the model's: 5.5, SeeSR-Turbo 1 = off)."),
    ] = None,
    prompt: Annotated[str, typer.Option(help="Extra prompt text added to the tags.")] = "",
    seed: Annotated[int | None, typer.Option(help="Random seed (same seed, same output).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU).")] = None,
    color_fix: Annotated[str, typer.Option(help="adain, wavelet or none.")] = "adain",
    tile_size: Annotated[int | None, typer.Option(help="Latent tile size; 0 disables tiling (default: auto).")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="png, jpeg or webp (default: from -o, else png).")] = None,
    suffix: Annotated[
        str | None,
        typer.Option(help="Added to output names (default: _x{scale} when writing into an input's folder, else none)."),
    ] = None,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Leave outputs that already exist alone.")
    ] = False,
    recursive: Annotated[
        bool,
        typer.Option(
            "--recursive", "-r", help="Walk folders recursively; sub-folders are mirrored under the output folder."
        ),
    ] = False,
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG/WebP quality.")] = 95,
    sampler: Annotated[
        str,
        typer.Option(
            help="ddpm (the paper's), or a faster solver that changes the output: dpmpp-2m (25 steps) or unipc (20)."
        ),
    ] = "ddpm",
    cfg_interval: Annotated[
        str | None,
        typer.Option(
            help="Run guidance only on this part of the schedule, start,end as fractions (0,0.6: the first 60 %)."
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(help="full, or fp8: the denoiser's linear layers in float8 (GPUs of compute capability 8.9+)."),
    ] = "full",
) -> None:
    """Super-resolve images with MegaSR."""
    if fmt is not None and fmt.lower() not in FORMATS:
        fail(f"--format must be png, jpeg or webp, got {fmt!r}")
    if suffix is not None and any(sep in suffix for sep in ("/", "\\")):
        fail(f"--suffix is part of a file name, got {suffix!r}")
    check_sampling(
        scale=scale,
        steps=steps,
        guidance_scale=guidance_scale,
        color_fix=color_fix,
        tile_size=tile_size,
        sampler=sampler,
    )
    interval = parse_cfg_interval(cfg_interval)
    device = check_device(device)
    torch_dtype = check_dtype(dtype, device)
    check_precision(precision, device)
    files = drop_previous_outputs(collect_inputs(inputs, recursive=recursive), output, fmt, suffix, scale)
    targets = output_paths(files, output, fmt, suffix, scale)
    if skip_existing:
        kept = [(f, t) for f, t in zip(files, targets) if not t[0].exists()]
        for (file, _), (target, _) in zip(files, targets):
            if target.exists():
                typer.echo(f"skipped {file}: {target} exists", err=True)
        if not kept:
            return
        files, targets = [f for f, _ in kept], [t for _, t in kept]
    from megasr_core.weights.choice import DEMO_STEPS
    from megasr_core.weights.layout import is_tiny_random

    quiet_loading()
    weights_dir = resolve_weights(weights)
    if steps is None and is_tiny_random(weights_dir):
        steps = DEMO_STEPS
        typer.echo(f"untrained tiny weights: {DEMO_STEPS} steps (--steps to choose)", err=True)

    from tqdm.auto import tqdm

    from megasr_core.pipelines import InvalidImageError, MegaSRPipeline

    try:
        pipeline = MegaSRPipeline.from_pretrained(
            weights_dir, torch_dtype=torch_dtype, device=device, precision=precision
        )
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    announce_model(pipeline, weights_dir)
    total_steps = steps if steps is not None else default_steps(sampler, pipeline.identity.default_steps)
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
                    file,
                    scale=scale,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    prompt=prompt,
                    seed=seed,
                    color_fix=color_fix,
                    tile_size=tile_size,
                    callback=progress,
                    sampler=sampler,
                    cfg_interval=interval,
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
