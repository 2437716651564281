"""NIQE runs from the vendored BasicSR parameters (megasr_core/assets/niqe_pris_params.npz), offline."""

from __future__ import annotations

import pytest

pyiqa = pytest.importorskip("pyiqa", reason="the [eval] extra")

from importlib import resources

import numpy as np
import scipy.io

from megasr_core.evaluation.metric_weights import niqe_parameters_mat
from megasr_core.evaluation.scoring import build_metric, load_rgb
from tests.evaluation.helpers import blurred, noisy


def test_vendored_parameters_are_package_data():
    """Found through importlib.resources (so an installed package has them, not only this checkout)."""
    with resources.files("megasr_core.assets").joinpath("niqe_pris_params.npz").open("rb") as handle:
        params = np.load(handle)
        assert params["mu_pris_param"].shape == (1, 36)
        assert params["cov_pris_param"].shape == (36, 36)
        assert params["gaussian_window"].shape == (7, 7)
        np.testing.assert_allclose(params["cov_pris_param"], params["cov_pris_param"].T)  # a covariance
        assert params["gaussian_window"].sum() == pytest.approx(1.0)


def test_mat_file_holds_the_keys_pyiqa_reads(tmp_path):
    path = niqe_parameters_mat(tmp_path)
    mat = scipy.io.loadmat(path)
    assert mat["mu_prisparam"].shape == (1, 36) and mat["cov_prisparam"].shape == (36, 36)


def test_niqe_scores_without_any_download(offline, tmp_path, photos):
    """Empty HOME and caches, every download route raising: NIQE still builds and scores."""
    metric = build_metric("niqe", device="cpu", metric_weights=None, workdir=tmp_path)
    paths = {}
    for name, image in (
        ("clean", photos["astronaut"]),
        ("blurred", blurred(photos["astronaut"], 2.5)),
        ("noisy", noisy(photos["astronaut"], 25.0)),
    ):
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    scores = {name: float(metric(load_rgb(path)[None])) for name, path in paths.items()}
    assert offline == []  # no download attempted
    assert all(np.isfinite(v) and v > 0 for v in scores.values())
    # NIQE is lower-better: a clean photo is more natural than its blurred or noisy copy.
    assert scores["clean"] < scores["blurred"] and scores["clean"] < scores["noisy"]
