"""Run a function in N processes joined by a gloo process group (CPU), and collect results.

    results = run_distributed(fn, world_size=2, args=(...))

``fn(rank, world_size, *args)`` must be a module-level function (it is pickled into spawned
processes); its return value (tensors / plain containers) comes back in rank order.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, args: tuple = ()) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        mp.start_processes(_worker, args=(world_size, port, out_dir, fn, args), nprocs=world_size,
                           join=True, start_method="spawn")
        results = []
        for rank in range(world_size):
            payload = torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True)
            if not payload["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results
