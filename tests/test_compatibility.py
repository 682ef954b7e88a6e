"""Run directories and checkpoints written by nocollapse 0.1 still load, resume and diagnose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nocollapse.cli import main
from nocollapse.utils.checkpoint import load_checkpoint

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_0.1_digits"

pytestmark = pytest.mark.slow


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def test_a_0_1_checkpoint_resumes_to_the_end(old_run):
    before = load_checkpoint(old_run / "checkpoints" / "last.pt")
    assert before["nocollapse"] == "0.1.0" and before["step"] == 3
    assert main(["train", "--out", str(old_run), "--resume"]) == 0
    after = load_checkpoint(old_run / "checkpoints" / "last.pt")
    assert after["step"] == 21 and after["nocollapse"] != "0.1.0"
    # the mixture went on from the saved one: same components, updated by the 18 new steps
    assert int(after["method"]["gmm.num_updates"]) == int(before["method"]["gmm.num_updates"]) + 18
    assert not torch.equal(after["method"]["gmm.means"], before["method"]["gmm.means"])
    summary = json.loads((old_run / "summary.json").read_text())
    assert summary["method"] == "dino" and summary["prototypes"] == "decoupled" and summary["steps"] == 21


def test_a_0_1_run_directory_is_diagnosed(old_run, capsys):
    assert main(["diagnose", str(old_run), "--no-data", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n\nwritten")[0])
    assert report["num_prototypes"] == 16 and report["mixture"]["dead_by"] == "usage"
