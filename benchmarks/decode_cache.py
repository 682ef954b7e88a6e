"""How long loading an image folder takes with and without the decoded-image cache.

Loads the folder (``train/`` and ``test/`` class folders, CIFAR-10 by default) three times through
``load_dataset``: with ``data.decode_cache=off``, then twice with a cache in a fresh temporary
directory (the first load decodes and writes it, the second reads it). Prints the seconds of each
load and the cache's size as JSON, after checking that the cached images equal the decoded ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from nocollapse.config import DataConfig
from nocollapse.data import load_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("NOCOLLAPSE_CIFAR10"),
                        help="the image folder (default: $NOCOLLAPSE_CIFAR10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("give --data or set NOCOLLAPSE_CIFAR10")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:
        seconds, splits = {}, {}
        for name, setting in (("cache_off", "off"), ("first_load", cache), ("cached_load", cache)):
            start = time.perf_counter()
            splits[name] = load_dataset(DataConfig(dataset="imagefolder", root=args.data, decode_cache=setting))
            seconds[name] = round(time.perf_counter() - start, 2)
        for split in ("train", "test"):
            if not torch.equal(getattr(splits["cached_load"], split).images,
                               getattr(splits["cache_off"], split).images):
                sys.exit(f"the cached {split} split differs from the decoded one")
        cache_bytes = sum(f.stat().st_size for f in Path(cache).glob("*.pt"))
    images = len(splits["cache_off"].train) + len(splits["cache_off"].test)
    result = {"data": args.data, "images": images, "seconds": seconds, "cache_bytes": cache_bytes,
              "cache_mib": round(cache_bytes / 2**20, 1), "threads": args.threads, "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
