"""fp8 linear layers (``pipelines/precision.py``): which layers convert, what the output does, and
the refusals a user can meet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torchao", reason="the [fp8] extra")

from megasr_core.pipelines import MegaSRPipeline  # noqa: E402
from megasr_core.pipelines import precision as precision_module  # noqa: E402
from megasr_core.pipelines.precision import fp8_problem, use_precision  # noqa: E402


def float8_layers(pipeline) -> list[str]:
    nets = {"unet": pipeline.denoiser.unet, "controlnet": pipeline.denoiser.controlnet}
    return [
        f"{net_name}.{name}"
        for net_name, net in nets.items()
        for name, module in net.named_modules()
        if isinstance(module, nn.Linear) and type(module.weight).__name__ == "Float8Tensor"
    ]


@pytest.fixture(scope="module")
def pipelines():
    return MegaSRPipeline.from_preset("tiny", seed=3), MegaSRPipeline.from_preset("tiny", seed=3, precision="fp8")


def test_fp8_converts_the_denoisers_linear_layers_and_says_so(pipelines):
    full, fp8 = pipelines
    assert float8_layers(full) == [] and full.precision == "full" and full.identity.precision == "full"
    converted = float8_layers(fp8)
    assert len(converted) > 20 and fp8.precision == "fp8" and fp8.identity.to_dict()["precision"] == "fp8"
    assert any(".attn1.to_q" in name for name in converted) and any(".ff." in name for name in converted)
    # the VAE, the text encoder and every convolution keep their dtype
    for module in (fp8.vae, fp8.text_encoder, fp8.denoiser.unet.conv_in):
        assert all(type(p).__name__ != "Float8Tensor" for p in module.parameters())


def test_a_zero_row_layer_is_left_in_full_precision():
    pipeline = MegaSRPipeline.from_preset("tiny", seed=3)
    layer = pipeline.denoiser.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_v
    with torch.no_grad():
        layer.weight[0].zero_()  # a zero scale would turn this row into NaN
    use_precision(pipeline, "fp8")
    assert type(layer.weight).__name__ != "Float8Tensor"


def test_fp8_output_stays_close_to_full_precision_but_is_not_the_same(pipelines, small_cat):
    full, fp8 = pipelines
    a = np.asarray(full(small_cat, scale=4, seed=1, num_inference_steps=3).images[0], dtype=np.float64)
    b = np.asarray(fp8(small_cat, scale=4, seed=1, num_inference_steps=3).images[0], dtype=np.float64)
    difference = np.abs(a - b)
    assert 0 < difference.mean() < 3, difference.mean()  # 8-bit levels: a small, real drift


def test_unknown_precisions_and_old_gpus_are_refused(monkeypatch):
    pipeline = MegaSRPipeline.from_preset("tiny")
    with pytest.raises(ValueError, match="precision must be one of full, fp8, got 'fp16'"):
        use_precision(pipeline, "fp16")
    assert use_precision(pipeline, "full") == 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    message = fp8_problem(torch.device("cuda"))
    assert message is not None and "8.9 or newer" in message and "A100" in message and "8.0" in message
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_problem(torch.device("cuda")) is None
    assert fp8_problem(torch.device("cpu")) is None and "mps" in fp8_problem(torch.device("mps"))


def test_without_torchao_the_message_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name == "torchao" or name.startswith("torchao."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    assert "pip install 'megasr[fp8]'" in precision_module.fp8_problem(torch.device("cpu"))
