"""Command line: ``nocollapse train | diagnose | eval | config``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__

log = logging.getLogger("nocollapse")

DEFAULT_OUT = "runs"


def _package_config(name: str) -> Path:
    return Path(__file__).resolve().parent / "configs" / name


def _resolve_config_path(value: str) -> Path:
    """A config file path, or the name of a bundled config (``digits``, ``cifar10/dino``)."""
    path = Path(value)
    if path.is_file():
        return path
    bundled = _package_config(value if value.endswith(".yaml") else value + ".yaml")
    if bundled.is_file():
        return bundled
    return path  # build_config reports the missing file


def _default_run_dir(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(DEFAULT_OUT) / f"{cfg.method.name}-{cfg.method.prototypes}-{cfg.data.dataset}-{stamp}"


def cmd_train(args: argparse.Namespace) -> int:
    from .config import build_config, load_yaml
    from .engine import distributed as dist_utils
    from .engine.checkpoint import CheckpointError
    from .engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted, format_summary

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
        cfg, _ = build_config(overrides=args.set, base=load_yaml(saved))
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise SystemExit(f"error: {run_dir}/checkpoints/last.pt does not exist; nothing to resume")
    else:
        config_file = _resolve_config_path(args.config) if args.config else _package_config("digits.yaml")
        cfg, _ = build_config(config_file, args.set)
        run_dir = Path(args.out) if args.out else _default_run_dir(cfg)
        if (run_dir / "checkpoints" / "last.pt").exists() and not args.force:
            raise SystemExit(f"error: {run_dir} already holds a run; use --resume to continue it, "
                             f"--force to overwrite it, or another --out")
    trainer = Trainer(cfg, run_dir, resume=args.resume)
    try:
        summary = trainer.fit()
    except TrainingInterrupted as exc:
        print(f"nocollapse: {exc}", file=sys.stderr)
        return 3
    except (NonFiniteLossError, CheckpointError) as exc:
        print(f"nocollapse: error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()
    if trainer.main:
        print(format_summary(summary))
        print(f"\nrun directory: {run_dir}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import build_config, reference_table, to_yaml

    if args.reference:
        print(reference_table())
        return 0
    config_file = _resolve_config_path(args.config) if args.config else _package_config("digits.yaml")
    cfg, _ = build_config(config_file, args.set)
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
    train.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override config keys, e.g. --set optim.lr=0.001 train.epochs=5")
    train.add_argument("--out", help="run directory (default: runs/<method>-<prototypes>-<dataset>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from checkpoints/last.pt")
    train.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    train.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="print the resolved config (or the key reference)")
    config.add_argument("--config", help="YAML config file or bundled config name")
    config.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    config.add_argument("--reference", action="store_true", help="print every key as a Markdown table")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data.registry import DatasetNotFoundError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"nocollapse: config error: {exc}", file=sys.stderr)
        return 2
    except (DatasetNotFoundError, ValueError) as exc:
        print(f"nocollapse: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
