"""HED: the upstream ControlNetHED key layout loads strictly; the forward is the side-output mean."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megasr_core.extractors import HEDConfig, HEDExtractor, HEDNetwork
from megasr_core.models import WeightsError


def upstream_layout() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of lllyasviel's ControlNetHED.pth, written out from its description."""
    layout = {"norm": (1, 3, 1, 1)}
    in_channels = 3
    for block, (channels, convs) in enumerate(zip((64, 128, 256, 512, 512), (2, 2, 3, 3, 3)), start=1):
        for index in range(convs):
            layout[f"block{block}.convs.{index}.weight"] = (channels, in_channels if index == 0 else channels, 3, 3)
            layout[f"block{block}.convs.{index}.bias"] = (channels,)
        layout[f"block{block}.projection.weight"] = (1, channels, 1, 1)
        layout[f"block{block}.projection.bias"] = (1,)
        in_channels = channels
    return layout


def test_network_has_exactly_the_upstream_layout():
    with torch.device("meta"):
        state = HEDNetwork(HEDConfig()).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == upstream_layout()


def test_upstream_pth_loads_strictly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) * 0.01 for k, shape in upstream_layout().items()}
    torch.save(state, tmp_path / "ControlNetHED.pth")
    extractor = HEDExtractor.from_pretrained(tmp_path)
    for key, value in extractor.network.state_dict().items():
        assert torch.equal(value, state[key])
    # Our own save format round-trips to the same weights.
    extractor.save_pretrained(tmp_path / "ours")
    again = HEDExtractor.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(again.network.state_dict().values(), state.values()))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("block3.convs.2.bias"), "missing: block3.convs.2.bias"),
        (
            lambda s: s.update({"block6.projection.weight": torch.zeros(1, 512, 1, 1)}),
            "unexpected: block6.projection.weight",
        ),
        (lambda s: s.update({"norm": torch.zeros(1, 3)}), "wrong shape: norm"),
    ],
)
def test_bad_hed_weights_name_the_keys(tmp_path, edit, message):
    state = {k: torch.zeros(shape) for k, shape in upstream_layout().items()}
    edit(state)
    torch.save(state, tmp_path / "ControlNetHED.pth")
    with pytest.raises(WeightsError, match=message):
        HEDExtractor.from_pretrained(tmp_path)


def straightforward_hed(state: dict[str, torch.Tensor], config: HEDConfig, rgb_255: torch.Tensor) -> torch.Tensor:
    """Re-computation from the raw state dict with plain functional ops."""
    x = rgb_255 - state["norm"]
    sides = []
    for block, convs in enumerate(config.convs_per_block, start=1):
        if block > 1:
            x = F.max_pool2d(x, 2, 2)
        for index in range(convs):
            x = F.relu(
                F.conv2d(
                    x, state[f"block{block}.convs.{index}.weight"], state[f"block{block}.convs.{index}.bias"], padding=1
                )
            )
        sides.append(F.conv2d(x, state[f"block{block}.projection.weight"], state[f"block{block}.projection.bias"]))
    size = rgb_255.shape[-2:]
    total = sum(F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sides)
    return torch.sigmoid(total / len(sides))


@torch.no_grad()
def test_forward_is_the_sigmoid_of_the_mean_side_output(photos):
    config = HEDConfig(channels=(8, 8, 16, 16, 16), native_short_side=64, max_long_side=128)
    torch.manual_seed(0)
    extractor = HEDExtractor(config).eval()
    with torch.no_grad():
        for param in extractor.parameters():
            param.normal_(0, 0.05)
    images = photos["rgb"]
    out = extractor(images)
    # The same steps by hand: resize to the native size, run, fuse, resize back.
    rgb = F.interpolate(images, size=(64, 64), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1) * 255
    expected = straightforward_hed(extractor.network.state_dict(), config, rgb)
    expected = F.interpolate(expected, size=images.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.std() > 1e-3  # edges vary over the photo
