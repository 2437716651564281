"""Each learned metric loads from a local file of its real checkpoint's layout, and a missing file is a clear error.

The files are written here: the real architecture (pyiqa's, torchvision's, CLIP's) built on the meta
device, its state dict filled with compact random tensors (see helpers.compact_random) and saved
under the exact file name our loader looks for. Strict loads (MUSIQ, MANIQA, CLIP, the torchvision
backbones) check every key and shape; LPIPS and DISTS load non-strictly in pyiqa, so for those
we check that the values we wrote are the values in the network.
"""

from __future__ import annotations

import pytest

pyiqa = pytest.importorskip("pyiqa", reason="the [eval] extra")

import math
import re
from pathlib import Path

import numpy as np
import torch
import torchvision

from megasr_core.evaluation.metric_weights import MetricWeightsError, required_files, torch_hub_with
from megasr_core.evaluation.scoring import _maniqa_backbone_without_download, build_metric
from tests.evaluation.helpers import save_compact, save_compact_torchscript


def file_named(metric: str, role: str) -> str:
    return next(f.name for f in required_files(metric) if f.role == role)


def write_lpips(folder: Path) -> dict[str, torch.Tensor]:
    from pyiqa.archs.lpips_arch import LPIPS

    with torch.device("meta"):
        alexnet = torchvision.models.alexnet()
    backbone = folder / file_named("lpips", "torchvision")
    save_compact(alexnet, backbone)
    with torch_hub_with({backbone.name: backbone}):
        net = LPIPS(pretrained=False, net="alex", version="0.1")
    linear = {
        k: v for k, v in net.state_dict().items() if re.match(r"lin\d\.", k)
    }  # what LPIPS_v0.1_alex holds (lins.N alias them)
    return save_compact(linear, folder / file_named("lpips", "model"), seed=1)


def write_dists(folder: Path) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        vgg = torchvision.models.vgg16()
    save_compact(vgg, folder / file_named("dists", "torchvision"))
    weights = {
        "alpha": torch.rand(1, 1475, 1, 1) * 0.1,
        "beta": torch.rand(1, 1475, 1, 1) * 0.1,
    }  # DISTS_weights' two keys
    torch.save(weights, folder / file_named("dists", "model"))
    return weights


def write_musiq(folder: Path) -> dict[str, torch.Tensor]:
    from pyiqa.archs.musiq_arch import MUSIQ

    with torch.device("meta"):
        net = MUSIQ(pretrained=False)
    return save_compact(net, folder / file_named("musiq", "model"))


def write_maniqa(folder: Path) -> dict[str, torch.Tensor]:
    from pyiqa.archs.maniqa_arch import MANIQA

    with _maniqa_backbone_without_download():  # not on meta: timm's ViT reads values while it builds
        net = MANIQA(pretrained=False, train_dataset="koniq", scale=0.8)
    return save_compact(net, folder / file_named("maniqa", "model"))


def write_clip_rn50(folder: Path) -> dict[str, torch.Tensor]:
    """OpenAI CLIP RN50's layout, as TorchScript like the real RN50.pt (pyiqa's CLIP loader reads
    a plain state-dict file only after a failed TorchScript read of the same handle, which fails)."""
    from pyiqa.archs.clip_model import CLIP

    with torch.device("meta"):
        net = CLIP(
            embed_dim=1024,
            image_resolution=224,
            vision_layers=(3, 4, 6, 3),
            vision_width=64,
            vision_patch_size=None,
            context_length=77,
            vocab_size=49408,
            transformer_width=512,
            transformer_heads=8,
            transformer_layers=12,
        )
    return save_compact_torchscript(net.state_dict(), folder / file_named("clipiqa", "clip"))


WRITERS = {
    "lpips": write_lpips,
    "dists": write_dists,
    "musiq": write_musiq,
    "maniqa": write_maniqa,
    "clipiqa": write_clip_rn50,
}
OPTIONS = {"maniqa": {"test_sample": 1}}  # one 224² crop instead of 20: the same network, 20× faster on a CPU
PROBES = {  # a tensor of the file → where it lands in the built metric
    "lpips": ("lin0.model.1.weight", lambda m: m.net.lin0.model[1].weight),
    "dists": ("alpha", lambda m: m.net.alpha),
    "musiq": ("head.weight", lambda m: m.net.head.weight),
    "maniqa": ("fc_score.3.weight", lambda m: m.net.fc_score[3].weight),
    "clipiqa": ("visual.attnpool.c_proj.weight", lambda m: m.net.clip_model[0].visual.attnpool.c_proj.weight),
}


@pytest.mark.parametrize("metric", list(WRITERS))
def test_learned_metric_loads_a_file_of_its_layout_and_scores(metric, offline, tmp_path, photos):
    folder = tmp_path / "metric-weights"
    folder.mkdir()
    written = WRITERS[metric](folder)
    built = build_metric(metric, device="cpu", metric_weights=folder, workdir=tmp_path, **OPTIONS.get(metric, {}))
    key, where = PROBES[metric]
    expected = (
        written[key].half().float() if metric == "clipiqa" else written[key]
    )  # CLIP's loader passes weights through fp16
    torch.testing.assert_close(where(built).float().cpu(), expected.float())
    image = torch.from_numpy(np.asarray(photos["chelsea"].resize((224, 224)), dtype=np.float32) / 255).permute(2, 0, 1)[
        None
    ]
    with torch.inference_mode():
        value = built(image, image.flip(-1)) if metric in ("lpips", "dists") else built(image)
    assert math.isfinite(float(value.reshape(-1)[0]))
    assert offline == []  # nothing was downloaded, not even a backbone


@pytest.mark.parametrize("metric", list(WRITERS))
def test_missing_weight_file_names_it_and_its_url(metric, offline, tmp_path):
    folder = tmp_path / "metric-weights"
    folder.mkdir()
    with pytest.raises(MetricWeightsError) as error:
        build_metric(metric, device="cpu", metric_weights=folder, workdir=tmp_path)
    first = required_files(metric)[0]
    assert first.name in str(error.value) and first.url in str(error.value) and str(folder) in str(error.value)
    assert offline == []


def test_file_in_pyiqa_cache_is_found_without_metric_weights(offline, tmp_path):
    """Without --metric-weights, pyiqa's own cache (where pyiqa would have downloaded it) is used."""
    from pyiqa.utils import download_util

    write_musiq(Path(download_util.DEFAULT_CACHE_DIR))
    build_metric("musiq", device="cpu", metric_weights=None, workdir=tmp_path)
    assert offline == []
