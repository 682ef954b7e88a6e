"""The examples that use an optional extra run end to end (skipped with a reason without it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> dict:
    pytest.importorskip("lightly", reason="the lightly examples need the extra: pip install 'nocollapse[lightly]'")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLLAPSE_ALARMS = {"prototype_collapse", "representation_collapse", "one_hot_collapse", "uniform_collapse"}


@pytest.mark.slow
def test_lightly_dino_example_trains_with_decoupled_prototypes_in_the_stock_head(tmp_path):
    result = run_example("lightly_dino.py", "--out", str(tmp_path), "--epochs", "3")
    assert result["mixture_updates"] == 3 * (1797 // 128)       # one EM step per committed step
    assert result["buffer_seedings"] == 1                        # seeded from the buffer after epoch 1
    assert result["last_epoch"]["unique_0.1"] > 0.9              # the means stay apart (whitened space)
    assert not COLLAPSE_ALARMS & set(result["alarms"])
    assert (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.long
def test_lightly_dino_example_on_the_sphere_shows_what_the_whitening_fixes(tmp_path):
    result = run_example("lightly_dino.py", "--out", str(tmp_path), "--epochs", "3", "--space", "sphere")
    assert result["last_epoch"]["unique_0.1"] < 0.75             # the stock head's cone merges the means


@pytest.mark.slow
@pytest.mark.parametrize("prototypes", [pytest.param("learned", marks=pytest.mark.long), "decoupled"])
def test_lightly_swav_example_trains_with_either_prototypes(tmp_path, prototypes):
    result = run_example("lightly_swav.py", "--out", str(tmp_path), "--epochs", "3", "--prototypes", prototypes)
    assert result["steps"] == 3 * (1797 // 128)
    assert result["last_epoch"]["unique_0.1"] > 0.9
    assert not COLLAPSE_ALARMS & set(result["alarms"])
    assert (tmp_path / "metrics.jsonl").exists()
