"""Fixtures of the evaluation tests: real photo crops, their folders, tiny weights of each family,
and isolated, download-refusing caches."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.evaluation.helpers import blurred, crop, jpeg, noisy

DEGRADE = {
    "astronaut": lambda im: blurred(im, 1.5),
    "chelsea": lambda im: noisy(im, 12.0),
    "coffee": lambda im: jpeg(im, 20),
}


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Three 128² crops of scikit-image's RGB photos (faces, fur, textures)."""
    from skimage import data

    return {
        "astronaut": crop(data.astronaut(), 96, 160),
        "chelsea": crop(data.chelsea(), 40, 120),
        "coffee": crop(data.coffee(), 100, 200),
    }


@pytest.fixture()
def folders(tmp_path, photos) -> dict[str, Path]:
    """gt/ (128² photos), pred/ (blurred, noisy, JPEG copies), lr/ (32² bicubic downscales)."""
    out = {name: tmp_path / name for name in ("gt", "pred", "lr")}
    for folder in out.values():
        folder.mkdir()
    for name, photo in photos.items():
        photo.save(out["gt"] / f"{name}.png")
        DEGRADE[name](photo).save(out["pred"] / f"{name}.png")
        photo.resize((32, 32), Image.Resampling.BICUBIC).save(out["lr"] / f"{name}.png")
    return out


@pytest.fixture(scope="session")
def family_weights(tmp_path_factory):
    """Make tiny (random, untrained) weights of a family once per session: ``family_weights("seesr")``."""
    from megasr_core.weights.tiny import init_tiny

    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = init_tiny(tmp_path_factory.mktemp("family-weights") / f"{family}-tiny", family=family)
        return made[family]

    return make


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """Empty HOME / torch hub / pyiqa caches, and every download route of pyiqa and torch raising."""
    import torch.hub
    from pyiqa.utils import download_util

    home = tmp_path / "home"
    home.mkdir()
    for var in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(home / "hub"))
    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(home / "hub" / "pyiqa"))
    attempts: list[str] = []

    def refuse(url, *args, **kwargs):
        attempts.append(str(url))
        raise AssertionError(f"download attempted: {url}")

    monkeypatch.setattr(download_util, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)
    yield attempts
    torch.hub.set_dir(previous)
