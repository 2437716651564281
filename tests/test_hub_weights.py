"""Weights by Hugging Face Hub id (megasr_core.weights.hub), offline from a real Hub cache layout.

The cache is the one huggingface_hub writes (``models--org--name/{blobs,refs,snapshots}``, snapshot
files linked to content-addressed blobs); ``HF_HUB_OFFLINE=1`` keeps the tests off the network. The
Hub's refusals (gated, missing repo, missing revision) come from a local server answering with the
Hub's error headers (``HF_ENDPOINT``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from megasr_core.weights.hub import ALLOW_PATTERNS, WeightsSourceError, parse_hub_source, resolve_weights_source
from tests.hub_cache import EXTRA, populate_hf_cache

REPO = "megasr-test/tiny"
MAIN = "a" * 40  # commit of refs/main
TAGGED = "b" * 40  # commit of refs/v1 (huggingface_hub stores a ref under the name it was asked for)


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory, tiny_weights) -> Path:
    """An HF_HOME whose cache holds ``REPO`` at two commits: main and tag v1."""
    home = tmp_path_factory.mktemp("hf_home")
    populate_hf_cache(home / "hub", REPO, tiny_weights, MAIN, ["main"])
    populate_hf_cache(home / "hub", REPO, tiny_weights, TAGGED, ["v1"])
    return home


@pytest.fixture
def offline_hub(hf_home, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home / "hub" / f"models--{REPO.replace('/', '--')}"


def test_allow_patterns_select_the_weights_layout(tiny_weights):
    """snapshot_download filters with these patterns: every layout file, nothing else of the repo."""
    from megasr_core.models.config import CONFIG_NAME
    from megasr_core.weights.hub import REQUIRED_DIRS, REQUIRED_FILES
    from megasr_core.weights.layout import COMPONENTS, MODEL_INDEX

    assert set(REQUIRED_DIRS) == set(COMPONENTS) and set(REQUIRED_FILES) == {MODEL_INDEX, CONFIG_NAME}
    layout = sorted(p.relative_to(tiny_weights).as_posix() for p in tiny_weights.rglob("*") if p.is_file())
    assert any(name.startswith("extractors/") for name in layout)
    repo = [*layout, EXTRA, "README.md", ".gitattributes", "sd2/unet/model.safetensors"]
    assert sorted(filter_repo_objects(repo, allow_patterns=ALLOW_PATTERNS)) == layout


def test_parse_hub_sources(tmp_path, monkeypatch):
    assert str(parse_hub_source("hf://org/name@v2")) == "hf://org/name@v2"
    assert parse_hub_source(Path("hf://org/name@refs/pr/3")).revision == "refs/pr/3"  # pathlib folds '//'
    assert parse_hub_source("org/name", revision="main").repo_id == "org/name"
    assert parse_hub_source(tmp_path) is None
    existing = tmp_path / "org" / "name"
    existing.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_hub_source("org/name") is None  # an existing folder wins over a Hub id
    with pytest.raises(WeightsSourceError, match="pins revision"):
        parse_hub_source("hf://org/name@v1", revision="v2")
    with pytest.raises(WeightsSourceError, match="not a Hub weights id"):
        parse_hub_source("hf://just-a-name")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights_source(tmp_path / "nowhere")


def test_from_pretrained_by_hub_id_offline(offline_hub):
    from megasr_core.pipelines import MegaSRPipeline

    pipeline = MegaSRPipeline.from_pretrained(REPO, device="cpu")
    image = pipeline(Image.new("RGB", (24, 16), (120, 80, 40)), scale=2, num_inference_steps=1, seed=0).images[0]
    assert image.size == (48, 32)
    tagged = MegaSRPipeline.from_pretrained(f"hf://{REPO}", revision=TAGGED, device="cpu", load_extractors=False)
    assert tagged.extractors is None


def test_revisions_resolve_to_their_snapshots(offline_hub):
    snapshots = offline_hub / "snapshots"
    assert resolve_weights_source(REPO) == snapshots / MAIN
    assert resolve_weights_source(f"hf://{REPO}@v1") == snapshots / TAGGED
    assert resolve_weights_source(REPO, revision="v1") == snapshots / TAGGED
    assert resolve_weights_source(f"hf://{REPO}", revision=TAGGED) == snapshots / TAGGED
    assert resolve_weights_source(f"hf://{REPO}@{MAIN}") == snapshots / MAIN


def test_offline_misses_are_clear_errors(offline_hub):
    with pytest.raises(WeightsSourceError, match=r"megasr-test/nothing.*not in the Hub cache.*HF_HUB_OFFLINE"):
        resolve_weights_source("hf://megasr-test/nothing")
    with pytest.raises(WeightsSourceError, match=r"revision v9 is not in the Hub cache"):
        resolve_weights_source(REPO, revision="v9")


def test_incomplete_snapshot_is_refused(tmp_path, tiny_weights, monkeypatch):
    populate_hf_cache(tmp_path / "hub", "megasr-test/partial", tiny_weights / "unet", MAIN, ["main"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsSourceError, match="not a complete MegaSR weights directory: missing model_index.json"):
        resolve_weights_source("megasr-test/partial")


def megasr(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("megasr")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=900, env={**os.environ, **env})


def test_cli_takes_hub_ids(hf_home, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (20, 12), (30, 160, 90)).save(source)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "MEGASR_WEIGHTS": ""}
    ok = megasr(
        "upscale",
        str(source),
        "-o",
        str(tmp_path / "out.png"),
        "--weights",
        f"hf://{REPO}@v1",
        "--steps",
        "1",
        "--scale",
        "2",
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (40, 24)

    info = megasr("weights", "info", f"hf://{REPO}@{MAIN}", env=env)
    assert info.returncode == 0, info.stderr
    assert '"parameters"' in info.stdout

    missing = megasr(
        "upscale",
        str(source),
        "-o",
        str(tmp_path / "o.png"),
        "--steps",
        "1",
        env={**env, "MEGASR_WEIGHTS": "hf://megasr-test/missing@v3"},
    )
    assert missing.returncode == 2
    assert "megasr-test/missing" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
    assert "Traceback" not in missing.stderr


class _HubErrors(BaseHTTPRequestHandler):
    """Answers repo look-ups the way the Hub does when it refuses them (X-Error-Code)."""

    answers = {
        "/api/models/megasr-test/gated/revision/main": (401, "GatedRepo"),
        "/api/models/megasr-test/missing/revision/main": (401, "RepoNotFound"),  # anonymous: 401, not 404
        "/api/models/megasr-test/tiny/revision/v9": (404, "RevisionNotFound"),
    }
    authorizations: list[str] = []

    def do_GET(self) -> None:
        type(self).authorizations.append(self.headers.get("Authorization", ""))
        status, code = self.answers.get(self.path, (500, "Unexpected"))
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_hub_refusals_are_clear_errors_and_the_token_stays_out_of_them(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubErrors)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_TOKEN", "hf_secretTOKENvalue")
        expected = {
            "hf://megasr-test/gated": "hf://megasr-test/gated is a gated repository: accept its terms",
            "megasr-test/missing": "repository megasr-test/missing not found (or private: set HF_TOKEN",
            "hf://megasr-test/tiny@v9": "repository megasr-test/tiny has no revision 'v9'",
        }
        for source, message in expected.items():
            with pytest.raises(WeightsSourceError) as error:
                resolve_weights_source(source)
            assert message in str(error.value)
            assert "hf_secretTOKENvalue" not in str(error.value) and error.value.__cause__ is None
        assert _HubErrors.authorizations == ["Bearer hf_secretTOKENvalue"] * 3  # HF_TOKEN reached the Hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("command", [["upscale"], ["worker"], ["serve"], ["weights", "info"]])
def test_help_shows_the_hub_form(command):
    from typer.testing import CliRunner

    from megasr_core.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "hf://org/name@revision" in result.output  # not eaten as rich markup
