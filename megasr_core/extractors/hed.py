"""HED edges (DAGE_HED), in the shape of the Apache-2.0 ``ControlNetHED`` network.

Five VGG-style blocks (64, 128, 256, 512, 512 channels; 2, 2, 3, 3, 3 convs with ReLU; a 2×2
max-pool before blocks 2-5), each with a 1×1 projection to one "side output". The input is RGB
in 0-255 minus a learned per-channel ``norm``. The edge map is the sigmoid of the mean of the
side outputs resized to the image size. The parameter names match the upstream
``ControlNetHED.pth`` (``norm``, ``blockN.convs.I.*``, ``blockN.projection.*``), so it loads
with ``strict=True``. Widths are configurable for the tiny test preset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.files import check_state_dict, read_weights, write_safetensors
from .base import Extractor, native_size, resize

UPSTREAM_FILE = "ControlNetHED.pth"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class HEDConfig:
    channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    convs_per_block: tuple[int, ...] = (2, 2, 3, 3, 3)
    #: short side the LR image is resized to before detection (ControlNet annotators use 512)
    native_short_side: int = 512
    max_long_side: int = 1024

    def save(self, directory: Path) -> None:
        (directory / CONFIG_FILE).write_text(json.dumps({"model_type": "controlnet-hed", **asdict(self)}, indent=2))

    @classmethod
    def load(cls, directory: Path) -> HEDConfig:
        path = directory / CONFIG_FILE
        if not path.is_file():
            return cls()  # a folder holding only the upstream ControlNetHED.pth
        data = json.loads(path.read_text())
        data.pop("model_type", None)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class HEDBlock(nn.Module):
    """Convs with ReLU (after an optional 2×2 max-pool) and a 1×1 side-output projection."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *[nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1) for i in range(num_convs)]
        )
        self.projection = nn.Conv2d(out_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNetwork(nn.Module):
    """The ControlNetHED network: returns the side outputs (one per block, at its resolution)."""

    def __init__(self, config: HEDConfig = HEDConfig()) -> None:
        super().__init__()
        self.config = config
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        in_channels = 3
        for index, (channels, convs) in enumerate(zip(config.channels, config.convs_per_block), start=1):
            self.add_module(f"block{index}", HEDBlock(in_channels, channels, convs))
            in_channels = channels
        self.num_blocks = len(config.channels)

    def forward(self, rgb_255: torch.Tensor) -> list[torch.Tensor]:
        return self.features(rgb_255)[1]

    def features(self, rgb_255: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(each block's feature map, each block's side output): the representations DAGE aligns."""
        x = rgb_255 - self.norm
        blocks, sides = [], []
        for index in range(1, self.num_blocks + 1):
            x, side = getattr(self, f"block{index}")(x, pool=index > 1)
            blocks.append(x)
            sides.append(side)
        return blocks, sides


def fuse_side_outputs(sides: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Edge probability: sigmoid of the mean of the side outputs, each resized to ``size``."""
    resized = [F.interpolate(side, size=size, mode="bilinear", align_corners=False) for side in sides]
    return torch.sigmoid(torch.stack(resized, dim=0).mean(dim=0))


class HEDExtractor(Extractor):
    """LR images → HED edge map ``B×1×H×W`` in [0, 1]."""

    name = "hed"

    def __init__(self, config: HEDConfig = HEDConfig()) -> None:
        super().__init__()
        self.config = config
        self.network = HEDNetwork(config)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in 0-255 at the native size (what the network takes)."""
        height, width = images.shape[-2:]
        size = native_size(
            height, width, self.config.native_short_side, multiple=16, max_long_side=self.config.max_long_side
        )
        return resize(images, size).clamp(0, 1) * 255.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self._model_input(images)
        rgb = self.preprocess(images)
        edges = fuse_side_outputs(self.network(rgb), tuple(rgb.shape[-2:]))
        return resize(edges, images.shape[-2:], mode="bilinear").clamp(0, 1)

    # ---------------------------------------------------------------- weights
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HEDExtractor:
        """Load our folder (config + safetensors) or one holding the upstream ``ControlNetHED.pth``."""
        directory = Path(directory)
        config = HEDConfig.load(directory)
        candidates = [directory / WEIGHTS_FILE, directory / UPSTREAM_FILE]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no HED weights in {directory}: expected {WEIGHTS_FILE} or {UPSTREAM_FILE}")
        extractor = cls(config)
        extractor.load_network_state(read_weights([path]), what=str(path))
        return extractor

    def load_network_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        """Strictly load a ControlNetHED state dict (upstream key layout)."""
        expected = {k: v.shape for k, v in self.network.state_dict().items()}
        check_state_dict(expected, state, f"HED weights {what}")
        self.network.load_state_dict(state, strict=True)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        write_safetensors(directory / WEIGHTS_FILE, self.network.state_dict())
