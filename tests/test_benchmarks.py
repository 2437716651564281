"""Benchmark commands on the CPU (tiny preset): they run, print JSON, and report what they promise."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from megasr_core.cli import app

runner = CliRunner()


def test_gpu_suite_runs_on_cpu_and_writes_every_section(tmp_path):
    out = tmp_path / "suite.json"
    result = runner.invoke(app, ["bench", "--suite", "gpu", "--preset", "tiny", "--size", "64", "--steps", "1",
                                 "--batches", "1,2", "--scopes=", "--large", "128", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert json.loads(result.stdout[result.stdout.index("{"):]) == report
    assert report["errors"] == {} and report["skipped"] == []
    assert report["settings"]["preset"] == "tiny" and report["environment"]["versions"]["torch"]
    sections = report["sections"]
    assert set(sections) == {"build", "baseline", "megasr_eager", "megasr_cuda_graphs", "denoiser_breakdown", "megasr_large"}
    for batch in ("1", "2"):
        row = sections["megasr_eager"][batch]
        assert row["images_per_s"] > 0 and row["ratio_to_baseline"] > 0
        assert {"extractors", "vae_encode", "denoise", "vae_decode"} <= set(row["stages_s"])
        assert sections["baseline"][batch]["step_median_ms"] > 0
    assert set(sections["denoiser_breakdown"]) == {"1", "2"}
    graphs = sections["megasr_cuda_graphs"]  # on a CPU: the graphs' static-buffer path, run eagerly
    assert graphs["graph_shapes"] == 2 and graphs["capture_failure"] is None and graphs["2"]["images_per_s"] > 0
    assert sections["megasr_large"]["tile_batch_4"]["output_size"] == [128, 128]
    assert set(sections["megasr_large"]) == {"tile_batch_4", "tile_batch_1"}
    assert report["summary"]["megasr_over_baseline_batch2"] == sections["megasr_eager"]["2"]["ratio_to_baseline"]


def test_gpu_suite_skips_sections_past_its_budget(tmp_path):
    out = tmp_path / "suite.json"
    result = runner.invoke(app, ["bench", "--suite", "gpu", "--preset", "tiny", "--size", "64", "--steps", "1",
                                 "--batches", "1", "--scopes=", "--large", "0", "--budget-s", "-1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [entry["section"] for entry in report["skipped"]] == ["build"]  # nothing else can run without it
    assert report["sections"] == {} and report["skipped"][0]["reason"].startswith("budget")


def test_unknown_suite_is_an_error():
    result = runner.invoke(app, ["bench", "--suite", "tpu"])
    assert result.exit_code == 2 and "unknown suite 'tpu'" in result.output


def test_bench_batch_reports_speedup_over_single_runs():
    result = runner.invoke(app, ["bench", "--preset", "tiny", "--size", "64", "--steps", "1", "--batch", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["batch"] == 2 and report["single_image_runs_s"] > 0
    assert report["batch_speedup"] == round(report["single_image_runs_s"] / report["total_s"], 3)


def test_gpu_suite_runs_only_the_chosen_sections(tmp_path):
    out = tmp_path / "suite.json"
    result = runner.invoke(app, ["bench", "--suite", "gpu", "--preset", "tiny", "--size", "64", "--steps", "2",
                                 "--batches", "1", "--scopes", "blocks+graphs", "--large", "0",
                                 "--sections", "megasr_compiled_blocks+graphs", "--device", "cpu", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert set(report["sections"]) == {"build", "megasr_compiled_blocks+graphs"}
    row = report["sections"]["megasr_compiled_blocks+graphs"]
    assert row["compiled_modules"] > 0 and row["1"]["images_per_s"] > 0 and row["capture_failure"] is None
