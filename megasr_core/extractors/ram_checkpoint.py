"""Reading RAM's released checkpoint and SeeSR's DAPE LoRA into :class:`RAMTagger`'s names.

Our module names are RAM's, so conversion is about which keys to drop and what to fix up:

* RAM's captioning half (``tag_encoder.*``, ``text_decoder.*``) is not used for tagging;
  nor are the parts RAM deletes when it builds the tagging head (Query2Label keeps only
  cross-attention: ``tagging_head.embeddings.*``, ``tagging_head.encoder.layer.*.attention.*``,
  ``tagging_head.pooler.*``). Those are skipped by name.
* ``relative_position_index`` and ``attn_mask`` are recomputed, so dropped when present.
* ``vision_multi.*`` is an older name of ``tagging_head.*`` (RAM's loader renames it too).
* Relative-position tables of another window size are resized as RAM's loader does: bicubic
  spline interpolation (``s=0``) over geometrically spaced source offsets.
* DAPE (loralib, r = 8, alpha = 1) is merged: ``W += B @ A · alpha / r``; on Swin's fused
  ``qkv`` (``MergedLinear``, q and v enabled) the two halves of A and B give the q and v rows.

Any other key, missing or unexpected, is an error that names it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: loralib's defaults as SeeSR builds DAPE (``lora.Linear(..., r=8)``, ``MergedLinear(..., r=8)``)
DAPE_RANK = 8
DAPE_ALPHA = 1.0

_SKIPPED = (
    re.compile(r"^(tag_encoder|text_decoder)\."),
    re.compile(r"^tagging_head\.(embeddings|pooler)\."),
    re.compile(r"^tagging_head\.encoder\.layer\.\d+\.attention\."),
)
_RECOMPUTED = re.compile(r"\.(relative_position_index|attn_mask)$")
_SWIN_QKV = re.compile(r"^visual_encoder\.layers\.\d+\.blocks\.\d+\.attn\.qkv$")
_HEAD_QK = re.compile(r"^tagging_head\.encoder\.layer\.\d+\.crossattention\.self\.(query|key)$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the offending keys."""


def is_skipped(key: str) -> bool:
    """Keys of RAM's captioning parts and of modules RAM deletes from the tagging head."""
    return any(pattern.match(key) for pattern in _SKIPPED)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict, unwrapped from ``{"model": ...}`` / ``{"params": ...}`` when wrapped."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    for wrapper in ("model", "params", "state_dict"):
        if isinstance(data, Mapping) and wrapper in data and isinstance(data[wrapper], Mapping):
            data = data[wrapper]
            break
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(data).__name__}")
    return dict(data)


