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


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


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
) -> None:
    """Write a complete random-initialized `tiny` weights directory (for tests and demos; untrained)."""
    from megasr_core.weights import init_tiny

    try:
        path = init_tiny(directory, seed=seed, overwrite=force)
    except FileExistsError as exc:
        _fail(str(exc))
    typer.echo(f"wrote untrained tiny MegaSR weights to {path}")


@weights_app.command("info")
def weights_info(
    directory: Annotated[Optional[Path], typer.Argument(help="A MegaSR weights directory.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Describe a preset's shapes instead (built on the meta device).")] = None,
) -> None:
    """Print a JSON description: config, parameter counts (base, CSM, MSFM), missing parts."""
    from megasr_core.models import MegaSRDenoiser, WeightsError
    from megasr_core.weights import describe

    if (directory is None) == (preset is None):
        _fail("give either a DIRECTORY or --preset NAME")
    try:
        if preset is not None:
            model = MegaSRDenoiser.from_preset(preset, device="meta")
            info = {"preset": preset, "config": model.config.to_dict(), "parameters": model.parameter_counts(),
                    "extractor_parameters": _extractor_counts(preset)}
        else:
            info = describe(directory)
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(info, indent=2))


def _extractor_counts(preset: str) -> dict[str, int]:
    import torch

    from megasr_core.extractors import GuidanceExtractors, real_preset, tiny_preset

    with torch.device("meta"):
        return GuidanceExtractors.from_preset(tiny_preset() if preset == "tiny" else real_preset()).parameter_counts()


@weights_app.command("assemble")
def weights_assemble(
    sd2: Annotated[Path, typer.Option(help="Local diffusers copy of stable-diffusion-2-base.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    overlay: Annotated[Optional[Path], typer.Option(help="Trained MegaSR overlay checkpoint (.safetensors).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for freshly initialized modules (no overlay).")] = 0,
    extractors: Annotated[Optional[Path], typer.Option(help="Extractor folder (hed/, depth/, segmentation/, clip/, tagger/).")] = None,
) -> None:
    """Build a MegaSR weights directory from SD2-base (and a trained overlay, if any)."""
    from megasr_core.models import WeightsError
    from megasr_core.weights import assemble_from_sd2

    try:
        path = assemble_from_sd2(sd2, output, overlay=overlay, seed=seed, extractors=extractors)
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote MegaSR weights to {path}")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
