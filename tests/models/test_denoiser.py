"""MegaSRDenoiser: identity at initialization, sensitivity once trained, input checks."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from tests.models.helpers import TINY, build_denoiser, make_inputs, perturb_zero_init


def plain_diffusers(tiny_base, inputs: dict) -> torch.Tensor:
    unet, controlnet = tiny_base
    down, mid = controlnet(
        inputs["latents"],
        inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        controlnet_cond=inputs["control_image"],
        conditioning_scale=1.0,
        return_dict=False,
    )
    return unet(
        inputs["latents"],
        inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]


@torch.no_grad()
def test_fresh_denoiser_equals_plain_controlnet_unet_bit_for_bit(tiny_base):
    model = build_denoiser(tiny_base)
    base_inputs = make_inputs(seed=0)
    expected = plain_diffusers(tiny_base, base_inputs)
    # Whatever the image tokens and guidance maps hold, the output is the plain SD2 one.
    for seed, scale in [(0, 1.0), (1, 100.0), (2, -3.0)]:
        other = make_inputs(seed=seed)
        inputs = dict(base_inputs)
        inputs["image_embeds"] = other["image_embeds"] * scale
        inputs["guidance"] = {k: v * abs(scale) for k, v in other["guidance"].items()}
        out = model(**inputs)
        assert torch.equal(out, expected)
    # Without image tokens and guidance at all: also identical.
    out = model(**{**base_inputs, "image_embeds": None, "guidance": None})
    assert torch.equal(out, expected)


@torch.no_grad()
def test_trained_modules_make_every_input_matter(tiny_base):
    model = build_denoiser(tiny_base)
    assert perturb_zero_init(model) > 0
    inputs = make_inputs(seed=0)
    reference = model(**inputs)
    assert not torch.equal(reference, plain_diffusers(tiny_base, inputs))
    changed = make_inputs(seed=5)

    out = model(**{**inputs, "image_embeds": changed["image_embeds"]})
    assert (out - reference).abs().max() > 1e-4, "image_embeds does not reach the output"
    for key in ("hed", "depth", "seg"):
        guidance = dict(inputs["guidance"], **{key: changed["guidance"][key]})
        out = model(**{**inputs, "guidance": guidance})
        assert (out - reference).abs().max() > 1e-4, f"guidance[{key!r}] does not reach the output"
    # A missing key switches that signal off, which also changes the output.
    for key in ("hed", "depth", "seg"):
        guidance = {k: v for k, v in inputs["guidance"].items() if k != key}
        out = model(**{**inputs, "guidance": guidance})
        assert (out - reference).abs().max() > 1e-4


@torch.no_grad()
def test_guidance_maps_of_any_resolution_are_resized(tiny_base):
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    inputs = make_inputs(seed=0)
    small = {k: torch.nn.functional.interpolate(v, size=(37, 53)) for k, v in inputs["guidance"].items()}
    batch = inputs["latents"].shape[0]
    conditioning = model.prepare_conditioning(inputs["image_embeds"], small, batch)
    rest = {k: v for k, v in inputs.items() if k not in ("image_embeds", "guidance")}
    out = model(**rest, conditioning=conditioning)
    without = model(**{**inputs, "guidance": None})
    assert not torch.allclose(out, without)  # the small maps were used
    # Every block got the maps at its own resolution: antialiased bilinear from 37×53.
    latent = inputs["latents"].shape[-1]
    sizes = {(h, w) for (_name, h, w, _dtype) in conditioning._resized}
    assert {(latent // 2**i, latent // 2**i) for i in range(3)} <= sizes
    depth_seg = torch.cat([small["depth"], small["seg"]], dim=1)
    for (name, h, w, _dtype), resized in conditioning._resized.items():
        source = small["hed"] if name == "hed" else depth_seg
        expected = torch.nn.functional.interpolate(
            source, size=(h, w), mode="bilinear", antialias=True, align_corners=False
        )
        torch.testing.assert_close(resized, expected)


@torch.no_grad()
def test_csm_reaches_every_cross_attention_block_of_both_networks(tiny_base):
    model = build_denoiser(tiny_base)
    names = model.cross_attention_block_names()
    # SD2 layout: 3 down blocks, the mid block and 3 up blocks carry cross-attention.
    assert len(names["unet"]) == 3 * TINY.unet["layers_per_block"] + 1 + 3 * (TINY.unet["layers_per_block"] + 1)
    assert len(names["controlnet"]) == 3 * TINY.unet["layers_per_block"] + 1
    for net in ("unet", "controlnet"):
        for name in names[net]:
            block = getattr(model, net).get_submodule(name)
            assert hasattr(block, "csm")
    # Each block's projection alone changes the output: every block is wired in.
    inputs = make_inputs(seed=0)
    reference = model(**inputs)
    for net in ("unet", "controlnet"):
        for name in names[net]:
            proj = getattr(model, net).get_submodule(name).csm.proj
            proj.weight.normal_(0, 0.5)
            out = model(**inputs)
            assert not torch.equal(out, reference), f"{net}.{name}.csm is not used"
            proj.weight.zero_()


@torch.no_grad()
def test_msfm_after_every_transformer_of_both_networks(tiny_base):
    model = build_denoiser(tiny_base)
    inputs = make_inputs(seed=0)
    reference = model(**inputs)
    count = 0
    for net in ("unet", "controlnet"):
        for name, module in getattr(model, net).named_modules():
            if name.endswith(".msfm"):
                count += 1
                module.hed_saft.beta.bias.fill_(0.3)
                out = model(**inputs)
                assert not torch.equal(out, reference), f"{net}.{name} is not used"
                module.hed_saft.beta.bias.zero_()
    assert count == 7 + 3 + 1 + 3  # UNet down/mid/up + ControlNet down/mid


def test_replacing_the_csm_processor_is_detected(tiny_base):
    model = build_denoiser(tiny_base)
    inputs = make_inputs(seed=0)
    # What diffusers' own set_attn_processor does: every processor replaced, CSM dropped.
    model.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="CSM attention processor"):
        model(**inputs)


def test_replacing_a_controlnet_csm_processor_is_detected_and_named(tiny_base):
    """The check covers the ControlNet's blocks too, and says which block lost its CSM and how to avoid it."""
    from megasr_core.models.csm import check_csm_processors

    model = build_denoiser(tiny_base)
    model.controlnet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError) as error:
        model(**make_inputs(seed=0))
    assert str(error.value) == (
        "the CSM attention processor of down_blocks.0.attentions.0.transformer_blocks.0.attn2 was replaced "
        "(now AttnProcessor2_0); use MegaSRDenoiser.set_attn_processor to change attention backends without "
        "dropping the CSM"
    )
    check_csm_processors(model.unet)  # without the cached block list, the UNet is walked: still intact
    with pytest.raises(RuntimeError, match="down_blocks.0.attentions.0"):
        check_csm_processors(model.controlnet)