def interpolate_position_table(table: torch.Tensor, target_rows: int) -> torch.Tensor:
    """Resize a ``(2w−1)²×nH`` relative-position table to ``target_rows`` as RAM's loader does.

    Source offsets are spread geometrically so that the outermost source offset lands at the
    target's edge; each head's table is then sampled from an interpolating bicubic spline
    (what ``scipy.interpolate.interp2d(kind="cubic")`` fits on a grid, which RAM calls).
    """
    from scipy.interpolate import RectBivariateSpline

    source = int(round(table.shape[0] ** 0.5))
    target = int(round(target_rows**0.5))
    if source * source != table.shape[0] or target * target != target_rows:
        raise CheckpointError(f"relative-position table rows {table.shape[0]} → {target_rows} are not squares")
    if source == target:
        return table
    ratio = _geometric_ratio(source // 2, target // 2)
    steps = np.cumsum([1.0] + [ratio ** (i + 1) for i in range(source // 2 - 1)])
    nodes = np.concatenate([-steps[::-1], [0.0], steps])
    half = target // 2
    samples = np.arange(-half, half + 0.1, 1.0)
    heads = []
    for head in table.float().T:
        spline = RectBivariateSpline(nodes, nodes, head.view(source, source).numpy(), kx=3, ky=3, s=0)
        heads.append(torch.from_numpy(spline(samples, samples)).float().reshape(-1))
    return torch.stack(heads, dim=1).to(table.dtype)


def _geometric_ratio(terms: int, reach: float) -> float:
    """Ratio q with 1 + q + … + q^(terms−1) ≈ reach, bisected in [1.01, 1.5] like RAM's loader."""
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        ratio = (low + high) / 2
        if (1.0 - ratio**terms) / (1.0 - ratio) > reach:
            high = ratio
        else:
            low = ratio
    return ratio


def convert_ram_state_dict(
    raw: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """RAM's ``model`` dict → a state dict with exactly the keys (and shapes) of ``expected``."""
    converted: dict[str, torch.Tensor] = {}
    skipped = 0
    for key, value in raw.items():
        key = key.replace("vision_multi.", "tagging_head.", 1) if key.startswith("vision_multi.") else key
        if is_skipped(key) or _RECOMPUTED.search(key):
            skipped += 1
            continue
        if key not in expected:
            raise CheckpointError(f"unexpected key in the RAM checkpoint: {key}")
        if key.endswith("relative_position_bias_table") and value.shape != expected[key].shape:
            value = interpolate_position_table(value, expected[key].shape[0])
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} in the model"
            )
        converted[key] = value
    missing = [key for key in expected if key not in converted]
    if missing:
        raise CheckpointError(f"keys missing from the RAM checkpoint: {', '.join(missing)}")
    logger.info("RAM checkpoint: %d tensors loaded, %d captioning/recomputed tensors skipped", len(converted), skipped)
    return converted


def lora_delta(
    name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, out_features: int, scaling: float = DAPE_ALPHA / DAPE_RANK
) -> torch.Tensor:
    """The weight update ``out×in`` of one loralib layer (fused q/v halves for Swin's ``qkv``)."""
    a, b = lora_a.float(), lora_b.float()
    if _SWIN_QKV.match(name):
        dim = out_features // 3
        rank = a.shape[0] // 2
        if a.shape[0] != 2 * rank or b.shape != (2 * dim, rank):
            raise CheckpointError(
                f"{name}: LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a q/v MergedLinear"
            )
        delta = torch.zeros(out_features, a.shape[1])
        delta[:dim] = b[:dim] @ a[:rank]
        delta[2 * dim :] = b[dim:] @ a[rank:]
        return delta * scaling
    if b.shape[1] != a.shape[0] or b.shape[0] != out_features:
        raise CheckpointError(
            f"{name}: LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit {out_features} outputs"
        )
    return (b @ a) * scaling


def dape_targets(names: list[str]) -> list[str]:
    """The module names DAPE adapts: every Swin ``qkv`` and every head cross-attention query/key."""
    return [n for n in names if _SWIN_QKV.match(n) or _HEAD_QK.match(n)]


def merge_dape(state: dict[str, torch.Tensor], dape: Mapping[str, torch.Tensor]) -> int:
    """Add DAPE's LoRA updates into ``state`` (in place); returns how many layers were merged."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in dape.items():
        if is_skipped(key):
            continue
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_A", "lora_B"):
            raise CheckpointError(f"unexpected key in the DAPE checkpoint (only LoRA is expected): {key}")
        pairs.setdefault(module, {})[leaf] = value
    targets = dape_targets([k[: -len(".weight")] for k in state if k.endswith(".weight")])
    for module in pairs:
        if module not in targets:
            raise CheckpointError(f"unexpected key in the DAPE checkpoint: {module}.lora_A/lora_B")
    for module in targets:
        found = pairs.get(module, {})
        for leaf in ("lora_A", "lora_B"):
            if leaf not in found:
                raise CheckpointError(f"key missing from the DAPE checkpoint: {module}.{leaf}")
        weight = state[f"{module}.weight"]
        delta = lora_delta(module, found["lora_A"], found["lora_B"], weight.shape[0])
        state[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    _warn_tied_caption_lora(dape, len([t for t in targets if _HEAD_QK.match(t)]) // 2)
    return len(targets)


def _warn_tied_caption_lora(dape: Mapping[str, torch.Tensor], head_layers: int) -> None:
    """Flag a SeeSR quirk that matters only if the captioning LoRA was trained.

    RAM ties the tagging head's weights to the lowest layers of ``tag_encoder``; when SeeSR
    calls ``.eval()``, loralib merges both modules' LoRA into that shared weight. Trained DAPE
    leaves the captioning ``lora_B`` at its zero init, so the extra term vanishes; if it does not,
    SeeSR's logits differ from ours by it, and we say so.
    """
    for layer in range(head_layers):
        for proj in ("query", "key"):
            key = f"tag_encoder.encoder.layer.{layer}.crossattention.self.{proj}.lora_B"
            if key in dape and bool(dape[key].abs().max() > 0):
                logger.warning(
                    "DAPE: %s is non-zero; SeeSR's tied weights would also merge it into the tagging head, we do not",
                    key,
                )
