#!/bin/bash
# Issue 36 item 2, CARP scoring against the prototype rows in block order: the step's peak memory
# against e460262 and the step time against the FLOP count at K = 65,536, alone on both cores.
# Current code from the worktree /tmp/cur, the code before the change from /tmp/prev, e460262 from /tmp/ref.
set -e
export TQDM_DISABLE=1
PY=/work/main/.venv/bin/python
OUT=/work/main/docs/throughput_goals/carp_block_order
cd /tmp/cur; export PYTHONPATH=/tmp/cur/src
date
$PY benchmarks/step_memory.py --methods carp carp_decoupled --set method.num_prototypes=65536 --rounds 1 --threads 2 \
    --reference /tmp/ref --out $OUT/step_memory-k65536.json > $OUT/log-memory.txt
date
$PY benchmarks/throughput.py --methods carp carp_decoupled --set method.num_prototypes=65536 --tag k65536 --rounds 5 \
    --repeats 1 --threads 2 --out $OUT > $OUT/log-k65536.txt
date
cd /tmp/prev; export PYTHONPATH=/tmp/prev/src
mkdir -p $OUT/before
$PY benchmarks/throughput.py --methods carp --set method.num_prototypes=65536 --tag k65536 --rounds 5 \
    --repeats 1 --threads 2 --out $OUT/before > $OUT/before/log-k65536.txt
date
