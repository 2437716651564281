"""`megasr eval` with weights of any family, and several models side by side, through the real CLI."""

from __future__ import annotations

import pytest

pytest.importorskip("pyiqa", reason="the [eval] extra")

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from megasr_core.cli import app
from megasr_core.evaluation.models import column_label, column_labels, plan_models
from megasr_core.identity import TINY_REASON
from megasr_core.image_quality import psnr_y
from megasr_core.pipelines import MegaSRPipeline

runner = CliRunner()
KEYS = ["astronaut", "chelsea", "coffee"]


def run(*args: object):
    return runner.invoke(app, ["eval", *map(str, args)])


def tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture()
def realsr(tmp_path, photos) -> Path:
    """The three photos laid out with RealSR's names: 128² ``*_HR.png``, 32² ``*_LR4.png``."""
    root = tmp_path / "RealSR" / "Test" / "4"
    root.mkdir(parents=True)
    for name, photo in photos.items():
        photo.save(root / f"{name}_HR.png")
        photo.resize((32, 32), Image.Resampling.BICUBIC).save(root / f"{name}_LR4.png")
    return tmp_path / "RealSR"


@pytest.fixture()
def sampling(monkeypatch) -> list[dict]:
    """Every pipeline call of the run: the steps and CFG it was given and the steps it reported."""
    calls: list[dict] = []
    original = MegaSRPipeline.__call__

    def recording(self, images, *args, callback=None, **kwargs):
        progress: list[tuple[int, int]] = []

        def step(done: int, total: int) -> None:
            progress.append((done, total))
            if callback is not None:
                callback(done, total)

        out = original(self, images, *args, callback=step, **kwargs)
        calls.append(
            {
                "family": self.family.name,
                "images": len(images),
                "steps": kwargs.get("num_inference_steps"),
                "guidance_scale": kwargs.get("guidance_scale"),
                "sampler": kwargs.get("sampler"),
                "cfg_interval": kwargs.get("cfg_interval"),
                "progress": progress,
            }
        )
        return out

    monkeypatch.setattr(MegaSRPipeline, "__call__", recording)
    return calls


def test_two_families_side_by_side(realsr, tmp_path, family_weights, sampling, offline):
    seesr, megasr = family_weights("seesr"), family_weights("megasr")
    out = tmp_path / "report"
    result = run(
        "--dataset",
        "realsr",
        realsr,
        "--weights",
        seesr,
        "--weights",
        megasr,
        "--steps",
        "1",
        "--batch-size",
        "3",
        "--metrics",
        "psnr,ssim",
        "--baseline",
        "bicubic",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())

    seesr_col, megasr_col = report["models"]
    assert (seesr_col["family"], megasr_col["family"]) == ("seesr", "megasr")
    assert (
        seesr_col["label"] == "SeeSR (seesr-tiny, untrained)"
        and megasr_col["label"] == "MegaSR (megasr-tiny, untrained)"
    )
    for column, weights in ((seesr_col, seesr), (megasr_col, megasr)):
        assert column["trained"] is False and column["untrained_reason"] == TINY_REASON
        assert column["weights"]["path"] == str(Path(weights).resolve())
        assert column["steps"] == 1 and column["guidance_scale"] == 5.5  # --steps given, CFG the families' default
        outputs = out / "sr" / Path(weights).name
        assert column["outputs"] == str(outputs) and sorted(p.stem for p in outputs.glob("*.png")) == KEYS
        for key in KEYS:  # each column scores its own model's outputs against the ground truth
            expected = psnr_y(tensor(outputs / f"{key}.png"), tensor(realsr / "Test" / "4" / f"{key}_HR.png"))
            assert column["metrics"]["psnr"]["per_image"][key] == pytest.approx(float(expected[0]), abs=1e-3)
    assert seesr_col["metrics"]["psnr"]["mean"] != megasr_col["metrics"]["psnr"]["mean"]
    assert (
        report["metrics"] == seesr_col["metrics"] and report["weights"] == seesr_col["weights"]
    )  # the single-model keys
    assert sorted((c["family"], c["images"], c["steps"]) for c in sampling) == [("megasr", 3, 1), ("seesr", 3, 1)]
    assert report["paper_table1"]["SeeSR"]["psnr"] == 23.60 and report["paper_table1"]["MegaSR"]["psnr"] == 23.49

    table = (out / "eval.md").read_text()
    assert table in result.output
    header, _, psnr_row, ssim_row = table.splitlines()[:4]
    assert header == (
        "| Dataset | Metric | SeeSR (paper) | MegaSR (paper) | Bicubic | SeeSR (seesr-tiny, untrained) "
        "| MegaSR (megasr-tiny, untrained) |"
    )
    bicubic = report["baselines"]["bicubic"]["metrics"]
    assert psnr_row == (
        f"| RealSR | PSNR↑ | 23.60 | 23.49 | {bicubic['psnr']['mean']:.2f} | "
        f"{seesr_col['metrics']['psnr']['mean']:.2f} | {megasr_col['metrics']['psnr']['mean']:.2f} |"
    )
    assert ssim_row.startswith("|  | SSIM↑ | 0.6947 | 0.6903 | ")
    assert table.count("UNTRAINED") == 2 and "SeeSR (seesr-tiny, untrained): 1 step, CFG 5.5" in table

    second = run(
        "--dataset",
        "realsr",
        realsr,
        "--weights",
        seesr,
        "--weights",
        megasr,
        "--steps",
        "1",
        "--batch-size",
        "3",
        "--metrics",
        "psnr",
        "-o",
        out,
    )
    assert second.exit_code == 0, second.output
    assert [c["resumed"] for c in json.loads((out / "eval.json").read_text())["models"]] == [3, 3]
    assert len(sampling) == 2  # nothing super-resolved again
    assert offline == []


