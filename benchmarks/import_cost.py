"""What importing nocollapse costs on top of torch, and how long ``nocollapse --help`` takes.

Each case runs in a fresh Python process (the interpreter running this script), timed by wall
clock from start to exit, ``--runs`` times, the cases interleaved round by round so that machine
noise hits them alike, after one unrecorded warm-up round (it fills the file cache):

* ``import_torch``: ``python -c "import torch"``, the floor;
* ``import_torch_nocollapse``: ``python -c "import torch; import nocollapse"``;
* ``import_nocollapse_extra``: the difference of the two medians, what the package adds;
* ``import_torch_nocollapse_full``: torch, then everything a training script or notebook usually
  touches: the package's public names (``CollapseMonitor``, ``DecoupledPrototypes``,
  ``OnlineProbe``), ``nocollapse.diagnostics``, ``nocollapse.evaluation``,
  ``nocollapse.prototypes``, and the built-in datasets, backbones and methods registered (the
  package loads these lazily, so plain ``import nocollapse`` does not pay for them);
* ``import_full_extra``: its median minus that of ``import_torch``;
* ``help``: the console script ``nocollapse --help`` installed next to the interpreter (the command
  the README uses), or, where it is not installed, ``python -c "from nocollapse.cli import main;
  main()" --help``, which runs the same entry point.

Prints one JSON with the median, min and max seconds of each case, the goals (the package, plain
or full, adds at most ``--import-goal`` seconds to ``import torch``; ``--help`` within
``--help-goal`` seconds) and whether each is met. ``--importtime`` also prints to stderr the
slowest packages that the full import loads beyond torch (``python -X importtime``, cumulative
seconds).

    python benchmarks/import_cost.py
    python benchmarks/import_cost.py --runs 9 --importtime
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPORT_TORCH = [sys.executable, "-c", "import torch"]
IMPORT_BOTH = [sys.executable, "-c", "import torch; import nocollapse"]
IMPORT_FULL = [sys.executable, "-c", "; ".join([
    "import torch",
    "from nocollapse import CollapseMonitor, DecoupledPrototypes, OnlineProbe",
    "import nocollapse.diagnostics, nocollapse.evaluation, nocollapse.prototypes",
    "from nocollapse.utils.registry import BACKBONES, DATASETS, METHODS",
    "METHODS.names(); DATASETS.names(); BACKBONES.names()",   # registers the built-in plugins
])]


def help_command() -> tuple[list[str], str]:
    """The command line of ``nocollapse --help`` and how it is run."""
    script = Path(sys.executable).parent / ("nocollapse.exe" if os.name == "nt" else "nocollapse")
    if script.is_file():
        return [str(script), "--help"], "console script"
    return [sys.executable, "-c", "from nocollapse.cli import main; main()", "--help"], "python -c cli.main"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per case (median of these)")
    parser.add_argument("--import-goal", type=float, default=0.5,
                        help="seconds import nocollapse may add to import torch")
    parser.add_argument("--help-goal", type=float, default=2.0, help="seconds nocollapse --help may take")
    parser.add_argument("--importtime", action="store_true",
                        help="also list the slowest packages the full import loads beyond torch (stderr)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def wall_seconds(command: list[str]) -> float:
    """Seconds from starting ``command`` to its exit; a failing command stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return seconds


def summary(times: list[float]) -> dict:
    return {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
            "max": round(max(times), 3), "runs": len(times)}


def slowest_modules(top: int = 15) -> list[tuple[str, int]]:
    """The top-level packages the full import (``IMPORT_FULL``) loads after torch, slowest first
    (cumulative microseconds, so a package first imported by another one counts in both)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *IMPORT_FULL[1:]],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    rows, after_torch = [], False
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        if not cumulative.strip().isdigit():
            continue                                   # the header line
        name = name.strip()                            # importtime indents children by depth
        if after_torch and "." not in name and name != "nocollapse":
            rows.append((name, int(cumulative)))       # top-level packages, wherever first imported
        elif name == "torch":                          # importtime prints a package after its children
            after_torch = True
    return sorted(rows, key=lambda row: -row[1])[:top]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    help_cmd, help_via = help_command()
    cases = {"import_torch": IMPORT_TORCH, "import_torch_nocollapse": IMPORT_BOTH,
             "import_torch_nocollapse_full": IMPORT_FULL, "help": help_cmd}
    for command in cases.values():                     # warm-up round, not recorded
        wall_seconds(command)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, command in cases.items():
            times[name].append(wall_seconds(command))
    result = {name: summary(values) for name, values in times.items()}
    torch_median = statistics.median(times["import_torch"])
    extra = statistics.median(times["import_torch_nocollapse"]) - torch_median
    full_extra = statistics.median(times["import_torch_nocollapse_full"]) - torch_median
    result["import_nocollapse_extra"] = {"median": round(extra, 3)}
    result["import_full_extra"] = {"median": round(full_extra, 3)}
    result["help"]["via"] = help_via
    result["help"]["command"] = " ".join(help_cmd)
    result["goals"] = {"import_nocollapse_extra": args.import_goal, "import_full_extra": args.import_goal,
                       "help": args.help_goal}
    result["pass"] = {"import_nocollapse_extra": extra <= args.import_goal,
                      "import_full_extra": full_extra <= args.import_goal,
                      "help": result["help"]["median"] <= args.help_goal}
    result["python"] = sys.version.split()[0]
    result["cpus"] = os.cpu_count()
    if args.importtime:
        for name, us in slowest_modules():
            print(f"{us / 1e6:8.3f} s  {name}", file=sys.stderr)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
