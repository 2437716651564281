"""Stage 1: degradation-aware guidance extractors (DAGE, paper Sec. 3.3, Eq. 3, 5, 6).

An HR branch (the extractor as downloaded, frozen) and an LR branch (initialized from it) see
an HR crop and its Real-ESRGAN degradation. The LR branch learns to produce the HR branch's
intermediate representations (L1) and outputs:

* HED and segmentation — full fine-tuning; L1 on block / backbone features + α (β) · L1 on the
  edge map (class scores);
* depth — LoRA r = 8 on the backbone; L1 on backbone hidden states + γ · SILog on the depth;
* CLIP — LoRA r = 8 on the vision tower; L1 on the final tokens + Σ L1 on every layer's tokens.

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

from ..data import PairedImageDataset
from ..extractors import GuidanceExtractors, attach_lora, save_lora
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
    mixed_precision: str = "no"
    checkpoint_every: int = 2000
    log_every: int = 10
    num_workers: int = 4
    seed: int = 0


def silog(prediction: torch.Tensor, target: torch.Tensor, lam: float = 0.85, eps: float = 1e-6) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al.) between positive depth maps."""
    diff = torch.log(prediction.clamp_min(eps)) - torch.log(target.clamp_min(eps))
    return torch.sqrt((diff.pow(2).mean() - lam * diff.mean().pow(2)).clamp_min(eps))


def representations(kind: str, extractor, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(intermediate representations, output) of an extractor on images in [0, 1]."""
    if kind == "hed":
        rgb = extractor.preprocess(images)
        blocks, sides = extractor.network.features(rgb)
        size = tuple(rgb.shape[-2:])
        mean_side = torch.stack([F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sides]).mean(0)
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
        return [outputs.last_hidden_state, *outputs.hidden_states[1:]], outputs.last_hidden_state
    raise ValueError(f"extractor must be one of {', '.join(KINDS)}, got {kind!r}")


def dage_loss(kind: str, config: DAGETrainConfig, teacher, student, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Eq. 5/6 for one batch: the LR branch on LR (upscaled to the HR size) vs the HR branch on HR."""
    lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        hr_features, hr_out = representations(kind, teacher, hr)
    lr_features, lr_out = representations(kind, student, lr_up)
    if kind == "clip":  # Eq. 6: L1 on the final embeddings + Σ L1 on every layer's tokens
        return sum(F.l1_loss(s.float(), t.float()) for s, t in zip(lr_features, hr_features))
    rep = sum(F.l1_loss(s.float(), t.float()) for s, t in zip(lr_features, hr_features)) / len(hr_features)
    if kind == "depth":
        return rep + config.gamma * silog(lr_out.float(), hr_out.float(), config.silog_lambda)
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
        self.dataset = PairedImageDataset(config.train_data, crop_size=config.crop_size, seed=config.seed)
        self.step = 0

    def _batches(self):
        epoch = 0
        while True:
            self.dataset.set_epoch(epoch)
            sampler = RandomSampler(self.dataset, generator=torch.Generator().manual_seed(self.config.seed + epoch))
            yield from DataLoader(self.dataset, batch_size=self.config.batch_size, sampler=sampler,
                                  num_workers=self.config.num_workers)
            epoch += 1

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.accelerator.device
        return dage_loss(self.kind, self.config, self.teacher, self.student, batch["hr"].to(device), batch["lr"].to(device))

    def train(self, max_steps: int | None = None) -> list[float]:
        target = max_steps or self.config.max_steps
        self.output.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.output / "config.json")
        losses, batches = [], self._batches()
        while self.step < target:
            loss = self.loss(next(batches))
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            losses.append(float(loss.detach()))
            if self.step % self.config.log_every == 0 or self.step == target:
                self._log(self.step, losses[-1])
            if self.step % self.config.checkpoint_every == 0 or self.step == target:
                self.save(self.output / "checkpoints" / f"step-{self.step:08d}")
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
