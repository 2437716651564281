"""Options a user can get wrong end `megasr` with one line naming the flag and exit code 2, before
any model loads (no "model:" line, no demo weights written, in seconds)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from megasr_core.cli import app
from megasr_core.cli.option_checks import check_dtype

runner = CliRunner()


@pytest.fixture()
def photo(tmp_path) -> Path:
    path = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).resize((24, 16)).save(path)
    return path


def refused(result, flag: str, text: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert lines == [lines[0]] and lines[0].startswith(f"error: {flag}") and text in lines[0], result.output


@pytest.mark.parametrize(
    ("args", "flag", "text"),
    [
        (["--steps", "0"], "--steps", "must be an integer from 1 to 1000, got 0"),
        (["--steps", "1001"], "--steps", "from 1 to 1000"),
        (["--scale", "9"], "--scale", "must be a number from 1 to 8, got 9.0"),
        (["--scale", "0.5"], "--scale", "from 1 to 8"),
        (["--guidance-scale", "51"], "--guidance-scale", "must be from 0 to 50"),
        (["--color-fix", "sepia"], "--color-fix", "must be one of adain, wavelet, none, got 'sepia'"),
        (["--tile-size", "8"], "--tile-size", "at least 16 latent pixels, got 8"),
        (["--device", "tpu"], "--device", "must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cpu", "--dtype", "fp16"], "--dtype", "fp16 runs on a GPU only"),
        (["--dtype", "fp64"], "--dtype", "must be fp32, fp16 or bf16, got 'fp64'"),
        (["--sampler", "euler"], "--sampler", "must be one of ddpm, dpmpp-2m, unipc, got 'euler'"),
        (["--cfg-interval", "0.6"], "--cfg-interval", "must be two fractions start,end such as 0,0.6"),
        (["--cfg-interval", "0.6,0.2"], "--cfg-interval", "0 ≤ start < end ≤ 1, got (0.6, 0.2)"),
        (["--precision", "fp16"], "--precision", "must be one of full, fp8, got 'fp16'"),
    ],
)
def test_upscale_refuses_a_wrong_option_before_loading(tmp_path, photo, args, flag, text):
    """Through the console script, as a user runs it: one line on stderr, exit code 2."""
    home = tmp_path / "home"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("megasr")), "upscale", str(photo), "-o", str(tmp_path / "out"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MEGASR_HOME": str(home), "MEGASR_WEIGHTS": ""},
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}") and text in lines[0], result.stderr
    assert not home.exists()  # no demo weights written, so nothing loaded
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line_through_the_console_script(tmp_path, photo):
    script = Path(sys.executable).with_name("megasr")
    started = time.monotonic()
    result = subprocess.run(
        [str(script), "upscale", str(photo), "-o", str(tmp_path / "out"), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MEGASR_HOME": str(tmp_path / "home"), "MEGASR_WEIGHTS": ""},
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: "), result.stderr
    assert ("without CUDA" if torch.version.cuda is None else "no CUDA device") in lines[0]
    assert time.monotonic() - started < 60 and not (tmp_path / "home").exists()


def test_dtypes_the_cpu_runs_are_taken():
    assert check_dtype(None, "cpu") is None
    assert check_dtype("fp32", "cpu") is torch.float32 and check_dtype("bf16", "cpu") is torch.bfloat16


def test_worker_checks_its_device_before_anything(tmp_path):
    result = runner.invoke(app, ["worker", "--device", "cpu", "--dtype", "fp16"], env={"MEGASR_HOME": str(tmp_path)})
    refused(result, "--dtype", "fp16 runs on a GPU only")


def test_serve_on_a_taken_port_fails_before_loading_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        home = tmp_path / "home"
        env = {"MEGASR_HOME": str(home), "MEGASR_WEIGHTS": "", "MEGASR_REDIS_URL": ""}
        started = time.monotonic()
        result = subprocess.run(  # the console script: before, a taken port cost a model load and rc 134
            [str(Path(sys.executable).with_name("megasr")), "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert (
            lines[0]
            == f"error: --port {port}: 127.0.0.1:{port} is already in use; choose another --port (or MEGASR_PORT)"
        )
        assert not home.exists() and time.monotonic() - started < 60  # no demo weights, no Valkey, no model
    # an address this machine does not have (TEST-NET-3), on the port just freed
    bad_host = runner.invoke(app, ["serve", "--host", "203.0.113.7", "--port", str(port)], env=env)
    assert bad_host.exit_code == 2 and "cannot listen there" in bad_host.output, bad_host.output
