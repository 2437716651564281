"""RAM (Recognize Anything) with SeeSR's DAPE: the tagger the paper uses for prompts.

``RAMTagger`` = RAM's Swin-L image encoder at 384² → ``image_proj`` (→ 512) → the Query2Label
tagging head: one query per tag (``relu(wordvec_proj(label_embed))``) cross-attends to the
image tokens through BERT layers without self-attention, ``fc`` gives one logit per tag, and a
tag is kept when ``sigmoid(logit) > threshold`` (RAM's per-tag thresholds, vendored).

Load RAM's release with :meth:`RAMTagger.from_checkpoint` (``ram_swin_large_14m.pth``, plus
SeeSR's ``DAPE.pth`` merged); :meth:`save_pretrained` / :meth:`from_pretrained` keep the
merged model as safetensors + ``tagger.json`` in the weights directory's ``extractors/tagger/``.

The tagging head is written here, not built from ``transformers.BertLayer``: RAM's head layers
have no self-attention (``BertLayer`` always runs one) and take 512-wide keys into a 768-wide
layer, which the library ties to the layer width.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils import DeviceDtypeMixin
from .base import IMAGENET_MEAN, IMAGENET_STD, check_images, normalize, resize
from .ram_checkpoint import convert_ram_state_dict, merge_dape, read_state_dict
from .swin import SwinEncoder
from .tagger import CONFIG_FILE, TAGS_FILE, THRESHOLDS_FILE, load_vocabulary

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
TAGGER_TYPE = "ram"


@dataclass(frozen=True)
class RAMConfig:
    """Shapes of RAM; the defaults are ``ram_swin_large_14m`` (Swin-L, 384², Q2L head)."""

    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    #: width of ``image_proj``'s output and of the label embeddings
    embed_width: int = 512
    head_hidden: int = 768
    head_layers: int = 2
    head_attention_heads: int = 4
    head_intermediate: int = 3072
    head_layer_norm_eps: float = 1e-12
    num_classes: int = 4585
    #: RAM's preprocessing: a plain resize to ``image_size``², ImageNet normalization
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    @classmethod
    def tiny(cls) -> RAMConfig:
        """Small dims, same code paths: shifted windows, a window-sized stage, a shrunk window."""
        return cls(
            image_size=64,
            embed_dim=8,
            depths=(2, 2, 2, 2),
            num_heads=(1, 2, 2, 4),
            window_size=4,
            embed_width=16,
            head_hidden=24,
            head_layers=2,
            head_attention_heads=4,
            head_intermediate=32,
        )

    @classmethod
    def from_dict(cls, data: dict) -> RAMConfig:
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**{**data, **tuples})


class CrossAttention(nn.Module):
    """BERT attention whose keys/values come from the image: ``query``/``key``/``value``."""

    def __init__(self, hidden: int, kv_width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, hidden_states: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query(hidden_states)), split(self.key(image_embeds)), split(self.value(image_embeds))
        )
        return out.transpose(1, 2).flatten(2)


class DenseResidualNorm(nn.Module):
    """BERT's output sub-layer: ``LayerNorm(dense(x) + residual)``."""

    def __init__(self, width_in: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class CrossAttentionBlock(nn.Module):
    """``crossattention.self`` + ``crossattention.output`` in RAM's names."""

    def __init__(self, config: RAMConfig) -> None:
        super().__init__()
        self.self = CrossAttention(config.head_hidden, config.embed_width, config.head_attention_heads)
        self.output = DenseResidualNorm(config.head_hidden, config.head_hidden, config.head_layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states, image_embeds), hidden_states)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TaggingLayer(nn.Module):
    """One Query2Label layer: cross-attention to the image, then BERT's feed-forward."""

    def __init__(self, config: RAMConfig) -> None:
        super().__init__()
        self.crossattention = CrossAttentionBlock(config)
        self.intermediate = Intermediate(config.head_hidden, config.head_intermediate)
        self.output = DenseResidualNorm(config.head_intermediate, config.head_hidden, config.head_layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        attended = self.crossattention(hidden_states, image_embeds)
        return self.output(self.intermediate(attended), attended)


class TaggingEncoder(nn.Module):
    def __init__(self, config: RAMConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TaggingLayer(config) for _ in range(config.head_layers))


class TaggingHead(nn.Module):
    """``tagging_head.encoder.layer.*`` of RAM (its embeddings and self-attention are deleted)."""

    def __init__(self, config: RAMConfig) -> None:
        super().__init__()
        self.encoder = TaggingEncoder(config)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, image_embeds)
        return queries


