"""``megasr weights``: create, inspect, assemble and export weights directories (megasr_core.weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import fail

app = typer.Typer(help="Create, inspect and assemble MegaSR weights directories.", no_args_is_help=True)


@app.command("init-tiny")
def weights_init_tiny(
    directory: Annotated[Path, typer.Argument(help="Folder to write (must be empty unless --force).")],
    seed: Annotated[int, typer.Option(help="Seed of the random initialization.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty folder.")] = False,
    ram_tagger: Annotated[
        bool, typer.Option("--ram-tagger", help="A tiny random RAM tagger instead of the CLIP fallback.")
    ] = False,
    family: Annotated[str, typer.Option(help="Model family: megasr, seesr or seesr-turbo.")] = "megasr",
) -> None:
    """Write a complete random-initialized `tiny` weights directory (for tests and demos; untrained)."""
    from megasr_core.families import FAMILIES, get_family
    from megasr_core.weights.tiny import init_tiny

    if family not in FAMILIES:
        fail(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    try:
        path = init_tiny(directory, seed=seed, overwrite=force, family=family)
    except FileExistsError as exc:
        fail(str(exc))
    if ram_tagger and family == "megasr":
        from megasr_core.extractors.guidance import tiny_random_ram

        tiny_random_ram(seed).save_pretrained(path / "extractors" / "tagger")
    typer.echo(f"wrote untrained tiny {get_family(family).title} weights to {path}")


@app.command("info")
def weights_info(
    directory: Annotated[
        str | None, typer.Argument(help="A MegaSR weights directory, hf://org/name or hf://org/name@revision.")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Describe a preset's shapes instead (built on the meta device).")
    ] = None,
    family: Annotated[
        str, typer.Option(help="With --preset: the family whose shapes to describe (megasr, seesr, seesr-turbo).")
    ] = "megasr",
) -> None:
    """Print a JSON description: family, whether trained (and what is random), config, parameter counts,
    missing parts."""
    from megasr_core.families import MEGASR, get_family
    from megasr_core.models import MegaSRDenoiser, SeeSRDenoiser, WeightsError
    from megasr_core.weights.summary import describe

    if (directory is None) == (preset is None):
        fail("give either a DIRECTORY or --preset NAME")
    try:
        if preset is not None:
            get_family(family)
            if family == MEGASR:
                model = MegaSRDenoiser.from_preset(preset, device="meta")
                extractor_counts = _extractor_counts(preset)
            else:
                model = SeeSRDenoiser.from_preset(preset, family=family, device="meta")
                extractor_counts = {"tagger": _ram_count(preset)}
            info = {
                "preset": preset,
                "family": family,
                "config": model.config.to_dict(),
                "parameters": model.parameter_counts(),
                "extractor_parameters": extractor_counts,
            }
        else:
            from megasr_core.weights.hub import resolve_weights_source

            info = describe(resolve_weights_source(directory))
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        fail(str(exc))
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


@app.command("assemble")
def weights_assemble(
    sd2: Annotated[
        Path, typer.Option(help="Local diffusers copy of stable-diffusion-2-base (seesr-turbo: of sd-turbo).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    family: Annotated[
        str, typer.Option(help="megasr, seesr (SeeSR's release on SD2-base) or seesr-turbo (on sd-turbo).")
    ] = "megasr",
    seesr: Annotated[
        Path | None, typer.Option(help="SeeSR's release folder (its unet/ and controlnet/); seesr families.")
    ] = None,
    overlay: Annotated[
        Path | None, typer.Option(help="Trained MegaSR overlay checkpoint (.safetensors); megasr only.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for freshly initialized modules (no overlay).")] = 0,
    extractors: Annotated[
        Path | None, typer.Option(help="Extractor folder (hed/, depth/, segmentation/, clip/, tagger/); megasr only.")
    ] = None,
    ram: Annotated[
        Path | None,
        typer.Option(help="RAM's ram_swin_large_14m.pth: becomes extractors/tagger/ (required for seesr families)."),
    ] = None,
    dape: Annotated[Path | None, typer.Option(help="SeeSR's DAPE.pth, merged into RAM (needs --ram).")] = None,
    ram_config: Annotated[
        Path | None, typer.Option(help="JSON of RAMConfig fields for a RAM other than ram_swin_large_14m.")
    ] = None,
) -> None:
    """Build a weights directory: MegaSR from SD2-base (+ a trained overlay), or SeeSR / SeeSR-Turbo from
    their releases."""
    from megasr_core.families import FAMILIES, MEGASR
    from megasr_core.models import WeightsError
    from megasr_core.weights.upstream import assemble_from_sd2, assemble_seesr

    if family not in FAMILIES:
        fail(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if dape is not None and ram is None:
        fail("--dape needs --ram")
    config = _ram_config(ram_config)
    if family == MEGASR:
        if seesr is not None:
            fail("--seesr is for --family seesr or seesr-turbo")
        try:
            path = assemble_from_sd2(sd2, output, overlay=overlay, seed=seed, extractors=extractors)
        except (FileNotFoundError, ValueError, WeightsError) as exc:
            fail(str(exc))
        if ram is not None:
            _install_ram(path / "extractors", ram, dape, config)
    else:
        if seesr is None or ram is None:
            fail(f"--family {family} needs --seesr (SeeSR's release folder) and --ram (RAM's checkpoint)")
        if overlay is not None or extractors is not None:
            fail("--overlay and --extractors are for --family megasr")
        if dape is None:
            typer.secho(
                "warning: no --dape: SeeSR was trained with DAPE's tags; plain RAM tags it less well",
                fg=typer.colors.YELLOW,
                err=True,
            )
        try:
            path = assemble_seesr(seesr, sd2, output, ram, dape, family=family, ram_config=config)
        except (FileNotFoundError, ValueError, WeightsError) as exc:  # RAM's CheckpointError is a ValueError
            fail(str(exc))
    _report_assembled(path)


@app.command("install-ram")
def weights_install_ram(
    directory: Annotated[Path, typer.Argument(help="A MegaSR weights directory.")],
    ram: Annotated[Path, typer.Option(help="RAM's ram_swin_large_14m.pth.")],
    dape: Annotated[Path | None, typer.Option(help="SeeSR's DAPE.pth, merged into RAM.")] = None,
) -> None:
    """Put RAM (+ DAPE) into an existing weights directory's extractors/tagger/ (replaces the CLIP fallback)."""
    _install_ram(directory / "extractors", ram, dape)


