"""CSM — customized semantics module (paper: CISM², Sec. 3.4, Eq. 7).

In every transformer block with a cross-attention, the block's output of ``attn2`` becomes

    F_t + Linear(CA_frozen(Connector(e_i), F_hidden))

where ``F_t`` is the block's own text cross-attention (untouched), ``Connector`` maps CLIP
image tokens to the block's cross-attention width, ``CA_frozen`` is a cross-attention
initialized from the block's text cross-attention and kept frozen, and ``Linear`` (the figure's
"LGWAM") starts at zero. The sum then goes through the block's frozen feed-forward, exactly as
diffusers' ``BasicTransformerBlock`` does with ``attn2``'s output.

Installed through diffusers' extension point: an attention processor on ``attn2`` that wraps
the existing one. The module's parameters live under ``<transformer_block>.csm.*``. The image
tokens travel in ``cross_attention_kwargs`` (as IP-Adapter's do), so they are part of the
arguments gradient checkpointing saves and replays.

Frozen attention: in the UNet the text cross-attention is frozen too, so a frozen copy would
equal it forever; there the visual branch reuses the block's own ``attn2`` weights (same maths,
no duplicate parameters). The ControlNet trains its text cross-attention, so there the CSM keeps
a frozen copy taken at installation (``csm.visual_attn``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

CSM_ATTR = "csm"
# diffusers' Attention drops unknown cross_attention_kwargs with a warning on every call, except
# for the image-prompt token names IP-Adapter uses; CSM tokens are image-prompt tokens too, so
# they travel under that name and the self-attention processors ignore them quietly.
IMAGE_TOKENS_KWARG = "ip_hidden_states"


class CSM(nn.Module):
    """Visual branch of one block: connector → frozen cross-attention → zero-initialized projection."""

    def __init__(self, attn: Attention, image_embed_dim: int, copy_attention: bool) -> None:
        super().__init__()
        cross_dim = attn.to_k.in_features
        out_dim = attn.to_out[0].out_features
        self.connector = nn.Linear(image_embed_dim, cross_dim)
        self.visual_attn: Attention | None = None
        if copy_attention:
            visual = copy.deepcopy(attn)
            visual.set_processor(AttnProcessor2_0())
            visual.requires_grad_(False)
            self.visual_attn = visual
        self.proj = nn.Linear(out_dim, out_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self,
        host_attn: Attention,
        host_processor: object,
        hidden_states: torch.Tensor,
        image_tokens: torch.Tensor,
    ) -> torch.Tensor:
        tokens = self.connector(image_tokens.to(self.connector.weight.dtype))
        if self.visual_attn is not None:
            visual = self.visual_attn(hidden_states, encoder_hidden_states=tokens)
        else:
            visual = host_processor(host_attn, hidden_states, encoder_hidden_states=tokens)
        return self.proj(visual)


class CSMAttnProcessor:
    """Wraps a block's ``attn2`` processor: text branch as before, plus the CSM visual branch.

    The text branch is delegated to the original processor, so with the projection at zero the
    output is bit-identical to the unextended model.
    """

    def __init__(self, base: object, csm: CSM) -> None:
        self.base = base
        self.csm = csm

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_hidden_states: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        text = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if ip_hidden_states is None:
            return text
        return text + self.csm(attn, self.base, hidden_states, ip_hidden_states)


def cross_attention_blocks(model: nn.Module) -> Iterator[tuple[str, BasicTransformerBlock]]:
    """Transformer blocks of ``model`` that have a text cross-attention, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
            if module.attn2.is_cross_attention:
                yield name, module


def install_csm(model: nn.Module, image_embed_dim: int, copy_attention: bool) -> list[str]:
    """Add a CSM to every cross-attention block of ``model``; returns the blocks' names."""
    names = []
    for name, block in cross_attention_blocks(model):
        if hasattr(block, CSM_ATTR):
            raise RuntimeError(f"{name} already has a CSM installed")
        csm = CSM(block.attn2, image_embed_dim, copy_attention=copy_attention)
        setattr(block, CSM_ATTR, csm)
        block.attn2.set_processor(CSMAttnProcessor(block.attn2.processor, csm))
        names.append(name)
    return names


def check_csm_processors(model: nn.Module) -> None:
    """Fail loudly if something (e.g. ``set_default_attn_processor``) replaced a CSM processor."""
    for name, block in cross_attention_blocks(model):
        csm = getattr(block, CSM_ATTR, None)
        if csm is None:
            continue
        processor = block.attn2.processor
        if not isinstance(processor, CSMAttnProcessor) or processor.csm is not csm:
            raise RuntimeError(
                f"the CSM attention processor of {name}.attn2 was replaced "
                f"(now {type(processor).__name__}); use MegaSRDenoiser.set_attn_processor to change "
                "attention backends without dropping the CSM"
            )
