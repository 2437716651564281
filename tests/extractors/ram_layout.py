"""Random checkpoints in RAM's exact key layout (and SeeSR's DAPE LoRA layout), generated from RAM's
architecture rather than read from the model: what the RAM tests and the upstream-layout fixtures load."""

from __future__ import annotations

import math

import torch

from megasr_core.extractors.ram import RAMConfig

#: the LoRA rank of ``dape_checkpoint``
RANK = 8


def stage_geometry(cfg: RAMConfig) -> list[tuple[int, int, int, int]]:
    """(dim, resolution, window, heads) per stage, with RAM's window clamp."""
    side = cfg.image_size // cfg.patch_size
    out = []
    for i, heads in enumerate(cfg.num_heads):
        res = side // 2**i
        out.append((cfg.embed_dim * 2**i, res, min(res, cfg.window_size), heads))
    return out


def ram_checkpoint(
    cfg: RAMConfig, seed: int = 0, captioning: bool = True, meta: bool = False
) -> dict[str, torch.Tensor]:
    """Random tensors under RAM's key names (``meta``: shapes only, for the full-size layout)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.empty(*size, device="meta") if meta else torch.randn(*size, generator=g)

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        return randn(out_f, in_f) / math.sqrt(in_f)

    def vec(n: int, mean: float = 0.0, std: float = 0.1) -> torch.Tensor:
        return mean + std * randn(n)

    sd: dict[str, torch.Tensor] = {}

    def linear(name: str, out_f: int, in_f: int, bias: bool = True) -> None:
        sd[f"{name}.weight"] = lin(out_f, in_f)
        if bias:
            sd[f"{name}.bias"] = vec(out_f)

    def norm(name: str, n: int) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = vec(n, 1.0, 0.2), vec(n)

    ve = "visual_encoder"
    sd[f"{ve}.patch_embed.proj.weight"] = randn(cfg.embed_dim, 3, cfg.patch_size, cfg.patch_size) / cfg.patch_size
    sd[f"{ve}.patch_embed.proj.bias"] = vec(cfg.embed_dim)
    norm(f"{ve}.patch_embed.norm", cfg.embed_dim)
    for i, (dim, res, window, heads) in enumerate(stage_geometry(cfg)):
        for j in range(cfg.depths[i]):
            b = f"{ve}.layers.{i}.blocks.{j}"
            norm(f"{b}.norm1", dim)
            sd[f"{b}.attn.relative_position_bias_table"] = randn((2 * window - 1) ** 2, heads)
            sd[f"{b}.attn.relative_position_index"] = randn(window**2, window**2).long()
            linear(f"{b}.attn.qkv", 3 * dim, dim)
            linear(f"{b}.attn.proj", dim, dim)
            norm(f"{b}.norm2", dim)
            linear(f"{b}.mlp.fc1", int(dim * cfg.mlp_ratio), dim)
            linear(f"{b}.mlp.fc2", dim, int(dim * cfg.mlp_ratio))
            if j % 2 == 1 and res > window:  # RAM saves its shifted blocks' masks: garbage must be ignored
                sd[f"{b}.attn_mask"] = randn((res // window) ** 2, window**2, window**2)
        if i < len(cfg.depths) - 1:
            norm(f"{ve}.layers.{i}.downsample.norm", 4 * dim)
            linear(f"{ve}.layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
    width = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
    norm(f"{ve}.norm", width)
    linear("image_proj", cfg.embed_width, width)
    sd["label_embed"] = randn(cfg.num_classes, cfg.embed_width)
    linear("wordvec_proj", cfg.head_hidden, cfg.embed_width)
    for k in range(cfg.head_layers):
        p = f"tagging_head.encoder.layer.{k}"
        linear(f"{p}.crossattention.self.query", cfg.head_hidden, cfg.head_hidden)
        linear(f"{p}.crossattention.self.key", cfg.head_hidden, cfg.embed_width)
        linear(f"{p}.crossattention.self.value", cfg.head_hidden, cfg.embed_width)
        linear(f"{p}.crossattention.output.dense", cfg.head_hidden, cfg.head_hidden)
        norm(f"{p}.crossattention.output.LayerNorm", cfg.head_hidden)
        linear(f"{p}.intermediate.dense", cfg.head_intermediate, cfg.head_hidden)
        linear(f"{p}.output.dense", cfg.head_hidden, cfg.head_intermediate)
        norm(f"{p}.output.LayerNorm", cfg.head_hidden)
    linear("fc", 1, cfg.head_hidden)
    if captioning:  # RAM's captioning half: present in the release, unused for tags
        linear("tag_encoder.encoder.layer.0.attention.self.query", 6, 6)
        linear("tag_encoder.encoder.layer.0.crossattention.self.key", 6, 4)
        sd["tag_encoder.embeddings.word_embeddings.weight"] = randn(10, 6)
        linear("text_decoder.bert.encoder.layer.0.output.dense", 6, 6)
        sd["text_decoder.cls.predictions.bias"] = vec(10)
    return sd


def dape_checkpoint(cfg: RAMConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """SeeSR's DAPE layout: loralib LoRA on every Swin qkv (q, v) and head cross-attention q/k."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (dim, _, _, _) in enumerate(stage_geometry(cfg)):
        for j in range(cfg.depths[i]):
            b = f"visual_encoder.layers.{i}.blocks.{j}.attn.qkv"
            sd[f"{b}.lora_A"] = torch.randn(2 * RANK, dim, generator=g)
            sd[f"{b}.lora_B"] = torch.randn(2 * dim, RANK, generator=g)
    for k in range(cfg.head_layers):
        for proj, fan_in in (("query", cfg.head_hidden), ("key", cfg.embed_width)):
            b = f"tagging_head.encoder.layer.{k}.crossattention.self.{proj}"
            sd[f"{b}.lora_A"] = torch.randn(RANK, fan_in, generator=g)
            sd[f"{b}.lora_B"] = torch.randn(cfg.head_hidden, RANK, generator=g)
    sd["tag_encoder.encoder.layer.0.crossattention.self.query.lora_A"] = torch.randn(RANK, 6, generator=g)
    sd["text_decoder.bert.encoder.layer.0.attention.self.key.lora_B"] = torch.randn(6, RANK, generator=g)
    return sd
