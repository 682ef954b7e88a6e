"""The training step's own peak memory, against the same step on another checkout of the code.

For each method of ``--methods`` at the study's CIFAR-10 recipe (``--set`` applies to all), one
fresh process per measurement builds the method, its optimiser and its views as
``benchmarks/throughput.py`` does and runs ``--warmup-steps`` training steps (augmentation,
forward, loss, backward, optimiser, EMA / mixture commit) on random uint8 images, which allocate
the optimiser's state and whatever else a run keeps from step to step. It then returns freed heap
pages to the system, reads its resident memory, resets the kernel's high-water mark and runs
``--steps`` more steps. The step's peak (``step_peak_bytes``) is the high-water mark's growth over
the trained model: activations, autograd's saved tensors, gradients and the K-wide temporaries,
what one step needs beyond the state a run holds anyway. ``state_growth_bytes`` is what the
warm-up steps added to the built model (the optimiser's moments, the EMA teacher's buffers), and
the process's whole peak is recorded too, though a width-16 ResNet-18 and torch itself make most
of it.
One more step is then measured phase by phase (``phase_peak_bytes``: the forward pass, the
backward pass and the optimiser, each over the resident memory before that step), to show where
the step's peak lies.

With ``--reference DIR`` (a checkout of an older commit, for instance ``git worktree add
/tmp/ref e460262``), every measurement is also made on that checkout's package and its own
``benchmarks/throughput.py``, alternating with the current code over ``--rounds``, and each
method gets the ratio of the two medians against ``--goal`` (the step's peak at most that
fraction of the reference's). For the current code it also records the preflight estimate
of the method's state and scores (``estimate_state_bytes``, what ``nocollapse train`` checks
before it starts), to compare with the measured growth.

Peak memory does not depend on what else runs on the machine, so this benchmark, unlike the
timing ones, can share the cores.

    git worktree add /tmp/ref e460262
    python benchmarks/step_memory.py --methods dino dino_decoupled --set method.num_prototypes=65536 \\
        --reference /tmp/ref --out docs/throughput_goals/step_memory-k65536.json
    python benchmarks/step_memory.py --dry-run --reference . --out /tmp/step_memory.json   # tiny, seconds
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# keys that older checkouts know too (a --reference run builds both codes with the same overrides)
DRY_RUN_SETS = ["train.batch_size=8", "model.width_multiplier=0.125", "method.head.hidden_dim=64",
                "method.head.bottleneck_dim=16"]
SIZE = 32


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0: ``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed malloc pages back to the system, so that the baseline is what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def phase_peaks(method, one_step) -> dict[str, int]:
    """The peak of one more step phase by phase, each over the resident memory before the step:
    the forward pass (up to the loss), the backward pass (up to the method's ``on_after_backward``)
    and the optimiser (up to its ``on_after_optimizer_step``). The boundaries are the engine's own
    calls, wrapped on this instance, so the step runs as the trainer runs it."""
    _trim_heap()
    base = _status_bytes("VmRSS")
    peaks: dict[str, int] = {}

    def boundary(name, call):
        def wrapped(*args, **kwargs):
            result = call(*args, **kwargs)
            peaks[name] = _status_bytes("VmHWM") - base
            _trim_heap()
            _reset_high_water_mark()
            return result
        return wrapped

    method.forward = boundary("forward", method.forward)
    method.on_after_backward = boundary("backward", method.on_after_backward)
    method.on_after_optimizer_step = boundary("optimizer", method.on_after_optimizer_step)
    _reset_high_water_mark()
    try:
        one_step()
    finally:
        for name in ("forward", "on_after_backward", "on_after_optimizer_step"):
            delattr(method, name)
    return peaks


def child(tree: Path, method_name: str, sets: list[str], warmup_steps: int, steps: int, threads: int,
          preflight: bool) -> dict:
    """One measurement, in this process, of the package and throughput.py of checkout ``tree``."""
    sys.path[:0] = [str(tree / "benchmarks"), str(tree / "src")]
    import torch

    import throughput  # the checkout's own: its build() is that code's step as throughput.py timed it
    from nocollapse.data.batch import Batch
    from nocollapse.engine.trainer import optimisation_step

    if threads:
        torch.set_num_threads(threads)
    cfg, method, optimizer, views = throughput.build(method_name, sets)
    batch = cfg.train.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    labels[torch.rand(batch, generator=generator) >= cfg.data.label_fraction] = -1
    estimate = None
    if preflight:
        from nocollapse.utils.registry import METHODS
        rows = batch * (2 + cfg.views.local_crops)
        estimate = METHODS.get(cfg.method.name).estimate_state_bytes(cfg, rows)
    def run_steps(first: int, count: int) -> None:
        for step in range(first, first + count):
            optimisation_step(method, method, optimizer, Batch(views(images), labels if method.uses_labels else None),
                              step, cfg.optim.lr, cfg.optim.weight_decay, clip_grad=cfg.optim.clip_grad)

    _trim_heap()
    built = _status_bytes("VmRSS")
    run_steps(0, warmup_steps)
    _trim_heap()
    trained = _status_bytes("VmRSS")
    if not _reset_high_water_mark() or built is None or trained is None:
        raise SystemExit("step_memory.py needs Linux's /proc/self/status and /proc/self/clear_refs")
    run_steps(warmup_steps, steps)
    peak = _status_bytes("VmHWM")
    phases = phase_peaks(method, lambda: run_steps(warmup_steps + steps, 1))
    import resource
    import nocollapse
    return {"package": str(Path(nocollapse.__file__).resolve().parent), "rss_built_bytes": built, "rss_trained_bytes": trained,
            "state_growth_bytes": trained - built, "peak_rss_bytes": peak, "step_peak_bytes": peak - trained,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "phase_peak_bytes": phases, "preflight_bytes": estimate, "num_prototypes": int(getattr(cfg.method, "num_prototypes", 0) or 0),
            "batch": batch, "threads": torch.get_num_threads()}


def commit_of(tree: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(tree: Path, method: str, args, sets: list[str], preflight: bool) -> dict:
    """One measurement in a fresh process, whose imports are the checkout's own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--tree", str(tree),
               "--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps), "--threads", str(args.threads),
               "--set", *sets]
    if preflight:
        command.append("--preflight")
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {method} on {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dino", "dino_decoupled"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every method")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="steps before the measurement (the first allocates the optimiser's state)")
    parser.add_argument("--steps", type=int, default=2, help="measured training steps")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per method and checkout, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each measurement")
    parser.add_argument("--reference", type=Path, help="a checkout of the code to compare with (its src/ and "
                                                       "benchmarks/ are used)")
    parser.add_argument("--goal", type=float, default=0.6, help="the step's peak at most this fraction of the "
                                                                "reference's")
    parser.add_argument("--out", type=Path, help="write the record here (JSON)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny network and K, one round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.tree, args.child, args.set, args.warmup_steps, args.steps, args.threads,
                               args.preflight)))
        return {}
    sets = list(args.set)
    if args.dry_run:
        sets, args.rounds, args.warmup_steps, args.steps = [*DRY_RUN_SETS, "method.num_prototypes=128", *sets], 1, 1, 1
    trees = {"current": REPO}
    if args.reference is not None:
        if not (args.reference / "src" / "nocollapse").is_dir() or not (args.reference / "benchmarks").is_dir():
            parser.error(f"--reference {args.reference}: not a nocollapse checkout (no src/nocollapse or benchmarks/)")
        trees["reference"] = args.reference.resolve()
    runs: list[dict] = []
    for round_index in range(args.rounds):
        for method in args.methods:
            for label, tree in trees.items():
                result = measure(tree, method, args, sets, preflight=label == "current")
                runs.append({"method": method, "code": label, "round": round_index, **result})
                print(f"{method} ({label}): step peak {result['step_peak_bytes'] / 2**20:.0f} MiB", flush=True)
    summary = []
    for method in args.methods:
        medians = {label: statistics.median(r["step_peak_bytes"] for r in runs
                                            if r["method"] == method and r["code"] == label) for label in trees}
        row = {"method": method, "step_peak_bytes": {k: int(v) for k, v in medians.items()}}
        if "reference" in medians:
            ratio = medians["current"] / medians["reference"]
            row.update(ratio_to_reference=round(ratio, 3), goal=args.goal, goal_met=ratio <= args.goal)
        summary.append(row)
    record = {"methods": summary, "runs": runs, "sets": sets, "warmup_steps": args.warmup_steps,
              "steps": args.steps, "rounds": args.rounds,
              "threads": args.threads, "current_commit": commit_of(REPO),
              "reference_commit": commit_of(trees["reference"]) if "reference" in trees else None}
    if args.out is not None:
        from nocollapse.utils.run_directory import write_json_atomically

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(args.out, record)
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
