"""Helpers shared by the benchmark scripts: memory readings, timing and resumable training runs."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

MIB = 1024 * 1024

# The methods of the collapse study and of the throughput benchmark: name -> (recipe in
# configs/cifar10/, overrides that make the variant). The ``*_paper`` variants are the mixture as
# published (no buffer, no refresh, no KoLeo on the embeddings) on the host's own balancing: DINO's
# centering, CARP's weight 1.
STUDY: dict[str, tuple[str, tuple[str, ...]]] = {
    "dino": ("dino", ()),
    "dino_koleo": ("dino_koleo", ()),
    "dino_decoupled_paper": ("dino_decoupled", ("dino.teacher_norm=centering",)),
    "dino_decoupled": ("dino_decoupled", ()),
    "carp": ("carp", ()),
    "carp_decoupled_paper": ("carp_decoupled", ("carp.entropy_weight=1", "method.embedding_koleo_weight=0")),
    "carp_decoupled": ("carp_decoupled", ()),
    "cplearn": ("cplearn", ()),
    "simclr": ("simclr", ()),
    "supcon": ("supcon", ()),
    "clop": ("clop", ()),
    "swav": ("swav", ()),
    "swav_decoupled": ("swav_decoupled", ()),
    "barlow_twins": ("barlow_twins", ()),
    "vicreg": ("vicreg", ()),
    "byol": ("byol", ()),
    "simsiam": ("simsiam", ()),
}


def current_rss_bytes() -> int | None:
    """Current resident set size, from /proc (Linux only)."""
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (torch's CPU allocations included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def cli(*args: str) -> list[str]:
    """The command line of ``nocollapse ARGS`` in this interpreter."""
    return [sys.executable, "-m", "nocollapse.cli", *args]


def train_once(run_dir: Path, train_args: list[str]) -> None:
    """``nocollapse train`` into ``run_dir`` unless it finished; an interrupted run is resumed."""
    if (run_dir / "summary.json").is_file():
        return
    if (run_dir / "checkpoints" / "last.pt").is_file():
        subprocess.run(cli("train", "--out", str(run_dir), "--resume"), check=True)
    else:
        subprocess.run(cli("train", "--out", str(run_dir), "--force", *train_args), check=True)
