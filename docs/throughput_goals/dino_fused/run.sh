#!/bin/bash
# Issue 36 item 2, DINO's logits made inside the loss: the step's peak memory at K = 65,536 against
# e460262 (/tmp/ref), then the step time against the FLOP count and lightly's step at both K,
# alone on both cores, on the code of the worktree /tmp/cur.
set -e
export TQDM_DISABLE=1
PY=/work/main/.venv/bin/python
OUT=/work/main/docs/throughput_goals/dino_fused
cd /tmp/cur; export PYTHONPATH=/tmp/cur/src
date
$PY benchmarks/step_memory.py --methods dino dino_decoupled dino_decoupled_paper --set method.num_prototypes=65536 \
    --rounds 1 --threads 2 --reference /tmp/ref --out $OUT/step_memory-k65536.json > $OUT/log-memory.txt
date
$PY benchmarks/throughput.py --methods dino dino_decoupled dino_decoupled_paper --set method.num_prototypes=65536 \
    --tag k65536 --rounds 5 --repeats 1 --threads 2 --lightly-reference --out $OUT > $OUT/log-k65536.txt
date
$PY benchmarks/throughput.py --methods dino dino_decoupled dino_decoupled_paper --tag k4096 --rounds 5 --repeats 1 \
    --threads 2 --lightly-reference --out $OUT > $OUT/log-k4096.txt
date
