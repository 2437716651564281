"""The `megasr` command line, through the installed console script and in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from megasr_core.cli import app

runner = CliRunner()


def megasr_executable() -> list[str]:
    script = Path(sys.executable).with_name("megasr")
    return [str(script)] if script.exists() else [shutil.which("megasr") or "megasr"]


def test_init_tiny_through_the_console_script(tmp_path):
    target = tmp_path / "tiny"
    result = subprocess.run(
        [*megasr_executable(), "weights", "init-tiny", str(target)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    assert "untrained" in result.stdout
    info = runner.invoke(app, ["weights", "info", str(target)])
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["tiny_random"] and data["missing_components"] == []
    assert data["parameters"]["total"]["csm"] > 0

    again = runner.invoke(app, ["weights", "init-tiny", str(target)])
    assert again.exit_code == 2 and "not empty" in again.output

    overlay = tmp_path / "overlay.safetensors"
    exported = runner.invoke(app, ["weights", "export-overlay", str(target), "-o", str(overlay)])
    assert exported.exit_code == 0, exported.output
    assert overlay.is_file()


def test_info_on_the_full_preset_without_weights():
    result = runner.invoke(app, ["weights", "info", "--preset", "sd2-base"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert 865e6 < data["parameters"]["unet"]["base"] < 867e6


def test_info_errors_are_clear(tmp_path):
    result = runner.invoke(app, ["weights", "info", str(tmp_path)])
    assert result.exit_code == 2 and "megasr.json" in result.output
    result = runner.invoke(app, ["weights", "info"])
    assert result.exit_code == 2 and "DIRECTORY or --preset" in result.output
    result = runner.invoke(app, ["weights", "info", "--preset", "nope"])
    assert result.exit_code == 2 and "unknown preset" in result.output


def test_loading_the_cli_loads_neither_torch_nor_the_service():
    """Commands import what they run when they run: `megasr --help` needs no torch and no [serve] extra."""
    code = (
        "import sys, megasr_core.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'service', 'worker', 'fastapi'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
