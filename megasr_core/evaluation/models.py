"""The models one evaluation compares: where each one's outputs go and how its column is named.

``megasr eval --weights A --weights B`` super-resolves the same LR images with every model (any
family: MegaSR, SeeSR, SeeSR-Turbo) and scores each. One model keeps the original layout
(``OUTPUT/sr/``); several get a folder each (``OUTPUT/sr/<weights label>/``), so a rerun resumes
every model where it stopped. A column is named by the model's family title and weights label,
and says "untrained" when the weights cannot super-resolve, so nobody reads a random model's
numbers as a result.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megasr_core.identity import weights_label

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ModelRun:
    """One ``--weights`` source of an evaluation."""

    weights: Path  # a local folder (Hub ids are resolved before this)
    slug: str  # its folder name under ``OUTPUT/sr/`` when several models run
    outputs: Path


def _slug(label: str) -> str:
    """A weights label as a folder name: ``hf://org/name@abc`` → ``hf_org_name_abc``."""
    return _UNSAFE.sub("_", label).strip("._-") or "model"


def plan_models(weights: Sequence[Path], output: Path) -> list[ModelRun]:
    """One :class:`ModelRun` per weights folder, with unique output folders (a ValueError for a
    folder given twice: its column would only repeat)."""
    seen: dict[Path, Path] = {}
    for folder in weights:
        resolved = Path(folder).resolve()
        if resolved in seen:
            raise ValueError(f"--weights {folder} is given twice (as {seen[resolved]})")
        seen[resolved] = Path(folder)
    if len(weights) == 1:
        return [ModelRun(Path(weights[0]), _slug(weights_label(weights[0])), output / "sr")]
    runs: list[ModelRun] = []
    taken: set[str] = set()
    for folder in weights:
        base = _slug(weights_label(folder))
        slug, n = base, 2
        while slug.lower() in taken:  # two folders of the same name (case-insensitive file systems too)
            slug, n = f"{base}-{n}", n + 1
        taken.add(slug.lower())
        runs.append(ModelRun(Path(folder), slug, output / "sr" / slug))
    return runs


def column_label(identity: dict, name: str | None = None) -> str:
    """``"SeeSR (seesr-weights)"``, ``"MegaSR (tiny, untrained)"``: title, weights (or ``name``), trained or not."""
    mark = "" if identity["trained"] else ", untrained"
    return f"{identity['title']} ({name or identity['weights']}{mark})"


def column_labels(runs: Sequence[ModelRun], identities: Sequence[dict]) -> list[str]:
    """One label per model; where two would read the same (folders of the same name), their output
    folder names tell them apart."""
    plain = [column_label(identity) for identity in identities]
    return [
        column_label(identity, run.slug) if plain.count(label) > 1 else label
        for run, identity, label in zip(runs, identities, plain)
    ]
