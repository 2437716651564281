"""Stage-2 training with two processes (DDP over gloo on the CPU), launched as users launch it.

`accelerate launch` runs the real `megasr train megasr` CLI twice over: the ranks must end with
identical weights (each checkpoint records a digest per rank), each rank must train on its own
shard of the data, and a run resumed from a checkpoint must land on exactly the weights of a run
that went straight through, as `test_resume_continues_exactly` asks of a single process.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from megasr_core.train import MegaSRTrainer, load_config
from megasr_core.train.train_megasr import STATE_FILE

pytestmark = pytest.mark.slow
ACCELERATE = Path(sys.executable).with_name("accelerate")
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def three_photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hr")
    for name, array in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("chelsea", data.chelsea())):
        Image.fromarray(array).save(folder / f"{name}.png")
    return folder


def write_config(path: Path, weights: Path, photos: Path, output: Path) -> Path:
    path.write_text(
        f"weights: {weights}\ntrain_data: [{photos}]\noutput_dir: {output}\ncrop_size: 64\nbatch_size: 1\n"
        "learning_rate: 0.001\nmax_steps: 3\nnum_workers: 0\ncheckpoint_every: 2\nlog_every: 1\n"
    )
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(config: Path, *options: str) -> subprocess.Popen:
    """Two CPU processes under torchrun (accelerate's `--cpu` alone starts one unless it finds mpirun)."""
    command = [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "megasr_core.cli",
        "train",
        "megasr",
        "--config",
        str(config),
        *options,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"accelerate launch ran past {LAUNCH_TIMEOUT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


def checkpoint_state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / STATE_FILE).read_text())


def test_two_processes_train_identical_weights_on_sharded_data_and_resume_exactly(tiny_weights, three_photos, tmp_path):
    resumed_run, straight_run = tmp_path / "resumed", tmp_path / "straight"
    resumed_config = write_config(tmp_path / "resumed.yaml", tiny_weights, three_photos, resumed_run)
    straight_config = write_config(tmp_path / "straight.yaml", tiny_weights, three_photos, straight_run)
    # The straight 5-step run goes alongside the first 3 steps of the resumed one (separate ports).
    straight = launch(straight_config, "--max-steps", "5", "--no-resume")
    first = finish(launch(resumed_config))
    assert "trained to step 3" in first

    state = checkpoint_state(resumed_run, 3)
    assert state["step"] == 3 and state["num_processes"] == 2
    digests = state["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1], "the ranks diverged"
    assert len(state["noise_generators"]) == 2 and state["noise_generators"][0] != state["noise_generators"][1]
    # Three photos over two ranks at batch 1: each rank's epoch is 2 batches (its shard, padded),
    # so 3 steps end 1 batch into epoch 1. Unsharded, every rank would still be in epoch 0 at batch 3.
    assert (state["epoch"], state["batches_into_epoch"]) == (1, 1)

    # The checkpoint holds the ranks' weights under the plain model's keys: one process loads it.
    single = MegaSRTrainer(load_config(resumed_config, overrides={"output_dir": str(tmp_path / "single")}))
    initial = single.weights_digest()
    assert initial != digests[0], "no training happened"
    assert single.resume(resumed_run / "checkpoints" / "step-00000003") and single.step == 3
    assert single.weights_digest() == digests[0]

    second = finish(launch(resumed_config, "--max-steps", "5"))
    assert "trained to step 5" in second
    state = checkpoint_state(resumed_run, 5)
    assert state["step"] == 5 and state["weights_sha256"][0] == state["weights_sha256"][1]
    with (resumed_run / "log.csv").open() as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4, 5]

    finish(straight)
    assert checkpoint_state(straight_run, 5)["weights_sha256"] == state["weights_sha256"], "resume is not exact"
