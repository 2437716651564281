"""Every UpscaleParams field reaches the pipeline: a job's result equals MegaSRPipeline's output for the same
parameters.

Jobs go in through the HTTP API and are run by the real worker task (RQ SimpleWorker, as ``megasr worker``
does), one job at a time, on the tiny weights; results come back through ``GET /v1/jobs/{id}/result``.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data

from service.app import create_app
from service.contracts import UpscaleParams
from tests.harness.valkey import fresh_database_url
from tests.service.helpers import form_fields, make_settings, run_worker

#: a value other than the default for every field that changes pixels (kept cheap: 2 steps)
BASE = {
    "scale": 2,
    "steps": 2,
    "guidance_scale": 3.0,
    "seed": 7,
    "prompt": "a red brick wall",
    "negative_prompt": "blurry, watermark",
    "color_fix": "wavelet",
    "sampler": "unipc",
    "cfg_interval": (0.0, 0.5),
}
#: for each field, a second value; a worker that drops the field gives the same image for both
VARIANTS = {
    "scale": 3,
    "steps": 1,
    "guidance_scale": 1.0,
    "seed": 8,
    "prompt": "a snowy mountain",
    "negative_prompt": "cartoon",
    "color_fix": "none",
    "sampler": "ddpm",  # (at 2 steps both solvers are first order, the same update)
    "cfg_interval": (0.5, 1.0),
    "output_format": "jpeg",
}
#: fields that do not change the pixels, and where they are covered
NOT_PIXELS = {
    "output_format": "the encoding: test_output_format_is_the_stored_encoding",
    "webhook_url": "delivery only: tests/service/test_webhooks.py",
    "model": "which model runs it: tests/service/test_model_routing.py",
}
#: UpscaleParams name → MegaSRPipeline argument
PIPELINE_ARGUMENT = {"steps": "num_inference_steps"}
MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff"}


def input_png() -> bytes:
    """128×128: at scale 2 the pipeline works at 512 px (its minimum) and returns 256×256."""
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pipeline(tiny_weights, tmp_path_factory):
    """The tiny pipeline with a tagger that adds no tags, so the user's prompt fits the tiny tokenizer.

    (The tiny tokenizer is character-level: ten tags fill its 77 tokens and would cut any prompt off.)
    """
    from megasr_core.pipelines import MegaSRPipeline

    weights = tmp_path_factory.mktemp("passthrough") / "tiny-no-tags"
    shutil.copytree(tiny_weights, weights)
    tagger_config = weights / "extractors" / "tagger" / "tagger.json"
    tagger_config.write_text(json.dumps({**json.loads(tagger_config.read_text()), "max_tags": 0}))
    return MegaSRPipeline.from_pretrained(weights, device="cpu")


@pytest.fixture(scope="module")
def run_job(pipeline, tmp_path_factory, redis_url):
    """run(fields) → (result bytes, content type): one job through the API and the worker (cached per fields
    unless ``fresh``)."""
    url = fresh_database_url(redis_url)  # no jobs of other tests in this queue or tenant
    settings = make_settings(tmp_path_factory.mktemp("passthrough-service"), url)
    image = input_png()
    results: dict[tuple, tuple[bytes, str]] = {}
    jobs: dict[tuple, dict] = {}  # the job views, for the fields the worker records

    def run(fields: dict, fresh: bool = False) -> tuple[bytes, str]:
        key = tuple(sorted(fields.items()))
        if key in results and not fresh:
            return results[key]
        files = {"image": ("photo.png", image, "image/png")}
        response = client.post("/v1/upscale", files=files, data=form_fields(fields))
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        run_worker(settings, pipeline)  # the only job in the queue
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
        jobs[key] = job
        for name, value in fields.items():
            assert job["params"][name] == (list(value) if isinstance(value, tuple) else value)  # as sent
        result = client.get(job["result_url"])
        assert result.status_code == 200
        results.setdefault(key, (result.content, result.headers["content-type"]))
        return result.content, result.headers["content-type"]

    run.jobs = jobs
    with TestClient(create_app(settings)) as client:
        yield run


def direct(pipeline, fields: dict) -> np.ndarray:
    """MegaSRPipeline called directly with the same image and parameters."""
    arguments = {PIPELINE_ARGUMENT.get(name, name): value for name, value in fields.items() if name not in NOT_PIXELS}
    return pixels_of(pipeline(input_png(), **arguments).images[0])


def pixels_of(image) -> np.ndarray:
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_cases_cover_every_field_of_the_contract():
    """BASE and VARIANTS name every UpscaleParams field (a new field fails here until it is tested) and avoid
    defaults."""
    assert set(UpscaleParams.model_fields) == set(BASE) | set(NOT_PIXELS)
    assert set(VARIANTS) == set(UpscaleParams.model_fields) - {"webhook_url", "model"}
    for name, value in BASE.items():
        assert value != UpscaleParams.model_fields[name].default, name
    assert VARIANTS["output_format"] != UpscaleParams.model_fields["output_format"].default
    for name, value in VARIANTS.items():
        assert value != BASE.get(name), name


def test_job_result_equals_the_pipeline_for_the_same_parameters(run_job, pipeline):
    """With a non-default value in every pixel-changing field, the job's PNG equals the pipeline's image
    (within 1/255)."""
    content, content_type = run_job(BASE)
    assert content_type == "image/png" and content.startswith(MAGIC["png"])
    job, expected = pixels_of(content), direct(pipeline, BASE)
    assert job.shape == expected.shape == (256, 256, 3)
    assert int(np.abs(job - expected).max()) <= 1


@pytest.mark.parametrize("field", [name for name in VARIANTS if name != "output_format"])
def test_changing_only_one_field_changes_the_job_result(run_job, field):
    """A job that differs from BASE in one field only gives another image: the worker does not drop that field."""
    base = pixels_of(run_job(BASE)[0])
    changed = pixels_of(run_job({**BASE, field: VARIANTS[field]})[0])
    if field == "scale":
        assert base.shape == (256, 256, 3) and changed.shape == (384, 384, 3)
    else:
        assert changed.shape == base.shape
        assert int(np.abs(changed - base).max()) > 1, (
            f"{field}={VARIANTS[field]!r} gave the same image as {BASE[field]!r}"
        )


def test_a_second_job_with_the_same_seed_gives_the_same_image(run_job):
    """The seed reaches the pipeline: the same job run again is identical (another seed differs, above)."""
    first = pixels_of(run_job(BASE)[0])
    again = pixels_of(run_job(BASE, fresh=True)[0])
    assert np.array_equal(first, again)


def test_output_format_is_the_stored_encoding(run_job):
    """output_format=jpeg stores a JPEG (served as image/jpeg) of the same picture as the PNG job."""
    png_content, _ = run_job(BASE)
    jpeg_content, content_type = run_job({**BASE, "output_format": "jpeg"})
    assert content_type == "image/jpeg" and jpeg_content.startswith(MAGIC["jpeg"])
    assert Image.open(io.BytesIO(jpeg_content)).format == "JPEG"
    # Same picture, JPEG-compressed: luminance PSNR > 35 dB (measured ~43 dB; another seed gives ~20 dB).
    # (RGB PSNR is lower: 4:2:0 chroma subsampling of the tiny random model's noisy colours.)
    reference = np.asarray(Image.open(io.BytesIO(png_content)).convert("L"), dtype=np.float64)
    lossy = np.asarray(Image.open(io.BytesIO(jpeg_content)).convert("L"), dtype=np.float64)
    assert lossy.shape == reference.shape == (256, 256)
    mse = float(np.mean((lossy - reference) ** 2))
    assert 0 < mse and 10 * np.log10(255**2 / mse) > 35


def test_the_job_records_which_tagger_ran(run_job, pipeline):
    """The worker writes the tagger's name on the job (the tiny weights have the CLIP fallback, no RAM)."""
    run_job(BASE)
    job = run_job.jobs[tuple(sorted(BASE.items()))]
    assert job["tagger"] == pipeline.extractors.tagger_name == "clip-zero-shot"
