"""Command line: ``nocollapse train | diagnose | eval | config``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .version import __version__

log = logging.getLogger("nocollapse")

DEFAULT_OUT = "runs"


def _package_config(name: str) -> Path:
    return Path(__file__).resolve().parent / "configs" / name


def bundled_config_names() -> list[str]:
    """The names of the bundled configs (``digits``, ``cifar10/dino``, ...), sorted."""
    root = _package_config("")
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _resolve_config_path(value: str) -> Path:
    """A config file path, or the name of a bundled config (``digits``, ``cifar10/dino``).

    Neither: a :class:`~nocollapse.config.ConfigError` that lists the bundled names, the
    closest first."""
    import difflib

    from .config import ConfigError

    path = Path(value)
    if path.is_file():
        return path
    bundled = _package_config(value if value.endswith(".yaml") else value + ".yaml")
    if bundled.is_file():
        return bundled
    names = bundled_config_names()
    close = difflib.get_close_matches(value.removesuffix(".yaml"), names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"config file not found: {value} is neither a file nor a bundled config{hint} "
                      f"Bundled configs: {', '.join(names)}")


DEFAULT_CONFIG = "digits.yaml"


def _build_config(args: argparse.Namespace):
    """The config of ``--config`` (every key it sets counts as set by the user) and ``--set``.

    Without ``--config`` the built-in default is the starting point, like the schema's own
    defaults: its method keys do not count as set, so ``--set method.name=carp`` (or a plugin
    method) starts from the same data, views and training settings."""
    from .config import build_config, load_yaml

    if args.config:
        return build_config(_resolve_config_path(args.config), args.set)
    return build_config(overrides=args.set, base=load_yaml(_package_config(DEFAULT_CONFIG)))


def _default_run_dir(cfg) -> Path:
    from .utils.registry import METHODS

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(DEFAULT_OUT) / f"{METHODS.get(cfg.method.name).run_name(cfg)}-{cfg.data.dataset}-{stamp}"


def cmd_train(args: argparse.Namespace) -> int:
    from .config import build_config, load_yaml
    from .utils import distributed as dist_utils
    from .utils.checkpoint import CheckpointError
    from .analysis import format_summary
    from .engine.trainer import CheckpointWriteError, NonFiniteLossError, Trainer, TrainingInterrupted

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"error: --out {args.out} is a file, not a directory; give a directory for the run")
    if args.resume:
        if not args.out:
            raise SystemExit("error: --resume needs --out RUN_DIR (the run to continue)")
        run_dir = Path(args.out)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise SystemExit(f"error: {run_dir} holds no config.yaml; nothing to resume")
        if args.config:
            raise SystemExit("error: --resume continues the run with its saved config.yaml; "
                             "--config cannot be combined with it")
        from .engine.trainer import check_resume_overrides

        check_resume_overrides(load_yaml(saved), args.set, run_dir)  # names a refused --set key first
        cfg, _ = build_config(overrides=args.set, base=load_yaml(saved))
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise SystemExit(f"error: {run_dir}/checkpoints/last.pt does not exist; nothing to resume")
    else:
        cfg, _ = _build_config(args)
        run_dir = Path(args.out) if args.out else _default_run_dir(cfg)
    trainer = Trainer(cfg, run_dir, resume=args.resume, force=args.force)
    if trainer.main:  # fail fast, before the data are loaded; the trainer checks again under the lock
        from .utils.run_directory import RunDirectoryError, refuse_if_locked, refuse_unless_empty

        try:
            if args.resume or args.force:
                refuse_if_locked(run_dir)
            else:
                refuse_unless_empty(run_dir)
        except RunDirectoryError as exc:
            raise SystemExit(f"error: {exc}") from None
    try:
        summary = trainer.fit()
    except TrainingInterrupted as exc:
        print(f"nocollapse: {exc}", file=sys.stderr)
        return 3
    except (NonFiniteLossError, CheckpointError, CheckpointWriteError) as exc:
        print(f"nocollapse: error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()
    if trainer.main:
        print(format_summary(summary))
        print(f"\nrun directory: {run_dir}")
    return 0


def _write_json(path: Path, data: dict) -> None:
    from .utils.run_directory import write_json_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, data)


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Collapse report of a run, a checkpoint, or a prototype matrix from another library."""
    import torch

    from .diagnostics.report import format_embedding_report, format_report, prototype_report, write_plots

    if args.weights:
        if args.target:
            raise SystemExit("error: give either RUN_DIR|CHECKPOINT or --weights FILE, not both")
        from .diagnostics.foreign import load_prototypes

        prototypes = load_prototypes(args.weights, args.key, transpose=args.transpose).float()
        report = prototype_report(prototypes)
        report["source"] = {"weights": str(args.weights), "key": args.key}
        out_dir = Path(args.out) if args.out else Path(".")
        if args.plots:
            report["plots"] = [str(p) for p in write_plots(prototypes, out_dir / "plots", report=report,
                                                           label=Path(args.weights).stem)]
    else:
        if not args.target:
            raise SystemExit("error: give a run directory, a checkpoint, or --weights FILE --key KEY")
        from .analysis import encode_split, method_report, write_run_plots
        from .utils.metrics_log import read_jsonl
        from .utils.run_directory import record
        from .runs import load_run

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        run = load_run(args.target, device=device, data_root=args.data_root)
        out_dir = Path(args.out) if args.out else run.run_dir
        if args.no_data:
            prototypes = run.method.prototype_vectors()
            if prototypes is None:
                raise SystemExit("error: this method has no prototypes; diagnose it with data")
            weights, idle = run.method.mixture_weights(), run.method.idle_prototypes()
            report = prototype_report(prototypes.float().cpu(),
                                      mixture_weights=weights.cpu() if weights is not None else None,
                                      idle=idle.cpu() if idle is not None else None)
        else:
            test = encode_split(run.method, run.splits.test, run.image_size, run.splits,
                                run.cfg.eval.batch_size, device, max_samples=args.samples)
            report = method_report(run.method, test)
        report["source"] = {"checkpoint": str(run.checkpoint), "step": run.step,
                            "method": run.cfg.method.name, **run.method.summary_fields()}
        record(run.run_dir, out_dir / "diagnosis.json", *report.get("plots", []))  # if inside the run
        if args.plots:
            records = read_jsonl(run.run_dir / "metrics.jsonl")
            report["plots"] = [str(p) for p in write_run_plots(out_dir, run.method, report, records,
                                                               label=run.method.describe())]
    _write_json(out_dir / "diagnosis.json", report)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "spectrum"}, indent=1))
    else:
        print(format_report(report) if "num_prototypes" in report else format_embedding_report(report))
        print(f"\nwritten: {out_dir / 'diagnosis.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """k-NN, linear probe, clustering and long-tail accuracy of a run's frozen features."""
    import torch

    from .analysis import cached_outputs
    from .evaluation.suite import evaluate
    from .runs import load_run
    from .utils.run_directory import record

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(args.target, device=device, data_root=args.data_root)
    train, test = cached_outputs(run, device, use_cache=not args.no_cache, balanced_train=args.balanced_train)
    chosen = {"knn": args.knn, "linear": args.linear, "clustering": args.clustering}
    if not any(chosen.values()):
        chosen = dict.fromkeys(chosen, True)
    e = run.cfg.eval
    result = evaluate(train, test, run.splits.num_classes, run.splits.class_counts(), **chosen,
                      linear_lrs=tuple(e.linear_lrs), linear_weight_decays=tuple(e.linear_weight_decays),
                      linear_epochs=e.linear_epochs, many_threshold=e.many_threshold,
                      few_threshold=e.few_threshold, seed=run.cfg.train.seed,
                      num_prototypes=run.method.num_prototypes)
    result["source"] = {"checkpoint": str(run.checkpoint), "step": run.step, "method": run.cfg.method.name,
                        **run.method.summary_fields(), "dataset": run.cfg.data.dataset,
                        "features": run.method.eval_network_name,
                        "evaluation_train": "balanced (before long-tail subsampling)" if args.balanced_train
                        else "pre-training split", "evaluation_train_images": len(train.labels)}
    out = Path(args.out) if args.out else run.run_dir
    name = "eval_balanced.json" if args.balanced_train else "eval.json"
    record(run.run_dir, out / name)  # listed in the run's manifest when written inside it
    _write_json(out / name, result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_eval(result))
        print(f"\nwritten: {out / name}")
    return 0


def format_eval(result: dict) -> str:
    from .evaluation.knn import KNN_PROTOCOLS, knn_protocol_key

    def pct(v):
        return "-" if v is None else f"{100 * v:6.2f} %"

    src = result["source"]
    method = src["method"] + (f" ({src['prototypes']})" if src.get("prototypes") else "")
    lines = [f"nocollapse eval: {method} on "
             f"{result['source']['dataset']}, step {result['source']['step']} "
             f"({result['num_train']} train / {result['num_test']} test, {result['feature_dim']}-d features)"]
    for key, value in result.get("knn", {}).items():
        lines.append(f"  {key:<28} top-1 {pct(value['top1'])}   top-5 {pct(value['top5'])}")
    if "linear" in result:
        lin = result["linear"]
        lines.append(f"  {'linear probe':<28} top-1 {pct(lin['top1'])}   top-5 {pct(lin['top5'])}   "
                     f"(lr {lin['best_lr']:g}, wd {lin['best_weight_decay']:g}, val {pct(lin['val_top1'])})")
    for name, value in result.get("clustering", {}).items():
        extra = f"   clusters used {value['clusters_used']}" if "clusters_used" in value else ""
        acc = f"ACC {pct(value['acc'])}   " if "acc" in value else ""
        lines.append(f"  {'clustering ' + name:<28} {acc}NMI {value['nmi']:.4f}   AMI {value['ami']:.4f}   "
                     f"ARI {value['ari']:.4f}{extra}")
    for source in (knn_protocol_key(*KNN_PROTOCOLS["dino"]), "linear"):
        lt = (result.get("knn", {}).get(source) or {}).get("long_tail") if source != "linear" \
            else (result.get("linear") or {}).get("long_tail")
        if lt:
            lines.append(f"  {'long tail (' + source.split('_')[0] + ')':<28} head {pct(lt['head'])}   "
                         f"medium {pct(lt['medium'])}   tail {pct(lt['tail'])}   "
                         f"({lt['num_head']}/{lt['num_medium']}/{lt['num_tail']} classes)")
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    """The trained backbone of a run as a plain state dict."""
    from .runs import export_backbone, load_run

    run = load_run(args.target, data_root=args.data_root)
    info = export_backbone(run, args.out)
    print(f"wrote {args.out} ({info['tensors']} tensors of the {info['network']}, {info['backbone']} "
          f"x{info['width_multiplier']:g}, {info['feature_dim']}-d features) and {args.out}.json")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import reference_table, to_yaml

    if args.reference:
        print(reference_table())
        return 0
    cfg, _ = _build_config(args)
    print(to_yaml(cfg), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nocollapse",
        description="Self-supervised learning whose prototypes do not collapse, and diagnostics "
                    "that show when they do.")
    parser.add_argument("--version", action="version", version=f"nocollapse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a self-supervised model",
                           description="Train a model. With no arguments: DINO on scikit-learn's "
                                       "digits, offline, in a few minutes on a CPU.")
    train.add_argument("--config", help="YAML config file, or a bundled config name "
                                        "(digits, cifar10, cifar10/dino, ...)")
    train.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override config keys, e.g. --set optim.lr=0.001 train.epochs=5; may be "
                            "repeated (every --set applies, later ones win for the same key)")
    train.add_argument("--out", help="run directory, new or empty unless --resume or --force "
                                     "(default: runs/<method>-<prototypes>-<dataset>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from checkpoints/last.pt")
    train.add_argument("--force", action="store_true",
                       help="train into a non-empty --out: first remove the files an earlier run wrote "
                            "there (those its manifest.json lists); files of your own are kept")
    train.set_defaults(func=cmd_train)

    diagnose = sub.add_parser(
        "diagnose", help="collapse report of a run, a checkpoint or another library's prototypes",
        description="Prototype geometry (unique prototypes at eps), utilisation, assignment entropy, "
                    "effective rank; writes diagnosis.json (and PNG plots with --plots).")
    diagnose.add_argument("target", nargs="?", help="run directory or checkpoint file")
    diagnose.add_argument("--weights", help="a checkpoint of another library (read with weights_only=True)")
    diagnose.add_argument("--key", help="dotted path of the prototype matrix in --weights, e.g. "
                                        "teacher.head.last_layer.weight (weight-norm parametrisations resolved)")
    diagnose.add_argument("--transpose", action="store_true", help="the matrix stores prototypes as columns")
    diagnose.add_argument("--json", action="store_true", help="print JSON instead of a table")
    diagnose.add_argument("--plots", action="store_true", help="write PNG plots to OUT/plots")
    diagnose.add_argument("--out", help="where diagnosis.json goes (default: the run directory, or . for --weights)")
    diagnose.add_argument("--samples", type=int, default=0, help="test images to use (0: all)")
    diagnose.add_argument("--no-data", action="store_true", help="prototype geometry only, no data pass")
    diagnose.add_argument("--data-root", help="override the run's data.root")
    diagnose.set_defaults(func=cmd_diagnose)

    evaluate = sub.add_parser(
        "eval", help="k-NN, linear probe, clustering and long-tail accuracy of a run",
        description="Evaluates frozen backbone features (cached per checkpoint in RUN_DIR/features); "
                    "with no flag it runs every evaluation. Writes eval.json.")
    evaluate.add_argument("target", help="run directory or checkpoint file")
    evaluate.add_argument("--knn", action="store_true", help="weighted k-NN (k=20, T=0.07 and k=200, T=0.1)")
    evaluate.add_argument("--linear", action="store_true", help="linear probe with a validated lr / wd sweep")
    evaluate.add_argument("--clustering", action="store_true", help="k-means and arg-max prototype NMI / ARI / ACC")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument("--out", help="where eval.json goes (default: the run directory)")
    evaluate.add_argument("--no-cache", action="store_true", help="recompute features even if cached")
    evaluate.add_argument("--balanced-train", action="store_true",
                          help="for a run pre-trained on a long-tailed subset: fit k-NN and the probe on the "
                               "full, balanced train split (head / medium / tail groups still follow the "
                               "pre-training class counts); writes eval_balanced.json")
    evaluate.add_argument("--data-root", help="override the run's data.root")
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser(
        "export", help="write a run's trained backbone as a plain state dict",
        description="Writes the backbone evaluation uses (the teacher's for EMA methods) as a state dict "
                    "that torch.load(..., weights_only=True) reads without nocollapse; ResNets keep "
                    "torchvision's key names. A JSON description goes next to it.")
    export.add_argument("target", help="run directory or checkpoint file")
    export.add_argument("--out", required=True, help="output file, e.g. backbone.pt")
    export.add_argument("--data-root", help="override the run's data.root (the data give the image size)")
    export.set_defaults(func=cmd_export)

    config = sub.add_parser("config", help="print the resolved config (or the key reference)")
    config.add_argument("--config", help="YAML config file or bundled config name")
    config.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys; may be repeated")
    config.add_argument("--reference", action="store_true", help="print every key as a Markdown table")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Imported after parsing, so that --help, --version and usage errors need neither torch
    # (data.registry and utils.checkpoint import it) nor OmegaConf.
    from .config import ConfigError
    from .data.registry import DatasetNotFoundError
    from .utils.checkpoint import CheckpointError
    from .utils.oserrors import describe_os_error

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except ConfigError as exc:
        print(f"nocollapse: config error: {exc}", file=sys.stderr)
        return 2
    except (DatasetNotFoundError, ValueError, KeyError, CheckpointError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"nocollapse: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # a directory that cannot be written, a full disk, ...: a sentence
        print(f"nocollapse: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
