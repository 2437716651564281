"""Eq. 4's trainable set: ControlNet whole; in the UNet only connectors, projections and MSFM."""

from __future__ import annotations

import torch

from tests.models.helpers import build_denoiser, make_inputs, perturb_zero_init


def test_groups_partition_parameters_and_follow_the_paper(tiny_base):
    model = build_denoiser(tiny_base)
    groups = model.parameter_groups()
    names = set(groups.trainable) | set(groups.frozen)
    assert names == {n for n, _ in model.named_parameters()}
    assert not set(groups.trainable) & set(groups.frozen)
    for name in groups.trainable:
        if name.startswith("unet."):
            assert ".csm.connector." in name or ".csm.proj." in name or ".msfm." in name, name
        assert ".visual_attn." not in name
    for name in groups.frozen:
        assert name.startswith("unet.") or ".csm.visual_attn." in name, name
    # requires_grad follows the groups.
    assert all(p.requires_grad for p in groups.trainable.values())
    assert not any(p.requires_grad for p in groups.frozen.values())
    assert any(n.startswith("controlnet.controlnet_cond_embedding") for n in groups.trainable)


def test_gradients_reach_exactly_the_trainable_group(tiny_base):
    model = build_denoiser(tiny_base).train()
    perturb_zero_init(model)  # at zero init some trainable weights would get zero gradient
    inputs = make_inputs(seed=0)
    noise = torch.randn_like(inputs["latents"])
    loss = torch.nn.functional.mse_loss(model(**inputs), noise)
    loss.backward()
    groups = model.parameter_groups()
    without_grad = [n for n, p in groups.trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not without_grad, without_grad[:10]
    with_grad = [n for n, p in groups.frozen.items() if p.grad is not None]
    assert not with_grad


def test_counts_split_base_csm_msfm(tiny_base):
    model = build_denoiser(tiny_base)
    counts = model.parameter_counts()
    total = sum(p.numel() for p in model.parameters())
    assert sum(counts["total"][k] for k in ("base", "csm", "msfm")) == total
    assert counts["total"]["trainable"] == model.parameter_groups().counts()["trainable"]


def _grads(model, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    target = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(7))
    torch.nn.functional.mse_loss(model(**inputs), target).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base):
    """Checkpointed blocks re-run in backward: CSM and MSFM inputs must still be there."""
    model = build_denoiser(tiny_base).train()
    perturb_zero_init(model)
    inputs = make_inputs(seed=0)
    plain = _grads(model, inputs)
    model.unet.enable_gradient_checkpointing()
    model.controlnet.enable_gradient_checkpointing()
    checkpointed = _grads(model, inputs)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-7), name


def test_image_tokens_do_not_make_self_attention_warn(tiny_base, caplog):
    import logging

    from diffusers.utils import logging as diffusers_logging

    model = build_denoiser(tiny_base)
    diffusers_logging.enable_propagation()  # diffusers' logger does not reach caplog otherwise
    try:
        with caplog.at_level(logging.WARNING), torch.no_grad():
            model(**make_inputs(seed=0))
            # The check can fail: an unknown kwarg does warn.
            model.unet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 77, 32), cross_attention_kwargs={"bogus": 1})
    finally:
        diffusers_logging.disable_propagation()
    warned = [r.getMessage() for r in caplog.records if "cross_attention_kwargs" in r.getMessage()]
    assert warned and all("bogus" in m for m in warned)
