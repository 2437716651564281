"""Each test set's naming and folder layouts, original and StableSR/SeeSR crop releases, pair as they should."""

from __future__ import annotations

import pytest

pyiqa = pytest.importorskip("pyiqa", reason="the [eval] extra")

from pathlib import Path

from PIL import Image

from megasr_core.evaluation.pairing import PairingError, attach_predictions, pair_dataset, pair_folders


def touch(root: Path, *relative: str) -> None:
    for rel in relative:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / rel)


def pairs(name: str, root: Path) -> dict[str, tuple[str, str | None]]:
    _, pairing = pair_dataset(name, root)
    return {
        s.key: (s.lr.relative_to(root).as_posix(), s.gt.relative_to(root).as_posix() if s.gt else None)
        for s in pairing.samples
    }


@pytest.mark.parametrize(
    "name, files, expected",
    [
        (
            "realsr",
            [
                "Canon/Test/4/Canon_001_HR.png",
                "Canon/Test/4/Canon_001_LR4.png",
                "Nikon/Test/4/Nikon_050_HR.png",
                "Nikon/Test/4/Nikon_050_LR4.png",
            ],
            {
                "Canon_001": ("Canon/Test/4/Canon_001_LR4.png", "Canon/Test/4/Canon_001_HR.png"),
                "Nikon_050": ("Nikon/Test/4/Nikon_050_LR4.png", "Nikon/Test/4/Nikon_050_HR.png"),
            },
        ),
        (
            "realsr",
            [
                "RealSRVal_crop128/test_HR/Canon_001_1.png",
                "RealSRVal_crop128/test_LR/Canon_001_1.png",
            ],  # StableSR's crops
            {"Canon_001_1": ("RealSRVal_crop128/test_LR/Canon_001_1.png", "RealSRVal_crop128/test_HR/Canon_001_1.png")},
        ),
        (
            "drealsr",
            ["Test_x4/test_HR/DSC_1454_x1.png", "Test_x4/test_LR/DSC_1454_x4.png"],
            {"DSC_1454": ("Test_x4/test_LR/DSC_1454_x4.png", "Test_x4/test_HR/DSC_1454_x1.png")},
        ),
        (
            "drealsr",
            ["DrealSRVal_crop128/test_HR/p_1.png", "DrealSRVal_crop128/test_LR/p_1.png"],
            {"p_1": ("DrealSRVal_crop128/test_LR/p_1.png", "DrealSRVal_crop128/test_HR/p_1.png")},
        ),
        (
            "div2k-val",
            [
                "DIV2K_valid_HR/0801.png",
                "DIV2K_valid_LR_bicubic/X4/0801x4.png",
                "DIV2K_valid_HR/0802.png",
                "DIV2K_valid_LR_bicubic/X4/0802x4.png",
            ],
            {
                "0801": ("DIV2K_valid_LR_bicubic/X4/0801x4.png", "DIV2K_valid_HR/0801.png"),
                "0802": ("DIV2K_valid_LR_bicubic/X4/0802x4.png", "DIV2K_valid_HR/0802.png"),
            },
        ),
        (
            "div2k-val",
            ["DIV2K_V2_val/gt/0000.png", "DIV2K_V2_val/lq/0000.png"],  # StableSR's synthetic DIV2K-Val
            {"0000": ("DIV2K_V2_val/lq/0000.png", "DIV2K_V2_val/gt/0000.png")},
        ),
        (
            "dped-iphone",
            ["iphone/1.jpg", "iphone/2.jpg"],
            {"iphone/1": ("iphone/1.jpg", None), "iphone/2": ("iphone/2.jpg", None)},
        ),
    ],
)
def test_layouts_pair_by_key(tmp_path, name, files, expected):
    touch(tmp_path, *files)
    assert pairs(name, tmp_path) == expected


def test_unrecognized_and_unpaired_files_are_listed(tmp_path):
    touch(tmp_path, "Canon_001_HR.png", "Canon_001_LR4.png", "Canon_002_HR.png", "readme.png")
    _, pairing = pair_dataset("realsr", tmp_path)
    assert [s.key for s in pairing.samples] == ["Canon_001"]
    reasons = {Path(s["file"]).name: s["reason"] for s in pairing.skipped}
    assert reasons["Canon_002_HR.png"] == "no matching LR file"
    assert "neither LR nor GT" in reasons["readme.png"]


def test_predictions_match_by_key_or_original_stems(tmp_path):
    touch(
        tmp_path / "set",
        "DIV2K_valid_HR/0801.png",
        "DIV2K_valid_LR_bicubic/X4/0801x4.png",
        "DIV2K_valid_HR/0802.png",
        "DIV2K_valid_LR_bicubic/X4/0802x4.png",
    )
    touch(tmp_path / "pred", "0801.png", "0802x4.png")  # by key, and by the LR's own stem
    _, pairing = pair_dataset("div2k-val", tmp_path / "set")
    attached = attach_predictions(pairing, tmp_path / "pred")
    assert {s.key: s.pred.name for s in attached.samples} == {"0801": "0801.png", "0802": "0802x4.png"}


def test_empty_or_missing_roots_are_errors(tmp_path):
    with pytest.raises(PairingError, match="no such folder"):
        pair_dataset("realsr", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairingError, match="holds no images"):
        pair_folders(pred=tmp_path / "empty")
    touch(tmp_path / "only_hr", "a_HR.png")
    with pytest.raises(PairingError, match="no RealSR pairs"):
        pair_dataset("realsr", tmp_path / "only_hr")
