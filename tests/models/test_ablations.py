"""Ablation switches (paper Tables 3-4): the switched-off module is absent and its input unused."""

from __future__ import annotations

import pytest
import torch

from megasr_core.models import MegaSRConfig
from tests.models.helpers import build_denoiser, make_inputs, perturb_zero_init


def keys(model) -> list[str]:
    return list(model.state_dict())


def sensitivity(model, inputs, field, key=None) -> float:
    """Largest output change when one input is replaced by another random one."""
    other = make_inputs(seed=9)
    with torch.no_grad():
        reference = model(**inputs)
        if key is None:
            changed = {**inputs, field: other[field]}
        else:
            changed = {**inputs, "guidance": dict(inputs["guidance"], **{key: other["guidance"][key]})}
        return float((model(**changed) - reference).abs().max())


@pytest.fixture()
def inputs():
    return make_inputs(seed=0)


def test_without_csm(tiny_base, inputs):
    model = build_denoiser(tiny_base, use_csm=False)
    perturb_zero_init(model)
    assert not [k for k in keys(model) if ".csm." in k]
    assert sensitivity(model, inputs, "image_embeds") == 0.0
    assert sensitivity(model, inputs, "guidance", "hed") > 0


def test_without_hed(tiny_base, inputs):
    model = build_denoiser(tiny_base, use_hed=False)
    perturb_zero_init(model)
    assert not [k for k in keys(model) if ".hed_saft." in k]
    assert [k for k in keys(model) if ".fused_saft." in k]
    assert sensitivity(model, inputs, "guidance", "hed") == 0.0
    assert sensitivity(model, inputs, "guidance", "depth") > 0
    assert model.config.guidance_keys == ("depth", "seg")


def test_without_depth_and_segmentation(tiny_base, inputs):
    model = build_denoiser(tiny_base, use_depth_seg=False)
    perturb_zero_init(model)
    assert not [k for k in keys(model) if ".fusion." in k or ".fused_saft." in k]
    assert sensitivity(model, inputs, "guidance", "depth") == 0.0
    assert sensitivity(model, inputs, "guidance", "seg") == 0.0
    assert sensitivity(model, inputs, "guidance", "hed") > 0
    assert model.config.guidance_keys == ("hed",)


def test_without_any_guidance(tiny_base, inputs):
    model = build_denoiser(tiny_base, use_guidance=False)
    perturb_zero_init(model)
    assert not [k for k in keys(model) if ".msfm." in k]
    for key in ("hed", "depth", "seg"):
        assert sensitivity(model, inputs, "guidance", key) == 0.0
    assert sensitivity(model, inputs, "image_embeds") > 0
    assert model.config.guidance_keys == ()


def test_config_json_round_trip_and_unknown_fields(tmp_path):
    config = MegaSRConfig(preset="x", use_hed=False, msfm_hidden_channels=7)
    config.save(tmp_path)
    assert MegaSRConfig.load(tmp_path) == config
    (tmp_path / "megasr.json").write_text('{"use_csm": true, "use_magic": 1}')
    with pytest.raises(ValueError, match="use_magic"):
        MegaSRConfig.load(tmp_path)