def _ram_config(path: Path | None):
    """``--ram-config``: RAMConfig fields from a JSON file (None: RAM's release, ram_swin_large_14m)."""
    if path is None:
        return None
    from megasr_core.extractors import RAMConfig

    try:
        return RAMConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        fail(f"--ram-config {path}: {exc}")


def _report_assembled(path: Path) -> None:
    """Say what was written and, loudly, when it cannot super-resolve (untrained parts)."""
    from megasr_core.families import get_family
    from megasr_core.weights.summary import describe

    info = describe(path)
    typer.echo(f"wrote {get_family(info['family']).title} weights to {path}")
    if not info["trained"]:
        typer.secho(
            f"warning: these weights are UNTRAINED ({'; '.join(info['untrained_reasons'])}): "
            "the output will not be a real super-resolution",
            fg=typer.colors.YELLOW,
            err=True,
        )


def _install_ram(extractors_dir: Path, ram: Path, dape: Path | None, config=None) -> None:
    from megasr_core.extractors.guidance import install_ram_tagger

    try:
        install_ram_tagger(extractors_dir, ram, dape, config=config)
    except (FileNotFoundError, ValueError) as exc:  # CheckpointError is a ValueError
        fail(str(exc))
    typer.echo(f"wrote the RAM tagger{' with DAPE' if dape else ''} to {extractors_dir / 'tagger'}")


@app.command("export-overlay")
def weights_export_overlay(
    directory: Annotated[Path, typer.Argument(help="A MegaSR weights directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Overlay file to write (.safetensors).")],
) -> None:
    """Write the small checkpoint of MegaSR's own and trained keys (ControlNet + UNet CSM/MSFM)."""
    from megasr_core.models import MegaSRDenoiser, WeightsError

    try:
        model = MegaSRDenoiser.from_pretrained(directory)
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        fail(str(exc))
    path = model.save_overlay(output)
    typer.echo(f"wrote overlay ({sum(v.numel() for v in model.overlay_state_dict().values())} parameters) to {path}")


@app.command("export")
def weights_export(
    run_dir: Annotated[Path, typer.Argument(help="A training run's output_dir.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Serving weights directory to write.")],
    checkpoint: Annotated[Path | None, typer.Option(help="A checkpoint folder (default: the newest).")] = None,
    ema: Annotated[bool, typer.Option(help="Use the EMA weights when the run kept them.")] = True,
) -> None:
    """Turn a training run into a serving weights directory (with its overlay checkpoint)."""
    from megasr_core.train.train_megasr import export_run

    try:
        path = export_run(run_dir, output, checkpoint=checkpoint, use_ema=ema)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"wrote serving weights to {path}")
