"""RAMTagger against RAM's own equations, on a random checkpoint in RAM's exact key layout.

The reference below is written from RAM's maths (SeeSR ``ram/models/swin_transformer.py``,
``bert.py``, ``ram_lora.py``) with plain tensor ops and a different formulation from the
model's: shifted-window attention as one global attention over the rolled map (other windows
excluded, −100 across regions), patch merging by reshape. Keys are generated here from RAM's
architecture, not read from the model.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megasr_core.extractors.base import IMAGENET_MEAN, IMAGENET_STD
from megasr_core.extractors.ram import RAMConfig, RAMTagger, is_ram_folder
from megasr_core.extractors.ram_checkpoint import CheckpointError, interpolate_position_table
from megasr_core.extractors.tagger import Tagger
from tests.extractors.ram_layout import RANK, dape_checkpoint, ram_checkpoint, stage_geometry

CFG = RAMConfig.tiny()


def loralib_delta(name: str, a: torch.Tensor, b: torch.Tensor, out_f: int) -> torch.Tensor:
    """loralib's merge: ``MergedLinear`` via grouped conv1d and zero padding, ``Linear`` as B@A; ×alpha/r."""
    if name.endswith("qkv"):
        delta = F.conv1d(a.unsqueeze(0), b.unsqueeze(-1), groups=2).squeeze(0)  # (2·dim)×in
        full = torch.zeros(out_f, a.shape[1])
        enabled = torch.tensor([True, False, True]).repeat_interleave(out_f // 3)
        full[enabled] = delta
        return full * (1.0 / RANK)
    return (b @ a) * (1.0 / RANK)


# ------------------------------------------------------------------ RAM's equations
def layer_norm(x, sd, name, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def dense(x, sd, name):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def region_labels(res: int, window: int, shift: int) -> torch.Tensor:
    """RAM's 3×3 regions of the rolled map: rows/cols [0, res−w), [res−w, res−s), [res−s, res)."""
    edges = torch.arange(res)
    band = (edges >= res - window).long() + (edges >= res - shift).long()
    return (band[:, None] * 3 + band[None, :]).flatten()


def swin_block(x, sd, b, res, window, shift, heads):
    batch, n, dim = x.shape
    h = layer_norm(x, sd, f"{b}.norm1", 1e-5).view(batch, res, res, dim)
    h = torch.roll(h, (-shift, -shift), (1, 2)).reshape(batch, n, dim)
    rows, cols = torch.div(torch.arange(n), res, rounding_mode="floor"), torch.arange(n) % res
    same_window = ((rows[:, None] // window) == (rows[None] // window)) & (
        (cols[:, None] // window) == (cols[None] // window)
    )
    offset = ((rows[:, None] - rows[None]) + window - 1) * (2 * window - 1) + (cols[:, None] - cols[None]) + window - 1
    table = sd[f"{b}.attn.relative_position_bias_table"]
    bias = table[offset.clamp(0, table.shape[0] - 1)].permute(2, 0, 1)  # heads×n×n (used inside windows only)
    if shift:
        labels = region_labels(res, window, shift)
        bias = bias + torch.where(labels[:, None] == labels[None], 0.0, -100.0)
    bias = torch.where(same_window, bias, torch.tensor(float("-inf")))
    qkv = dense(h, sd, f"{b}.attn.qkv").view(batch, n, 3, heads, dim // heads)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    attn = torch.softmax((q * (dim // heads) ** -0.5) @ k.transpose(-1, -2) + bias, dim=-1)
    out = dense((attn @ v).transpose(1, 2).reshape(batch, n, dim), sd, f"{b}.attn.proj")
    out = torch.roll(out.view(batch, res, res, dim), (shift, shift), (1, 2)).reshape(batch, n, dim)
    x = x + out
    return x + dense(gelu(dense(layer_norm(x, sd, f"{b}.norm2", 1e-5), sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")


def patch_merge(x, sd, name, res):
    batch, _, dim = x.shape
    grid = x.view(batch, res // 2, 2, res // 2, 2, dim)  # [row block, row offset, col block, col offset]
    x = grid.permute(0, 1, 3, 4, 2, 5).reshape(batch, (res // 2) ** 2, 4 * dim)  # (0,0),(1,0),(0,1),(1,1)
    return dense(layer_norm(x, sd, f"{name}.norm", 1e-5), sd, f"{name}.reduction")


def reference_image_embeds(sd, pixels, cfg):
    ve = "visual_encoder"
    x = F.conv2d(pixels, sd[f"{ve}.patch_embed.proj.weight"], sd[f"{ve}.patch_embed.proj.bias"], stride=cfg.patch_size)
    x = layer_norm(x.flatten(2).transpose(1, 2), sd, f"{ve}.patch_embed.norm", 1e-5)
    for i, (_, res, window, heads) in enumerate(stage_geometry(cfg)):
        for j in range(cfg.depths[i]):
            shift = window // 2 if (j % 2 and res > cfg.window_size) else 0
            x = swin_block(x, sd, f"{ve}.layers.{i}.blocks.{j}", res, window, shift, heads)
        if i < len(cfg.depths) - 1:
            x = patch_merge(x, sd, f"{ve}.layers.{i}.downsample", res)
    x = layer_norm(x, sd, f"{ve}.norm", 1e-5)
    return dense(torch.cat([x.mean(1, keepdim=True), x], 1), sd, "image_proj")


def reference_logits(sd, pixels, cfg):
    image = reference_image_embeds(sd, pixels, cfg)
    h = torch.relu(dense(sd["label_embed"], sd, "wordvec_proj")).expand(pixels.shape[0], -1, -1)
    heads, eps = cfg.head_attention_heads, cfg.head_layer_norm_eps
    for k in range(cfg.head_layers):
        p = f"tagging_head.encoder.layer.{k}"

        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q = split(dense(h, sd, f"{p}.crossattention.self.query"))
        key = split(dense(image, sd, f"{p}.crossattention.self.key"))
        v = split(dense(image, sd, f"{p}.crossattention.self.value"))
        ctx = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        ctx = ctx.transpose(1, 2).flatten(2)
        h = layer_norm(
            dense(ctx, sd, f"{p}.crossattention.output.dense") + h, sd, f"{p}.crossattention.output.LayerNorm", eps
        )
        inter = gelu(dense(h, sd, f"{p}.intermediate.dense"))
        h = layer_norm(dense(inter, sd, f"{p}.output.dense") + h, sd, f"{p}.output.LayerNorm", eps)
    return dense(h, sd, "fc").squeeze(-1)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[dict, object]:
    sd = ram_checkpoint(CFG)
    path = tmp_path_factory.mktemp("ram") / "ram_tiny.pth"
    torch.save({"model": sd}, path)
    return sd, path


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(3))


def test_tiny_config_exercises_every_window_path():
    geometry = stage_geometry(CFG)
    assert any(res > window for _, res, window, _ in geometry)  # shifted windows with masks
    assert any(res == window == CFG.window_size for _, res, window, _ in geometry)  # whole map, no shift
    assert any(window < CFG.window_size for _, _, window, _ in geometry)  # shrunk window


def test_forward_matches_rams_equations(checkpoint, pixels):
    sd, path = checkpoint
    model = RAMTagger.from_checkpoint(path, config=CFG)
    side = CFG.image_size // CFG.patch_size // 2 ** (len(CFG.depths) - 1)
    with torch.no_grad():
        embeds = model.image_embeds(pixels)
        logits = model.tag_logits(pixels)
        expected_embeds = reference_image_embeds(sd, pixels, CFG)
        expected_logits = reference_logits(sd, pixels, CFG)
    assert embeds.shape == (2, 1 + side * side, CFG.embed_width)
    assert logits.shape == (2, CFG.num_classes)
    torch.testing.assert_close(embeds, expected_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert logits.std() > 0.1 and (logits[0] - logits[1]).abs().max() > 1e-2  # not a degenerate comparison


def test_shifted_window_masks_matter(checkpoint, pixels):
    """Guards the reference itself: dropping the −100 region mask changes the answer."""
    sd, _ = checkpoint
    x = torch.randn(1, 16 * 16, CFG.embed_dim, generator=torch.Generator().manual_seed(5))
    b = "visual_encoder.layers.0.blocks.1"
    shifted = swin_block(x, sd, b, 16, 4, 2, CFG.num_heads[0])
    from megasr_core.extractors.swin import SwinBlock

    block = SwinBlock(CFG.embed_dim, (16, 16), CFG.num_heads[0], 4, 2, CFG.mlp_ratio)
    block.load_state_dict(
        {
            k[len(b) + 1 :]: v
            for k, v in sd.items()
            if k.startswith(b + ".") and "attn_mask" not in k and "relative_position_index" not in k
        }
    )
    with torch.no_grad():
        torch.testing.assert_close(block(x), shifted, rtol=1e-5, atol=1e-5)
        block.attn_mask.zero_()
        assert (block(x) - shifted).abs().max() > 1e-3


def test_dape_is_merged_with_loralib_scaling(checkpoint, pixels, tmp_path):
    sd, path = checkpoint
    dape = dape_checkpoint(CFG)
    torch.save(dape, tmp_path / "DAPE.pth")
    model = RAMTagger.from_checkpoint(path, tmp_path / "DAPE.pth", config=CFG)
    state = model.state_dict()
    merged = dict(sd)
    for key in dape:
        if key.startswith(("visual_encoder", "tagging_head")) and key.endswith("lora_A"):
            module = key[: -len(".lora_A")]
            weight = sd[f"{module}.weight"]
            merged[f"{module}.weight"] = weight + loralib_delta(
                module, dape[key], dape[f"{module}.lora_B"], weight.shape[0]
            )
            torch.testing.assert_close(state[f"{module}.weight"], merged[f"{module}.weight"], rtol=1e-6, atol=1e-6)
    qkv = "visual_encoder.layers.1.blocks.0.attn.qkv.weight"
    dim = sd[qkv].shape[1]
    assert torch.equal(state[qkv][dim : 2 * dim], sd[qkv][dim : 2 * dim])  # k rows untouched
    assert not torch.allclose(state[qkv][:dim], sd[qkv][:dim])
    value = "tagging_head.encoder.layer.0.crossattention.self.value.weight"
    assert torch.equal(state[value], sd[value])
    with torch.no_grad():
        torch.testing.assert_close(
            model.tag_logits(pixels), reference_logits(merged, pixels, CFG), rtol=1e-5, atol=1e-5
        )


def test_captioning_keys_are_skipped_by_name(tmp_path):
    with_caption = ram_checkpoint(CFG, captioning=True)
    without = ram_checkpoint(CFG, captioning=False)
    assert set(with_caption) - set(without)
    torch.save({"model": with_caption}, tmp_path / "a.pth")
    torch.save({"model": without}, tmp_path / "b.pth")
    a = RAMTagger.from_checkpoint(tmp_path / "a.pth", config=CFG).state_dict()
    b = RAMTagger.from_checkpoint(tmp_path / "b.pth", config=CFG).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vision_multi_is_an_old_name_of_the_tagging_head(checkpoint, tmp_path):
    sd, _ = checkpoint
    renamed = {k.replace("tagging_head.", "vision_multi.", 1): v for k, v in sd.items()}
    torch.save({"model": renamed}, tmp_path / "old.pth")
    state = RAMTagger.from_checkpoint(tmp_path / "old.pth", config=CFG).state_dict()
    key = "tagging_head.encoder.layer.1.output.dense.weight"
    assert torch.equal(state[key], sd[key])


@pytest.mark.parametrize(
    "change, named",
    [
        (
            lambda sd: sd.update({"visual_encoder.layers.0.blocks.0.attn.qkv.extra": torch.zeros(1)}),
            "visual_encoder.layers.0.blocks.0.attn.qkv.extra",
        ),
        (
            lambda sd: sd.pop("tagging_head.encoder.layer.1.crossattention.self.key.bias"),
            "tagging_head.encoder.layer.1.crossattention.self.key.bias",
        ),
        (lambda sd: sd.pop("label_embed"), "label_embed"),
        (lambda sd: sd.update({"fc.weight": torch.zeros(2, CFG.head_hidden)}), "fc.weight"),
    ],
)
def test_unknown_missing_or_misshapen_keys_are_named(tmp_path, change, named):
    sd = ram_checkpoint(CFG)
    change(sd)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        RAMTagger.from_checkpoint(tmp_path / "bad.pth", config=CFG)


@pytest.mark.parametrize(
    "change, named",
    [
        (
            lambda d: d.pop("tagging_head.encoder.layer.0.crossattention.self.key.lora_B"),
            "tagging_head.encoder.layer.0.crossattention.self.key.lora_B",
        ),
        (
            lambda d: d.update(
                {"tagging_head.encoder.layer.0.crossattention.self.value.lora_A": torch.zeros(RANK, 16)}
            ),
            "tagging_head.encoder.layer.0.crossattention.self.value",
        ),
        (lambda d: d.update({"visual_encoder.norm.weight": torch.zeros(32)}), "visual_encoder.norm.weight"),
    ],
)
def test_dape_problems_are_named(checkpoint, tmp_path, change, named):
    _, path = checkpoint
    dape = dape_checkpoint(CFG)
    change(dape)
    torch.save(dape, tmp_path / "DAPE.pth")
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        RAMTagger.from_checkpoint(path, tmp_path / "DAPE.pth", config=CFG)


def test_position_tables_are_resized_by_an_interpolating_bicubic_spline():
    """A cubic polynomial of the offsets is reproduced exactly at RAM's resampled offsets.

    Offsets past the outermost source offset take its value (FITPACK clamps, as under RAM's
    ``interp2d``): with 7 → 11 the bisection stops at q = 1.5 and the sources end at ±4.75.
    """
    source, target = 7, 11  # window 4 → window 6
    nodes = _ram_source_offsets(source, target)

    def poly(y, x, h):
        return 0.3 + 0.1 * x - 0.05 * y + 0.01 * x * y + 0.002 * x**3 - 0.003 * (h + 1) * y**2 * x

    yy, xx = np.meshgrid(nodes, nodes, indexing="ij")
    table = torch.tensor(np.stack([poly(yy, xx, h).reshape(-1) for h in range(3)], 1), dtype=torch.float32)
    out = interpolate_position_table(table, target * target)
    grid = np.clip(np.arange(-(target // 2), target // 2 + 1, dtype=np.float64), nodes[0], nodes[-1])
    assert nodes[-1] < target // 2  # the clamped edge is exercised
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    expected = torch.tensor(np.stack([poly(gy, gx, h).reshape(-1) for h in range(3)], 1), dtype=torch.float32)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert interpolate_position_table(table, source * source) is table


def _ram_source_offsets(source: int, target: int) -> np.ndarray:
    """RAM's loader: bisect q so that 1 + q + … + q^(n−1) reaches target // 2, offsets ±cumulative."""
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if (1 - q ** (source // 2)) / (1 - q) > target // 2:
            hi = q
        else:
            lo = q
    dis, cur = [], 1.0
    for i in range(source // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0.0] + dis)


def test_checkpoint_with_another_window_size_loads(tmp_path):
    sd = ram_checkpoint(CFG, captioning=False)
    key = "visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"
    sd[key] = torch.randn(9 * 9, CFG.num_heads[0])  # trained with window 5
    torch.save({"model": sd}, tmp_path / "w5.pth")
    state = RAMTagger.from_checkpoint(tmp_path / "w5.pth", config=CFG).state_dict()
    torch.testing.assert_close(state[key], interpolate_position_table(sd[key], 7 * 7))


def test_tags_preprocessing_thresholds_and_protocol(checkpoint):
    _, path = checkpoint
    model = RAMTagger.from_checkpoint(path, config=CFG)
    assert isinstance(model, Tagger)
    image = torch.rand(1, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(image), (image - mean) / std)
    assert model.preprocess(torch.rand(2, 3, 37, 90)).shape == (2, 3, CFG.image_size, CFG.image_size)
    probabilities = torch.zeros(2, CFG.num_classes)
    probabilities[0, [5, 2]] = model.thresholds[[5, 2]] + 1e-3
    probabilities[0, 7] = model.thresholds[7]  # RAM keeps strictly greater only
    probabilities[1] = 1.0
    tags = model.tags_from_probabilities(probabilities)
    assert tags[0] == [model.vocabulary[2], model.vocabulary[5]]
    assert tags[1] == [t for t, limit in zip(model.vocabulary, model.thresholds.tolist()) if limit < 1.0]
    assert len(tags[1]) < len(model.vocabulary)  # some of RAM's thresholds are 1: never tagged
    batch = torch.rand(2, 3, 50, 70, generator=torch.Generator().manual_seed(1))
    expected = model.tags_from_probabilities(torch.sigmoid(model.tag_logits(model.preprocess(batch))))
    assert model(batch) == model.tags(batch) == expected


def test_save_and_load_pretrained_round_trip(checkpoint, pixels, tmp_path):
    _, path = checkpoint
    model = RAMTagger.from_checkpoint(path, config=CFG)
    model.save_pretrained(tmp_path / "tagger")
    assert is_ram_folder(tmp_path / "tagger")
    loaded = RAMTagger.from_pretrained(tmp_path / "tagger")
    assert loaded.config == CFG and loaded.vocabulary == model.vocabulary
    assert torch.equal(loaded.thresholds, model.thresholds)
    with torch.no_grad():
        assert torch.equal(loaded.tag_logits(pixels), model.tag_logits(pixels))


def test_real_config_has_rams_shapes():
    """ram_swin_large_14m: Swin-L (192, [2, 2, 18, 2], [6, 12, 24, 48], window 12) at 384², Q2L 768/4 heads."""
    with torch.device("meta"):
        model = RAMTagger()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in _real_layout_shapes().items()}
    pixels = torch.empty(2, 3, 384, 384, device="meta")
    assert model.image_embeds(pixels).shape == (2, 145, 512)
    assert model.tag_logits(pixels).shape == (2, 4585)
    assert sum(v.numel() for v in model.state_dict().values()) == 212_117_045


def _real_layout_shapes() -> dict[str, torch.Tensor]:
    """RAM's layout at full size, from this file's checkpoint builder (shapes only)."""
    sd = ram_checkpoint(RAMConfig(), captioning=False, meta=True)
    return {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}


@pytest.mark.parametrize("shape", [(200, 500, 3), (30, 41, 3)])
def test_resize_matches_rams_pil_transform(shape):
    """RAM's ``get_transform``: PIL ``Resize((S, S))`` (bilinear, antialiased when shrinking) on 8-bit images."""
    from PIL import Image

    model = RAMTagger(CFG)
    array = (np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
    size = (CFG.image_size, CFG.image_size)
    pil = np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR), dtype=np.float64) / 255
    normalized = model.preprocess(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ours = (normalized * std + mean)[0].permute(1, 2, 0).double().numpy()
    assert np.abs(ours - pil).max() < 1.0 / 255  # PIL rounds to 8 bits; we do not


def test_trained_captioning_lora_on_the_tied_layers_is_flagged(checkpoint, tmp_path, caplog):
    """SeeSR's RAM ties the head to tag_encoder's lowest layers; a non-zero LoRA there is warned about."""
    _, path = checkpoint
    key = "tag_encoder.encoder.layer.1.crossattention.self.key.lora_B"
    for value, warned in ((torch.zeros(6, RANK), False), (torch.ones(6, RANK), True)):
        dape = {**dape_checkpoint(CFG), key: value}
        torch.save(dape, tmp_path / "DAPE.pth")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megasr_core.extractors.ram_checkpoint"):
            RAMTagger.from_checkpoint(path, tmp_path / "DAPE.pth", config=CFG)
        assert (key in caplog.text) is warned


def test_loads_in_bfloat16(checkpoint, pixels):
    _, path = checkpoint
    full = RAMTagger.from_checkpoint(path, config=CFG)
    half = RAMTagger.from_checkpoint(path, config=CFG, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.thresholds.dtype == torch.float32
    with torch.no_grad():
        low, high = half.tag_logits(pixels).float(), full.tag_logits(pixels)
    assert torch.corrcoef(torch.stack([low.flatten(), high.flatten()]))[0, 1] > 0.99
    assert half.probabilities(torch.rand(1, 3, 20, 30)).dtype == torch.float32
