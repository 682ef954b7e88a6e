#!/bin/bash
# The fused against the layer-then-loss step in one process per method (K = 65,536, 2 threads,
# alone on the machine), then the step's peak memory of every method at both K against e460262.
set -e
export TQDM_DISABLE=1
PY=/work/main/.venv/bin/python
OUT=/work/main/docs/throughput_goals/fused_losses
cd /tmp/cur; export PYTHONPATH=/tmp/cur/src
date
$PY benchmarks/fused_losses.py --methods dino dino_decoupled carp carp_decoupled --set method.num_prototypes=65536 \
    --rounds 6 --threads 2 --out $OUT/ab-k65536.json > /dev/null
date
M="dino dino_decoupled dino_decoupled_paper carp carp_decoupled"
$PY benchmarks/step_memory.py --methods $M --set method.num_prototypes=65536 --rounds 1 --threads 2 \
    --reference /tmp/ref --out $OUT/step_memory-k65536.json > /dev/null
$PY benchmarks/step_memory.py --methods $M --rounds 1 --threads 2 \
    --reference /tmp/ref --out $OUT/step_memory-k4096.json > /dev/null
date
# then (December 8, 01:57), the same A/B at the CIFAR-10 recipes' K = 4,096:
#   $PY benchmarks/fused_losses.py --methods dino dino_decoupled carp carp_decoupled --rounds 6 --threads 2 \
#       --out $OUT/ab-k4096.json
# and DINO alone again over 10 rounds (its 6-round ratio was 1.10, with rounds 0.95-1.14):
#   $PY benchmarks/fused_losses.py --methods dino --rounds 10 --threads 2 --out $OUT/ab-k4096-dino-10rounds.json
# and the step's peak phase by phase (step_memory.py's phase_peak_bytes), DINO and CARP at both K:
#   for K in 65536 4096; do $PY benchmarks/step_memory.py --methods dino carp --set method.num_prototypes=$K \
#       --rounds 1 --threads 2 --reference /tmp/ref --out $OUT/phases/step_memory-k$K.json; done
