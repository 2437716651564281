"""Stage 2: train MegaSR (paper Eq. 4) with accelerate — eps-MSE, uniform timesteps.

Only the denoiser's training group learns (the ControlNet whole; in the UNet the CSM
connectors and projections and the MSFM); the VAE, text encoder, UNet base and the guidance
extractors stay frozen. Mixed precision, gradient accumulation and multi-GPU come from
``accelerate``; checkpoints hold the optimizer, the RNG states and the step, so a resumed run
continues exactly. Validation upscales degraded validation crops and logs PSNR/SSIM (Y).

With several processes (``accelerate launch --num_processes N``) each rank trains on its own
shard of every epoch (a ``DistributedSampler``: the same shuffled order, every N-th image) with
its own noise, DDP averages the gradients, only the main process writes files, and every
checkpoint records a SHA-256 digest of the trainable weights per rank, so diverged ranks fail
loudly instead of silently saving one rank's weights.

The recipe is SeeSR's: the prompt is the tags of the HR crop (the ground truth, as SeeSR's
``make_tags.py`` tags it, not the degraded input), without the inference-time quality suffix
"clean, high-resolution, 8k"; HR crops are mirrored half of the time and USM-sharpened, and the
LR is degraded from the sharpened HR (``megasr_core.data``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader, DistributedSampler

from ..data import PairedImageDataset, USMConfig
from ..families import tags_to_prompt
from ..image_quality import psnr_y, ssim_y
from ..pipelines import MegaSRPipeline
from ..progress import progress_bar
from .config import MegaSRTrainConfig, save_config

log = logging.getLogger("megasr.train")
STATE_FILE = "trainer_state.json"


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own per rank; rank 0 keeps ``seed``, so a single-process run is unchanged."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def training_prompt(tags: list[str]) -> str:
    """The tags alone: SeeSR adds "clean, high-resolution, 8k" only at inference."""
    return tags_to_prompt(tags, suffix="")


class EMA:
    """Exponential moving average of the trainable parameters (kept in fp32)."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        for name, param in parameters.items():
            self.shadow[name].lerp_(param.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


class MegaSRTrainer:
    def __init__(self, config: MegaSRTrainConfig) -> None:
        if not config.weights or not config.train_data:
            raise ValueError("set `weights` (a MegaSR weights directory) and `train_data` (HR image folders)")
        self.config = config
        self.output = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        # The weights are loaded (DDP also broadcasts rank 0's), so per-rank seeds only vary the draws.
        set_seed(config.seed, device_specific=True)
        device = self.accelerator.device
        self.pipeline = MegaSRPipeline.from_pretrained(config.weights, device=device, torch_dtype=torch.float32)
        self.denoiser = self.pipeline.denoiser
        self.denoiser.apply_trainable_flags()
        self.denoiser.train()
        if config.gradient_checkpointing:
            self.denoiser.unet.enable_gradient_checkpointing()
            self.denoiser.controlnet.enable_gradient_checkpointing()
        self.trainable = self.denoiser.parameter_groups().trainable
        self.optimizer = torch.optim.Adam(
            list(self.trainable.values()),
            lr=config.learning_rate,
            betas=tuple(config.adam_betas),
            weight_decay=config.weight_decay,
        )
        self.dataset = PairedImageDataset(
            config.train_data,
            crop_size=config.crop_size,
            seed=config.seed,
            hflip=config.use_hflip,
            usm=USMConfig() if config.use_usm else None,
        )
        self.denoiser, self.optimizer = self.accelerator.prepare(self.denoiser, self.optimizer)
        self.ema = EMA(self.trainable, config.ema_decay) if config.ema_decay else None
        self.step = 0
        self.epoch = 0
        self.batches_into_epoch = 0
        self.noise_generator = torch.Generator().manual_seed(rank_seed(config.seed + 1, self.accelerator.process_index))

    # ------------------------------------------------------------------ data
    def _loader(self) -> DataLoader:
        """This rank's shard of the epoch: one shuffled order (seed + epoch), every N-th image."""
        self.dataset.set_epoch(self.epoch)
        sampler = DistributedSampler(
            self.dataset,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
            shuffle=True,
            seed=self.config.seed,
        )
        sampler.set_epoch(self.epoch)
        return DataLoader(
            self.dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.config.num_workers,
            persistent_workers=False,
        )

    def _batches(self):
        while True:
            loader = self._loader()
            for index, batch in enumerate(loader):
                if index < self.batches_into_epoch:
                    continue  # resuming mid-epoch: the same order, the seen batches skipped
                self.batches_into_epoch = index + 1
                yield batch
            self.epoch += 1
            self.batches_into_epoch = 0

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def _hr_tags(self, hr: torch.Tensor) -> list[list[str]]:
        """Tags of the HR crops: SeeSR tags the ground truth, so the prompt names what should appear."""
        extractors = self.pipeline.extractors
        if not self.config.use_tags or extractors is None or "tagger" not in extractors.available:
            return [[] for _ in range(hr.shape[0])]
        return extractors(hr.to(extractors.dtype), enabled=["tagger"]).tags

    @torch.no_grad()
    def _condition(self, lr: torch.Tensor, hr: torch.Tensor):
        """Guidance and image tokens from the LR (as at inference); the prompt from the HR's tags."""
        pipe = self.pipeline
        guidance, tokens, _ = pipe.extract_guidance(lr, tuple(hr.shape[-2:]), with_tags=False)
        keep = torch.rand(lr.shape[0], generator=self.noise_generator) >= self.config.empty_prompt_probability
        prompts = [training_prompt(t) if k else "" for t, k in zip(self._hr_tags(hr), keep.tolist())]
        text = pipe._encode_text(prompts)
        return guidance, tokens, text

    @torch.no_grad()
    def _model_inputs(self, batch: dict[str, torch.Tensor], sample_latents: bool = True) -> dict:
        """Noised HR latents at uniform timesteps, their noise, and every condition, for a batch."""
        pipe = self.pipeline
        device = self.accelerator.device
        lr, hr = batch["lr"].to(device), batch["hr"].to(device)
        posterior = pipe.vae.encode(hr * 2 - 1).latent_dist
        latents = posterior.mean
        if sample_latents:
            latents = latents + posterior.std * torch.randn(latents.shape, generator=self.noise_generator).to(device)
        latents = latents * pipe.vae.config.scaling_factor
        control = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        guidance, tokens, text = self._condition(lr, hr)
        noise = torch.randn(latents.shape, generator=self.noise_generator).to(device)
        timesteps = torch.randint(
            0, pipe.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=self.noise_generator
        ).to(device)
        return {
            "noisy": pipe.scheduler.add_noise(latents, noise, timesteps),
            "noise": noise,
            "timesteps": timesteps,
            "text": text,
            "tokens": tokens,
            "guidance": guidance,
            "control": control,
        }

    def _loss(self, inputs: dict) -> torch.Tensor:
        prediction = self.denoiser(
            inputs["noisy"],
            inputs["timesteps"],
            inputs["text"],
            image_embeds=inputs["tokens"],
            guidance=inputs["guidance"],
            control_image=inputs["control"],
        )
        return F.mse_loss(prediction.float(), inputs["noise"].float())

    def training_step(self, batch: dict[str, torch.Tensor]) -> float:
        inputs = self._model_inputs(batch)
        with self.accelerator.accumulate(self.denoiser):
            loss = self._loss(inputs)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.config.max_grad_norm:
                self.accelerator.clip_grad_norm_(list(self.trainable.values()), self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def evaluation_loss(self, batch: dict[str, torch.Tensor], seed: int = 0) -> float:
        """The eps-MSE on ``batch`` with noise, timesteps and prompts fixed by ``seed`` (comparable across steps)."""
        saved = self.noise_generator.get_state()
        self.noise_generator.manual_seed(seed)
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            return float(self._loss(self._model_inputs(batch, sample_latents=False)))
        finally:
            self.noise_generator.set_state(saved)
            self.denoiser.train(was_training)

    # ------------------------------------------------------------------ loop
    def train(self, max_steps: int | None = None) -> list[float]:
        """Run until ``max_steps`` optimizer steps (the config's by default); returns the losses."""
        target = max_steps or self.config.max_steps
        if self.accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.output / "config.json")
        self.accelerator.wait_for_everyone()
        losses = []
        batches = self._batches()
        started, first_step = time.perf_counter(), self.step
        bar = progress_bar(target, "training", "step", initial=self.step, enabled=self.accelerator.is_main_process)
        while self.step < target:
            loss = self.training_step(next(batches))
            if not self.accelerator.sync_gradients:
                continue
            self.step += 1
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.ema is not None:
                self.ema.update(self.trainable)
            if self.step % self.config.log_every == 0 or self.step == target:
                rate = (self.step - first_step) / (time.perf_counter() - started)
                self._log({"step": self.step, "loss": loss, "steps_per_s": rate})
            if self.config.val_data and self.step % self.config.validate_every == 0:
                self._log({"step": self.step, **self.validate()})
            if self.step % self.config.checkpoint_every == 0 or self.step == target:
                self.save_checkpoint()
        bar.close()
        return losses

    def _log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        path = self.output / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(
                handle, fieldnames=["step", "loss", "steps_per_s", "psnr_y", "ssim_y"], extrasaction="ignore"
            )
            if new:
                writer.writeheader()
            writer.writerow(row)
        log.info("%s", {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Upscale fixed degraded validation crops; mean PSNR/SSIM on Y against the HR.

        The SR images are written to ``output_dir/validation/step-N/`` next to their LR and HR.
        """
        from ..pipelines.image_processing import to_pil

        # The true HR (no USM, no flip), as benchmarks measure it.
        dataset = PairedImageDataset(
            self.config.val_data, crop_size=self.config.crop_size, seed=12345, hflip=False, usm=None
        )
        self.denoiser.eval()
        psnrs, ssims = [], []
        try:
            for index in range(min(self.config.validation_images, len(dataset))):
                pair = dataset[index]
                result = self.pipeline(
                    to_pil(pair["lr"]),
                    scale=self.config.crop_size / pair["lr"].shape[-1],
                    num_inference_steps=self.config.validation_steps,
                    seed=index,
                )
                sr = torch.from_numpy(np.asarray(result.images[0], dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
                if self.accelerator.is_main_process:
                    folder = self.output / "validation" / f"step-{self.step:08d}"
                    folder.mkdir(parents=True, exist_ok=True)
                    result.images[0].save(folder / f"{index:03d}_sr.png")
                    to_pil(pair["lr"]).save(folder / f"{index:03d}_lr.png")
                    to_pil(pair["hr"]).save(folder / f"{index:03d}_hr.png")
                psnrs.append(float(psnr_y(sr, pair["hr"][None], crop=4)))
                ssims.append(float(ssim_y(sr, pair["hr"][None], crop=4)))
        finally:
            self.denoiser.train()
        return {"psnr_y": sum(psnrs) / len(psnrs), "ssim_y": sum(ssims) / len(ssims)}

    # ------------------------------------------------------------------ checkpoints
    def weights_digest(self) -> str:
        """SHA-256 over the trainable parameters (by name, as float32 bytes): equal on every rank."""
        digest = hashlib.sha256()
        for name in sorted(self.trainable):
            digest.update(name.encode())
            digest.update(self.trainable[name].detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save_checkpoint(self) -> Path:
        """Save on every rank (accelerate writes the weights once, RNG states per rank); all ranks wait for it."""
        path = self.output / "checkpoints" / f"step-{self.step:08d}"
        accelerator = self.accelerator
        accelerator.save_state(str(path))
        # One entry per rank, gathered to the main process (a no-op in a single process).
        noise_generators = gather_object([self.noise_generator.get_state().tolist()])
        digests = gather_object([self.weights_digest()])
        if accelerator.is_main_process:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batches_into_epoch": self.batches_into_epoch,
                "num_processes": accelerator.num_processes,
                "noise_generators": noise_generators,
                "weights_sha256": digests,
            }
            (path / STATE_FILE).write_text(json.dumps(state))
            if self.ema is not None:
                torch.save(self.ema.state_dict(), path / "ema.pt")
            checkpoints = sorted((self.output / "checkpoints").glob("step-*"))
            for old in checkpoints[: -self.config.checkpoints_to_keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks hold different weights at step {self.step} (digests {digests}); see {path}")
        return path

    def latest_checkpoint(self) -> Path | None:
        checkpoints = sorted((self.output / "checkpoints").glob("step-*"))
        return checkpoints[-1] if checkpoints else None

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` (default: the newest checkpoint); False when there is none."""
        path = Path(path) if path else self.latest_checkpoint()
        if path is None:
            return False
        self.accelerator.load_state(str(path))
        state = json.loads((path / STATE_FILE).read_text())
        self.step, self.epoch, self.batches_into_epoch = state["step"], state["epoch"], state["batches_into_epoch"]
        generators = state.get("noise_generators") or [state["noise_generator"]]
        rank, saved_by = self.accelerator.process_index, state.get("num_processes", 1)
        if saved_by != self.accelerator.num_processes:
            log.warning(
                "checkpoint %s was written by %d processes, resuming with %d: the data order and noise "
                "continue, but not exactly as the original run would have",
                path,
                saved_by,
                self.accelerator.num_processes,
            )
        if rank < len(generators):
            self.noise_generator.set_state(torch.tensor(generators[rank], dtype=torch.uint8))
        if self.ema is not None and (path / "ema.pt").is_file():
            self.ema.load_state_dict(torch.load(path / "ema.pt", weights_only=True))
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ export
    def export(self, directory: str | Path, use_ema: bool = True) -> Path:
        """Write a serving weights directory (and ``megasr_overlay.safetensors`` inside it)."""
        denoiser = self.accelerator.unwrap_model(self.denoiser)
        if use_ema and self.ema is not None:
            backup = {n: p.detach().clone() for n, p in self.trainable.items()}
            with torch.no_grad():
                for name, param in self.trainable.items():
                    param.copy_(self.ema.shadow[name].to(param.dtype))
        try:
            directory = Path(directory)
            self.pipeline.save_pretrained(directory)
            denoiser.save_overlay(directory / "megasr_overlay.safetensors")
        finally:
            if use_ema and self.ema is not None:
                with torch.no_grad():
                    for name, param in self.trainable.items():
                        param.copy_(backup[name])
        return directory


def export_run(
    run_dir: str | Path, output: str | Path, checkpoint: str | Path | None = None, use_ema: bool = True
) -> Path:
    """Turn a training run (its config and newest checkpoint) into a serving weights directory."""
    from .config import load_config

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.json", overrides={"output_dir": str(run_dir), "num_workers": 0})
    trainer = MegaSRTrainer(config)
    if not trainer.resume(checkpoint):
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")
    return trainer.export(output, use_ema=use_ema)
