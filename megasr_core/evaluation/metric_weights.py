"""Where each learned metric's weight files come from, without ever downloading them.

pyiqa fetches weights on first use: its own files through ``load_file_from_url`` into
``pyiqa.utils.download_util.DEFAULT_CACHE_DIR``, torchvision backbones (AlexNet for LPIPS, VGG16
for DISTS) into torch hub's ``checkpoints/``, OpenAI CLIP into hub's ``clip/``. We look each
file up ourselves — ``--metric-weights DIR`` first, then those caches — and hand pyiqa the local
path through its own arguments (``pretrained_model_path``, CLIP's ``backbone`` path) or a
temporary torch hub dir holding links to the files. A missing file is a ``MetricWeightsError``
naming the file and the URL pyiqa would have used. The file names and URLs are read from the
installed pyiqa/torchvision, so they follow the versions in use.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse


class MetricWeightsError(FileNotFoundError):
    """A metric's weight file is not on disk (we never download it)."""


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs: ``role`` says how it reaches pyiqa."""

    url: str
    role: str  # "model" (pyiqa's own checkpoint), "torchvision" (hub checkpoints/), "clip"

    @property
    def name(self) -> str:
        return os.path.basename(urlparse(self.url).path)


def required_files(metric: str) -> list[WeightFile]:
    """The files ``metric`` needs, as the installed pyiqa names them (NIQE: none, it is vendored)."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    if metric == "lpips":
        from pyiqa.archs.lpips_arch import default_model_urls

        return [
            WeightFile(default_model_urls["0.1_alex"], "model"),
            WeightFile(AlexNet_Weights.IMAGENET1K_V1.url, "torchvision"),
        ]
    if metric == "dists":
        from pyiqa.archs.dists_arch import default_model_urls

        return [
            WeightFile(default_model_urls["url"], "model"),
            WeightFile(VGG16_Weights.IMAGENET1K_V1.url, "torchvision"),
        ]
    if metric == "musiq":
        from pyiqa.archs.musiq_arch import default_model_urls

        return [WeightFile(default_model_urls["koniq10k"], "model")]
    if metric == "maniqa":
        from pyiqa.archs.maniqa_arch import default_model_urls

        return [WeightFile(default_model_urls["koniq"], "model")]
    if metric == "clipiqa":
        from pyiqa.archs.clip_model import _MODELS

        return [WeightFile(_MODELS["RN50"], "clip")]
    return []


def search_dirs(metric_weights: Path | None) -> list[Path]:
    """Where files are looked for, in order: ``--metric-weights``, pyiqa's cache, torch hub's caches."""
    import torch.hub
    from pyiqa.utils import download_util

    hub = Path(torch.hub.get_dir())
    dirs = [metric_weights] if metric_weights is not None else []
    return dirs + [Path(download_util.DEFAULT_CACHE_DIR), hub / "checkpoints", hub / "clip"]


def locate(metric: str, metric_weights: Path | None) -> dict[str, Path]:
    """``{file name: local path}`` for every file ``metric`` needs, or a MetricWeightsError for the first missing."""
    if metric_weights is not None and not metric_weights.is_dir():
        raise MetricWeightsError(f"--metric-weights {metric_weights} is not a folder")
    found: dict[str, Path] = {}
    dirs = search_dirs(metric_weights)
    for file in required_files(metric):
        path = next((d / file.name for d in dirs if (d / file.name).is_file()), None)
        if path is None:
            where = metric_weights if metric_weights is not None else dirs[0]
            raise MetricWeightsError(
                f"{metric}: weight file {file.name} not found (looked in {', '.join(map(str, dirs))}); "
                f"download it from {file.url} into {where}"
            )
        found[file.name] = path
    return found


@contextlib.contextmanager
def torch_hub_with(files: dict[str, Path]) -> Iterator[None]:
    """Point torch hub at a temporary dir whose ``checkpoints/`` links ``files`` (torchvision finds them there)."""
    import torch.hub

    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="megasr-hub-") as hub:
        (Path(hub) / "checkpoints").mkdir()
        for name, path in files.items():
            (Path(hub) / "checkpoints" / name).symlink_to(path.resolve())
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


def niqe_parameters_mat(directory: Path) -> Path:
    """Write the vendored NIQE model (BasicSR's, Apache-2.0) as the .mat pyiqa's NIQE reads; returns its path."""
    import numpy as np
    import scipy.io

    with resources.files("megasr_core.assets").joinpath("niqe_pris_params.npz").open("rb") as handle:
        params = np.load(handle)
        mat = {
            "mu_prisparam": params["mu_pris_param"],
            "cov_prisparam": params["cov_pris_param"],
            "gaussian_window": params["gaussian_window"],
        }
    path = directory / "niqe_modelparameters.mat"
    scipy.io.savemat(path, mat)
    return path
