"""Stage 1: degradation-aware guidance extractors (DAGE, paper Sec. 3.3, Eq. 3, 5, 6).

An HR branch (the extractor as downloaded, frozen) and an LR branch (initialized from it) see
an HR crop and its Real-ESRGAN degradation. The LR branch learns to produce the HR branch's
intermediate representations (L1) and outputs:

* HED and segmentation — full fine-tuning; L1 on block / backbone features + α (β) · L1 on the
  edge map (class scores);
* depth — LoRA r = 8 on the backbone; L1 on backbone hidden states + γ · SILog on the
  predicted disparity (see :func:`silog` for how zero disparity is handled);
* CLIP — LoRA r = 8 on the vision tower; L1 on the final tokens (what the CSM consumes) + Σ L1
  on the outputs of layers 1..N−1 (layer N enters through the final tokens, so no layer counts
  twice).

The result goes into a weights directory as the extractor itself (HED, segmentation) or as a
LoRA adapter under ``<extractor>/lora`` (depth, CLIP), which serving merges at load.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, RandomSampler

from ..data import PairedImageDataset, USMConfig
from ..extractors import GuidanceExtractors, attach_lora, save_lora
from ..progress import progress_bar
from .config import save_config

log = logging.getLogger("megasr.dage")
KINDS = ("hed", "segmentation", "depth", "clip")
LORA_KINDS = ("depth", "clip")


@dataclass
class DAGETrainConfig:
    #: MegaSR weights directory whose extractors/<extractor> is fine-tuned
    weights: str = ""
    #: one of hed, segmentation, depth, clip
    extractor: str = "hed"
    train_data: list[str] = field(default_factory=list)
    output_dir: str = "runs/dage"
    crop_size: int = 512
    batch_size: int = 8
    learning_rate: float = 1e-5
    max_steps: int = 20_000
    #: output-loss weights: α (HED), β (segmentation), γ (depth SILog)
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    lora_rank: int = 8
    silog_lambda: float = 0.85
    #: SILog offset as a fraction of each disparity map's maximum (resolves depths up to ~1/x× the nearest)
    silog_relative_floor: float = 0.01
    #: mirror half the crops; USM-sharpen the HR before degrading it (SeeSR's pairs)
    use_hflip: bool = True
    use_usm: bool = True
    mixed_precision: str = "no"
    checkpoint_every: int = 2000
    log_every: int = 10
    num_workers: int = 4
    seed: int = 0


def disparity_floor(disparity: torch.Tensor, relative_floor: float = 0.01, eps: float = 1e-6) -> torch.Tensor:
    """Per-map offset ``relative_floor × max(d)`` (at least ``eps``), shaped to broadcast over ``B×…``.

    Depth-Anything predicts relative disparity (inverse depth): 0 at infinity (sky) and an
    arbitrary scale per image, so a fixed clamp is either far below the map's values (log
    explodes at the sky) or above them. Tied to the map's own maximum, the offset keeps the loss
    scale-invariant; it is a constant (detached).
    """
    peak = disparity.detach().flatten(1).amax(dim=1).clamp_min(0)
    return (relative_floor * peak).clamp_min(eps).view(-1, *[1] * (disparity.ndim - 1))


def silog(
    prediction: torch.Tensor, target: torch.Tensor, lam: float = 0.85, relative_floor: float = 0.01, eps: float = 1e-6
) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014) between disparity maps ``B×…``, mean over images.

    g = log(p + c_p) − log(t + c_t) with c = :func:`disparity_floor` of each map, then per image
    √(mean g² − λ·(mean g)²). Finite where either map is 0 (sky), with gradients bounded by 1/c_p;
    multiplying either map by a constant only shifts g, which λ = 1 removes exactly.
    """
    pred = prediction.clamp_min(0) + disparity_floor(prediction, relative_floor, eps)
    true = target.clamp_min(0) + disparity_floor(target, relative_floor, eps)
    diff = (torch.log(pred) - torch.log(true)).flatten(1)
    per_image = diff.pow(2).mean(dim=1) - lam * diff.mean(dim=1).pow(2)
    return torch.sqrt(per_image.clamp_min(eps)).mean()


