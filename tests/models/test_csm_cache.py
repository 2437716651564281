"""The CSM's inference cache of image keys/values: same numbers as recomputing, invalidated safely."""

from __future__ import annotations

import torch

from megasr_core.models.csm import CSM, CSM_ATTR, csm_blocks
from tests.models.helpers import build_denoiser, make_inputs, perturb_zero_init


def first_csm_block(model):
    name, block = csm_blocks(model.controlnet)[0]
    return block, getattr(block, CSM_ATTR)


@torch.no_grad()
def test_direct_visual_attention_equals_the_attention_modules_own_path(tiny_base):
    """The cached-K/V path computes what diffusers' Attention computes over the connected tokens."""
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    for net in (model.unet, model.controlnet):
        name, block = csm_blocks(net)[0]
        csm: CSM = getattr(block, CSM_ATTR)
        attn = csm.visual_attn if csm.visual_attn is not None else block.attn2
        hidden = torch.randn(2, 64, attn.to_q.in_features)
        tokens = torch.randn(2, 5, csm.connector.in_features)
        reference = (
            attn.processor.base(attn, hidden, csm.connector(tokens))
            if csm.visual_attn is None
            else attn(hidden, encoder_hidden_states=csm.connector(tokens))
        )
        direct = csm._attend(attn, hidden, *csm._visual_kv(attn, tokens))
        torch.testing.assert_close(direct, reference, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_repeated_forwards_reuse_keys_and_values_with_identical_output(tiny_base):
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    inputs = make_inputs(seed=0)
    conditioning = model.prepare_conditioning(
        inputs.pop("image_embeds"), inputs.pop("guidance"), inputs["latents"].shape[0]
    )
    block, csm = first_csm_block(model)
    first = model(**inputs, conditioning=conditioning)
    [cached] = csm._kv_cache
    assert cached[0][0] is conditioning.image_tokens
    second = model(**inputs, conditioning=conditioning)
    assert len(csm._kv_cache) == 1 and csm._kv_cache[0][1] is cached[1]  # reused, not recomputed
    model.clear_caches()
    assert csm._kv_cache == []
    third = model(**inputs, conditioning=conditioning)
    assert torch.equal(first, second) and torch.equal(first, third)


@torch.no_grad()
def test_in_place_changes_of_tokens_or_weights_recompute(tiny_base):
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    inputs = make_inputs(seed=1)
    conditioning = model.prepare_conditioning(
        inputs.pop("image_embeds"), inputs.pop("guidance"), inputs["latents"].shape[0]
    )
    before = model(**inputs, conditioning=conditioning)
    conditioning.image_tokens.mul_(-1.0)  # same tensor object, new values
    flipped = model(**inputs, conditioning=conditioning)
    model.clear_caches()
    assert torch.equal(flipped, model(**inputs, conditioning=conditioning)) and not torch.equal(before, flipped)
    block, csm = first_csm_block(model)
    csm.connector.weight.add_(0.5)  # e.g. load_state_dict copies into the weights in place
    changed = model(**inputs, conditioning=conditioning)
    model.clear_caches()
    assert torch.equal(changed, model(**inputs, conditioning=conditioning))


def test_no_cache_while_training(tiny_base):
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    inputs = make_inputs(seed=2)
    model(**inputs).sum().backward()
    assert all(getattr(b, CSM_ATTR)._kv_cache == [] for _, b in csm_blocks(model.unet) + csm_blocks(model.controlnet))


@torch.no_grad()
def test_pinned_keys_and_values_stand_in_for_exactly_their_tokens(tiny_base):
    """``pin_kv`` (how a CUDA graph feeds its static buffers): used for that very token tensor only,
    kept by ``clear_cache``, gone after ``unpin_kv``; ``image_kv`` gives the keys/values in use."""
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    block, csm = first_csm_block(model)
    attn = csm.visual_attn
    block.attn2.to_k.weight.add_(0.5)  # "trained": the ControlNet's attn2 leaves the CSM's frozen copy
    tokens = torch.randn(2, 5, csm.connector.in_features)
    other = tokens.clone()
    key, value = csm.image_kv(block.attn2, tokens)
    direct_key, direct_value = csm._visual_kv(attn, tokens)
    assert torch.equal(key, direct_key) and torch.equal(value, direct_value)
    assert not torch.equal(key, csm._visual_kv(block.attn2, tokens)[0])  # the copy, not attn2
    fake_key, fake_value = torch.zeros_like(key), torch.ones_like(value)
    csm.pin_kv(tokens, fake_key, fake_value)
    csm.clear_cache()
    pinned = csm.image_kv(block.attn2, tokens)
    assert pinned[0] is fake_key and pinned[1] is fake_value
    assert torch.equal(csm.image_kv(block.attn2, other)[0], key)  # equal values, another tensor: computed
    csm.pin_kv(tokens, key, value)  # re-pinning replaces the entry
    assert len(csm._pinned) == 1 and csm.image_kv(block.attn2, tokens)[0] is key
    csm.unpin_kv(tokens)
    assert csm._pinned == [] and csm.image_kv(block.attn2, tokens)[0] is not key
    _, unet_block = csm_blocks(model.unet)[0]
    unet_csm = getattr(unet_block, CSM_ATTR)
    unet_key, _ = unet_csm.image_kv(unet_block.attn2, tokens)  # the UNet's CSM attends with attn2 itself
    assert torch.equal(unet_key, unet_csm._visual_kv(unet_block.attn2, tokens)[0])


@torch.no_grad()
def test_the_cache_keeps_the_last_four_token_tensors(tiny_base):
    """A tiled run alternates between its groups of tiles: the last KV_CACHE_ENTRIES token tensors keep their
    keys/values (found again by identity), an older one is computed anew."""
    from megasr_core.models.csm import KV_CACHE_ENTRIES

    model = build_denoiser(tiny_base).eval()
    name, block = csm_blocks(model.unet)[0]
    csm = getattr(block, CSM_ATTR)
    tokens = [torch.randn(1, 3, csm.connector.in_features) for _ in range(KV_CACHE_ENTRIES + 1)]
    first = [csm.image_kv(block.attn2, t) for t in tokens]
    assert [entry[0][0] for entry in csm._kv_cache] == tokens[1:]
    for t, (key, value) in zip(tokens[1:], first[1:]):
        again = csm.image_kv(block.attn2, t)
        assert again[0] is key and again[1] is value
    recomputed = csm.image_kv(block.attn2, tokens[0])
    assert recomputed[0] is not first[0][0] and torch.equal(recomputed[0], first[0][0])


@torch.no_grad()
def test_a_half_precision_csm_takes_float32_image_tokens(tiny_base):
    """CLIP's tokens come in float32; a bfloat16 (fp16 on a GPU) CSM casts them to its own dtype."""
    model = build_denoiser(tiny_base).eval()
    _, block = csm_blocks(model.controlnet)[0]
    csm = getattr(block, CSM_ATTR).to(torch.bfloat16)
    key, value = csm.image_kv(block.attn2, torch.randn(1, 3, csm.connector.in_features))
    assert key.dtype == value.dtype == torch.bfloat16


@torch.no_grad()
def test_the_unets_csm_shares_the_text_branchs_query_bit_for_bit(tiny_base, monkeypatch):
    """In the UNet the visual branch attends with the block's own attn2: one query projection serves
    both branches, and the block's output is the separate-branch output bit for bit. The ControlNet's
    CSMs (a frozen copy) keep their own query."""
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    _, block = csm_blocks(model.unet)[0]
    attn, processor = block.attn2, block.attn2.processor
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    text = torch.randn(2, 7, attn.to_k.in_features)
    tokens = torch.randn(2, 5, processor.csm.connector.in_features)
    projected: list[int] = []
    hook = attn.to_q.register_forward_hook(lambda *_: projected.append(1))
    try:
        shared = processor(attn, hidden, text, ip_hidden_states=tokens)
        assert len(projected) == 1  # one to_q for both branches
        separate = processor.base(attn, hidden, text) + processor.csm(attn, hidden, tokens)
        assert len(projected) == 3
    finally:
        hook.remove()
    assert torch.equal(shared, separate)
    _, control_block = csm_blocks(model.controlnet)[0]
    assert getattr(control_block, CSM_ATTR).shares_host_query is False
    assert processor.csm.shares_host_query is True
