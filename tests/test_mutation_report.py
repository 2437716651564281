"""The mutation gate's verdict (``.ci/mutation_report.py``): what counts as killed, when the gate
fails or is incomplete, and how survivors are listed with their reasons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RESULTS = """\
    service.jobs.xǁJobStoreǁget__mutmut_1: killed
    service.jobs.xǁJobStoreǁget__mutmut_2: timeout
    service.jobs.xǁJobStoreǁget__mutmut_3: survived
    worker.tasks.x__encode__mutmut_1: killed
    worker.tasks.x__encode__mutmut_2: no tests
"""


def report(results: str, *args: str, accepted: str = "", tmp_path: Path) -> subprocess.CompletedProcess:
    doc = tmp_path / "survivors.md"
    doc.write_text(accepted)
    return subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "mutation_report.py"), "--accepted", str(doc), *args],
        input=results,
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )


def test_timeouts_count_as_killed_and_untested_mutants_as_survivors(tmp_path):
    done = report(RESULTS, "--min-killed", "60", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert lines[1].split() == ["service.jobs", "2", "3", "66.7", "0"]
    assert lines[2].split() == ["worker.tasks", "1", "2", "50.0", "0"]
    assert lines[3].split() == ["all", "3", "5", "60.0", "0"]
    assert "mutation gate passed: 60.0 % killed >= 60 %" in done.stdout


def test_below_the_threshold_fails(tmp_path):
    done = report(RESULTS, "--min-killed", "61", tmp_path=tmp_path)
    assert done.returncode == 1
    assert "mutation gate FAILED: 60.0 % killed < 61 %" in done.stdout


def test_unchecked_mutants_make_it_incomplete_and_do_not_count(tmp_path):
    done = report(
        RESULTS + "    worker.tasks.x__encode__mutmut_3: not checked\n", "--min-killed", "60", tmp_path=tmp_path
    )
    assert done.returncode == 2
    assert done.stdout.splitlines()[3].split() == ["all", "3", "5", "60.0", "1"]
    assert "1 not checked yet" in done.stdout


def test_survivors_are_listed_with_their_reason_or_as_not_reviewed(tmp_path):
    accepted = "# Survivors\n\n- service.jobs.xǁJobStoreǁget__mutmut_3: equivalent (a reason)\n"
    done = report(RESULTS, accepted=accepted, tmp_path=tmp_path)
    assert "  service.jobs.xǁJobStoreǁget__mutmut_3: equivalent (a reason)" in done.stdout
    assert "  worker.tasks.x__encode__mutmut_2: NOT REVIEWED" in done.stdout


def test_the_markdown_table_names_files(tmp_path):
    lines = report(RESULTS, "--markdown", tmp_path=tmp_path).stdout.splitlines()
    assert lines[:3] == [
        "| module | killed | checked | % | not checked yet |",
        "|---|---:|---:|---:|---:|",
        "| `service/jobs.py` | 2 | 3 | 66.7 | 0 |",
    ]
    assert lines[4] == "| all | 3 | 5 | 60.0 | 0 |"