@torch.no_grad()
def test_set_attn_processor_keeps_csm(tiny_base):
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    inputs = make_inputs(seed=0)
    reference = model(**inputs)
    model.set_attn_processor(AttnProcessor2_0)
    assert torch.allclose(model(**inputs), reference, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_embeds": torch.zeros(3, 17, 32)}, "image_embeds"),
        ({"guidance": {"hed": torch.zeros(2, 3, 128, 128)}}, "guidance\\['hed'\\]"),
        ({"guidance": {"edges": torch.zeros(2, 1, 8, 8)}}, "unknown guidance keys"),
        ({"guidance": {"depth": torch.zeros(2, 1, 64, 64), "seg": torch.zeros(2, 3, 32, 32)}}, "share H×W"),
        ({"control_image": torch.zeros(2, 3, 64, 64)}, "control_image"),
        ({"control_image": None}, "control_image"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_base, change, message):
    model = build_denoiser(tiny_base)
    with pytest.raises(ValueError, match=message):
        model(**{**make_inputs(seed=0), **change})


def test_tiny_forward_is_fast_on_cpu(tiny_base):
    import time

    model = build_denoiser(tiny_base)
    inputs = make_inputs(seed=0, batch=2)
    with torch.no_grad():
        model(**inputs)
        start = time.perf_counter()
        model(**inputs)
    # Generous bound (the tiny preset runs in tens of ms); catches accidental full-size builds.
    assert time.perf_counter() - start < 5.0


def test_prepared_conditioning_reuses_msfm_modulation_across_steps(tiny_base):
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    inputs = make_inputs(seed=0)
    calls = []
    for module in model.modules():
        if module.__class__.__name__ == "SAFT":
            module.mlp.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        expected = [model(**{**inputs, "timestep": torch.tensor([t, t])}) for t in (981, 501)]
        per_step = len(calls) // 2
        assert per_step > 0
        calls.clear()
        conditioning = model.prepare_conditioning(inputs["image_embeds"], inputs["guidance"], batch_size=2)
        rest = {k: v for k, v in inputs.items() if k not in ("image_embeds", "guidance")}
        got = [model(**{**rest, "timestep": torch.tensor([t, t])}, conditioning=conditioning) for t in (981, 501)]
    assert len(calls) == per_step  # γ/β computed in the first step only
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, conditioning=conditioning)
    with pytest.raises(ValueError, match="prepared for batch 2"):
        small = make_inputs(seed=0, batch=1)
        model(
            small["latents"],
            1,
            small["encoder_hidden_states"],
            control_image=small["control_image"],
            conditioning=conditioning,
        )


@torch.no_grad()
def test_repeat_for_cfg_equals_doubled_inputs(tiny_base):
    """CFG halves share image tokens and maps: stored once, broadcast, same result as doubling."""
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    single = make_inputs(seed=0, batch=1)
    double = {k: v for k, v in make_inputs(seed=1, batch=2).items()}
    rest = {
        "latents": double["latents"],
        "timestep": double["timestep"],
        "encoder_hidden_states": double["encoder_hidden_states"],
        "control_image": double["control_image"],
    }
    doubled = model(
        **rest,
        image_embeds=single["image_embeds"].repeat(2, 1, 1),
        guidance={k: v.repeat(2, 1, 1, 1) for k, v in single["guidance"].items()},
    )
    for reuse in (False, True):
        conditioning = model.prepare_conditioning(
            single["image_embeds"], single["guidance"], batch_size=2, reuse_modulation=reuse, repeat=2
        )
        assert conditioning.batch_size == 2
        assert torch.allclose(model(**rest, conditioning=conditioning), doubled, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of repeat"):
        model.prepare_conditioning(None, single["guidance"], batch_size=3, repeat=2)
