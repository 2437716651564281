"""Issue 23's end to end: tiny SeeSR and SeeSR-Turbo checkpoints in SeeSR's release layout go
through ``megasr weights assemble`` → ``megasr upscale`` → the real API (``megasr serve`` over
Valkey and SeaweedFS's S3) with one ``megasr worker`` per model, the ``model`` field routing each
job to its model's worker → ``megasr eval`` with both models side by side. Real processes and
the console script throughout; the weights are random, so only the plumbing is under test.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from skimage import data

from tests.harness.processes import start_serve
from tests.harness.valkey import fresh_database_url
from tests.upstream_layouts import write_releases

MEGASR = str(Path(sys.executable).with_name("megasr"))
KEY = "e2e-families-key-0123"
FAMILIES = {"seesr": "SeeSR", "seesr-turbo": "SeeSR-Turbo"}


def run(*args: str | Path, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([MEGASR, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"megasr {' '.join(map(str, args))}: {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Both families assembled by the CLI from the upstream layouts (SD2-base / sd-turbo, SeeSR, RAM, DAPE)."""
    root = tmp_path_factory.mktemp("families-e2e")
    releases = write_releases(root / "releases")
    made = {}
    for family, base in (("seesr", releases.sd2), ("seesr-turbo", releases.sd_turbo)):
        result = run(
            "weights",
            "assemble",
            "--family",
            family,
            "--seesr",
            releases.seesr,
            "--sd2",
            base,
            "--ram",
            releases.ram,
            "--dape",
            releases.dape,
            "--ram-config",
            releases.ram_config,
            "-o",
            root / family,
        )
        assert f"wrote {FAMILIES[family]} weights" in result.stdout
        made[family] = root / family
    return made


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "cat.png"
    Image.fromarray(data.chelsea()).resize((32, 21), Image.Resampling.BICUBIC).save(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_upscale_runs_each_assembled_family(weights, photo, tmp_path, family):
    steps = ["--steps", "2"] if family == "seesr" else []  # Turbo runs its own 2 steps
    result = run(
        "upscale", photo, "--weights", weights[family], "-o", tmp_path, "--device", "cpu", "--seed", "1", *steps
    )
    assert (
        f"model: {FAMILIES[family]} (weights {family}, float32)" in result.stderr and "UNTRAINED" not in result.stderr
    )
    with Image.open(tmp_path / "cat.png") as image:
        assert image.size == (128, 84)


def _wait_done(base: str, job_id: str, headers: dict, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (job := httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers, timeout=10).json())["status"] not in (
        "succeeded",
        "failed",
        "canceled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


def test_the_api_routes_each_model_to_its_own_worker(weights, photo, tmp_path, redis_url, s3_endpoint):
    common = {
        **os.environ,
        "MEGASR_HOME": str(tmp_path / "home"),
        "MEGASR_REDIS_URL": fresh_database_url(redis_url),
        "MEGASR_STORAGE_URL": f"s3://megasr/e2e-{uuid.uuid4().hex[:8]}",
        "MEGASR_S3_ENDPOINT_URL": s3_endpoint,
        "MEGASR_API_KEYS": f"e2e:{KEY}",
        "MEGASR_WARMUP_BUCKETS": "64x64",
    }
    for name in ("MEGASR_PUBLIC_URL", "MEGASR_ALLOW_ANONYMOUS", "MEGASR_WEIGHTS", "MEGASR_MODEL", "MEGASR_MODELS"):
        common.pop(name, None)
    headers = {"Authorization": f"Bearer {KEY}"}
    api, base = start_serve({**common, "MEGASR_MODELS": "seesr,seesr-turbo"}, tmp_path / "serve.log")
    try:
        image = photo.read_bytes()

        def submit(**fields) -> httpx.Response:
            return httpx.post(
                f"{base}/v1/upscale",
                headers=headers,
                files={"image": ("cat.png", image, "image/png")},
                data={k: str(v) for k, v in fields.items()},
                timeout=30,
            )

        refused = submit(model="sd-xl")
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_model"
        assert "served models: seesr, seesr-turbo" in refused.json()["error"]["message"]
        jobs = {
            "seesr": submit(model="seesr", steps=2, seed=3),
            "seesr-turbo": submit(model="seesr-turbo", seed=3),
            "default": submit(steps=1, seed=4),
        }  # no model: the first served, seesr
        for response in jobs.values():
            assert response.status_code == 202, response.text
        ids = {name: response.json()["id"] for name, response in jobs.items()}

        # One burst worker per model: each takes its own queue's jobs, then exits.
        workers = []
        for family in FAMILIES:
            log = (tmp_path / f"worker-{family}.log").open("wb")
            workers.append(
                (
                    family,
                    log,
                    subprocess.Popen(
                        [MEGASR, "worker", "--burst", "--device", "cpu"],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**common, "MEGASR_MODEL": family, "MEGASR_WEIGHTS": str(weights[family])},
                    ),
                )
            )
        for family, log, worker in workers:
            assert worker.wait(timeout=400) == 0, (tmp_path / f"worker-{family}.log").read_text()[-3000:]
            log.close()

        done = {name: _wait_done(base, job_id, headers) for name, job_id in ids.items()}
        for name, job in done.items():
            family = "seesr" if name == "default" else name
            assert job["status"] == "succeeded", job
            assert job["model"] == family and job["params"]["model"] == family
            info = job["model_info"]
            assert (info["name"], info["family"], info["title"], info["trained"]) == (
                family,
                family,
                FAMILIES[family],
                True,
            )
            assert info["weights"] == family and info["tagger"] == "ram"  # the folder's name; RAM + DAPE
            result = httpx.get(f"{base}{job['result_url']}", headers=headers, timeout=30, follow_redirects=True)
            assert Image.open(io.BytesIO(result.content)).size == (128, 84)
        assert done["seesr-turbo"]["model_info"]["default_steps"] == 2
        # each worker ran only its own model's jobs
        seesr_log = (tmp_path / "worker-seesr.log").read_text()
        turbo_log = (tmp_path / "worker-seesr-turbo.log").read_text()
        assert ids["seesr-turbo"] not in seesr_log and ids["seesr"] in seesr_log and ids["default"] in seesr_log
        assert ids["seesr-turbo"] in turbo_log and ids["seesr"] not in turbo_log

        listed = httpx.get(f"{base}/v1/models", headers=headers, timeout=10).json()["models"]
        assert [(m["name"], m["default"]) for m in listed] == [("seesr", True), ("seesr-turbo", False)]
    finally:
        api.terminate()
        api.wait(timeout=30)


def test_eval_puts_both_models_side_by_side(weights, tmp_path):
    """`megasr eval --weights A --weights B` on real photo pairs: one column per model, the paper's rows."""
    (tmp_path / "gt").mkdir()
    (tmp_path / "lr").mkdir()
    for name, array in (("cat", data.chelsea()), ("coffee", data.coffee())):
        hr = Image.fromarray(array).resize((64, 48), Image.Resampling.BICUBIC)
        hr.save(tmp_path / "gt" / f"{name}.png")
        hr.resize((16, 12), Image.Resampling.BICUBIC).save(tmp_path / "lr" / f"{name}.png")
    run(
        "eval",
        "--lr",
        tmp_path / "lr",
        "--gt",
        tmp_path / "gt",
        "--weights",
        weights["seesr"],
        "--weights",
        weights["seesr-turbo"],
        "--metrics",
        "psnr,ssim",
        "--steps",
        "1",
        "--baseline",
        "bicubic",
        "--device",
        "cpu",
        "-o",
        tmp_path / "report",
    )
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    text = (tmp_path / "report" / "eval.md").read_text()
    models = {m["family"]: m for m in report["models"]}
    assert set(models) == set(FAMILIES)
    header = next(line for line in text.splitlines() if line.startswith("| Dataset"))
    for family, title in FAMILIES.items():
        assert models[family]["trained"] is True and models[family]["steps"] == 1
        assert f"{title} ({family})" in header and models[family]["label"] in header
        assert len(list((tmp_path / "report" / "sr" / family).glob("*.png"))) == 2
        assert set(models[family]["metrics"]) >= {"psnr", "ssim"}
    assert "Bicubic" in header
