"""The ``megasr`` command line (typer): the root app and ``main``, one module per command or group.

Each module holds one command (``upscale``, ``serve``, ``worker``, ``eval``) or one group of them
(``weights``, ``data``, ``train``, ``bench``); ``common`` holds what they share. Commands import
what they run inside their functions, so ``megasr --help`` loads neither torch nor the [serve]
extra, and the library never imports ``service`` or ``worker`` at module level.
"""

from __future__ import annotations

import logging

import typer

from . import bench, data, train, weights
from .evaluate import eval_command
from .serve import serve
from .upscale import upscale
from .worker import worker

app = typer.Typer(
    help="MegaSR diffusion super-resolution.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals could hold secrets or huge tensors
)
app.add_typer(weights.app, name="weights")
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.add_typer(bench.app, name="bench")


@app.command()
def version() -> None:
    """Print the installed megasr version."""
    from megasr_core import __version__

    typer.echo(__version__)


app.command()(upscale)
app.command()(worker)
app.command()(serve)
app.command("eval")(eval_command)


#: loggers whose warnings say nothing about megasr's runs: bitsandbytes (pulled in by pyiqa for
#: ``eval``) warns at import that an optional CPU kernel for 4-bit matrix products, which no
#: megasr model uses, cannot be fetched; diffusers, when torchao is installed (the [fp8] extra),
#: that it cannot list torchao classes for loading torchao-serialized checkpoints, which megasr
#: never loads; torch, when torchao registers its enums, that such registration is deprecated
SILENCED_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",
    "diffusers.quantizers.torchao.torchao_quantizer",
    "torch.utils._pytree",
)


def main() -> None:
    for name in SILENCED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    app()