def test_seesr_turbo_samples_two_steps_without_cfg_by_default(tmp_path, folders, family_weights, sampling):
    out = tmp_path / "report"
    result = run(
        "--lr",
        folders["lr"],
        "--gt",
        folders["gt"],
        "--weights",
        family_weights("seesr-turbo"),
        "--batch-size",
        "3",
        "--metrics",
        "psnr",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    (call,) = sampling
    assert (call["steps"], call["guidance_scale"]) == (2, 1.0)
    assert [done for done, _ in call["progress"]] == [1, 2] and call["progress"][-1][1] == 2  # what the sampler ran
    (column,) = json.loads((out / "eval.json").read_text())["models"]
    assert (column["steps"], column["guidance_scale"], column["label"]) == (
        2,
        1.0,
        "SeeSR-Turbo (seesr-turbo-tiny, untrained)",
    )
    assert sorted(p.stem for p in (out / "sr").glob("*.png")) == KEYS  # one model: the original OUTPUT/sr/ layout
    assert "SeeSR-Turbo (seesr-turbo-tiny, untrained): 2 steps, CFG 1" in result.output


def test_a_fast_sampler_takes_its_own_steps_and_is_named_in_the_report(tmp_path, folders, family_weights, sampling):
    out = tmp_path / "report"
    args = ["--lr", folders["lr"], "--gt", folders["gt"], "--weights", family_weights("seesr"), "--batch-size", "3"]
    result = run(*args, "--metrics", "psnr", "--sampler", "unipc", "--cfg-interval", "0,0.5", "-o", out)
    assert result.exit_code == 0, result.output
    (call,) = sampling
    assert (call["steps"], call["sampler"], call["cfg_interval"]) == (20, "unipc", (0.0, 0.5))
    assert len(call["progress"]) == 20
    (column,) = json.loads((out / "eval.json").read_text())["models"]
    assert (column["steps"], column["sampler"], column["cfg_interval"]) == (20, "unipc", [0.0, 0.5])
    assert "20 steps, CFG 5.5, sampler unipc, CFG on 0-0.5 of the steps" in (out / "eval.md").read_text()
    refused = run(*args, "--sampler", "euler", "-o", tmp_path / "other")
    assert refused.exit_code == 2 and "--sampler must be one of ddpm, dpmpp-2m, unipc" in refused.output


def test_the_same_weights_twice_is_a_clear_error(tmp_path, folders, family_weights, sampling):
    weights = family_weights("seesr-turbo")
    result = run(
        "--lr",
        folders["lr"],
        "--gt",
        folders["gt"],
        "--weights",
        weights,
        "--weights",
        weights,
        "--metrics",
        "psnr",
        "-o",
        tmp_path / "r",
    )
    assert result.exit_code == 2 and "given twice" in result.output and "Traceback" not in result.output
    assert sampling == []


def test_a_hub_id_is_resolved_through_the_hub_cache(tmp_path, folders, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run(
        "--lr",
        folders["lr"],
        "--gt",
        folders["gt"],
        "--weights",
        "hf://someone/seesr@v1",
        "--metrics",
        "psnr",
        "-o",
        tmp_path / "r",
    )
    assert (
        result.exit_code == 2 and "hf://someone/seesr@v1" in result.output and "not in the Hub cache" in result.output
    )


def test_output_folders_and_labels(tmp_path):
    a, b, c = (
        tmp_path / "x" / "tiny",
        tmp_path / "y" / "tiny",
        tmp_path / "models--org--seesr" / "snapshots" / ("ab12" * 10),
    )
    runs = plan_models([a, b, c], tmp_path / "out")
    assert [r.outputs for r in runs] == [
        tmp_path / "out" / "sr" / s for s in ("tiny", "tiny-2", "hf_org_seesr_ab12ab12ab12")
    ]
    assert plan_models([a], tmp_path / "out")[0].outputs == tmp_path / "out" / "sr"
    identity = {"title": "SeeSR", "weights": "hf://org/seesr@ab12ab12ab12", "trained": True}
    assert column_label(identity) == "SeeSR (hf://org/seesr@ab12ab12ab12)"
    assert column_label({**identity, "trained": False}) == "SeeSR (hf://org/seesr@ab12ab12ab12, untrained)"
    tiny = {"title": "MegaSR", "weights": "tiny", "trained": False}
    assert column_labels(runs, [tiny, tiny, identity]) == [
        "MegaSR (tiny, untrained)",
        "MegaSR (tiny-2, untrained)",
        "SeeSR (hf://org/seesr@ab12ab12ab12)",
    ]


@pytest.mark.parametrize(
    "dataset, method, metric, value",
    [
        ("realsr", "SeeSR", "musiq", 69.8200),
        ("drealsr", "SeeSR", "psnr", 26.01),
        ("div2k-val", "SeeSR", "clipiqa", 0.6936),
        ("dped-iphone", "SeeSR", "maniqa", 0.4581),
        ("drealsr", "MegaSR", "niqe", 6.6276),
        ("div2k-val", "MegaSR", "ssim", 0.5664),
    ],
)
def test_paper_figures_are_table_1s_per_test_set(dataset, method, metric, value):
    """One figure per set and method, as printed in the paper's Table 1 (its blocks run RealSR, DIV2K-Val,
    DrealSR, DPED-iPhone: a mix-up of two blocks would show here)."""
    from megasr_core.evaluation.paper import paper_figures

    figures = paper_figures(dataset)
    assert list(figures) == ["SeeSR", "MegaSR"] and figures[method][metric] == value
    assert ("psnr" in figures[method]) == (dataset != "dped-iphone")
    assert paper_figures(None) == {} and paper_figures("set5") == {}
