"""Evaluation reports: the JSON record and a Markdown table in the layout of the paper's Table 1.

Columns, left to right: the paper's SeeSR and MegaSR figures for the test set (``paper``), the
bicubic baseline when asked for, then one column per evaluated model (labelled by family title
and weights, "untrained" where it is), or "Ours" for ``--pred`` outputs.
"""

from __future__ import annotations

import math

from .paper import PAPER_MEGASR, PAPER_SEESR, paper_figures
from .scoring import METRICS

__all__ = ["DATASET_LABELS", "PAPER_MEGASR", "PAPER_SEESR", "markdown_table", "summarize"]

DATASET_LABELS = {"realsr": "RealSR", "drealsr": "DRealSR", "div2k-val": "DIV2K-Val", "dped-iphone": "DPED-iPhone"}


def summarize(per_image: dict[str, dict[str, float]]) -> dict[str, dict[str, object]]:
    """``{metric: {key: value}}`` → ``{metric: {"mean": x, "per_image": {key: value}}}``."""
    return {
        name: {
            "mean": (sum(values.values()) / len(values)) if values else None,
            "per_image": dict(sorted(values.items())),
        }
        for name, values in per_image.items()
    }


def _format(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2f}" if name in ("psnr", "musiq") else f"{value:.4f}"


def _cell(text: str) -> str:
    """A table cell's text: a ``|`` in a folder name would split the column."""
    return text.replace("|", "\\|")


def _columns(report: dict) -> list[tuple[str, dict]]:
    columns = [
        (f"{method} (paper)", {k: {"mean": v} for k, v in figures.items()})
        for method, figures in paper_figures(report.get("dataset")).items()
    ]
    for name, block in report.get("baselines", {}).items():
        columns.append((name.capitalize(), block["metrics"]))
    models = report.get("models") or []
    columns += [(model["label"], model["metrics"]) for model in models] or [("Ours", report["metrics"])]
    return columns


def _notes(report: dict) -> list[str]:
    notes = [f"{report['images']} images scored"]
    if report.get("skipped"):
        notes.append(f"{len(report['skipped'])} skipped (listed in the JSON report)")
    if report.get("settings", {}).get("crop_border"):
        notes.append(f"PSNR/SSIM with {report['settings']['crop_border']} border pixels cropped")
    for model in report.get("models") or []:
        steps = model["steps"]
        note = f"{model['label']}: {steps} step{'' if steps == 1 else 's'}, CFG {model['guidance_scale']:g}"
        if model.get("sampler", "ddpm") != "ddpm":
            note += f", sampler {model['sampler']}"
        if model.get("cfg_interval"):
            note += f", CFG on {model['cfg_interval'][0]:g}-{model['cfg_interval'][1]:g} of the steps"
        if not model["trained"]:
            note += f"; UNTRAINED ({model['untrained_reason']}), its numbers are not a super-resolution result"
        notes.append(note)
    if paper_figures(report.get("dataset")):
        notes.append("(paper): the MegaSR paper's Table 1 on the full test set")
    return notes


def markdown_table(report: dict) -> str:
    """Table 1's layout: one row per metric (↑/↓), one column per method (see the module docstring)."""
    label = DATASET_LABELS.get(report.get("dataset") or "", "—")
    columns = _columns(report)
    header = "| Dataset | Metric | " + " | ".join(_cell(c) for c, _ in columns) + " |"
    lines = [header, "|" + "---|" * (2 + len(columns))]
    for i, name in enumerate(report["metrics"]):
        spec = METRICS[name]
        cells = [_format(name, block.get(name, {}).get("mean")) for _, block in columns]
        lines.append(
            f"| {label if i == 0 else ''} | {spec.label}{'↓' if spec.lower_better else '↑'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {_cell(n)}" for n in _notes(report)) + "\n"
