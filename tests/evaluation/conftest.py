"""Fixtures of the evaluation tests: real photo crops and isolated, download-refusing caches."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.evaluation.helpers import crop


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Three 128² crops of scikit-image's RGB photos (faces, fur, textures)."""
    from skimage import data

    return {"astronaut": crop(data.astronaut(), 96, 160), "chelsea": crop(data.chelsea(), 40, 120),
            "coffee": crop(data.coffee(), 100, 200)}


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
