#!/bin/bash
# Issue 36 item 2, DINO's and CARP's losses making their scores inside one node: the step's peak
# memory at K = 65,536 against e460262 (/tmp/ref), then the step time at K = 65,536 against the
# FLOP count and lightly's step, on this code (/tmp/cur) and on the code before the fused losses
# (/tmp/prev: CARP scoring in block order, DINO's loss on the layer's logits), one after the other
# in the same sitting, alone on both cores.
set -e
export TQDM_DISABLE=1
PY=/work/main/.venv/bin/python
OUT=/work/main/docs/throughput_goals/fused_losses
M="dino dino_decoupled dino_decoupled_paper carp carp_decoupled"
mkdir -p $OUT/first_memory
cd /tmp/cur; export PYTHONPATH=/tmp/cur/src
date
$PY benchmarks/step_memory.py --methods $M --set method.num_prototypes=65536 --rounds 1 --threads 2 \
    --reference /tmp/ref --out $OUT/first_memory/step_memory-k65536.json > $OUT/first_memory/log-memory.txt
date
$PY benchmarks/throughput.py --methods dino carp carp_decoupled --set method.num_prototypes=65536 --tag k65536 \
    --rounds 5 --repeats 1 --threads 2 --lightly-reference --out $OUT > $OUT/log-k65536.txt
date
mkdir -p $OUT/before
cd /tmp/prev; export PYTHONPATH=/tmp/prev/src
$PY benchmarks/throughput.py --methods dino carp carp_decoupled --set method.num_prototypes=65536 --tag k65536 \
    --rounds 5 --repeats 1 --threads 2 --lightly-reference --out $OUT/before > $OUT/before/log-k65536.txt
date
# then, when the above had finished, the same step memory at K = 4,096 (the issue's recipes' K),
# for the K-wide part (K = 65,536 less K = 4,096):
#   cd /tmp/cur; PYTHONPATH=/tmp/cur/src $PY benchmarks/step_memory.py --methods $M --rounds 1 --threads 2 \
#       --reference /tmp/ref --out $OUT/first_memory/step_memory-k4096.json