def clip_representations(extractor, outputs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Eq. 6's CLIP terms, each tensor once: (outputs of layers 1..N−1, the final tokens F^ec).

    The final tokens are what the CSM consumes: the last layer's output, or its LayerNorm +
    projection where the encoder works in CLIP's projected space. Layer N's raw output is not
    listed with the intermediate ones: it is (or directly feeds) the final tokens, and listing it
    too made the loss count the last layer twice.
    """
    return list(outputs.hidden_states[1:-1]), extractor.tokens(outputs)


def representations(kind: str, extractor, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(intermediate representations, output) of an extractor on images in [0, 1]."""
    if kind == "hed":
        rgb = extractor.preprocess(images)
        blocks, sides = extractor.network.features(rgb)
        size = tuple(rgb.shape[-2:])
        mean_side = torch.stack(
            [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sides]
        ).mean(0)
        return blocks, torch.sigmoid(mean_side)
    if kind == "segmentation":
        outputs = extractor.backend.model(pixel_values=extractor.preprocess(images), output_hidden_states=True)
        classes = outputs.class_queries_logits.softmax(dim=-1)[..., :-1]
        scores = torch.einsum("bqc,bqhw->bchw", classes, outputs.masks_queries_logits.sigmoid())
        return list(outputs.encoder_hidden_states), scores
    if kind == "depth":
        outputs = extractor.model(pixel_values=extractor.preprocess(images), output_hidden_states=True)
        return list(outputs.hidden_states), outputs.predicted_depth
    if kind == "clip":
        outputs = extractor.vision_outputs(extractor.preprocess(images), output_hidden_states=True)
        return clip_representations(extractor, outputs)
    raise ValueError(f"extractor must be one of {', '.join(KINDS)}, got {kind!r}")


def dage_loss(kind: str, config: DAGETrainConfig, teacher, student, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Eq. 5/6 for one batch: the LR branch on LR (upscaled to the HR size) vs the HR branch on HR."""
    lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        hr_features, hr_out = representations(kind, teacher, hr)
    lr_features, lr_out = representations(kind, student, lr_up)
    if kind == "clip":  # Eq. 6: L1 on the final tokens + Σ L1 on the intermediate layers' tokens
        layers = sum(F.l1_loss(s.float(), t.float()) for s, t in zip(lr_features, hr_features))
        return F.l1_loss(lr_out.float(), hr_out.float()) + layers
    rep = sum(F.l1_loss(s.float(), t.float()) for s, t in zip(lr_features, hr_features)) / len(hr_features)
    if kind == "depth":
        return rep + config.gamma * silog(
            lr_out.float(), hr_out.float(), config.silog_lambda, config.silog_relative_floor
        )
    weight = config.alpha if kind == "hed" else config.beta
    return rep + weight * F.l1_loss(lr_out.float(), hr_out.float())


class DAGETrainer:
    def __init__(self, config: DAGETrainConfig) -> None:
        if config.extractor not in KINDS:
            raise ValueError(f"extractor must be one of {', '.join(KINDS)}, got {config.extractor!r}")
        if not config.weights or not config.train_data:
            raise ValueError("set `weights` (a MegaSR weights directory) and `train_data` (HR image folders)")
        self.config, self.kind = config, config.extractor
        self.output = Path(config.output_dir)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
        set_seed(config.seed)
        folder = Path(config.weights) / "extractors"
        loaded = GuidanceExtractors.from_pretrained(folder, enabled=[config.extractor])
        student = getattr(loaded, config.extractor)
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False).to(self.accelerator.device)
        if self.kind in LORA_KINDS:
            attach_lora(student, rank=config.lora_rank)  # base frozen, adapters trainable
        else:
            student.requires_grad_(True)
        student.train()
        self.student = student
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        self.student, self.optimizer = self.accelerator.prepare(self.student, self.optimizer)
        self.dataset = PairedImageDataset(
            config.train_data,
            crop_size=config.crop_size,
            seed=config.seed,
            hflip=config.use_hflip,
            usm=USMConfig() if config.use_usm else None,
        )
        self.step = 0

    def _batches(self):
        epoch = 0
        while True:
            self.dataset.set_epoch(epoch)
            sampler = RandomSampler(self.dataset, generator=torch.Generator().manual_seed(self.config.seed + epoch))
            yield from DataLoader(
                self.dataset, batch_size=self.config.batch_size, sampler=sampler, num_workers=self.config.num_workers
            )
            epoch += 1

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.accelerator.device
        return dage_loss(
            self.kind, self.config, self.teacher, self.student, batch["hr"].to(device), batch["lr"].to(device)
        )

    def train(self, max_steps: int | None = None) -> list[float]:
        target = max_steps or self.config.max_steps
        self.output.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.output / "config.json")
        losses, batches = [], self._batches()
        bar = progress_bar(target, f"dage {self.kind}", "step", initial=self.step)
        while self.step < target:
            loss = self.loss(next(batches))
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if self.step % self.config.log_every == 0 or self.step == target:
                self._log(self.step, losses[-1])
            if self.step % self.config.checkpoint_every == 0 or self.step == target:
                self.save(self.output / "checkpoints" / f"step-{self.step:08d}")
        bar.close()
        return losses

    def _log(self, step: int, loss: float) -> None:
        path = self.output / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "loss"])
            writer.writerow([step, loss])
        log.info("dage %s step %d loss %.5f", self.kind, step, loss)

    def save(self, directory: str | Path) -> Path:
        """The fine-tuned extractor (HED, segmentation) or its LoRA adapter (depth, CLIP)."""
        directory = Path(directory)
        student = self.accelerator.unwrap_model(self.student)
        if self.kind in LORA_KINDS:
            save_lora(student, directory / "lora")
        else:
            student.save_pretrained(directory)
        (directory / "dage.json").write_text(json.dumps({"extractor": self.kind, "step": self.step}))
        return directory

    def export(self, weights: str | Path) -> Path:
        """Install the result into ``weights/extractors/<extractor>`` (serving merges LoRA at load)."""
        target = Path(weights) / "extractors" / self.kind
        if self.kind in LORA_KINDS:
            if (target / "lora").exists():
                shutil.rmtree(target / "lora")
            save_lora(self.accelerator.unwrap_model(self.student), target / "lora")
        else:
            self.accelerator.unwrap_model(self.student).save_pretrained(target)
        return target
