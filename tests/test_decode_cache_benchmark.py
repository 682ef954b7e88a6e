"""benchmarks/decode_cache.py on a tiny image folder: three loads, equal images, a cache written."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_decode_cache_benchmark_reports_three_loads_and_the_cache_size(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import decode_cache
        result = decode_cache.main(["--data", str(tmp_path)])
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert result["images"] == 16
    assert set(result["seconds"]) == {"cache_off", "first_load", "cached_load"}
    # two splits of 8 uint8 images of 3 x 8 x 8, plus the labels and the file format's overhead
    assert 2 * 8 * 3 * 8 * 8 < result["cache_bytes"] < 2 * 8 * 3 * 8 * 8 + 2 * 2**14
    assert '"cached_load"' in capsys.readouterr().out
