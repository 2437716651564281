"""`megasr upscale` as Real-ESRGAN's users expect: inputs never overwritten, --skip-existing,
--recursive, --quality; and --dtype/--compile checked by `megasr serve`."""

from __future__ import annotations

from PIL import Image
from skimage import data
from typer.testing import CliRunner

from megasr_core.cli import app

runner = CliRunner()


def _photo(path, size=(24, 16), which=data.astronaut):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(which()).resize(size).save(path)
    return path


def _upscale(*args, weights):
    return runner.invoke(app, ["upscale", *map(str, args), "--weights", str(weights), "--steps", "1", "--seed", "3"])


def test_writing_into_the_input_folder_adds_a_suffix_and_never_overwrites(tmp_path, tiny_weights):
    folder = tmp_path / "photos"
    source = _photo(folder / "cat.png")
    original = source.read_bytes()

    result = _upscale(folder, "-o", folder, "--scale", "2", weights=tiny_weights)
    assert result.exit_code == 0, result.output
    with Image.open(folder / "cat_x2.png") as image:
        assert image.size == (48, 32)
    assert source.read_bytes() == original

    custom = _upscale(source, "-o", folder, "--scale", "2", "--suffix", "_big", weights=tiny_weights)
    assert custom.exit_code == 0, custom.output
    assert (folder / "cat_big.png").is_file()

    # a target that is an input anyway is refused before any work
    for args in ((source, "-o", source), (source, "-o", folder, "--suffix", "")):
        refused = _upscale(*args, weights=tiny_weights)
        assert refused.exit_code == 2 and "refusing to overwrite the input" in refused.output, refused.output
    assert source.read_bytes() == original

    elsewhere = _upscale(folder / "cat.png", "-o", tmp_path / "out", "--scale", "2", weights=tiny_weights)
    assert elsewhere.exit_code == 0 and (tmp_path / "out" / "cat.png").is_file()  # another folder: no suffix


def test_a_rerun_into_the_input_folder_never_takes_its_outputs_as_inputs(tmp_path, tiny_weights):
    folder = tmp_path / "photos"
    _photo(folder / "cat.png", which=data.chelsea)
    _photo(folder / "dog.png")
    first = _upscale(folder, "-o", folder, "--scale", "2", weights=tiny_weights)
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in folder.iterdir()) == ["cat.png", "cat_x2.png", "dog.png", "dog_x2.png"]
    made = (folder / "cat_x2.png").stat().st_mtime_ns

    skipped = _upscale(folder, "-o", folder, "--scale", "2", "--skip-existing", weights=tiny_weights)
    assert skipped.exit_code == 0, skipped.output
    assert "left out 2 file(s) that are outputs of the other inputs (a previous run)" in skipped.output
    assert "skipped" in skipped.output and "upscaling" not in skipped.output  # nothing to do: no model
    assert (folder / "cat_x2.png").stat().st_mtime_ns == made

    again = _upscale(folder, "-o", folder, "--scale", "2", weights=tiny_weights)  # overwrites its own outputs
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in folder.iterdir()) == ["cat.png", "cat_x2.png", "dog.png", "dog_x2.png"]

    other_format = _upscale(folder, "-o", folder, "--scale", "2", "--format", "webp", weights=tiny_weights)
    assert other_format.exit_code == 0, other_format.output
    assert sorted(p.name for p in folder.glob("*.webp")) == ["cat_x2.webp", "dog_x2.webp"]  # no cat_x2_x2


def test_skip_existing_leaves_finished_outputs_alone(tmp_path, tiny_weights):
    inputs = tmp_path / "in"
    _photo(inputs / "a.png")
    _photo(inputs / "b.png", which=data.chelsea)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"done before")

    result = _upscale(inputs, "-o", out, "--scale", "2", "--skip-existing", weights=tiny_weights)
    assert result.exit_code == 0, result.output
    assert (out / "a.png").read_bytes() == b"done before"
    assert "skipped" in result.output and "a.png" in result.output
    with Image.open(out / "b.png") as image:
        assert image.size == (48, 32)

    again = _upscale(inputs, "-o", out, "--scale", "2", "--skip-existing", weights=tiny_weights)
    assert again.exit_code == 0 and "upscaling" not in again.output  # nothing left to do: no model loaded
    overwrite = _upscale(inputs, "-o", out, "--scale", "2", weights=tiny_weights)
    assert overwrite.exit_code == 0 and (out / "a.png").read_bytes() != b"done before"


