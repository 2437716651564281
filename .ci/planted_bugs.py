"""Plant each bug of issue 16's audit in a copy of the tree and check that its tests catch it.

The audit of issue 16 planted deliberate bugs, one at a time, and found that most survived the
suite. This script keeps that audit as a standing check: for every bug below it copies the
working tree once, makes the one edit, runs the named test files with pytest, and calls the bug
caught when a test fails (pytest exit code 1). Before that, the same test files must pass on the
unmodified copy, so a failure means the bug was seen, not that the tests were broken already.

    .venv/bin/python .ci/planted_bugs.py [--only NAME ...] [--json report.json]

Prints one JSON object (per bug: caught, the first failing test, seconds) and exits 1 when a
bug was not caught or the clean run failed. ``tests/test_planted_bugs.py`` runs it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PlantedBug:
    name: str
    path: str  # file to edit, relative to the repository root
    old: str  # text that must occur exactly once in it
    new: str
    tests: tuple[str, ...]  # test files (or node ids) that must catch it


PASSTHROUGH = ("tests/service/test_param_passthrough.py",)
STATE = ("tests/service/test_job_state_guards.py", "tests/worker/test_failures.py")
LIMITS = ("tests/service/test_limits_boundaries.py", "tests/service/test_admission.py")

BUGS: tuple[PlantedBug, ...] = (
    PlantedBug(
        "cfg_halves_swapped",
        "megasr_core/pipelines/sampling.py",
        "negative, positive = prediction.chunk(2)",
        "positive, negative = prediction.chunk(2)",
        ("tests/pipelines/test_known_answers.py",),
    ),
    PlantedBug("worker_drops_guidance_scale", "worker/tasks.py", "guidance_scale=guidance,", "", PASSTHROUGH),
    PlantedBug(
        "worker_drops_prompt", "worker/tasks.py", "prompt=[m.record.params.prompt for m in group],", "", PASSTHROUGH
    ),
    PlantedBug(
        "worker_drops_negative_prompt", "worker/tasks.py", "negative_prompt=params.negative_prompt,", "", PASSTHROUGH
    ),
    PlantedBug("worker_drops_seed", "worker/tasks.py", "seed=[m.seed for m in group],", "", PASSTHROUGH),
    PlantedBug("worker_drops_color_fix", "worker/tasks.py", "color_fix=params.color_fix,", "", PASSTHROUGH),
    PlantedBug(
        "msfm_saft_on_f_not_norm_f",
        "megasr_core/models/msfm.py",
        "normed = self.norm(hidden)",
        "normed = hidden",
        ("tests/models/test_known_answers.py",),
    ),
    PlantedBug(
        "job_cas_without_state_check",
        "service/jobsystem/store.py",
        "if record.status not in allowed:",
        "if False:",
        STATE,
    ),
    PlantedBug(
        "job_cas_without_owner_fence",
        "service/jobsystem/store.py",
        "if expect_owner is not None and record.owner != expect_owner:",
        "if False:",
        STATE,
    ),
    PlantedBug(
        "webhook_hmac_over_body_only",
        "service/webhooks.py",
        'hmac.new(secret, f"{timestamp}.".encode() + body,',
        "hmac.new(secret, body,",
        ("tests/service/test_webhook_vectors.py",),
    ),
    PlantedBug(
        "upload_limit_off_by_one",
        "service/images.py",
        "if len(data) > max_bytes:",
        "if len(data) >= max_bytes:",
        LIMITS,
    ),
    PlantedBug(
        "streamed_body_limit_off_by_one",
        "service/body_limits.py",
        "if received > limit:",
        "if received >= limit:",
        LIMITS,
    ),
    PlantedBug(
        "declared_length_limit_off_by_one",
        "service/body_limits.py",
        "int(declared) > limit",
        "int(declared) >= limit",
        LIMITS,
    ),
    PlantedBug(
        "ssim_constants_times_ten",
        "megasr_core/image_quality.py",
        "c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2",
        "c1, c2 = (0.1 * 255) ** 2, (0.3 * 255) ** 2",
        ("tests/test_metrics_known_answers.py",),
    ),
    PlantedBug(
        "csm_projection_not_zero_initialised",
        "megasr_core/models/csm.py",
        "nn.init.zeros_(self.proj.weight)\n        nn.init.zeros_(self.proj.bias)",
        "pass",
        ("tests/models/test_known_answers.py", "tests/models/test_weights.py"),
    ),
    PlantedBug(
        "tenant_check_removed",
        "service/jobsystem/store.py",
        "return record if record is not None and record.tenant == tenant else None",
        "return record",
        ("tests/service/test_api.py",),
    ),
    PlantedBug(
        "reaper_never_requeues",
        "service/jobsystem/sweeper.py",
        "lifecycle.requeue(services.jobs, services.queue_for(record.model), record.id, record.owner)",
        "pass",
        STATE,
    ),
    PlantedBug(
        "lease_never_renewed", "worker/runtime.py", "self.services.jobs.renew_lease(job_id, owner)", "pass", STATE
    ),
)


def tree_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore: what a commit of the tree would hold."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return [name for name in listing.decode().split("\0") if name and (ROOT / name).is_file()]


def copy_tree(target: Path) -> None:
    for name in tree_files():
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, destination)


def run_tests(tree: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[int, str | None, str]:
    """pytest on ``tests`` inside ``tree``: (exit code, first failing test, output tail)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("MUTANT_UNDER_TEST", None)
    command = [sys.executable, "-m", "pytest", "-n", "0", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return 124, None, f"timed out after {timeout_s:.0f} s"
    output = done.stdout + done.stderr
    failed = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    return done.returncode, failed.group(1) if failed else None, output[-3000:]


def imports_from(tree: Path) -> str:
    """Where ``megasr_core`` is imported from inside ``tree`` (it must be the copy, not the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [sys.executable, "-c", "import megasr_core, service, worker; print(megasr_core.__file__)"],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="names of the bugs to plant (default: all)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    args = parser.parse_args()
    bugs = [bug for bug in BUGS if args.only is None or bug.name in args.only]
    unknown = set(args.only or ()) - {bug.name for bug in BUGS}
    if unknown:
        parser.error(f"unknown bug names: {', '.join(sorted(unknown))}")
    report: dict[str, object] = {"bugs": {}}
    with tempfile.TemporaryDirectory(prefix="megasr-planted-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        origin = imports_from(tree)
        if not origin.startswith(str(tree)):
            raise SystemExit(f"the copy imports megasr_core from {origin}, not from itself")
        all_tests = tuple(dict.fromkeys(test for bug in bugs for test in bug.tests))
        started = time.monotonic()
        code, failed, tail = run_tests(tree, all_tests, args.timeout)
        report["clean"] = {"passed": code == 0, "seconds": round(time.monotonic() - started, 1)}
        if code != 0:
            report["clean"]["failed"] = failed
            report["clean"]["output"] = tail
        else:
            for bug in bugs:
                source = tree / bug.path
                original = source.read_text()
                if original.count(bug.old) != 1:
                    raise SystemExit(
                        f"{bug.name}: the text to change occurs {original.count(bug.old)} times "
                        f"in {bug.path}; update .ci/planted_bugs.py"
                    )
                source.write_text(original.replace(bug.old, bug.new))
                started = time.monotonic()
                try:
                    code, failed, tail = run_tests(tree, bug.tests, args.timeout)
                finally:
                    source.write_text(original)
                entry = {
                    "caught": code == 1,
                    "exit_code": code,
                    "failed_test": failed,
                    "seconds": round(time.monotonic() - started, 1),
                }
                if code != 1:
                    entry["output"] = tail
                report["bugs"][bug.name] = entry
    bug_entries = report["bugs"]
    report["caught"] = sum(1 for entry in bug_entries.values() if entry["caught"])
    report["planted"] = len(bugs)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = report["clean"]["passed"] and report["caught"] == report["planted"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
