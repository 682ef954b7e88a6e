"""Issue 36's step goals, read from the records of ``throughput.py`` and ``step_memory.py``.

Reads, from ``--records`` (default ``docs/throughput_goals``):

* ``<method>-k<K>.json`` and ``<decoupled>-vs-<learned>-k<K>.json``, written by
  ``throughput.py --tag k<K> --lightly-reference`` for the methods of ``--methods``;
* ``step_memory-k<K>.json``, written by ``step_memory.py --reference`` (optional);
* ``<reference>/dino-k<K>.json``, the reference commit's own ``throughput.py`` on DINO (optional),
  from which its speed against lightly's step is derived: lightly's step over the bare backbone
  (measured beside the current code) divided by the reference step without augmentation over its
  own backbone (for a ``throughput.py`` that did not time that, its step less its augmentation).

and prints one JSON with every goal, its value and whether it is met, and with ``--markdown`` a
table for ``docs/results.md``. Nothing is measured here.

    python benchmarks/throughput_goals.py --records docs/throughput_goals --markdown
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # its sibling throughput.py, imported where used

METHODS = ("dino", "dino_decoupled", "dino_decoupled_paper", "carp", "carp_decoupled")
PAIRS = (("dino", "dino_decoupled"), ("dino", "dino_decoupled_paper"), ("carp", "carp_decoupled"))


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def step_goals(records: Path, k: int, methods=METHODS) -> list[dict]:
    """Each method's measured ratio to the backbone against its FLOP-count ratio."""
    rows = []
    for method in methods:
        result = _read(records / f"{method}-k{k}.json")
        if result is None:
            continue
        rows.append({"method": method, "k": k, "ratio_step_to_backbone": result["ratio_step_to_backbone"],
                     "ratio_rounds": result["ratio_step_to_backbone_rounds"],
                     "ratio_by_flops": result["ratio_step_to_backbone_by_flops"],
                     "measured_over_flops": result["measured_over_flops_ratio"],
                     "goal": result["goal_measured_over_flops"], "goal_met": result["goal_measured_over_flops_met"],
                     "step_seconds": result["seconds"]["step"], "backbone_seconds": result["seconds"]["backbone"],
                     "threads": result["config"]["threads"]})
    return rows


def pair_goals(records: Path, k: int) -> list[dict]:
    """Decoupled against learned, the step ratio against 1.05 x their FLOP ratio."""
    import throughput

    rows = []
    for learned, decoupled in PAIRS:
        a, b = _read(records / f"{learned}-k{k}.json"), _read(records / f"{decoupled}-k{k}.json")
        if a is not None and b is not None:
            rows.append({"k": k, **throughput.decoupled_pair(a, b)})
    return rows


def peer_goal(records: Path, k: int, reference: Path | None) -> dict | None:
    """Our DINO step against lightly's, and the reference commit's where it was measured."""
    ours = _read(records / f"dino-k{k}.json")
    if ours is None or "speed_over_lightly" not in ours:
        return None
    row = {"k": k, "speed_over_lightly": ours["speed_over_lightly"], "rounds": ours["speed_over_lightly_rounds"],
           "goal": ours["goal_speed_over_lightly"], "goal_met": ours["goal_speed_over_lightly_met"],
           "lightly_step_to_backbone": ours["lightly_reference_step_to_backbone"],
           "ours_without_augmentation_to_backbone": ours["ratio_step_without_augmentation_to_backbone"]}
    old = _read(reference / f"dino-k{k}.json") if reference is not None else None
    if old is not None:
        seconds = old["seconds"]
        # older throughput.py versions did not time the step without augmentation: their step less
        # the augmentation timed beside it
        without = (seconds["step_without_augmentation"] if "step_without_augmentation" in seconds
                   else seconds["step"] - seconds.get("augmentation", 0.0))
        old_ratio = without / seconds["backbone"]
        row["reference_without_augmentation_to_backbone"] = round(old_ratio, 3)
        row["reference_speed_over_lightly"] = round(ours["lightly_reference_step_to_backbone"] / old_ratio, 3)
    return row


def memory_goals(records: Path, k: int) -> list[dict]:
    record = _read(records / f"step_memory-k{k}.json")
    if record is None:
        return []
    return [{"k": k, **row} for row in record["methods"]]


def markdown(summary: dict) -> str:
    lines = ["| K | method | step / backbone (rounds) | by FLOPs | measured / FLOPs | goal | met |",
             "|---|---|---|---|---|---|---|"]
    for row in summary["steps"]:
        rounds = ", ".join(f"{r:.2f}" for r in row["ratio_rounds"])
        lines.append(f"| {row['k']:,} | {row['method']} | {row['ratio_step_to_backbone']:.2f} ({rounds}) | "
                     f"{row['ratio_by_flops']:.2f} | {row['measured_over_flops']:.2f} | {row['goal']:.2f} | "
                     f"{'yes' if row['goal_met'] else 'no'} |")
    lines += ["", "| K | decoupled / learned | step ratio | by FLOPs | goal (1.05 x FLOPs) | met |",
              "|---|---|---|---|---|---|"]
    for row in summary["pairs"]:
        lines.append(f"| {row['k']:,} | {row['decoupled']} / {row['learned']} | {row['ratio_decoupled_to_learned_step']:.3f} "
                     f"| {row['ratio_by_flops']:.3f} | {row['goal']:.3f} | {'yes' if row['goal_met'] else 'no'} |")
    lines += ["", "| K | our DINO step's speed over lightly's (rounds) | goal | met | reference commit's |",
              "|---|---|---|---|---|"]
    for row in summary["peer"]:
        rounds = ", ".join(f"{r:.2f}" for r in row["rounds"])
        old = row.get("reference_speed_over_lightly")
        lines.append(f"| {row['k']:,} | {row['speed_over_lightly']:.2f} ({rounds}) | {row['goal']:.1f} | "
                     f"{'yes' if row['goal_met'] else 'no'} | {'-' if old is None else f'{old:.2f}'} |")
    if summary["memory"]:
        lines += ["", "| K | method | step's peak, now (MiB) | reference (MiB) | ratio | goal | met |",
                  "|---|---|---|---|---|---|---|"]
        for row in summary["memory"]:
            now, ref = row["step_peak_bytes"]["current"], row["step_peak_bytes"].get("reference")
            lines.append(f"| {row['k']:,} | {row['method']} | {now / 2**20:.0f} | "
                         f"{'-' if ref is None else f'{ref / 2**20:.0f}'} | {row.get('ratio_to_reference', '-')} | "
                         f"{row.get('goal', '-')} | {'yes' if row.get('goal_met') else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, default=Path("docs/throughput_goals"))
    parser.add_argument("--reference", type=Path, help="the reference commit's throughput.py records "
                                                       "(default RECORDS/e460262 where it exists)")
    parser.add_argument("--k", type=int, nargs="+", default=[65536, 4096])
    parser.add_argument("--markdown", action="store_true", help="also print the tables for docs/results.md")
    args = parser.parse_args(argv)
    reference = args.reference or (args.records / "e460262" if (args.records / "e460262").is_dir() else None)
    summary = {"steps": [r for k in args.k for r in step_goals(args.records, k)],
               "pairs": [r for k in args.k for r in pair_goals(args.records, k)],
               "peer": [r for k in args.k if (r := peer_goal(args.records, k, reference)) is not None],
               "memory": [r for k in args.k for r in memory_goals(args.records, k)]}
    print(json.dumps(summary, indent=1))
    if args.markdown:
        print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
