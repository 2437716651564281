"""Issue 16's audit as a standing check: each planted bug makes its tests fail (``.ci/planted_bugs.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.planted
def test_every_bug_of_the_audit_is_caught_by_its_tests(tmp_path):
    """The audit's bugs (CFG halves swapped, parameters dropped on the way to the pipeline, SAFT on F instead of
    Norm(F), the job guards, the webhook HMAC, off-by-one limits, SSIM constants, the CSM's zero projection, the
    tenant check, the reaper, the lease), planted one at a time in a copy of the tree: each makes a test fail,
    and the same tests pass on the unmodified copy."""
    report_path = tmp_path / "planted.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "planted_bugs.py"), "--json", str(report_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert report_path.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    # pytest shortens long assertion messages; what the failing runs printed goes to stdout in full.
    for name, entry in [("clean run", report["clean"]), *report["bugs"].items()]:
        if "output" in entry:
            print(f"--- {name}: the end of what pytest printed ---\n{entry['output']}")
    assert report["clean"]["passed"], report["clean"]
    missed = {name: entry for name, entry in report["bugs"].items() if not entry["caught"]}
    assert not missed, json.dumps(missed, indent=2)
    assert report["planted"] == report["caught"] >= 18
    assert done.returncode == 0


def load_planted_bugs():
    """``.ci/planted_bugs.py`` as a module (it is a script, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("planted_bugs", ROOT / ".ci" / "planted_bugs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_every_planted_text_occurs_once_and_its_tests_exist():
    """The quick half of the check, in the default run: a move or a reformat that changes a planted
    line shows here in a second, not after minutes of the planted-bug tier."""
    bugs = load_planted_bugs().BUGS
    assert len(bugs) >= 18
    for bug in bugs:
        assert (ROOT / bug.path).read_text().count(bug.old) == 1, f"{bug.name}: {bug.old!r} in {bug.path}"
        for test in bug.tests:
            assert (ROOT / test.split("::")[0]).is_file(), f"{bug.name}: no test file {test}"
