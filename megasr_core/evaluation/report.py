"""Evaluation reports: the JSON record and a Markdown table in the layout of the paper's Table 1.

``PAPER_MEGASR`` is the MegaSR column of Table 1 (MegaSR paper, Sec. 4.2), transcribed per test
set; DPED-iPhone has no ground truth, so the paper reports only no-reference metrics there.
"""

from __future__ import annotations

import math

from .scoring import METRICS

PAPER_MEGASR: dict[str, dict[str, float]] = {
    "realsr": {"psnr": 23.49, "ssim": 0.6903, "lpips": 0.3072, "niqe": 5.3795, "maniqa": 0.5574, "musiq": 70.0251, "clipiqa": 0.6790},
    "drealsr": {"psnr": 25.74, "ssim": 0.7367, "lpips": 0.3258, "niqe": 6.6276, "maniqa": 0.5098, "musiq": 64.1473, "clipiqa": 0.6853},
    "div2k-val": {"psnr": 22.05, "ssim": 0.5664, "lpips": 0.3157, "niqe": 4.8258, "maniqa": 0.5074, "musiq": 68.7602, "clipiqa": 0.6892},
    "dped-iphone": {"niqe": 6.7751, "maniqa": 0.4653, "musiq": 56.3767, "clipiqa": 0.6201},
}
DATASET_LABELS = {"realsr": "RealSR", "drealsr": "DRealSR", "div2k-val": "DIV2K-Val", "dped-iphone": "DPED-iPhone"}


def summarize(per_image: dict[str, dict[str, float]]) -> dict[str, dict[str, object]]:
    """``{metric: {key: value}}`` → ``{metric: {"mean": x, "per_image": {key: value}}}``."""
    return {name: {"mean": (sum(values.values()) / len(values)) if values else None, "per_image": dict(sorted(values.items()))}
            for name, values in per_image.items()}


def _format(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2f}" if name in ("psnr", "musiq") else f"{value:.4f}"


def markdown_table(report: dict) -> str:
    """Table 1's layout: one row per metric (↑/↓), columns for the paper's MegaSR, a baseline, ours."""
    dataset = report.get("dataset")
    paper = PAPER_MEGASR.get(dataset or "", {})
    label = DATASET_LABELS.get(dataset or "", "—")
    columns = []
    if paper:
        columns.append(("MegaSR (paper)", {k: {"mean": v} for k, v in paper.items()}))
    for name, block in report.get("baselines", {}).items():
        columns.append((name.capitalize(), block["metrics"]))
    columns.append(("Ours", report["metrics"]))
    header = "| Dataset | Metric | " + " | ".join(c for c, _ in columns) + " |"
    lines = [header, "|" + "---|" * (2 + len(columns))]
    for i, name in enumerate(report["metrics"]):
        spec = METRICS[name]
        cells = [_format(name, block.get(name, {}).get("mean")) for _, block in columns]
        lines.append(f"| {label if i == 0 else ''} | {spec.label}{'↓' if spec.lower_better else '↑'} | " + " | ".join(cells) + " |")
    notes = [f"{report['images']} images scored"]
    if report.get("skipped"):
        notes.append(f"{len(report['skipped'])} skipped (listed in the JSON report)")
    if report.get("settings", {}).get("crop_border"):
        notes.append(f"PSNR/SSIM with {report['settings']['crop_border']} border pixels cropped")
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + ".\n"
