"""Known answers for the MSFM (Eq. 8-9) and the CSM (Eq. 7), recomputed with plain torch.

Each test runs the tiny denoiser with its zero-initialized parameters perturbed (so the modules
are not identities), captures one block's input and output with hooks, and recomputes that
output from the block's parameters with explicit tensor maths: no call into the code under test.

MSFM as docs/model.md and msfm.py read Eq. 8-9:
    M_c = depth ⊕ seg at the block's resolution;  F_r = CA(SiLU(GN_1(Conv(M_c)))) ⊙ M_c
    SAFT(F, g) = Norm(F) ⊙ γ(g) + β(g),  γ, β = Conv(SiLU(Conv(g)))
    F' = F + SAFT(F, M_h) + SAFT(F, F_r)
CSM (Eq. 7), one transformer block:
    a = CA_text(x, e_t) + Linear(CA_frozen(x, Connector(e_i))),  x = LN_2(h)
    FF input = LN_3(h + a)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.models.helpers import build_denoiser, make_inputs, perturb_zero_init

ATOL = 1e-5


@pytest.fixture()
def model(tiny_base):
    """Tiny MegaSR with every zero-init parameter perturbed, and ControlNet text attention "trained".

    Built for each test (0.3 s): mutmut maps a function to the tests during which it ran, so a model
    shared by the module would tie the CSM's and MSFM's constructors to the first test alone."""
    denoiser = build_denoiser(tiny_base)
    assert perturb_zero_init(denoiser, seed=3, std=0.2) > 0
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        # Training moves the ControlNet's text cross-attention away from the CSM's frozen copy;
        # do that here so the test can tell which weights the visual branch uses.
        for name, param in denoiser.controlnet.named_parameters():
            if ".attn2." in name and ".csm." not in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.2)
    return denoiser


def module(model, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


# ---------------------------------------------------------------- plain-torch references
def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(x: torch.Tensor, groups: int, eps: float, weight=None, bias=None) -> torch.Tensor:
    """Explicit GroupNorm: mean and (biased) variance over each group's channels and pixels."""
    b, c, h, w = x.shape
    grouped = x.reshape(b, groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=-1, keepdim=True)
    out = ((grouped - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    if weight is not None:
        out = out * weight[None, :, None, None] + bias[None, :, None, None]
    return out


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def conv(x: torch.Tensor, layer: torch.nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, layer.weight, layer.bias, padding=layer.padding)


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def saft_ref(saft, normed: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """SAFT: Norm(F) ⊙ γ(g) + β(g), γ/β = conv(SiLU(conv(g)))."""
    shared = silu(conv(guidance, saft.mlp[0]))
    return normed * conv(shared, saft.gamma) + conv(shared, saft.beta)


def fusion_ref(fusion, maps: torch.Tensor) -> torch.Tensor:
    """Stage 1 (Eq. 8): F_c = channel attention of SiLU(GN(conv(M_c))); F_r = F_c ⊙ M_c."""
    x = conv(maps, fusion.conv)
    # One group: each image's fused features normalised over all channels and pixels together.
    x = silu(group_norm(x, 1, fusion.norm.eps, fusion.norm.weight, fusion.norm.bias))
    fc1, fc2 = fusion.channel_attention.fc[0], fusion.channel_attention.fc[2]
    squeezed = x.mean(dim=(-2, -1), keepdim=True)
    gate = torch.sigmoid(conv(silu(conv(squeezed, fc1)), fc2))
    return (x * gate) * maps


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # The map resize conditioning.py documents: antialiased bilinear to the block's resolution.
    return F.interpolate(maps, size=size, mode="bilinear", antialias=True, align_corners=False)


def msfm_ref(msfm, hidden: torch.Tensor, guidance: dict) -> torch.Tensor:
    """F' = F + SAFT(Norm F, M_h) + SAFT(Norm F, F_r) (Eq. 9, residual reading)."""
    size = tuple(hidden.shape[-2:])
    hed = resize(guidance["hed"], size)
    depth_seg = resize(torch.cat([guidance["depth"], guidance["seg"]], dim=1), size)
    normed = group_norm(hidden, msfm.norm.num_groups, msfm.norm.eps)
    f_h = saft_ref(msfm.hed_saft, normed, hed)
    f_m = saft_ref(msfm.fused_saft, normed, fusion_ref(msfm.fusion, depth_seg))
    return hidden + f_h + f_m


def attention_ref(attn, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Multi-head softmax(Q Kᵀ / √d) V with the layer's projections, then its output Linear."""
    q, k, v = linear(x, attn.to_q), linear(context, attn.to_k), linear(context, attn.to_v)
    b, n, inner = q.shape
    d = inner // attn.heads

    def heads(t):
        return t.reshape(b, t.shape[1], attn.heads, d).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, inner)
    return linear(out, attn.to_out[0])


# ---------------------------------------------------------------- capture
def run_with_hooks(handles: list, run) -> None:
    """``run()`` without gradients, then remove the hooks whatever happened."""
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def capture(model, paths: list[str], run) -> dict[str, dict[str, torch.Tensor]]:
    """Raw output (before the MSFM hook) and final output (after it) of each Transformer2DModel."""
    seen: dict[str, dict[str, torch.Tensor]] = {p: {} for p in paths}
    handles = []

    def grab(path, key):
        def hook(_module, _args, output):
            sample = output[0] if isinstance(output, tuple) else output.sample
            seen[path].setdefault(key, []).append(sample.detach().clone())

        return hook

    for path in paths:
        block = module(model, path)
        handles.append(block.register_forward_hook(grab(path, "raw"), prepend=True))
        handles.append(block.register_forward_hook(grab(path, "out")))
    run_with_hooks(handles, run)
    return seen


MSFM_BLOCKS = [
    "controlnet.down_blocks.0.attentions.0",
    "controlnet.mid_block.attentions.0",
    "unet.down_blocks.2.attentions.0",
    "unet.mid_block.attentions.0",
    "unet.up_blocks.3.attentions.1",
]


def test_msfm_output_matches_eq_8_9(model):
    """Eq. 8-9: F' = F + Norm(F)⊙γ(M_h) + β(M_h) + Norm(F)⊙γ(F_r) + β(F_r), F_r from stage 1."""
    inputs = make_inputs(seed=5, batch=2)
    seen = capture(model, MSFM_BLOCKS, lambda: model(**inputs))
    for path in MSFM_BLOCKS:
        raw, out = seen[path]["raw"][0], seen[path]["out"][0]
        expected = msfm_ref(module(model, path).msfm, raw, inputs["guidance"])
        assert (out - raw).abs().max() > 1e-2, path  # the module really acts
        torch.testing.assert_close(out, expected, rtol=0, atol=ATOL, msg=path)


def test_msfm_with_cfg_repeat_and_cached_modulation_matches_eq_8_9(model):
    """Eq. 9 with maps given once for both CFG halves (repeat=2) and γ/β cached across forwards."""
    inputs = make_inputs(seed=6, batch=2)
    doubled = {
        k: torch.cat([inputs[k], inputs[k].flip(0)]) for k in ("latents", "encoder_hidden_states", "control_image")
    }
    with torch.no_grad():
        cond = model.prepare_conditioning(
            inputs["image_embeds"], inputs["guidance"], batch_size=4, reuse_modulation=True, repeat=2
        )
    t = torch.tensor([981, 501, 981, 501])
    paths = ["unet.down_blocks.1.attentions.0", "controlnet.down_blocks.2.attentions.0"]

    def twice():
        model(
            doubled["latents"],
            t,
            doubled["encoder_hidden_states"],
            control_image=doubled["control_image"],
            conditioning=cond,
        )
        model(
            doubled["latents"],
            t,
            doubled["encoder_hidden_states"],
            control_image=doubled["control_image"],
            conditioning=cond,
        )

    seen = capture(model, paths, twice)
    # Model batch row i uses image i % 2's maps.
    guidance_rows = {k: torch.cat([v, v]) for k, v in inputs["guidance"].items()}
    for path in paths:
        for call in range(2):
            raw, out = seen[path]["raw"][call], seen[path]["out"][call]
            expected = msfm_ref(module(model, path).msfm, raw, guidance_rows)
            torch.testing.assert_close(out, expected, rtol=0, atol=ATOL, msg=f"{path} call {call}")


def test_msfm_called_directly_matches_eq_8_9(model):
    """``msfm(F, hed, depth_seg)`` (the module's own forward, maps at the block's size) and one
    SAFT called directly give Eq. 9 too."""
    msfm = module(model, "unet.down_blocks.1.attentions.0").msfm
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, msfm.norm.num_channels, 8, 8, generator=generator)
    guidance = {
        "hed": torch.rand(2, 1, 8, 8, generator=generator),
        "depth": torch.rand(2, 1, 8, 8, generator=generator),
        "seg": torch.rand(2, 3, 8, 8, generator=generator),
    }
    depth_seg = torch.cat([guidance["depth"], guidance["seg"]], dim=1)
    with torch.no_grad():
        direct = msfm(hidden, guidance["hed"], depth_seg)
        normed = group_norm(hidden, msfm.norm.num_groups, msfm.norm.eps)
        saft_direct = msfm.hed_saft(normed, guidance["hed"])
    torch.testing.assert_close(direct, msfm_ref(msfm, hidden, guidance), rtol=0, atol=ATOL)
    torch.testing.assert_close(saft_direct, saft_ref(msfm.hed_saft, normed, guidance["hed"]), rtol=0, atol=ATOL)


def test_msfm_leaves_out_a_branch_whose_map_is_missing(model):
    """With one map given, (γ, β) is that branch's SAFT alone; with none, there is no modulation."""
    msfm = module(model, "unet.down_blocks.1.attentions.0").msfm
    generator = torch.Generator().manual_seed(12)
    hed, depth_seg = torch.rand(2, 1, 8, 8, generator=generator), torch.rand(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        for got, expected in [
            (msfm.modulation(hed, None), msfm.hed_saft.modulation(hed)),
            (msfm.modulation(None, depth_seg), msfm.fused_saft.modulation(msfm.fusion(depth_seg))),
        ]:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert msfm.modulation(None, None) is None


def test_a_half_precision_block_gets_its_maps_in_its_own_dtype(model):
    """The block's hook resizes the float32 maps to the block's size and dtype (fp16 on a GPU; bfloat16
    here, which the CPU runs) before the MSFM's layers see them."""
    from megasr_core.models.conditioning import MegaSRConditioning
    from megasr_core.models.msfm import _MSFMHook

    block = module(model, "unet.down_blocks.1.attentions.0")
    (hook,) = [h for h in block._forward_hooks.values() if isinstance(h, _MSFMHook)]
    generator = torch.Generator().manual_seed(13)
    conditioning = MegaSRConditioning(
        hed=torch.rand(1, 1, 32, 32, generator=generator), depth_seg=torch.rand(1, 4, 32, 32, generator=generator)
    )
    block.msfm.to(torch.bfloat16)
    with torch.no_grad():
        gamma, beta = hook.modulation(conditioning, (8, 8), torch.bfloat16)
        expected = block.msfm.modulation(
            resize(conditioning.hed, (8, 8)).to(torch.bfloat16),
            resize(conditioning.depth_seg, (8, 8)).to(torch.bfloat16),
        )
    assert gamma.dtype == beta.dtype == torch.bfloat16 and gamma.shape[-2:] == (8, 8)
    torch.testing.assert_close((gamma, beta), expected, rtol=0.02, atol=0.02)


def test_msfm_norm_is_the_unets_groupnorm_without_affine_parameters(model):
    """Norm(F) in Eq. 9 is the UNet's GroupNorm (its groups and eps) without affine parameters (SAFT
    supplies γ/β); stage 1's norm is one group."""
    for net in (model.unet, model.controlnet):
        for name, block in net.named_modules():
            msfm = getattr(block, "msfm", None)
            if msfm is None:
                continue
            assert msfm.norm.num_groups == model.unet.config.norm_num_groups, name
            assert msfm.norm.eps == model.unet.config.norm_eps and not msfm.norm.affine, name
            assert msfm.norm.weight is None and msfm.fusion.norm.num_groups == 1, name


def test_controlnet_csm_keeps_a_frozen_deep_copy_and_the_unet_csm_shares(tiny_base):
    """The ControlNet trains attn2, so its CSM attends with a frozen copy taken at installation; the
    UNet's attn2 is frozen anyway, so its CSM uses attn2 itself (paper Sec. 3.4, csm.py)."""
    from megasr_core.models.csm import cross_attention_blocks

    denoiser = build_denoiser(tiny_base)
    blocks = list(cross_attention_blocks(denoiser.controlnet))
    assert blocks
    for name, block in blocks:
        visual = block.csm.visual_attn
        assert visual is not None and visual is not block.attn2, name
        for (key, mine), theirs in zip(visual.named_parameters(), block.attn2.parameters()):
            assert mine.data_ptr() != theirs.data_ptr() and torch.equal(mine, theirs), f"{name}.{key}"
            assert not mine.requires_grad, f"{name}.{key} must stay frozen"
    for name, block in cross_attention_blocks(denoiser.unet):
        assert block.csm.visual_attn is None, name


def test_installing_twice_is_refused_and_the_blocks_are_named(tiny_base):
    from megasr_core.models.conditioning import ConditioningSlot
    from megasr_core.models.csm import cross_attention_blocks, install_csm
    from megasr_core.models.msfm import install_msfm, transformer_blocks

    denoiser = build_denoiser(tiny_base)
    with pytest.raises(RuntimeError, match="already has a CSM installed"):
        install_csm(denoiser.unet, denoiser.config.image_embed_dim, copy_attention=False)
    with pytest.raises(RuntimeError, match="already has an MSFM installed"):
        install_msfm(
            denoiser.unet,
            ConditioningSlot(),
            norm_groups=4,
            norm_eps=1e-5,
            use_hed=True,
            use_depth_seg=True,
            hed_channels=1,
            depth_seg_channels=4,
            hidden_channels=8,
            attention_hidden=2,
        )
    fresh_unet, _ = tiny_base
    fresh = type(fresh_unet).from_config(fresh_unet.config)
    expected = [name for name, _ in cross_attention_blocks(fresh)]
    assert install_csm(fresh, 16, copy_attention=False) == expected and expected
    expected = [name for name, _ in transformer_blocks(fresh)]
    kwargs = dict(
        norm_groups=fresh.config.norm_num_groups,
        norm_eps=1e-5,
        use_hed=True,
        use_depth_seg=True,
        hed_channels=1,
        depth_seg_channels=4,
        hidden_channels=8,
        attention_hidden=2,
    )
    assert install_msfm(fresh, ConditioningSlot(), **kwargs) == expected and expected


def capture_block(model, path: str, run) -> dict[str, torch.Tensor]:
    """A transformer block's cross-attention: h before norm2, attn2's output, the FF's input."""
    block = module(model, path)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        block.norm2.register_forward_pre_hook(lambda _m, args: seen.setdefault("h", args[0].clone())),
        block.attn2.register_forward_hook(lambda _m, _a, out: seen.setdefault("attn2", out.clone())),
        block.ff.register_forward_pre_hook(lambda _m, args: seen.setdefault("ff_in", args[0].clone())),
    ]
    run_with_hooks(handles, run)
    return seen


@pytest.mark.parametrize(
    "path, frozen_copy",
    [
        ("unet.down_blocks.1.attentions.0.transformer_blocks.0", False),
        ("unet.up_blocks.1.attentions.1.transformer_blocks.0", False),
        ("controlnet.down_blocks.0.attentions.0.transformer_blocks.0", True),
        ("controlnet.mid_block.attentions.0.transformer_blocks.0", True),
    ],
)
def test_csm_block_matches_eq_7(model, path, frozen_copy):
    """Eq. 7: a = CA(x, e_t) + Linear(CA_frozen(x, Connector(e_i))), summed before the FF (LN_3(h + a))."""
    inputs = make_inputs(seed=7, batch=2)
    seen = capture_block(model, path, lambda: model(**inputs))
    block = module(model, path)
    csm = block.csm
    # UNet: the visual branch shares the frozen attn2 weights; ControlNet: a frozen copy.
    visual_attn = csm.visual_attn if frozen_copy else block.attn2
    assert (visual_attn is not None) and (frozen_copy == (visual_attn is not block.attn2))

    x = layer_norm(seen["h"], block.norm2)
    text = attention_ref(block.attn2, x, inputs["encoder_hidden_states"])
    tokens = linear(inputs["image_embeds"], csm.connector)
    visual = linear(attention_ref(visual_attn, x, tokens), csm.proj)
    expected = text + visual
    assert visual.abs().max() > 1e-2  # the visual branch is really on
    torch.testing.assert_close(seen["attn2"], expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(seen["ff_in"], layer_norm(seen["h"] + expected, block.norm3), rtol=0, atol=ATOL)
    if frozen_copy:
        # Teeth: the trained text attention differs from the frozen copy, so using it would fail.
        wrong = text + linear(attention_ref(block.attn2, x, tokens), csm.proj)
        assert (wrong - expected).abs().max() > 10 * ATOL


def test_csm_without_image_tokens_is_the_text_cross_attention_alone(model):
    """Eq. 7 with no e_i: the block's attn2 output is plain multi-head CA(x, e_t)."""
    inputs = make_inputs(seed=8, batch=1)
    inputs["image_embeds"] = None
    path = "unet.mid_block.attentions.0.transformer_blocks.0"
    seen = capture_block(model, path, lambda: model(**inputs))
    block = module(model, path)
    expected = attention_ref(block.attn2, layer_norm(seen["h"], block.norm2), inputs["encoder_hidden_states"])
    torch.testing.assert_close(seen["attn2"], expected, rtol=0, atol=ATOL)


def test_the_csm_processor_hands_the_text_branch_its_attention_mask(model):
    """A text mask (as diffusers passes encoder_attention_mask) reaches the block's own processor: masked text
    tokens drop out of the text branch, with and without image tokens; the visual branch is added on top."""
    block = module(model, "unet.down_blocks.1.attentions.0.transformer_blocks.0")
    attn, processor = block.attn2, block.attn2.processor
    generator = torch.Generator().manual_seed(14)
    x = torch.randn(2, 64, attn.to_q.in_features, generator=generator)
    text = torch.randn(2, 5, attn.to_k.in_features, generator=generator)
    tokens = torch.randn(2, 3, block.csm.connector.in_features, generator=generator)
    mask = torch.zeros(2, 1, 5)
    mask[:, :, 3:] = -10000.0  # the last two text tokens are padding
    with torch.no_grad():
        masked = processor(attn, x, text, attention_mask=mask)
        expected = attention_ref(attn, x, text[:, :3])
        with_tokens = processor(attn, x, text, attention_mask=mask, ip_hidden_states=tokens)
        visual = block.csm(attn, x, tokens)
    torch.testing.assert_close(masked, expected, rtol=0, atol=ATOL)
    assert (masked - attention_ref(attn, x, text)).abs().max() > 10 * ATOL  # the mask matters
    torch.testing.assert_close(with_tokens, expected + visual, rtol=0, atol=ATOL)


def test_the_csm_refuses_what_its_maths_does_not_cover():
    """Cross-attentions with a spatial or group norm (not SD2's) at installation; hidden states that are not
    B×tokens×C when called."""
    from diffusers.models.attention_processor import Attention

    from megasr_core.models.csm import CSM

    with pytest.raises(ValueError) as refused:
        CSM(Attention(32, cross_attention_dim=16, heads=2, dim_head=16, norm_num_groups=8), 8, copy_attention=False)
    assert str(refused.value) == (
        "the CSM supports cross-attentions without spatial or group norm (SD2's transformer blocks); this one has one"
    )
    csm = CSM(Attention(32, cross_attention_dim=16, heads=2, dim_head=16), 8, copy_attention=False)
    with pytest.raises(ValueError, match="B×tokens×C"):
        csm(Attention(32, cross_attention_dim=16, heads=2, dim_head=16), torch.zeros(1, 32, 4, 4), torch.zeros(1, 3, 8))


def test_the_csm_processor_hands_the_wrapped_processor_every_argument(model):
    """Whatever backend the block had (diffusers' or one set through MegaSRDenoiser.set_attn_processor) gets
    the call exactly as diffusers made it: temb and any further keyword arguments included."""
    from megasr_core.models.csm import CSMAttnProcessor

    block = module(model, "unet.down_blocks.1.attentions.0.transformer_blocks.0")
    calls = []

    def backend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs):
        calls.append((attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs))
        return hidden_states

    processor = CSMAttnProcessor(backend, block.csm)
    x, text, mask, temb = (torch.zeros(1, 4, 8) for _ in range(4))
    assert processor(block.attn2, x, text, mask, temb, scale=0.5) is x
    ((attn, *tensors, kwargs),) = calls
    assert (
        attn is block.attn2 and all(a is b for a, b in zip(tensors, (x, text, mask, temb))) and kwargs == {"scale": 0.5}
    )
