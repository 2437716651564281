"""Stage 1 (DAGE): a few steps lower the loss; LoRA moves only adapters, full fine-tuning the LR branch only."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from skimage import data

from megasr_core.extractors import GuidanceExtractors
from megasr_core.train.dage import DAGETrainConfig, DAGETrainer, silog

RATES = {"hed": 1e-4, "segmentation": 1e-4, "depth": 3e-3, "clip": 3e-3}


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dage-hr")
    for name, array in (("astronaut", data.astronaut()), ("coffee", data.coffee())):
        Image.fromarray(array).save(folder / f"{name}.png")
    return folder


def make(kind, weights, hr_folder, output) -> DAGETrainer:
    return DAGETrainer(
        DAGETrainConfig(
            weights=str(weights),
            extractor=kind,
            train_data=[str(hr_folder)],
            output_dir=str(output),
            crop_size=64,
            batch_size=2,
            learning_rate=RATES[kind],
            num_workers=0,
            checkpoint_every=3,
            log_every=1,
        )
    )


@pytest.mark.parametrize("kind", list(RATES))
def test_steps_lower_the_loss_and_touch_only_the_intended_parameters(kind, tiny_weights, hr_folder, tmp_path):
    trainer = make(kind, tiny_weights, hr_folder, tmp_path / "run")
    batch = {k: torch.stack([trainer.dataset[i][k] for i in range(2)]) for k in ("lr", "hr")}
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    losses = []
    for _ in range(6):  # on one fixed batch, so the decrease is not sampling noise
        loss = trainer.loss(batch)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    after = trainer.student.state_dict()
    changed = {k for k, v in student_before.items() if not torch.equal(v, after[k])}
    assert changed
    if kind in ("depth", "clip"):
        assert all("lora_" in k for k in changed), sorted(changed)[:5]
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher_before.items())


@pytest.mark.parametrize("kind", ["hed", "depth"])
def test_train_save_and_export_into_a_weights_dir(kind, tiny_weights, hr_folder, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    trainer = make(kind, weights, hr_folder, tmp_path / "run")
    trainer.train(max_steps=3)
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "dage.json").is_file()
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 4
    target = trainer.export(weights)
    if kind == "depth":
        assert (target / "lora" / "adapter_config.json").is_file()
    loaded = getattr(GuidanceExtractors.from_pretrained(weights / "extractors", enabled=[kind]), kind)
    images = trainer.dataset[0]["lr"][None]
    student = trainer.accelerator.unwrap_model(trainer.student).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(images), student(images), atol=1e-4)


def test_silog_is_scale_invariant():
    depth = torch.rand(2, 16, 16) + 0.1
    assert silog(depth, depth).item() < 1e-2
    assert silog(depth * 3, depth, lam=1.0).item() < 1e-2
    assert silog(depth.flip(-1), depth).item() > 0.05


def test_cli_train_dage(tiny_weights, hr_folder, tmp_path):
    from typer.testing import CliRunner

    from megasr_core.cli import app

    (tmp_path / "d.toml").write_text(
        f'weights = "{tiny_weights}"\nextractor = "clip"\ntrain_data = ["{hr_folder}"]\n'
        f'output_dir = "{tmp_path / "run"}"\n'
        "crop_size = 64\nbatch_size = 2\nmax_steps = 2\nnum_workers = 0\n"
    )
    result = CliRunner().invoke(app, ["train", "dage", "--config", str(tmp_path / "d.toml")])
    assert result.exit_code == 0, result.output
    assert "dage clip: 100%" in result.output and "2/2 [" in result.output and "loss=" in result.output
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "lora" / "adapter_model.safetensors").is_file()
    (tmp_path / "bad.toml").write_text('weights = "w"\nextractor = "normals"\ntrain_data = ["x"]\n')
    assert CliRunner().invoke(app, ["train", "dage", "--config", str(tmp_path / "bad.toml")]).exit_code == 2
