"""A trained-and-exported model is served by the worker through the HTTP API."""

from __future__ import annotations

from fastapi.testclient import TestClient
from PIL import Image
from skimage import data

from megasr_core.pipelines import MegaSRPipeline
from megasr_core.train import MegaSRTrainConfig, MegaSRTrainer
from service.app import create_app
from tests.service.helpers import make_settings, run_worker, submit


def test_worker_serves_an_exported_training_run(tmp_path, redis_url, tiny_weights):
    folder = tmp_path / "hr"
    folder.mkdir()
    Image.fromarray(data.astronaut()).save(folder / "a.png")
    trainer = MegaSRTrainer(
        MegaSRTrainConfig(
            weights=str(tiny_weights),
            train_data=[str(folder)],
            output_dir=str(tmp_path / "run"),
            crop_size=64,
            batch_size=1,
            learning_rate=1e-3,
            max_steps=2,
            num_workers=0,
            checkpoint_every=2,
        )
    )
    trainer.train()
    exported = trainer.export(tmp_path / "served")
    pipeline = MegaSRPipeline.from_pretrained(exported, device="cpu")
    settings = make_settings(tmp_path, redis_url)
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, steps=2).json()["id"]
        run_worker(settings, pipeline)
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["output"] == {"width": 96, "height": 64}
