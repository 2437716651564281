"""Benchmark commands on the CPU (tiny preset): they run, print JSON, and report what they promise."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from megasr_core.cli import app

runner = CliRunner()


@pytest.fixture()
def sampling(monkeypatch) -> list[dict]:
    """Every pipeline call: its family, the steps and CFG it was given, and how many steps it reported."""
    from megasr_core.pipelines import MegaSRPipeline

    calls: list[dict] = []
    original = MegaSRPipeline.__call__

    def recording(self, images, *args, callback=None, **kwargs):
        steps: list[int] = []
        out = original(self, images, *args, callback=lambda done, total: steps.append(done), **kwargs)
        calls.append(
            {
                "family": self.family.name,
                "steps": kwargs.get("num_inference_steps"),
                "guidance_scale": kwargs.get("guidance_scale"),
                "steps_run": len(steps),
            }
        )
        return out

    monkeypatch.setattr(MegaSRPipeline, "__call__", recording)
    return calls


FAMILY_SECTIONS = ("seesr_eager", "seesr_cuda_graphs", "seesr_turbo_eager", "seesr_turbo_cuda_graphs")


def test_gpu_suite_runs_on_cpu_and_writes_every_section(tmp_path, sampling):
    out = tmp_path / "suite.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "gpu",
            "--preset",
            "tiny",
            "--size",
            "64",
            "--steps",
            "1",
            "--batches",
            "1,2",
            "--scopes=",
            "--large",
            "128",
            "--repeats",
            "1",
            "--budget-s",
            "3600",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert json.loads(result.stdout[result.stdout.index("{") :]) == report
    assert report["errors"] == {} and report["skipped"] == []
    assert report["settings"]["preset"] == "tiny" and report["environment"]["versions"]["torch"]
    assert report["settings"]["single_repeats"] == 1
    sections = report["sections"]
    assert set(sections) == {
        "build",
        "baseline",
        "megasr_eager",
        "megasr_cuda_graphs",
        "denoiser_breakdown",
        "megasr_large",
        "step_loop_ab",
        "ddpm_step_equality",
        "fast_presets",
        "fused_qkv",
        "worker_overhead",
        *FAMILY_SECTIONS,
    }
    for batch in ("1", "2"):  # the graphs-only A/B: on a CPU the same images, bit for bit
        ab = sections["step_loop_ab"][batch]
        assert ab["identical_images"] == int(batch) and ab["speedup"] > 0, ab
        assert report["summary"][f"device_step_speedup_batch{batch}"] == ab["speedup"]
    overhead = sections["worker_overhead"]
    assert overhead["batch"] == 2 and overhead["encode_png_pooled_s"] > 0 and overhead["decode_pooled_s"] > 0
    assert 0 < overhead["service_share_of_pipeline"] <= 1
    assert overhead["service_images_per_s_estimate"] <= overhead["pipeline_images_per_s"]
    assert report["summary"]["service_share_of_pipeline"] == overhead["service_share_of_pipeline"]
    fused = sections["fused_qkv"]
    assert fused["fused_layers"] > 0 and fused["speedup"] > 0 and fused["fused"]["images_per_s"] > 0
    assert report["summary"]["fused_qkv_speedup"] == fused["speedup"]
    equality = sections["ddpm_step_equality"]
    assert equality["bit_identical"] is True and equality["max_abs_diff"] == 0 and equality["device_schedule_ms"] > 0
    presets = sections["fast_presets"]
    assert presets["batch"] == 2 and presets["ddpm"]["images_per_s"] > 0
    for label in ("dpmpp_2m", "unipc", "ddpm_cfg_interval_0_0.5", "dpmpp_2m_cfg_interval_0_0.5"):
        row = presets[label]
        assert row["steps"] == 1 and row["images_per_s"] > 0 and row["speedup_over_ddpm"] > 0, row
        if label != "ddpm_cfg_interval_0_0.5":  # (at one step, that step is in the interval: no change)
            assert 0 < row["psnr_db"] < 100 and row["mean_abs_diff"] > 0, row  # a solver changes the output
        assert report["summary"][f"preset_{label}_images_per_s_batch2"] == row["images_per_s"]
    assert report["summary"]["ddpm_device_step_bit_identical"] is True
    for label in ("fp8", "fp8_dpmpp_2m_cfg_interval_0_0.5"):  # torchao's float8 weights on the CPU
        row = presets[label]
        assert row["converted_layers"] > 20 and row["images_per_s"] > 0 and row["mean_abs_diff"] > 0, row
    # per-step latent errors where the schedule is DDPM's: none at the one step CFG still runs, some with fp8
    assert presets["ddpm_cfg_interval_0_0.5"]["step_relative_error"]["per_step"] == [0.0]
    assert (
        presets["fp8"]["step_relative_error"]["max"] > 0 and len(presets["fp8"]["step_relative_error"]["per_step"]) == 1
    )
    assert "step_relative_error" not in presets["dpmpp_2m"]  # another schedule: not comparable step by step
    for batch in ("1", "2"):
        row = sections["megasr_eager"][batch]
        assert row["images_per_s"] > 0 and row["ratio_to_baseline"] > 0
        assert {"extractors", "vae_encode", "denoise", "vae_decode"} <= set(row["stages_s"])
        assert sections["baseline"][batch]["step_median_ms"] > 0
    assert set(sections["denoiser_breakdown"]) == {"1", "2"} and sections["denoiser_breakdown"]["2"]["steps_timed"] == 2
    graphs = sections["megasr_cuda_graphs"]  # on a CPU: the graphs' static-buffer path, run eagerly
    assert graphs["graph_shapes"] == 2 and graphs["capture_failure"] is None and graphs["2"]["images_per_s"] > 0
    assert sections["megasr_large"]["tile_batch_4"]["output_size"] == [128, 128]
    assert set(sections["megasr_large"]) == {"tile_batch_4", "tile_batch_16", "tile_batch_1"}
    assert report["summary"]["megasr_over_baseline_batch2"] == sections["megasr_eager"]["2"]["ratio_to_baseline"]
    check_family_sections(report, sampling)


def check_family_sections(report: dict, sampling: list[dict]) -> None:
    """SeeSR at the suite's steps and CFG, Turbo at 2 steps without CFG, each eager and with graphs."""
    sections, summary = report["sections"], report["summary"]
    for name in FAMILY_SECTIONS:
        section = sections[name]
        turbo = name.startswith("seesr_turbo")
        assert (section["family"], section["batches"]) == ("seesr-turbo" if turbo else "seesr", [1, 2])
        assert (section["steps"], section["guidance_scale"]) == ((2, 1.0) if turbo else (1, 5.5))
        assert ("build_s" in section) == name.endswith("_eager")  # built once per family, by its first section
        mode = "cuda_graphs" if name.endswith("cuda_graphs") else "eager"
        for batch in ("1", "2"):
            row = section[batch]
            assert row["images_per_s"] > 0 and row["step_median_ms"] > 0 and row["stages_s"]["denoise"] > 0
            assert row["images_per_s"] == pytest.approx(int(batch) / row["total_s"], rel=2e-3, abs=2e-3)  # both rounded
            if turbo:  # no CFG, different steps: no ratio to the CFG baseline, but Turbo over SeeSR
                seesr = sections[f"seesr_{mode}"][batch]
                assert "ratio_to_baseline" not in row and row["speedup_over_seesr"] == round(
                    seesr["total_s"] / row["total_s"], 2
                )
            else:
                megasr = sections[f"megasr_{mode}"][batch]
                assert row["ratio_to_baseline"] > 0 and row["ratio_to_megasr"] == round(
                    row["total_s"] / megasr["total_s"], 3
                )
        if mode == "cuda_graphs":
            assert section["graph_shapes"] == 2 and section["capture_failure"] is None and section["static_calls"] > 0
        assert summary[f"{name}_single_image_p50_s"] == section["1"]["total_s"]
        assert summary[f"{name}_step_ms_batch1"] == section["1"]["step_median_ms"]
        assert summary[f"{name}_images_per_s_batch2"] == section["2"]["images_per_s"]
    turbo_calls = [c for c in sampling if c["family"] == "seesr-turbo"]
    assert turbo_calls and all((c["steps"], c["guidance_scale"], c["steps_run"]) == (2, 1.0, 2) for c in turbo_calls)
    seesr_calls = [c for c in sampling if c["family"] == "seesr"]
    assert {(c["steps"], c["guidance_scale"]) for c in seesr_calls} == {(2, 5.5), (1, 5.5)}  # warm-ups, then --steps 1


