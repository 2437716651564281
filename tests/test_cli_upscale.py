"""`megasr upscale` end to end through the console script, and `megasr bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from skimage import data
from typer.testing import CliRunner

from megasr_core.cli import app

runner = CliRunner()


def megasr(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("megasr")
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def test_upscale_a_folder_of_photos(tmp_path, tiny_weights):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(data.chelsea()).resize((45, 30)).save(inputs / "cat.png")
    Image.fromarray(data.coffee()).resize((40, 27)).save(inputs / "coffee.jpg", quality=90)
    (inputs / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    result = megasr(
        "upscale",
        str(inputs),
        "-o",
        str(tmp_path / "out"),
        "--weights",
        str(tiny_weights),
        "--steps",
        "2",
        "--seed",
        "1",
        "--format",
        "jpeg",
    )
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / "cat.jpg") as cat:
        assert cat.size == (180, 120) and cat.format == "JPEG"
    with Image.open(tmp_path / "out" / "coffee.jpg") as coffee:
        assert coffee.size == (160, 108)
    assert "upscaling" in result.stderr  # the progress bar


def test_upscale_single_file_and_errors(tmp_path, tiny_weights):
    source = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((32, 32)).save(source)
    target = tmp_path / "big.webp"
    ok = runner.invoke(
        app, ["upscale", str(source), "-o", str(target), "--weights", str(tiny_weights), "--steps", "1", "--scale", "2"]
    )
    assert ok.exit_code == 0, ok.output
    with Image.open(target) as image:
        assert image.size == (64, 64) and image.format == "WEBP"

    broken = tmp_path / "broken.png"
    broken.write_bytes(source.read_bytes()[:100])
    bad = runner.invoke(
        app, ["upscale", str(broken), "-o", str(tmp_path / "o"), "--weights", str(tiny_weights), "--steps", "1"]
    )
    assert bad.exit_code == 1 and "truncated or corrupt" in bad.output

    scale = runner.invoke(
        app, ["upscale", str(source), "-o", str(tmp_path / "o"), "--weights", str(tiny_weights), "--scale", "20"]
    )
    assert scale.exit_code == 2 and "--scale must be a number from 1 to 8, got 20.0" in scale.output

    missing = runner.invoke(app, ["upscale", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_without_weights_the_demo_weights_are_made_with_a_warning(tmp_path):
    source = tmp_path / "a.png"
    Image.fromarray(data.astronaut()).resize((16, 16)).save(source)
    env = {"MEGASR_HOME": str(tmp_path / "home"), "MEGASR_WEIGHTS": ""}
    result = megasr("upscale", str(source), "-o", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" in result.stderr and "megasr weights assemble --help" in result.stderr
    assert (tmp_path / "home" / "tiny-demo" / "megasr.json").is_file()
    # a fast first run: the demo's own step count, and no bar per weight file or stray warning
    assert "untrained tiny weights: 10 steps (--steps to choose)" in result.stderr
    assert "/10 [" in result.stderr and "/50 [" not in result.stderr
    for noise in ("Loading weights", "Writing model shards", "gemm_4bit"):
        assert noise not in result.stderr, result.stderr


def test_bench_prints_json():
    result = runner.invoke(
        app, ["bench", "pipeline", "--preset", "tiny", "--size", "128", "--steps", "2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["steps"] == 2 and report["output_size"] == 128
    for stage in ("extractors", "text_encoding", "vae_encode", "denoise", "vae_decode", "postprocess"):
        assert stage in report["stages_s"]
    assert report["denoise_step_median_s"] > 0 and report["images_per_s"] > 0
