"""A search over settings of the built-in default (``nocollapse train``), run side by side.

Each candidate is ``nocollapse train`` with ``--set`` overrides, run in its own process on one
thread (``train.threads=1``), ``--parallel`` at a time, so that a candidate and the reference
share the machine alike. Per run the JSON line holds the settings, seed, training and
whole-command seconds, k-NN top-1 against the random init, unique prototypes at ε = 0.1, the
per-epoch k-NN curve when ``eval.knn_every`` is set, and the alarms. Runs are appended to
``--out`` and a run already there (same name and seed) is skipped, so an interrupted search
resumes. ``--pythonpath`` runs another checkout's code (e.g. a worktree of an older commit) for
the side-by-side reference.

    python benchmarks/default_search.py --out docs/default_search.jsonl --seeds 0 \\
        --candidate base= --candidate e50="train.epochs=50"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_one(name: str, overrides: list[str], seed: int, pythonpath: str | None, data_args: list[str]) -> dict:
    """One ``nocollapse train`` in a fresh process; its summary and timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sets = ["train.threads=1", f"train.seed={seed}", "diagnostics.plots=false", *data_args, *overrides]
        command = [sys.executable, "-c", "import sys; from nocollapse.cli import main; sys.exit(main())",
                   "train", "--out", str(out), "--set", *sets]
        env = dict(os.environ, TQDM_DISABLE="1")
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            return {"name": name, "seed": seed, "overrides": overrides, "error": done.stderr[-2000:]}
        summary = json.loads((out / "summary.json").read_text())
        curve = []
        for line in (out / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "knn_top1" in record and "epoch" in record:
                curve.append((record["epoch"], round(record["knn_top1"], 4)))
        unique = summary.get("unique_prototypes") or {}
        return {
            "name": name, "seed": seed, "overrides": overrides, "pythonpath": pythonpath,
            "train_seconds": round(summary["train_seconds"], 1), "command_seconds": round(wall, 1),
            "knn_top1": summary["knn_top1"], "knn_top1_init": summary.get("knn_top1_init"),
            "unique_0.1": unique.get("0.1"), "epochs": summary["epochs"], "steps": summary["steps"],
            "train_images": summary.get("train_images"), "alarms": summary.get("alarms"),
            "knn_curve": curve,
        }


def split_overrides(text: str) -> list[str]:
    """``KEY=VALUE,KEY=VALUE`` -> the overrides; a comma inside brackets belongs to a list value
    (``views.global_scale=[0.6,1.0]``)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*parts, current] if p]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", action="append", default=[],
                        help="NAME=OVERRIDE[,OVERRIDE...] (an empty list: the default as it is)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--pythonpath", default=None, help="run this source tree's nocollapse (for a reference)")
    parser.add_argument("--data", nargs="*", default=[], help="extra --set entries for every run (e.g. an image folder)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            record = json.loads(line)
            done.add((record["name"], record["seed"]))
    jobs = []
    for spec in args.candidate:
        name, _, sets = spec.partition("=")
        overrides = split_overrides(sets)
        jobs += [(name, overrides, seed) for seed in args.seeds if (name, seed) not in done]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run_one, n, o, s, args.pythonpath, args.data) for n, o, s in jobs]
        for future in futures:
            record = future.result()
            with args.out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps({k: record.get(k) for k in ("name", "seed", "train_seconds", "command_seconds",
                                                         "knn_top1", "knn_top1_init", "unique_0.1", "error")}),
                  flush=True)


if __name__ == "__main__":
    main()