def test_gpu_suite_skips_sections_past_its_budget(tmp_path):
    out = tmp_path / "suite.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "gpu",
            "--preset",
            "tiny",
            "--size",
            "64",
            "--steps",
            "1",
            "--batches",
            "1",
            "--scopes=",
            "--large",
            "0",
            "--budget-s",
            "-1",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [entry["section"] for entry in report["skipped"]] == ["build"]  # nothing else can run without it
    assert report["sections"] == {} and report["skipped"][0]["reason"].startswith("budget")


def test_unknown_benchmark_is_an_error():
    result = runner.invoke(app, ["bench", "tpu"])
    assert result.exit_code == 2 and "No such command 'tpu'" in result.output


def test_bench_batch_reports_speedup_over_single_runs():
    result = runner.invoke(
        app, ["bench", "pipeline", "--preset", "tiny", "--size", "64", "--steps", "1", "--batch", "2"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["batch"] == 2 and report["single_image_runs_s"] > 0
    assert report["batch_speedup"] == round(report["single_image_runs_s"] / report["total_s"], 3)


def test_gpu_suite_runs_only_the_chosen_sections(tmp_path):
    out = tmp_path / "suite.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "gpu",
            "--preset",
            "tiny",
            "--size",
            "64",
            "--steps",
            "2",
            "--batches",
            "1",
            "--scopes",
            "blocks+graphs",
            "--large",
            "0",
            "--sections",
            "megasr_compiled_blocks+graphs",
            "--device",
            "cpu",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert set(report["sections"]) == {"build", "megasr_compiled_blocks+graphs"}
    row = report["sections"]["megasr_compiled_blocks+graphs"]
    assert row["compiled_modules"] > 0 and row["1"]["images_per_s"] > 0 and row["capture_failure"] is None
