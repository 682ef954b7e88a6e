"""Step time and peak memory against the number of prototypes K, learned and decoupled.

For each K of ``--k`` and each method of ``--methods`` (default DINO with learned and with
decoupled prototypes, at the study's CIFAR-10 recipes), one fresh process runs
``benchmarks/throughput.py`` (so that each peak resident memory is that case's own) and the
result is gathered: the step's ratio to the same-process bare backbone, the same ratio by FLOP
count, their quotient, and the peak memory. Before each run the preflight estimate of the
method's K-dependent memory (``estimate_state_bytes``, what ``nocollapse train`` checks before
training) is printed and recorded, so that K = 131,072 is sized before it runs.

Writes ``OUT/k_scaling.json`` and ``OUT/k_scaling.png`` (measured and FLOP-count ratios against
K, and peak memory against K, log-scaled), and prints the JSON.

    python benchmarks/k_scaling.py --k 1024 4096 16384 65536 131072 --out docs/k_scaling --rounds 5
    python benchmarks/k_scaling.py --dry-run --out /tmp/k_scaling      # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))                       # its sibling throughput.py, imported where used
DRY_RUN_SETS = ["train.batch_size=8", "model.width_multiplier=0.125", "method.head.hidden_dim=64",
                "method.head.bottleneck_dim=16", "diagnostics.held_out_images=0"]


def preflight_bytes(method: str, k: int, sets: list[str]) -> int:
    """The preflight estimate of the method's K-dependent memory for one step of the recipe."""
    from throughput import build_config_for
    from nocollapse.utils.registry import METHODS

    cfg = build_config_for(method, [*sets, f"method.num_prototypes={k}"])
    rows = cfg.train.batch_size * (2 + cfg.views.local_crops)
    return METHODS.get(cfg.method.name).estimate_state_bytes(cfg, rows)


def measure(method: str, k: int, args, sets: list[str]) -> None:
    """``throughput.py`` on one case, in a fresh process; it writes ``OUT/raw/METHOD-kK.json``."""
    command = [sys.executable, str(HERE / "throughput.py"), "--methods", method, "--out", str(args.out / "raw"),
               "--tag", f"k{k}", "--rounds", str(args.rounds), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--set", *sets, f"method.num_prototypes={k}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def run_one(method: str, k: int, args, sets: list[str]) -> dict:
    """One case's row. A case whose result is already in ``OUT/raw`` (from an interrupted run) is
    read back instead of measured again, unless ``--redo``."""
    done = args.out / "raw" / f"{method}-k{k}.json"
    if args.redo or not done.is_file():
        measure(method, k, args, sets)
    result = json.loads(done.read_text())
    return {"method": method, "k": k, "step_seconds": result["seconds"]["step"],
            "backbone_seconds": result["seconds"]["backbone"],
            "ratio_step_to_backbone": result["ratio_step_to_backbone"],
            "ratio_step_to_backbone_rounds": result["ratio_step_to_backbone_rounds"],
            "ratio_step_to_backbone_by_flops": result["ratio_step_to_backbone_by_flops"],
            "measured_over_flops_ratio": result["measured_over_flops_ratio"],
            "gflops_step": result["gflops"]["step"], "peak_rss_bytes": result["peak_rss_bytes"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["k"])
        ks = [r["k"] for r in mine]
        line, = left.plot(ks, [r["ratio_step_to_backbone"] for r in mine], marker="o", label=f"{method}, measured")
        left.plot(ks, [r["ratio_step_to_backbone_by_flops"] for r in mine], linestyle="--", color=line.get_color(),
                  label=f"{method}, by FLOP count")
        right.plot(ks, [r["peak_rss_bytes"] / 2**30 for r in mine], marker="o", color=line.get_color(),
                   label=f"{method}, measured peak")
        right.plot(ks, [r["preflight_bytes"] / 2**30 for r in mine], linestyle=":", color=line.get_color(),
                   label=f"{method}, preflight estimate (K part)")
    for axis, label in ((left, "step / bare backbone"), (right, "GiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prototypes K")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    left.set_title("step time against the backbone's")
    right.set_title("peak resident memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    parser.add_argument("--methods", nargs="+", default=["dino", "dino_decoupled"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="K = 64 and 128 on a tiny network, one round")
    parser.add_argument("--redo", action="store_true", help="measure again the cases already measured in OUT/raw")
    args = parser.parse_args(argv)
    sets = list(args.set)
    if args.dry_run:
        args.k, args.rounds, args.repeats = [64, 128], 1, 1
        sets = [*DRY_RUN_SETS, *sets]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in args.k:
        for method in args.methods:
            estimate = preflight_bytes(method, k, sets)
            print(f"{method} K={k}: preflight estimate of the K-dependent memory {estimate / 2**30:.2f} GiB",
                  flush=True)
            rows.append({**run_one(method, k, args, sets), "preflight_bytes": estimate})
    record = {"runs": rows, "sets": sets, "rounds": args.rounds, "threads": args.threads}
    (args.out / "k_scaling.json").write_text(json.dumps(record, indent=1))
    plot(rows, args.out / "k_scaling.png")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
