#!/bin/bash
# The same DINO step-time measurement at K = 65,536 on the code before the change (/tmp/prev,
# the parent commit), right after run.sh in the same sitting, alone on both cores.
set -e
export TQDM_DISABLE=1
PY=/work/main/.venv/bin/python
OUT=/work/main/docs/throughput_goals/dino_fused/before
mkdir -p $OUT
cd /tmp/prev; export PYTHONPATH=/tmp/prev/src
date
$PY benchmarks/throughput.py --methods dino dino_decoupled --set method.num_prototypes=65536 \
    --tag k65536 --rounds 5 --repeats 1 --threads 2 --lightly-reference --out $OUT > $OUT/log-k65536.txt
date
