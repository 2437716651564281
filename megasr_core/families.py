"""Model families: what a weights folder holds and how its model is sampled. Pure Python, no torch.

A weights folder's ``megasr.json`` names its family. The family decides the denoiser class
(``megasr_core.weights.loading``), the conditioning the pipeline prepares, the prompt string and
the sampling defaults; the sampler, batching, graphs, tiling, colour fix, service and eval are
shared by all of them.

* ``megasr``: the paper's model (SD2-base + ControlNet + CSM + MSFM), five guidance extractors.
* ``seesr``: SeeSR (CVPR 2024), the paper's predecessor and Table 1 baseline: SD2-base +
  ControlNet with one image cross-attention after every text cross-attention, attending to
  RAM's image embeddings; RAM + DAPE tags as the prompt. Defaults of SeeSR's ``test_seesr.py``.
* ``seesr-turbo``: the same networks on sd-turbo's UNet, VAE and text encoder, sampled in two
  steps without classifier-free guidance (SeeSR's ``test_seesr_turbo.py``).

The API imports this module too (it never imports torch), to show a model's defaults.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: ``megasr.json``: the file that names a weights folder's family (and its model config)
CONFIG_NAME = "megasr.json"
MEGASR, SEESR, SEESR_TURBO = "megasr", "seesr", "seesr-turbo"
#: the family of a ``megasr.json`` written before families existed
DEFAULT_FAMILY = MEGASR
#: SeeSR's quality words, added to every prompt at inference (never in training)
QUALITY_SUFFIX = "clean, high-resolution, 8k"


@dataclass(frozen=True)
class SamplingDefaults:
    """What a family's reference script uses when the caller says nothing.

    ``tile_above``: latent tiling switches on when the latent's longest side exceeds this
    (``tile_rule="side"``) or its area exceeds ``tile_above²`` (``"area"``, SeeSR's rule).
    ``vae_encode_tile`` / ``vae_decode_tile``: the VAE works in tiles of this many pixels when
    the image is larger.
    """

    steps: int
    guidance_scale: float
    tile_size: int
    tile_overlap: int
    tile_above: int
    tile_rule: str
    vae_encode_tile: int
    vae_decode_tile: int
    start_timestep: int = 999

    def needs_tiling(self, height: int, width: int) -> bool:
        """Whether a latent of ``height × width`` is sampled in tiles under the auto rule."""
        if self.tile_rule == "area":
            return height * width > self.tile_above * self.tile_above
        return max(height, width) > self.tile_above


@dataclass(frozen=True)
class ModelFamily:
    """One kind of model this package serves."""

    name: str
    title: str
    summary: str
    defaults: SamplingDefaults
    #: SeeSR's scripts build the prompt their own way (:func:`seesr_prompt`)
    seesr_prompt: bool

    def prompt(self, tags: Sequence[str], user_prompt: str = "") -> str:
        """The text prompt for one image: its tags, the user's words and the quality suffix."""
        return (seesr_prompt if self.seesr_prompt else tags_to_prompt)(tags, user_prompt)


def tags_to_prompt(tags: Sequence[str], user_prompt: str = "", suffix: str = QUALITY_SUFFIX) -> str:
    """MegaSR's prompt: ``"{tags}, {user prompt}, clean, high-resolution, 8k"`` (empty parts dropped)."""
    parts = [", ".join(tags), user_prompt.strip(), suffix]
    return ", ".join(p for p in parts if p)


def seesr_prompt(tags: Sequence[str], user_prompt: str = "", suffix: str = QUALITY_SUFFIX) -> str:
    """SeeSR's exact string, ``f"{tags}, {prompt},"`` + the suffix: empty parts keep their commas.

    The SeeSR checkpoints were sampled with it, so ``", ,clean, ..."`` for an image without tags
    and prompt is what they expect, odd as it reads.
    """
    return f"{', '.join(tags)}, {user_prompt},{suffix}"


_SEESR_TILES = dict(tile_size=96, tile_above=96, tile_rule="area", vae_encode_tile=1024, vae_decode_tile=224 * 8)

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            MEGASR,
            "MegaSR",
            "SD2-base + ControlNet with CSM and MSFM (this project's paper)",
            SamplingDefaults(
                steps=50,
                guidance_scale=5.5,
                tile_size=96,
                tile_overlap=8,
                tile_above=128,
                tile_rule="side",
                vae_encode_tile=1024,
                vae_decode_tile=1024,
            ),
            seesr_prompt=False,
        ),
        ModelFamily(
            SEESR,
            "SeeSR",
            "SD2-base + ControlNet with RAM image cross-attentions (Wu et al., CVPR 2024)",
            SamplingDefaults(steps=50, guidance_scale=5.5, tile_overlap=4, **_SEESR_TILES),
            seesr_prompt=True,
        ),
        ModelFamily(
            SEESR_TURBO,
            "SeeSR-Turbo",
            "SeeSR's networks on sd-turbo: 2 steps, no classifier-free guidance",
            SamplingDefaults(steps=2, guidance_scale=1.0, tile_overlap=32, **_SEESR_TILES),
            seesr_prompt=True,
        ),
    )
}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; this megasr knows {', '.join(FAMILIES)}") from None


def read_family(directory: str | Path) -> str:
    """The family named by a weights folder's ``megasr.json`` (``megasr`` when it names none)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a megasr weights directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    family = data.get("family", DEFAULT_FAMILY) if isinstance(data, dict) else None
    if not isinstance(family, str):
        raise ValueError(f"{path}: 'family' must be a string")
    get_family(family)
    return family
