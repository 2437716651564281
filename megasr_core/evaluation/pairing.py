"""Which files belong together: (LR, ground truth, prediction) samples from folders or a named test set.

Pairing is by a *key* (the file stem with the set's resolution suffix removed), so RealSR's
``Canon_001_LR4.png`` and ``Canon_001_HR.png`` meet as ``Canon_001``. What cannot be paired is
returned as a listed skip, never raised: one stray file should not cost a whole evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class PairingError(ValueError):
    """The inputs cannot be evaluated at all (missing folder, nothing paired)."""


@dataclass(frozen=True)
class Sample:
    key: str
    lr: Path | None = None
    gt: Path | None = None
    pred: Path | None = None


@dataclass
class Pairing:
    samples: list[Sample]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file": ..., "reason": ...}


@dataclass(frozen=True)
class DatasetLayout:
    """How a test set names its files. ``lr_suffix``/``gt_suffix`` end the stem (before the extension)."""

    name: str
    lr_suffix: str | None
    gt_suffix: str | None
    has_gt: bool = True
    note: str = ""


# Both the original releases and StableSR's crop release (test_LR/ + test_HR/, or lq/ + gt/, same
# names) are recognized: a file is LR or GT by its name suffix first, else by its folder's name.
DATASETS: dict[str, DatasetLayout] = {
    "realsr": DatasetLayout(
        "RealSR", r"_LR4", r"_HR", note="RealSR V3 Test/4: *_LR4.png ↔ *_HR.png; or test_LR/ + test_HR/"
    ),
    "drealsr": DatasetLayout("DRealSR", r"_x4", r"_x1", note="DRealSR Test_x4: test_LR/*_x4.png ↔ test_HR/*_x1.png"),
    "div2k-val": DatasetLayout(
        "DIV2K-Val", r"x4", None, note="DIV2K_valid_LR_bicubic/X4/0801x4.png ↔ DIV2K_valid_HR/0801.png; or lq/ + gt/"
    ),
    "dped-iphone": DatasetLayout("DPED-iPhone", None, None, has_gt=False, note="LR photos only (no-reference metrics)"),
}

_LR_FOLDERS = re.compile(r"(^|[_\-])(lr|lq|low|x4|lr_bicubic)([_\-]|$)", re.IGNORECASE)
_GT_FOLDERS = re.compile(r"(^|[_\-])(hr|gt|high)([_\-]|$)", re.IGNORECASE)


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` (sorted); a missing or empty folder is a PairingError."""
    if not folder.is_dir():
        raise PairingError(f"no such folder: {folder}")
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(
        p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise PairingError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _by_stem(files: list[Path], role: str, skipped: list[dict[str, str]]) -> dict[str, Path]:
    table: dict[str, Path] = {}
    for file in files:
        if file.stem in table:
            skipped.append(
                {"file": str(file), "reason": f"two {role} files with the stem {file.stem!r} ({table[file.stem].name})"}
            )
            continue
        table[file.stem] = file
    return table


def pair_folders(pred: Path | None = None, gt: Path | None = None, lr: Path | None = None) -> Pairing:
    """Pair the files of up to three folders by stem. The first folder given drives the sample list."""
    skipped: list[dict[str, str]] = []
    tables = {
        role: _by_stem(list_images(folder), role, skipped)
        for role, folder in (("pred", pred), ("lr", lr), ("gt", gt))
        if folder is not None
    }
    if not tables:
        raise PairingError("nothing to evaluate: give --pred, --lr or --dataset")
    keys = sorted(set().union(*tables.values()))
    samples = []
    for key in keys:
        missing = [role for role, table in tables.items() if key not in table]
        if missing:
            present = next(table[key] for table in tables.values() if key in table)
            skipped.append({"file": str(present), "reason": f"no matching {' or '.join(missing)} file"})
            continue
        samples.append(Sample(key=key, **{role: table[key] for role, table in tables.items()}))
    if not samples:
        raise PairingError(f"no file could be paired ({len(skipped)} unpaired); files pair by identical stems")
    return Pairing(samples, skipped)


def _classify(file: Path, root: Path, layout: DatasetLayout) -> tuple[str, str] | None:
    """``(role, key)`` of a file in a test-set tree, or None if it is neither LR nor GT."""
    stem = file.stem
    if not layout.has_gt:
        return "lr", str(file.relative_to(root).with_suffix(""))
    for role, suffix in (("lr", layout.lr_suffix), ("gt", layout.gt_suffix)):
        if suffix and re.search(f"{suffix}$", stem, re.IGNORECASE):
            return role, re.sub(f"{suffix}$", "", stem, flags=re.IGNORECASE)
    for part in reversed(file.relative_to(root).parts[:-1]):
        if _LR_FOLDERS.search(part):
            return "lr", stem
        if _GT_FOLDERS.search(part):
            return "gt", stem
    return None


def pair_dataset(name: str, root: Path) -> tuple[DatasetLayout, Pairing]:
    """The samples of test set ``name`` under ``root`` (LR always; GT where the set has it)."""
    if name not in DATASETS:
        raise PairingError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    layout = DATASETS[name]
    skipped: list[dict[str, str]] = []
    tables: dict[str, dict[str, Path]] = {"lr": {}, "gt": {}}
    for file in list_images(root, recursive=True):
        found = _classify(file, root, layout)
        if found is None:
            skipped.append(
                {"file": str(file), "reason": f"neither LR nor GT by {layout.name}'s naming ({layout.note})"}
            )
            continue
        role, key = found
        if key in tables[role]:
            skipped.append({"file": str(file), "reason": f"a second {role} file for {key!r} ({tables[role][key]})"})
            continue
        tables[role][key] = file
    samples: list[Sample] = []
    for key in sorted(set(tables["lr"]) | set(tables["gt"])):
        lr, gt = tables["lr"].get(key), tables["gt"].get(key)
        if lr is None:
            skipped.append({"file": str(gt), "reason": "no matching LR file"})
        elif layout.has_gt and gt is None:
            skipped.append({"file": str(lr), "reason": "no matching GT file"})
        else:
            samples.append(Sample(key=key, lr=lr, gt=gt))
    if not samples:
        raise PairingError(
            f"no {layout.name} pairs under {root} (expected {layout.note}); {len(skipped)} files skipped"
        )
    return layout, Pairing(samples, skipped)


def attach_predictions(pairing: Pairing, pred: Path) -> Pairing:
    """Give each sample its prediction in ``pred``: the file whose stem is the key, the LR or the GT stem."""
    table = _by_stem(list_images(pred), "pred", pairing.skipped)
    samples = []
    for sample in pairing.samples:
        names = [sample.key.replace("/", "_")] + [p.stem for p in (sample.lr, sample.gt) if p is not None]
        found = next((table[n] for n in names if n in table), None)
        if found is None:
            pairing.skipped.append(
                {
                    "file": str(sample.lr or sample.gt),
                    "reason": f"no prediction in {pred} (looked for {', '.join(names)})",
                }
            )
            continue
        samples.append(Sample(sample.key, sample.lr, sample.gt, found))
    if not samples:
        raise PairingError(f"no prediction in {pred} matches the test set's files")
    return Pairing(samples, pairing.skipped)
