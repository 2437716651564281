"""Two models behind one API, end to end: tiny SeeSR and SeeSR-Turbo weights (real pipelines on the
CPU), each behind its own in-process worker on its own queue; jobs submitted over HTTP with
``model`` run on the right one, and their records say which model ran them, untrained and all."""

from __future__ import annotations

import io

from fastapi.testclient import TestClient
from PIL import Image
from rq.worker import SimpleWorker
from skimage import data

from megasr_core.identity import TINY_REASON
from service.app import create_app
from tests.service.helpers import make_settings, submit
from worker.main import make_worker
from worker.runtime import install_runtime


class DenoiserCalls:
    """The model batch of every denoiser call (classifier-free guidance doubles it)."""

    def __init__(self, pipeline) -> None:
        self.batches: list[int] = []
        self.handle = pipeline.denoiser.register_forward_pre_hook(
            lambda _m, args: self.batches.append(args[0].shape[0])
        )

    def close(self) -> None:
        self.handle.remove()


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((32, 32), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def run_burst(settings, model: str, pipeline):
    """`megasr worker --burst` of ``model``, in this process: its runtime, then RQ's loop on its queue."""
    runtime = install_runtime(settings.model_copy(update={"model": model}), pipeline)
    make_worker(SimpleWorker, runtime.services.redis, runtime.queue.name, name=runtime.name).work(burst=True)
    return runtime


def test_jobs_run_on_the_model_they_name(tmp_path, db_url, seesr_pipelines):
    """``seesr_pipelines``: tiny random SeeSR and SeeSR-Turbo pipelines on the CPU (tests/conftest.py)."""
    pipelines = seesr_pipelines
    settings = make_settings(tmp_path, db_url, models="seesr,seesr-turbo")
    calls = {family: DenoiserCalls(pipeline) for family, pipeline in pipelines.items()}
    try:
        with TestClient(create_app(settings)) as client:
            seesr = submit(client, image=small_png(), steps=1, seed=1, scale=2).json()  # no model: the default
            turbo = submit(client, image=small_png(), model="seesr-turbo", seed=1, scale=2).json()  # its 2 steps
            assert (seesr["model"], turbo["model"]) == ("seesr", "seesr-turbo")

            run_burst(settings, "seesr", pipelines["seesr"])
            assert calls["seesr"].batches == [2] and calls["seesr-turbo"].batches == []  # 1 step, with CFG
            assert client.get(f"/v1/jobs/{turbo['id']}").json()["status"] == "queued"  # not the seesr worker's

            runtime = run_burst(settings, "seesr-turbo", pipelines["seesr-turbo"])
            assert calls["seesr-turbo"].batches == [1, 1]  # the family's 2 steps, without CFG (guidance 1)

            for job, family in ((seesr, "seesr"), (turbo, "seesr-turbo")):
                done = client.get(f"/v1/jobs/{job['id']}").json()
                assert done["status"] == "succeeded", done
                assert done["model"] == done["model_info"]["name"] == done["model_info"]["family"] == family
                assert done["model_info"]["trained"] is False and done["model_info"]["untrained_reason"] == TINY_REASON
                assert done["model_info"]["weights"] == family and done["model_info"]["tagger"] == "ram"
                assert done["output"] == {"width": 64, "height": 64}
                assert Image.open(io.BytesIO(client.get(done["result_url"]).content)).size == (64, 64)
            assert client.get(f"/v1/jobs/{turbo['id']}").json()["model_info"]["default_steps"] == 2
            assert client.get(f"/v1/jobs/{turbo['id']}").json()["params"]["steps"] is None  # as the client sent it

            runtime.announce()
            models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
            assert models["seesr-turbo"]["workers"] == 1 and models["seesr-turbo"]["title"] == "SeeSR-Turbo"
            assert models["seesr-turbo"]["trained"] is False and models["seesr"]["workers"] == 0
            runtime.withdraw()
    finally:
        for recorder in calls.values():
            recorder.close()
