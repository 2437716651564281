"""DAGE losses against their formulas (issue 11): SILog on disparity with zeros, CLIP Eq. 6 term count."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megasr_core.extractors import GuidanceExtractors
from megasr_core.train.dage import DAGETrainConfig, dage_loss, silog


def reference_silog(prediction: np.ndarray, target: np.ndarray, lam: float, relative_floor: float) -> float:
    """Per image: g = log(p + r·max p) − log(t + r·max t); √(mean g² − λ (mean g)²); mean over images."""
    losses = []
    for p, t in zip(prediction, target):
        g = np.log(p + relative_floor * p.max()) - np.log(t + relative_floor * t.max())
        losses.append(math.sqrt(np.mean(g**2) - lam * np.mean(g) ** 2))
    return float(np.mean(losses))


def sky_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """Disparity maps 2×16×16 whose top rows are exactly 0 (sky), as Depth-Anything gives them."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 16, 16, generator=g, dtype=torch.float64) * 5 + 0.5
    prediction = target * (1 + 0.3 * torch.rand(2, 16, 16, generator=g, dtype=torch.float64))
    target[:, :4] = 0
    prediction[:, :3] = 0  # the sky is a row smaller in the prediction: a pixel with p = 0 < t
    prediction[1] *= 40  # another scale for the second image
    return prediction, target


def test_silog_is_finite_and_matches_the_formula_on_maps_with_zero_disparity():
    prediction, target = sky_maps()
    prediction.requires_grad_(True)
    loss = silog(prediction, target, lam=0.85, relative_floor=0.01)
    expected = reference_silog(prediction.detach().numpy(), target.numpy(), 0.85, 0.01)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    assert torch.isfinite(prediction.grad).all() and prediction.grad.abs().max() > 0
    assert 0.05 < expected < 5  # a moderate value, not the old clamp's blow-up at log(1e-6)


def test_silog_is_zero_for_equal_maps_and_scale_invariant_at_lambda_one():
    prediction, target = sky_maps()
    assert silog(target, target).item() < 2e-3  # √eps floor only
    assert silog(target * 7.5, target, lam=1.0).item() < 2e-3
    assert silog(prediction * 0.01, target, lam=1.0).item() == pytest.approx(
        silog(prediction, target, lam=1.0).item(), rel=1e-9
    )
    assert silog(prediction, target).item() > 0.05


# ---------------------------------------------------------------- CLIP (Eq. 6)
@pytest.fixture(scope="module")
def clip_pair(tiny_weights):
    """The tiny CLIP extractor (HR branch) and a perturbed copy (LR branch)."""
    teacher = GuidanceExtractors.from_pretrained(tiny_weights / "extractors", enabled=["clip"]).clip.eval()
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    return teacher, student


def test_clip_loss_counts_the_final_tokens_and_each_earlier_layer_once(clip_pair):
    teacher, student = clip_pair
    g = torch.Generator().manual_seed(2)
    hr, lr = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        loss = dage_loss("clip", DAGETrainConfig(), teacher, student, hr, lr).item()
        lr_up = F.interpolate(lr, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
        t_out = teacher.vision_outputs(teacher.preprocess(hr), output_hidden_states=True)
        s_out = student.vision_outputs(student.preprocess(lr_up), output_hidden_states=True)
        layers = teacher.vision_config.num_hidden_layers
        assert len(t_out.hidden_states) == layers + 1  # embeddings + one output per layer
        final = F.l1_loss(student(lr_up), teacher(hr)).item()  # the tokens the CSM gets
        earlier = [F.l1_loss(s_out.hidden_states[i], t_out.hidden_states[i]).item() for i in range(1, layers)]
        last = F.l1_loss(s_out.hidden_states[layers], t_out.hidden_states[layers]).item()
    assert len(earlier) + 1 == layers  # N terms in all: N−1 layers + the final tokens
    assert loss == pytest.approx(final + sum(earlier), rel=1e-5)
    assert last > 1e-3 and abs(loss - (final + sum(earlier) + last)) > 1e-3  # a double count would show
