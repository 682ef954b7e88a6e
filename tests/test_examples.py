"""The examples that use an optional extra run end to end (skipped with a reason without it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lightly_dino_example_trains_with_decoupled_prototypes(tmp_path):
    pytest.importorskip("lightly", reason="the lightly example needs the extra: pip install 'nocollapse[lightly]'")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "lightly_dino.py"), "--out", str(tmp_path),
                           "--epochs", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mixture_updates"] == 3 * (1797 // 128)       # one EM step per committed step
    assert result["buffer_seedings"] == 1                        # seeded from the buffer after epoch 1
    assert result["last_epoch"]["unique_0.1"] > 0.9              # the means stay apart
    assert (tmp_path / "metrics.jsonl").exists()
