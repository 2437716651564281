"""Tiling covers the latent and blends exactly for local functions; colour fixes do what they say."""

from __future__ import annotations

import pytest
import torch

from megasr_core.pipelines import adain, color_fix, wavelet
from megasr_core.pipelines.tiling import Tile, blend_tiles, gaussian_weights, starts, tiles


@pytest.mark.parametrize("length, tile, overlap", [(96, 96, 8), (150, 96, 8), (200, 64, 16), (65, 64, 4)])
def test_starts_cover_with_the_requested_overlap(length, tile, overlap):
    positions = starts(length, tile, overlap)
    assert positions[0] == 0 and positions[-1] + min(tile, length) == max(length, min(tile, length))
    for a, b in zip(positions, positions[1:]):
        assert b > a and a + tile - b >= overlap


def test_tiles_cover_every_latent_pixel():
    covered = torch.zeros(150, 100, dtype=torch.int32)
    for tile in tiles(150, 100, 64, 8):
        covered[tile.top : tile.bottom, tile.left : tile.right] += 1
        assert tile.bottom - tile.top == 64 and tile.right - tile.left == 64
    assert covered.min() >= 1


def test_blending_a_local_function_equals_the_untiled_result():
    latents = torch.randn(2, 4, 90, 70)

    def local(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 3 - x**2

    tiled = blend_tiles(latents, tiles(90, 70, 32, 8), lambda t: local(t.crop(latents)))
    assert torch.allclose(tiled, local(latents), atol=1e-5)
    single = blend_tiles(latents, [Tile(0, 90, 0, 70)], lambda t: local(t.crop(latents)))
    assert torch.equal(single, local(latents))


def test_gaussian_weights_peak_in_the_centre_and_never_vanish():
    weights = gaussian_weights(33, 21, torch.device("cpu"))[0, 0]
    assert weights.min() > 0
    assert weights.argmax() == 16 * 21 + 10


def test_adain_matches_the_reference_statistics():
    content = torch.rand(1, 3, 32, 32) * 0.3
    reference = torch.rand(1, 3, 32, 32) * 0.5 + 0.4
    fixed = adain(content, reference)
    assert torch.allclose(fixed.mean(dim=(-2, -1)), reference.mean(dim=(-2, -1)), atol=1e-5)
    assert torch.allclose(
        fixed.std(dim=(-2, -1), unbiased=False), reference.std(dim=(-2, -1), unbiased=False), atol=1e-4
    )


def test_wavelet_takes_low_frequencies_from_the_reference():
    reference = torch.full((1, 3, 64, 64), 0.7)
    detail = torch.rand(1, 3, 64, 64) * 0.1
    content = torch.full((1, 3, 64, 64), 0.2) + detail
    fixed = wavelet(content, reference)
    assert abs(fixed.mean().item() - (0.7 + detail.mean().item() - detail.mean().item())) < 0.02
    assert torch.allclose(wavelet(content, content), content, atol=1e-6)


def test_color_fix_rejects_unknown_methods():
    with pytest.raises(ValueError, match="adain, wavelet, none"):
        color_fix(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), "histogram")


def test_tile_groups_keep_order_and_shape():
    from megasr_core.pipelines.tiling import tile_groups

    grid = tiles(150, 100, 64, 8)
    groups = tile_groups(grid, 3)
    assert [t for g in groups for t in g] == grid
    assert all(len(g) <= 3 and len({(t.bottom - t.top, t.right - t.left) for t in g}) == 1 for g in groups)
    mixed = [Tile(0, 8, 0, 8), Tile(0, 8, 8, 16), Tile(0, 4, 0, 4), Tile(4, 8, 0, 4)]
    assert [len(g) for g in tile_groups(mixed, 4)] == [2, 2]
    nine = tiles(256, 256, 96, 8)  # 2048² output: 3 × 3 tiles of one shape
    assert len(nine) == 9 and [len(g) for g in tile_groups(nine, 4)] == [3, 3, 3]  # not 4 + 4 + 1
    assert [len(g) for g in tile_groups(nine, 9)] == [9] and [len(g) for g in tile_groups(nine, 1)] == [1] * 9
    assert [len(g) for g in tile_groups(nine * 2, 4)] == [4, 4, 4, 3, 3]  # 18 in as few groups, balanced


def test_blend_tiles_in_groups_equals_one_by_one():
    latents = torch.randn(2, 4, 90, 70, generator=torch.Generator().manual_seed(0))

    def local(tile: Tile) -> torch.Tensor:
        return tile.crop(latents) * 2 + tile.top

    grid = tiles(90, 70, 32, 8)
    one = blend_tiles(latents, grid, local)
    grouped = blend_tiles(latents, grid, predict_many=lambda group: [local(t) for t in group], group_size=4)
    assert torch.equal(one, grouped)
