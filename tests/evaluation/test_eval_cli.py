"""`megasr eval` end to end through the real CLI: reports, super-resolve + resume, a test set, bad input."""

from __future__ import annotations

import pytest

pyiqa = pytest.importorskip("pyiqa", reason="the [eval] extra")

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from megasr_core.cli import app
from megasr_core.image_quality import psnr_y, ssim_y
from tests.evaluation.helpers import blurred

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["eval", *map(str, args)])


def fails_cleanly(result, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def test_pred_gt_writes_json_and_markdown(folders, tmp_path, offline):
    out = tmp_path / "report"
    result = run(
        "--pred", folders["pred"], "--gt", folders["gt"], "--metrics", "psnr,ssim,niqe", "-o", out, "--crop-border", "4"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert list(report["metrics"]) == ["psnr", "ssim", "niqe"]
    for block in report["metrics"].values():
        assert sorted(block["per_image"]) == ["astronaut", "chelsea", "coffee"]
        assert block["mean"] == pytest.approx(np.mean(list(block["per_image"].values())))
    for key in (
        "astronaut",
        "chelsea",
        "coffee",
    ):  # the CLI's numbers are the paper convention (our known-answer metrics)
        pred, gt = tensor(folders["pred"] / f"{key}.png"), tensor(folders["gt"] / f"{key}.png")
        assert report["metrics"]["psnr"]["per_image"][key] == pytest.approx(
            float(psnr_y(pred, gt, crop=4)[0]), abs=1e-3
        )
        assert report["metrics"]["ssim"]["per_image"][key] == pytest.approx(
            float(ssim_y(pred, gt, crop=4)[0]), abs=1e-4
        )
    assert report["settings"]["crop_border"] == 4 and report["versions"]["pyiqa"] == pyiqa.__version__
    assert report["skipped"] == [] and report["weights"] is None
    table = (out / "eval.md").read_text()
    assert "| PSNR↑ |" in table and "| SSIM↑ |" in table and "| NIQE↓ |" in table and "Ours" in table
    assert f"{report['metrics']['psnr']['mean']:.2f}" in table
    assert table in result.output
    assert offline == []


def test_lr_gt_weights_super_resolves_then_resumes(folders, tmp_path, tiny_weights):
    out = tmp_path / "report"
    args = (
        "--lr",
        folders["lr"],
        "--gt",
        folders["gt"],
        "--weights",
        tiny_weights,
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--metrics",
        "psnr,ssim",
        "--baseline",
        "bicubic",
        "-o",
        out,
    )
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "super-resolving (MegaSR): 100%" in first.output and "3/3 [" in first.output  # a bar with totals
    assert "scoring: 100%" in first.output
    outputs = sorted((out / "sr").glob("*.png"))
    assert [p.stem for p in outputs] == ["astronaut", "chelsea", "coffee"]
    assert all(Image.open(p).size == (128, 128) for p in outputs)
    report = json.loads((out / "eval.json").read_text())
    assert (
        report["weights"]["path"] == str(Path(tiny_weights).resolve())
        and len(report["weights"]["fingerprint_sha256"]) == 64
    )
    assert report["resumed"] == 0 and report["settings"]["steps"] == 1
    assert set(report["baselines"]["bicubic"]["metrics"]["psnr"]["per_image"]) == {"astronaut", "chelsea", "coffee"}
    assert "| Bicubic |" in (out / "eval.md").read_text() or "Bicubic" in (out / "eval.md").read_text()

    stamps = {p.name: p.stat().st_mtime_ns for p in outputs}
    (out / "sr" / "chelsea.png").unlink()
    second = run(*args)
    assert second.exit_code == 0, second.output
    assert "2 of 3 outputs already" in second.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sr").glob("*.png") if p.name != "chelsea.png"} == {
        k: v for k, v in stamps.items() if k != "chelsea.png"
    }
    assert (out / "sr" / "chelsea.png").is_file()
    assert json.loads((out / "eval.json").read_text())["resumed"] == 2


def test_dataset_realsr_pairs_by_its_naming(tmp_path, photos, offline):
    root = tmp_path / "RealSR(V3)"
    pred = tmp_path / "pred"
    pred.mkdir()
    for camera, (name, photo) in zip(("Canon", "Canon", "Nikon"), photos.items()):
        folder = root / camera / "Test" / "4"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{camera}_{name}"
        photo.save(folder / f"{stem}_HR.png")
        photo.resize((32, 32), Image.Resampling.BICUBIC).save(folder / f"{stem}_LR4.png")
        blurred(photo).save(pred / f"{stem}.png")
    photos["coffee"].save(root / "Canon" / "Test" / "4" / "Canon_extra_LR4.png")  # an LR without its HR
    out = tmp_path / "report"
    result = run("--dataset", "realsr", root, "--pred", pred, "--metrics", "psnr,ssim", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["dataset"] == "realsr" and report["images"] == 3
    assert sorted(report["metrics"]["psnr"]["per_image"]) == ["Canon_astronaut", "Canon_chelsea", "Nikon_coffee"]
    assert report["files"]["Canon_astronaut"]["gt"].endswith("Canon_astronaut_HR.png")
    assert [s["reason"] for s in report["skipped"]] == ["no matching GT file"]
    assert "Canon_extra_LR4.png" in result.output  # skips are listed on the console too
    table = (out / "eval.md").read_text()
    # the paper's SeeSR and MegaSR columns beside ours
    assert "| SeeSR (paper) | MegaSR (paper) | Ours |" in table
    assert "| RealSR | PSNR↑ | 23.60 | 23.49 |" in table and "| SSIM↑ | 0.6947 | 0.6903 |" in table


def test_no_reference_only_set_skips_full_reference_metrics(tmp_path, photos, offline):
    root = tmp_path / "dped" / "iphone"
    root.mkdir(parents=True)
    for name, photo in photos.items():
        photo.save(root / f"{name}.jpg")
    out = tmp_path / "report"
    result = run("--dataset", "dped-iphone", root, "--pred", root, "--metrics", "psnr,niqe", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert list(report["metrics"]) == ["niqe"] and "psnr" in report["notes"][0]
    assert "| DPED-iPhone | NIQE↓ | 6.7261 | 6.7751 |" in (out / "eval.md").read_text()  # SeeSR, MegaSR (paper)


def test_missing_folder_is_a_clear_error(folders, tmp_path):
    fails_cleanly(
        run("--pred", tmp_path / "nope", "--gt", folders["gt"], "--metrics", "psnr", "-o", tmp_path / "r"),
        "no such folder",
        "nope",
    )


def test_unpaired_files_are_listed_skips(folders, tmp_path):
    Image.new("RGB", (128, 128)).save(folders["pred"] / "stray.png")
    (folders["gt"] / "coffee.png").unlink()
    out = tmp_path / "r"
    result = run("--pred", folders["pred"], "--gt", folders["gt"], "--metrics", "psnr", "-o", out)
    assert result.exit_code == 0, result.output
    skipped = json.loads((out / "eval.json").read_text())["skipped"]
    assert sorted(Path(s["file"]).name for s in skipped) == ["coffee.png", "stray.png"]
    assert all(s["reason"] == "no matching gt file" for s in skipped)
    assert "skipped" in result.output and "stray.png" in result.output


def test_size_mismatched_pairs_are_listed_skips(folders, tmp_path):
    Image.open(folders["pred"] / "chelsea.png").resize((120, 128)).save(folders["pred"] / "chelsea.png")
    out = tmp_path / "r"
    result = run("--pred", folders["pred"], "--gt", folders["gt"], "--metrics", "psnr", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 2 and "120×128 differs from the ground truth's 128×128" in report["skipped"][0]["reason"]


def test_nothing_pairable_is_a_clear_error(folders, tmp_path):
    for path in folders["pred"].iterdir():
        Image.open(path).resize((64, 64)).save(path)
    fails_cleanly(
        run("--pred", folders["pred"], "--gt", folders["gt"], "--metrics", "psnr", "-o", tmp_path / "r"),
        "every pair was skipped",
    )
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    Image.new("RGB", (8, 8)).save(renamed / "other.png")
    fails_cleanly(
        run("--pred", renamed, "--gt", folders["gt"], "--metrics", "psnr", "-o", tmp_path / "r"),
        "no file could be paired",
    )


def test_missing_metric_weights_name_the_file_and_url(folders, tmp_path, offline):
    empty = tmp_path / "metric-weights"
    empty.mkdir()
    result = run(
        "--pred",
        folders["pred"],
        "--gt",
        folders["gt"],
        "--metrics",
        "psnr,lpips",
        "--metric-weights",
        empty,
        "-o",
        tmp_path / "r",
    )
    fails_cleanly(result, "LPIPS_v0.1_alex-df73285e.pth", "https://", str(empty))
    assert offline == []


@pytest.mark.parametrize(
    "args, phrase",
    [
        (("--metrics", "psnr,fid"), "unknown metric(s) fid"),
        (("--dataset", "set5", "."), "unknown dataset 'set5'"),
        (("--baseline", "bicubic", "--metrics", "psnr"), "needs the LR images"),
        (("--baseline", "lanczos", "--metrics", "psnr"), "unknown --baseline"),
    ],
)
def test_bad_options_are_clear_errors(folders, tmp_path, args, phrase):
    base = () if args[0] == "--dataset" else ("--pred", folders["pred"], "--gt", folders["gt"])
    fails_cleanly(run(*base, *args, "-o", tmp_path / "r"), phrase)


def test_lr_without_weights_or_pred_is_a_clear_error(folders, tmp_path):
    fails_cleanly(
        run("--lr", folders["lr"], "--gt", folders["gt"], "--metrics", "psnr", "-o", tmp_path / "r"), "--weights"
    )


def test_unreadable_image_is_a_listed_skip(folders, tmp_path):
    (folders["pred"] / "coffee.png").write_bytes(b"not an image")
    out = tmp_path / "r"
    result = run("--pred", folders["pred"], "--gt", folders["gt"], "--metrics", "psnr", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 2 and report["skipped"][0]["reason"].startswith("unreadable image")
