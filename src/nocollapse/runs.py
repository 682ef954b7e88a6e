"""Re-open a finished or running training run: its config, data and model from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, config_from_dict
from .data import load_dataset
from .data.registry import DatasetSplits, image_size_of
from .utils.checkpoint import CheckpointError, atomic_save, load_checkpoint
from .utils.run_directory import record, write_json_atomically
from .methods import SSLMethod, build_run_method


@dataclass
class LoadedRun:
    cfg: Config
    method: SSLMethod
    splits: DatasetSplits
    image_size: int
    checkpoint: Path
    run_dir: Path
    step: int


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint file, run directory) of a run directory or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise CheckpointError(f"{path} holds no checkpoints/last.pt; is it a nocollapse run directory?")
        return ckpt, path
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return path, run_dir
    raise CheckpointError(f"{path} is neither a run directory nor a checkpoint file")


def load_run(path: str | Path, device: torch.device | str = "cpu", data_root: str | None = None) -> LoadedRun:
    """Rebuild the method of a run from its checkpoint, and its dataset splits.

    ``data_root`` overrides ``data.root`` (a run moved to another machine). The method comes from
    the trainer's own factory (:func:`~nocollapse.methods.build_run_method`) with the world size
    the checkpoint was written with, so its per-step schedules are the trained run's."""
    ckpt_path, run_dir = resolve_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    data = dict(ckpt["config"])
    if data_root is not None:
        data["data"] = {**data["data"], "root": data_root}
    cfg = config_from_dict(data)
    splits = load_dataset(cfg.data)
    size = image_size_of(cfg, splits)
    method = build_run_method(cfg, splits, size, world_size=int(ckpt.get("world_size", 1)))
    method.load_state_dict(ckpt["method"])
    method.to(device).eval()
    return LoadedRun(cfg, method, splits, size, ckpt_path, run_dir, int(ckpt.get("step", 0)))


def export_backbone(run: LoadedRun, out: str | Path) -> dict:
    """Write the run's evaluation backbone as a plain state dict to ``out`` (``torch.load``-able
    with ``weights_only=True``, no nocollapse needed) and its description to ``out`` + ``.json``.

    A ResNet backbone keeps torchvision's key names (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
    no ``fc``): at width 1 with the ImageNet stem it loads into ``torchvision.models.resnet18()``
    with ``strict=False``, only ``fc`` missing. Files written inside the run directory are added to
    its manifest (``train --force`` removes them with the run)."""
    backbone = run.method.eval_backbone()
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    out = Path(out)
    record(run.run_dir, out, out.with_name(out.name + ".json"))
    atomic_save(state, out)
    m = run.cfg.model
    info = {"backbone": m.backbone, "width_multiplier": m.width_multiplier, "stem": m.stem,
            "image_size": run.image_size, "feature_dim": int(getattr(backbone, "feature_dim", 0)),
            "network": run.method.eval_network_name, "method": run.cfg.method.name,
            "checkpoint": str(run.checkpoint), "step": run.step, "tensors": len(state)}
    write_json_atomically(out.with_name(out.name + ".json"), info)
    return info
