"""Run logging: ``metrics.jsonl`` (one JSON object per record) and TensorBoard, rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .run_directory import write_text_atomically


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return records


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and mirrors numeric values to TensorBoard.

    ``files`` lists what it writes (``metrics.jsonl`` and this run's TensorBoard event file), for
    the run directory's manifest."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.files: list[Path] = []
        if not enabled:
            return
        self.files.append(self.path)
        if resume_step is None:
            self.path.write_text("")  # a fresh run starts a fresh file
        elif self.path.is_file():
            # Drop what an interrupted run logged after the checkpoint we resume from; the kept
            # records replace the file in one rename, so a crash here loses none of them.
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                log_dir = Path(run_dir) / "tensorboard"
                before = set(log_dir.iterdir()) if log_dir.is_dir() else set()
                self.writer = SummaryWriter(log_dir=str(log_dir))  # creates its event file now
                self.files += sorted(set(log_dir.iterdir()) - before)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.writer = None

    def log(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            step = int(clean.get("step", 0))
            for key, value in clean.items():
                if key in ("step", "epoch") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
