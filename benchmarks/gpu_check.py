"""A check of nocollapse on a CUDA machine, in one run of a few minutes; prints one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json     # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run                 # the same code paths on the CPU, tiny

What it runs, each part timed and reported even when another part fails:

* ``tests``: the suite's device tests (``pytest -m cuda``: every method's step under bf16
  autocast on the device, the mixture's E-step and the fp32 losses under autocast), with their
  counts and the tail of pytest's output on failure;
* ``steps``: each method's training step at its recipe (the CIFAR-10 recipes of the collapse
  study, the baselines with their digits recipe's head, DINO and DINO + decoupled also at
  K = 65,536) on the device with bf16 autocast and channels-last convolutions: seconds, the
  ratio to a bare backbone forward and backward on the same crops at the same precision, the
  same ratio by FLOP count, and the step's peak device memory;
* ``mixture_bf16``: the mixture's update under bf16 autocast against fp32 (largest difference of
  the responsibilities and of the means after 20 updates; the E-step opts out of autocast);
* ``torchrun``: a 1-process ``torchrun`` of ``nocollapse train`` on digits at tiny size (exit
  code, seconds, and the device its summary names);
* ``device``: the GPU's name, torch and CUDA versions, and the peak memory of the whole check.

``--dry-run`` takes the same paths on the CPU at tiny sizes (batch 8, ResNet-18 at 1/8 width,
K = 32 / 64, one timed call, one device test), so the test suite checks the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from throughput import BASELINES, SIZE, STUDY, build, count_gflops

ROOT = Path(__file__).resolve().parent.parent
K_LARGE = 65_536
# the recipes' methods whose section holds K (the others have no such key)
PROTOTYPE_METHODS = ("dino", "carp", "swav")
TINY = ["model.width_multiplier=0.125", "train.batch_size=8"]
TINY_BY_METHOD = {
    "prototypes": ["method.num_prototypes=32", "method.head.hidden_dim=32", "method.head.bottleneck_dim=16",
                   "method.head.layers=2"],
    "cplearn": ["cplearn.embedding_dim=16", "cplearn.num_codes=32"],
    "contrastive": ["contrastive.hidden_dim=32", "contrastive.output_dim=16"],
    "barlow_twins": ["barlow_twins.hidden_dim=32", "barlow_twins.output_dim=16"],
    "vicreg": ["vicreg.hidden_dim=32", "vicreg.output_dim=16"],
    "byol": ["byol.hidden_dim=32", "byol.output_dim=16", "byol.predictor_hidden_dim=16"],
    "simsiam": ["simsiam.hidden_dim=32", "simsiam.output_dim=16", "simsiam.predictor_hidden_dim=8"],
}


def _tiny(name: str) -> list[str]:
    """The dry run's tiny overrides for a case of the throughput benchmark (each method has its
    own section of head settings; CARP's blocks must divide the tiny K)."""
    base = name.split("_")[0]
    if base in PROTOTYPE_METHODS:
        return [*TINY_BY_METHOD["prototypes"], *(["carp.block_size=8"] if base == "carp" else [])]
    if base in ("simclr", "supcon", "clop"):
        return TINY_BY_METHOD["contrastive"]
    return TINY_BY_METHOD["barlow_twins" if base == "barlow" else base]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up, the device synchronised."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def check_step(name: str, extra: list[str], device: torch.device, repeats: int) -> dict:
    from nocollapse.data.batch import Batch
    from nocollapse.engine.trainer import optimisation_step
    from nocollapse.models.backbones import build_backbone
    from nocollapse.utils.optim import build_optimizer

    cfg, method, _, views = build(name, [*extra, "model.channels_last=true"])
    method = method.to(device)
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    views = views.to(device)
    batch = cfg.train.batch_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    labels[torch.rand(batch, generator=gen).to(device) >= cfg.data.label_fraction] = -1
    state = {"step": 0, "finite": True}

    def step() -> None:
        loss, out = optimisation_step(method, method, optimizer,
                                      Batch(views(images), labels if method.uses_labels else None),
                                      state["step"], cfg.optim.lr, cfg.optim.weight_decay,
                                      clip_grad=cfg.optim.clip_grad, amp_dtype=torch.bfloat16)
        state["finite"] &= out is not None and bool(torch.isfinite(loss))
        state["step"] += 1

    backbone = build_backbone(cfg.model, SIZE).to(device)
    joined = torch.cat(views(images))

    def backbone_step() -> None:
        backbone.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = backbone(joined)
        out.float().sum().backward()

    flops = {"step": count_gflops(step), "backbone": count_gflops(backbone_step)}
    _peak_reset(device)
    seconds = {"step": _timed(step, device, repeats)}
    peak = _peak_mib(device)
    seconds["backbone"] = _timed(backbone_step, device, repeats)
    ratio, by_flops = seconds["step"] / seconds["backbone"], flops["step"] / flops["backbone"]
    return {"method": name, "overrides": extra, "finite_losses": state["finite"],
            "num_prototypes": method.num_prototypes, "seconds": {k: round(v, 5) for k, v in seconds.items()},
            "gflops": {k: round(v, 3) for k, v in flops.items()}, "ratio_step_to_backbone": round(ratio, 3),
            "ratio_by_flops": round(by_flops, 3), "measured_over_flops": round(ratio / by_flops, 3),
            "peak_memory_mib": peak}


