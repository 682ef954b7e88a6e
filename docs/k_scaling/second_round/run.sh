#!/bin/bash
# Issue 36 item 3 again, on the code with the losses making their own scores (results 21), on both
# cores alone (section 19.2's round ran on one thread beside training runs).
set -e
export TQDM_DISABLE=1
cd /tmp/cur; export PYTHONPATH=/tmp/cur/src
date
/work/main/.venv/bin/python benchmarks/k_scaling.py --k 1024 4096 16384 65536 131072 --rounds 3 --threads 2 \
    --out /work/main/docs/k_scaling/second_round > /work/main/docs/k_scaling/second_round/log.txt
date
