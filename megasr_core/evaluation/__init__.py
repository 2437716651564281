"""``megasr eval``: the paper's Table 1 metrics (through pyiqa) on the standard test sets.

Needs the ``[eval]`` extra (pyiqa, torchvision). Modules: ``pairing`` (which files belong
together), ``metric_weights`` (local weight files, never downloaded), ``scoring`` (pyiqa metrics,
batched), ``models`` (the models compared: output folders, column labels), ``generate`` (each
model's outputs, of any family; bicubic baseline), ``paper`` (Table 1's SeeSR and MegaSR figures),
``report`` (JSON, Table-1 Markdown), ``runner`` (one run end to end).
"""

from .metric_weights import MetricWeightsError
from .pairing import DATASETS, PairingError
from .runner import EvalSettings, evaluate
from .scoring import METRICS, PAPER_METRICS, parse_metrics

__all__ = [
    "DATASETS",
    "METRICS",
    "PAPER_METRICS",
    "EvalSettings",
    "MetricWeightsError",
    "PairingError",
    "evaluate",
    "parse_metrics",
]
