"""``megasr train``: stage 1 (DAGE, one extractor) and stage 2 (MegaSR) training (megasr_core.train)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import fail, quiet_loading

app = typer.Typer(help="Train MegaSR (stage 2) from HR photos.", no_args_is_help=True)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@app.command("megasr")
def train_megasr(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML/TOML/JSON file of MegaSRTrainConfig fields.")],
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in output_dir.")] = True,
    max_steps: Annotated[int | None, typer.Option(help="Override max_steps.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Override output_dir.")] = None,
) -> None:
    """Stage 2: train the ControlNet and MegaSR's modules (launch with `accelerate launch` for multi-GPU)."""
    import logging

    from megasr_core.train import MegaSRTrainer, load_config

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    quiet_loading()
    try:
        settings = load_config(config, overrides={"max_steps": max_steps, "output_dir": output_dir})
        trainer = MegaSRTrainer(settings)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if resume:
        trainer.resume()
    trainer.train()
    trainer.accelerator.end_training()  # with several processes: leave the process group cleanly
    if trainer.accelerator.is_main_process:
        typer.echo(f"trained to step {trainer.step}; checkpoints in {settings.output_dir}/checkpoints")


@app.command("dage")
def train_dage(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML/TOML/JSON file of DAGETrainConfig fields.")],
    max_steps: Annotated[int | None, typer.Option(help="Override max_steps.")] = None,
    export_to: Annotated[Path | None, typer.Option(help="Install the result into this weights directory.")] = None,
) -> None:
    """Stage 1: degradation-aware fine-tuning of one guidance extractor (full or LoRA r=8)."""
    import logging

    from megasr_core.train import load_config
    from megasr_core.train.dage import DAGETrainConfig, DAGETrainer

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    quiet_loading()
    try:
        settings = load_config(config, cls=DAGETrainConfig, overrides={"max_steps": max_steps})
        trainer = DAGETrainer(settings)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    trainer.train()
    if export_to is not None:
        typer.echo(f"installed into {trainer.export(export_to)}")
    typer.echo(f"trained {settings.extractor} for {trainer.step} steps; results in {settings.output_dir}")
