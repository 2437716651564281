"""``megasr data``: training data, degraded (LR, HR) pairs made offline (megasr_core.data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import fail

app = typer.Typer(help="Training data: degraded (LR, HR) pairs.", no_args_is_help=True)


@app.command("make-pairs")
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
        count = make_pairs(
            inputs,
            output,
            crop_size=crop_size,
            per_image=per_image,
            seed=seed,
            degradation=DegradationConfig(scale=scale),
            hflip=hflip,
            usm=USMConfig() if usm else None,
        )
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {count} pairs to {output}/hr and {output}/lr")
