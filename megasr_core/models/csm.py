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
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

CSM_ATTR = "csm"
# diffusers' Attention drops unknown cross_attention_kwargs with a warning on every call, except
# for the image-prompt token names IP-Adapter uses; CSM tokens are image-prompt tokens too, so
# they travel under that name and the self-attention processors ignore them quietly.
IMAGE_TOKENS_KWARG = "ip_hidden_states"
#: token tensors whose keys/values each CSM keeps (one per group of tiles in a tiled run)
KV_CACHE_ENTRIES = 4


class CSM(nn.Module):
    """Visual branch of one block: connector → frozen cross-attention → zero-initialized projection."""

    def __init__(self, attn: Attention, image_embed_dim: int, copy_attention: bool) -> None:
        super().__init__()
        if attn.spatial_norm is not None or attn.group_norm is not None:
            # The visual branch attends over precomputed keys/values (see _attend), which skips
            # these norms: a block that has them (not SD2's) would get wrong maths, so refuse it.
            raise ValueError(
                "the CSM supports cross-attentions without spatial or group norm (SD2's "
                "transformer blocks); this one has one"
            )
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

        # Inference cache of the visual keys/values: they depend on the image tokens only, which
        # stay the same for every step of a sampling run (see ``_visual_kv``).
        self._kv_cache: list[tuple[tuple[object, ...], torch.Tensor, torch.Tensor]] = []
        # Keys/values bound to a token tensor by their owner (a CUDA graph's static buffers),
        # matched by identity only: the owner refreshes them whenever it refills the tokens.
        self._pinned: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(
        self,
        host_attn: Attention,
        hidden_states: torch.Tensor,
        image_tokens: torch.Tensor,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Linear(CA_frozen(Connector(e_i), F_hidden))`` for ``hidden_states`` of ``B×tokens×C``.

        ``query``: ``to_q(hidden_states)`` of the frozen attention when the caller has it already
        (the UNet's text branch projects the same query with the same weights).
        """
        if hidden_states.ndim != 3:
            raise ValueError(
                f"the CSM takes B×tokens×C hidden states (a transformer block's); got {hidden_states.ndim}-D"
            )
        attn = self._frozen_attention(host_attn)
        return self.proj(self._attend(attn, hidden_states, *self._visual_kv(attn, image_tokens), query=query))

    @property
    def shares_host_query(self) -> bool:
        """Whether the visual branch attends with the host's own ``attn2`` (the UNet's CSMs), so its
        query projection is the text branch's."""
        return self.visual_attn is None

    def _frozen_attention(self, host_attn: Attention) -> Attention:
        """CA_frozen: the frozen copy (ControlNet), or the host block's own frozen ``attn2`` (UNet)."""
        return self.visual_attn if self.visual_attn is not None else host_attn

    def _visual_kv(self, attn: Attention, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the connected image tokens, ``B×heads×N×d``.

        Without gradients they are kept while the same token tensor comes back (a sampler passes
        one tensor to all its steps), so each step only projects its queries. The cache holds the
        tensor itself (compared by identity, never by a reusable id) and the versions of it and
        of the weights involved, so an in-place change of any of them recomputes. (Tensors made
        under ``torch.inference_mode`` have no version counter; they are compared by identity.)
        """
        if not torch.is_grad_enabled():
            # Pinned keys/values also serve compiled code: a CUDA graph's static buffers are the
            # same objects at every replay, so they enter the compiled graph as inputs.
            for tokens, key, value in self._pinned:
                if tokens is image_tokens:
                    return key, value
        use_cache = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key_of = None
        if use_cache:
            key_of = tuple(
                _version(t) for t in (image_tokens, self.connector.weight, attn.to_k.weight, attn.to_v.weight)
            )
            for cached in self._kv_cache:
                if cached[0][0] is image_tokens and cached[0][1:] == key_of:
                    return cached[1], cached[2]
        tokens = self.connector(image_tokens.to(self.connector.weight.dtype))
        if attn.norm_cross:
            tokens = attn.norm_encoder_hidden_states(tokens)
        batch, heads = tokens.shape[0], attn.heads
        key, value = attn.to_k(tokens), attn.to_v(tokens)
        head_dim = key.shape[-1] // heads
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if use_cache:  # a few entries: a tiled run alternates between its groups of tiles
            self._kv_cache = [*self._kv_cache[-(KV_CACHE_ENTRIES - 1) :], ((image_tokens, *key_of), key, value)]
        return key, value

    @staticmethod
    def _attend(
        attn: Attention,
        hidden_states: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-attention of ``hidden_states`` over precomputed keys/values (diffusers' SDPA path)."""
        batch, heads, _, head_dim = key.shape
        if query is None:
            query = attn.to_q(hidden_states)
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def image_kv(self, host_attn: Attention, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual keys/values of ``image_tokens`` (cached, pinned or computed now)."""
        return self._visual_kv(self._frozen_attention(host_attn), image_tokens)

    def pin_kv(self, image_tokens: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Use ``key``/``value`` whenever exactly ``image_tokens`` comes (inference only).

        For a caller that keeps both in fixed buffers and refills them together, such as a CUDA
        graph whose replays must read the keys/values from the addresses it captured.
        """
        self.unpin_kv(image_tokens)
        self._pinned.append((image_tokens, key, value))

    def unpin_kv(self, image_tokens: torch.Tensor) -> None:
        self._pinned = [entry for entry in self._pinned if entry[0] is not image_tokens]

    def clear_cache(self) -> None:
        """Drop the keys/values cached by the last run (pinned ones stay with their owner)."""
        self._kv_cache = []


def _version(tensor: torch.Tensor) -> int:
    """In-place modification counter (inference tensors have none: -1)."""
    return -1 if tensor.is_inference() else tensor._version


class CSMAttnProcessor:
    """Wraps a block's ``attn2`` processor: text branch as before, plus the CSM visual branch.

    The text branch is delegated to the original processor, so with the projection at zero the
    output is bit-identical to the unextended model. Where the visual branch attends with the
    host's own weights (the UNet) and the text branch is diffusers' SDPA processor, both share one
    query projection: the text branch is that processor's maths op for op on the shared query
    (:func:`_text_attention`), so the output is the same bit for bit, with one GEMM less.
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
        if (
            ip_hidden_states is not None
            and self.csm.shares_host_query
            and type(self.base) is AttnProcessor2_0
            and attention_mask is None
            and hidden_states.ndim == 3
            and not kwargs
        ):
            query = attn.to_q(hidden_states)
            text = _text_attention(attn, hidden_states, query, encoder_hidden_states)
            return text + self.csm(attn, hidden_states, ip_hidden_states, query=query)
        text = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if ip_hidden_states is None:
            return text
        return text + self.csm(attn, hidden_states, ip_hidden_states)


def _text_attention(
    attn: Attention, hidden_states: torch.Tensor, query: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> torch.Tensor:
    """diffusers' ``AttnProcessor2_0`` for 3-D hidden states without a mask or spatial/group norm
    (the CSM refuses those), on an already projected ``query``."""
    residual = hidden_states
    batch_size = hidden_states.shape[0] if encoder_hidden_states is None else encoder_hidden_states.shape[0]
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


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


def csm_blocks(model: nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """The blocks of ``model`` that carry a CSM (found once; the model's layout does not change)."""
    return [
        (name, block) for name, block in cross_attention_blocks(model) if getattr(block, CSM_ATTR, None) is not None
    ]


def check_csm_processors(model: nn.Module, blocks: list[tuple[str, BasicTransformerBlock]] | None = None) -> None:
    """Fail loudly if something (e.g. ``set_default_attn_processor``) replaced a CSM processor.

    ``blocks`` (from :func:`csm_blocks`) spares walking every module at every forward.
    """
    for name, block in blocks if blocks is not None else csm_blocks(model):
        csm = getattr(block, CSM_ATTR)
        processor = block.attn2.processor
        if not isinstance(processor, CSMAttnProcessor) or processor.csm is not csm:
            raise RuntimeError(
                f"the CSM attention processor of {name}.attn2 was replaced "
                f"(now {type(processor).__name__}); use MegaSRDenoiser.set_attn_processor to change "
                "attention backends without dropping the CSM"
            )