class RAMTagger(DeviceDtypeMixin, nn.Module):
    """RAM's tagging path; ``__call__(images in [0, 1]) -> tags`` satisfies the ``Tagger`` protocol."""

    name = TAGGER_TYPE

    def __init__(
        self, config: RAMConfig | None = None, tags: list[str] | None = None, thresholds: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.config = config = config or RAMConfig()
        # On the CPU even under ``with torch.device("cuda" or "meta")``: probabilities are compared there.
        with torch.device("cpu"):
            if tags is None:
                tags, thresholds = load_vocabulary()
            if thresholds is None or len(tags) != len(thresholds) or len(tags) != config.num_classes:
                raise ValueError(
                    f"RAM needs {config.num_classes} tags with one threshold each, got {len(tags)} "
                    f"tags and {None if thresholds is None else len(thresholds)} thresholds"
                )
            self.thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
        self.vocabulary = list(tags)
        self.visual_encoder = SwinEncoder(
            config.image_size,
            config.patch_size,
            config.embed_dim,
            config.depths,
            config.num_heads,
            config.window_size,
            config.mlp_ratio,
        )
        self.image_proj = nn.Linear(self.visual_encoder.num_features, config.embed_width)
        self.label_embed = nn.Parameter(torch.zeros(config.num_classes, config.embed_width))
        # RAM uses Identity when the head is as wide as the label embeddings.
        self.wordvec_proj = (
            nn.Linear(config.embed_width, config.head_hidden)
            if config.head_hidden != config.embed_width
            else nn.Identity()
        )
        self.tagging_head = TaggingHead(config)
        self.fc = nn.Linear(config.head_hidden, 1)

    # ------------------------------------------------------------------ maths
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalized ``B×3×S×S`` → ``B×(1+L)×512`` (``B×145×512`` for RAM at 384²)."""
        return self.image_proj(self.visual_encoder(pixel_values.to(self.device, self.dtype)))

    def tag_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalized ``B×3×S×S`` → ``B×num_classes`` logits, before the sigmoid."""
        return self._logits(self.image_embeds(pixel_values))

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        queries = F.relu(self.wordvec_proj(self.label_embed))
        hidden = self.tagging_head(queries.unsqueeze(0).expand(image.shape[0], -1, -1), image)
        return self.fc(hidden).squeeze(-1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], any size → RAM's input: bilinear resize to S² (antialiased), ImageNet norm."""
        size = self.config.image_size
        images = resize(check_images(images).float(), (size, size), mode="bilinear").clamp(0, 1)
        return normalize(images, self.config.mean, self.config.std)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Per-tag probabilities ``B×num_classes`` for images in [0, 1]."""
        return torch.sigmoid(self.tag_logits(self.preprocess(images)).float())

    def tags_from_probabilities(self, probabilities: torch.Tensor) -> list[list[str]]:
        """Tags whose probability exceeds their threshold, in RAM's vocabulary order."""
        keep = probabilities.cpu() > self.thresholds.unsqueeze(0)
        return [[self.vocabulary[i] for i in row.nonzero().flatten().tolist()] for row in keep]

    def tags(self, images: torch.Tensor) -> list[list[str]]:
        return self.tags_from_probabilities(self.probabilities(images))

    @torch.no_grad()
    def tags_and_embeds(self, images: torch.Tensor) -> tuple[list[list[str]], torch.Tensor]:
        """Tags and the image embeddings ``B×(1+L)×512`` they came from, in one pass (SeeSR conditions
        its image cross-attentions on these embeddings, ``generate_image_embeds``)."""
        embeds = self.image_embeds(self.preprocess(images))
        return self.tags_from_probabilities(torch.sigmoid(self._logits(embeds).float())), embeds

    def __call__(self, images: torch.Tensor) -> list[list[str]]:
        """The ``Tagger`` protocol (replaces ``nn.Module.__call__``: call ``tag_logits`` for tensors)."""
        return self.tags(images)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(
        cls,
        ram_path: str | Path,
        dape_path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        config: RAMConfig | None = None,
    ) -> RAMTagger:
        """RAM's released ``.pth`` (+ SeeSR's ``DAPE.pth``, merged) → an eval-mode tagger."""
        with torch.device("cpu"):
            model = cls(config)
        state = convert_ram_state_dict(read_state_dict(ram_path), model.state_dict())
        if dape_path is not None:
            merged = merge_dape(state, read_state_dict(dape_path))
            logger.info("DAPE: merged LoRA into %d layers from %s", merged, dape_path)
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False).to(device=device or "cpu", dtype=dtype or torch.float32)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / TAGS_FILE).write_text("\n".join(self.vocabulary) + "\n", encoding="utf-8")
        (directory / THRESHOLDS_FILE).write_text("\n".join(repr(t) for t in self.thresholds.tolist()) + "\n")
        (directory / CONFIG_FILE).write_text(json.dumps({"type": TAGGER_TYPE, "config": asdict(self.config)}, indent=2))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> RAMTagger:
        directory = Path(directory)
        settings = json.loads((directory / CONFIG_FILE).read_text())
        if settings.get("type") != TAGGER_TYPE:
            raise ValueError(f"{directory}: tagger type {settings.get('type')!r} is not {TAGGER_TYPE!r}")
        tags, thresholds = load_vocabulary(directory)
        with torch.device("cpu"):
            model = cls(RAMConfig.from_dict(settings["config"]), tags, thresholds)
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return model.eval().requires_grad_(False).to(device=device or "cpu", dtype=dtype or torch.float32)


def is_ram_folder(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved :class:`RAMTagger` (``tagger.json`` of type ``ram``)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file() or not (Path(directory) / WEIGHTS_FILE).is_file():
        return False
    return json.loads(path.read_text()).get("type") == TAGGER_TYPE