def test_recursive_mirrors_sub_folders_and_quality_sets_the_encoder(tmp_path, tiny_weights):
    root = tmp_path / "album"
    _photo(root / "top.png")
    _photo(root / "2024" / "mid.png", which=data.chelsea)
    _photo(root / "2024" / "june" / "deep.png", which=data.coffee)

    flat = _upscale(root, "-o", tmp_path / "flat", "--scale", "2", weights=tiny_weights)
    assert flat.exit_code == 0, flat.output
    assert f"skipped 1 sub-folder(s) of {root} (pass -r to include them): 2024" in flat.output
    assert sorted(p.name for p in (tmp_path / "flat").rglob("*.png")) == ["top.png"]

    best = _upscale(
        root,
        "-o",
        tmp_path / "best",
        "--recursive",
        "--format",
        "jpeg",
        "--quality",
        "100",
        "--scale",
        "2",
        weights=tiny_weights,
    )
    assert best.exit_code == 0, best.output
    found = sorted(p.relative_to(tmp_path / "best").as_posix() for p in (tmp_path / "best").rglob("*.jpg"))
    assert found == ["2024/june/deep.jpg", "2024/mid.jpg", "top.jpg"]

    worst = _upscale(
        root / "2024" / "june",
        "-o",
        tmp_path / "worst",
        "--format",
        "jpeg",
        "--quality",
        "5",
        "--scale",
        "2",
        weights=tiny_weights,
    )
    assert worst.exit_code == 0, worst.output
    assert (tmp_path / "worst" / "deep.jpg").stat().st_size < (
        tmp_path / "best" / "2024" / "june" / "deep.jpg"
    ).stat().st_size

    out_of_range = _upscale(root, "-o", tmp_path / "x", "--quality", "0", weights=tiny_weights)
    assert out_of_range.exit_code == 2


def test_serve_checks_dtype_and_compile_before_starting(tmp_path):
    env = {"MEGASR_HOME": str(tmp_path), "MEGASR_REDIS_URL": ""}
    bad_dtype = runner.invoke(app, ["serve", "--dtype", "fp64"], env=env)
    assert bad_dtype.exit_code == 2 and "--dtype must be fp32, fp16 or bf16" in bad_dtype.output
    bad_compile = runner.invoke(app, ["serve", "--compile", "everything"], env=env)
    assert bad_compile.exit_code == 2 and "compile" in bad_compile.output and "'blocks' or 'full'" in bad_compile.output
    worker = runner.invoke(app, ["worker", "--compile", "everything"], env=env)
    assert worker.exit_code == 2 and "'blocks' or 'full'" in worker.output


def test_a_fast_sampler_a_cfg_interval_and_fp8_reach_the_pipeline(tmp_path, tiny_weights):
    source = _photo(tmp_path / "in" / "cat.png")
    outputs = {}
    fast = ["--sampler", "dpmpp-2m", "--cfg-interval", "0,0.5"]
    for name, extra in (("ddpm", []), ("dpmpp", fast), ("fp8", ["--precision", "fp8"])):
        result = _upscale(source, "-o", tmp_path / name / "cat.png", "--scale", "2", *extra, weights=tiny_weights)
        assert result.exit_code == 0, result.output
        assert ("fp8 linear layers" in result.output) == (name == "fp8"), result.output  # the model line says so
        with Image.open(tmp_path / name / "cat.png") as image:
            assert image.size == (48, 32)
            outputs[name] = image.tobytes()
    assert outputs["ddpm"] != outputs["dpmpp"] and outputs["ddpm"] != outputs["fp8"]
