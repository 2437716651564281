"""The images' hashed locks: they match the Dockerfiles and pyproject, and the worker's set
actually runs (installed into a clean virtual environment, beside this machine's torch)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.manifests import ROOT

LOCKS = {"api": ROOT / "docker" / "api.lock.txt", "worker": ROOT / "docker" / "worker.lock.txt"}


def pins(lock: Path) -> dict[str, str]:
    """name → version of every requirement in a lock, checking each carries hashes."""
    text = lock.read_text()
    entries = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})+)", text, flags=re.M)
    requirement_lines = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert len(entries) == len(requirement_lines), f"{lock.name}: every requirement must be pinned with hashes"
    return {name.lower().replace("_", "-"): version for name, version, _ in entries}


def base_torch() -> str:
    (version,) = set(
        re.findall(r"^FROM pytorch/pytorch:([0-9.]+)-cuda", (ROOT / "docker/worker.Dockerfile").read_text(), re.M)
    )
    return version


def test_dockerfiles_install_their_locks_with_hashes():
    for image, lock in LOCKS.items():
        text = (ROOT / "docker" / f"{image}.Dockerfile").read_text()
        assert f"docker/{lock.name}" in text and "--require-hashes" in text and "--no-deps" in text, image
        assert pins(lock)


def test_worker_lock_fits_the_base_image_torch():
    """The base image's torch is left out of the lock, and it is new enough for the locked
    transformers (5.x disables itself below torch 2.6)."""
    locked = pins(LOCKS["worker"])
    assert "torch" not in locked and not [name for name in locked if name.startswith("nvidia-") or name == "triton"]
    torch_version = tuple(int(part) for part in base_torch().split(".")[:2])
    if int(locked["transformers"].split(".")[0]) >= 5:
        assert torch_version >= (2, 6), (
            f"transformers {locked['transformers']} needs torch >= 2.6, the base has {base_torch()}"
        )
    assert f"torch {base_torch()}" in LOCKS["worker"].read_text().splitlines()[1]  # resolved against that torch


def test_locks_cover_what_the_project_asks_for():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    worker = set(pins(LOCKS["worker"]))
    assert names(project["dependencies"]) - {"torch"} <= worker
    assert names(project["optional-dependencies"]["serve"]) <= worker
    api_inputs = [
        line
        for line in (ROOT / "docker/requirements-api.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert names(api_inputs) <= set(pins(LOCKS["api"]))
    assert names(project["optional-dependencies"]["serve"]) <= names(api_inputs)  # the API image serves


def host_torch_closure(provided: set[str]) -> list[str]:
    """This interpreter's torch and the requirements of it the lock does not provide (a CUDA build's
    nvidia-* libraries and triton), as distribution names: what the base image brings besides the lock."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    names, pending = [], ["torch"]
    while pending:
        name = pending.pop()
        key = name.lower().replace("_", "-")
        if key in provided or key in names:
            continue
        names.append(key)
        for line in distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return names


def link_distributions(names: list[str], into: Path) -> None:
    """Symlink every top-level package and metadata folder of these installed distributions into ``into``
    (a folder the clean venv's path file lists), instead of installing a second multi-GB copy."""
    from importlib.metadata import distribution

    into.mkdir()
    for name in names:
        dist = distribution(name)
        for top in {Path(str(file)).parts[0] for file in dist.files or []} - {".."}:
            target = into / top
            source = Path(str(dist.locate_file(top)))
            if not target.exists() and source.exists() and not top.endswith(".pth"):
                target.symlink_to(source)


@pytest.mark.slow
def test_the_worker_lock_installs_and_runs(tmp_path, tiny_weights, redis_url):
    """A clean venv with the worker lock (hash-checked, from the package index), on top of the torch
    the base image would bring, played by this interpreter's torch (linked, not installed: a CUDA
    build with its libraries is several GB per run): a tiny upscale and a worker start-up must work."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    provided = set(pins(LOCKS["worker"])) | {"pip", "setuptools"}  # the lock, and what a fresh venv has
    link_distributions(host_torch_closure(provided), tmp_path / "base-image-torch")
    (site / "base-image-torch.pth").write_text(f"{tmp_path / 'base-image-torch'}\n")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", "--require-hashes", "-r", str(LOCKS["worker"])], check=True, timeout=900)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, timeout=600)
    assert "torch" not in {path.name for path in site.iterdir()}  # the linked one, not a fresh install
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0 or "torch" in check.stdout, check.stdout  # only the swapped torch may be reported

    megasr = str(venv / "bin" / "megasr")
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "MEGASR_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    from PIL import Image

    Image.new("RGB", (16, 12), "gray").save(tmp_path / "in.png")
    upscale = subprocess.run(
        [
            megasr,
            "upscale",
            str(tmp_path / "in.png"),
            "-o",
            str(tmp_path / "out"),
            "--weights",
            str(tiny_weights),
            "--steps",
            "1",
            "--scale",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert upscale.returncode == 0, upscale.stderr[-3000:]
    assert Image.open(next((tmp_path / "out").iterdir())).size == (32, 24)

    from tests.harness.valkey import fresh_database_url

    worker_env = {
        **env,
        "MEGASR_REDIS_URL": fresh_database_url(redis_url),
        "MEGASR_WEIGHTS": str(tiny_weights),
        "MEGASR_STORAGE_URL": (tmp_path / "data").as_uri(),
        "MEGASR_WARMUP_BUCKETS": "64x64",
    }
    started = subprocess.run(
        [megasr, "worker", "--burst", "--device", "cpu"], env=worker_env, capture_output=True, text=True, timeout=600
    )
    assert started.returncode == 0, started.stderr[-3000:]
    assert "ready: model default on queue megasr" in started.stderr  # no MEGASR_MODEL: the default model's queue