def check_mixture(device: torch.device, components: int, dim: int, updates: int) -> dict:
    import torch.nn.functional as F

    from nocollapse.prototypes import DecoupledPrototypes

    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(max(2, components // 4), dim, generator=gen), dim=1)
    ref = DecoupledPrototypes(components, dim, eta=0.1).to(device)
    amp = DecoupledPrototypes(components, dim, eta=0.1).to(device)
    worst = 0.0
    for step in range(updates):
        pick = torch.randint(0, centres.shape[0], (256,), generator=gen)
        x = F.normalize(centres[pick] + 0.05 * torch.randn(256, dim, generator=gen), dim=1).to(device)
        g_ref = ref.update(x, step)
        ref.commit()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            g_amp = amp.update(x, step)
        amp.commit()
        worst = max(worst, float((g_ref - g_amp).abs().max()))
    means = float((ref.means - amp.means).abs().max())
    return {"components": components, "dim": dim, "updates": updates, "max_abs_diff_responsibilities": worst,
            "max_abs_diff_means": means, "ok": worst <= 1e-4 and means <= 1e-4}


def run_tests(dry_run: bool) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_device.py")]
    if dry_run:
        command += ["-k", "mixture"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    result = {"command": " ".join(command[1:]), "exit_code": done.returncode, "summary": summary,
              "seconds": round(time.perf_counter() - start, 1)}
    if done.returncode:
        result["output_tail"] = (done.stdout + done.stderr)[-3000:]
    return result


def run_torchrun(device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "nocollapse.cli",
                   "train", "--out", str(out), "--set", "data.image_size=8", "model.width_multiplier=0.125",
                   "method.num_prototypes=32", "method.head.hidden_dim=64", "method.head.bottleneck_dim=16",
                   "train.epochs=1", "train.batch_size=64", "train.progress=false", "diagnostics.plots=false",
                   "eval.knn_init=false", f"train.device={'cuda' if device.type == 'cuda' else 'cpu'}"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, env=env)
        result = {"exit_code": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
        summary = out / "summary.json"
        if summary.is_file():
            data = json.loads(summary.read_text())
            result.update(device=data.get("device"), processes=data.get("processes"), knn_top1=data.get("knn_top1"))
        if done.returncode:
            result["output_tail"] = (done.stdout + done.stderr)[-3000:]
        return result


def _guarded(results: dict, key: str, fn) -> None:
    """Run one part; a failure is reported in its place and the check goes on."""
    start = time.perf_counter()
    try:
        results[key] = fn()
    except Exception:  # noqa: BLE001 - every failure of a part is reported, none stops the check
        results[key] = {"error": traceback.format_exc()[-3000:]}
    if isinstance(results[key], dict):
        results[key].setdefault("seconds", round(time.perf_counter() - start, 1))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU at tiny sizes")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per step (1 in a dry run)")
    parser.add_argument("--methods", nargs="+", help="the step cases to run (default: every recipe)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run it on a GPU machine, or use --dry-run here")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    repeats = 1 if args.dry_run else args.repeats
    results: dict = {"dry_run": args.dry_run, "device": {
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda}}
    _peak_reset(device)
    _guarded(results, "tests", lambda: run_tests(args.dry_run))

    names = args.methods or [*STUDY, *[n for n in BASELINES if not n.endswith("_paper")]]
    cases = [(n, []) for n in names]
    large = 64 if args.dry_run else K_LARGE
    cases += [(n, [f"method.num_prototypes={large}"]) for n in ("dino", "dino_decoupled") if n in names]
    steps: list = []
    for name, extra in cases:
        tiny = [*TINY, *_tiny(name)] if args.dry_run else []
        tiny = [o for o in tiny if not (extra and o.startswith("method.num_prototypes"))]
        part: dict = {}
        _guarded(part, "result", lambda: check_step(name, [*tiny, *extra], device, repeats))
        steps.append(part["result"] if "error" not in part["result"] else {"method": name, **part["result"]})
    results["steps"] = steps
    _guarded(results, "mixture_bf16", lambda: check_mixture(device, 64 if args.dry_run else 4096,
                                                            16 if args.dry_run else 256, 20))
    _guarded(results, "torchrun", lambda: run_torchrun(device))
    results["device"]["peak_memory_mib"] = _peak_mib(device)
    results["ok"] = (results["tests"].get("exit_code") == 0 and results["torchrun"].get("exit_code") == 0
                     and bool(results["mixture_bf16"].get("ok"))
                     and all(s.get("finite_losses") for s in steps))
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
