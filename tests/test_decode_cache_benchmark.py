"""benchmarks/decode_cache.py on a tiny image folder: three loads, equal images, a cache written."""

from __future__ import annotations

import numpy as np
from PIL import Image

def test_decode_cache_benchmark_reports_three_loads_and_the_cache_size(tmp_path, capsys, import_benchmark):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    result = import_benchmark("decode_cache").main(["--data", str(tmp_path)])
    assert result["images"] == 16
    assert set(result["seconds"]) == {"cache_off", "first_load", "cached_load"}
    # two splits of 8 uint8 images of 3 x 8 x 8, plus the labels and the file format's overhead
    assert 2 * 8 * 3 * 8 * 8 < result["cache_bytes"] < 2 * 8 * 3 * 8 * 8 + 2 * 2**14
    assert '"cached_load"' in capsys.readouterr().out
