#!/bin/bash
# Issue 36 item 2: the step goals, alone on both cores. Current code from the worktree /tmp/cur,
# e460262's DINO step from /tmp/ref (its own throughput.py) for the peer comparison's history.
set -e
export TQDM_DISABLE=1
PY=/work/main/.venv/bin/python
OUT=/work/main/docs/throughput_goals
M="dino dino_decoupled dino_decoupled_paper carp carp_decoupled"
cd /tmp/cur; export PYTHONPATH=/tmp/cur/src
date
$PY benchmarks/throughput.py --methods $M --set method.num_prototypes=65536 --tag k65536 --rounds 5 --repeats 1 --threads 2 --lightly-reference --out $OUT > $OUT/log-k65536.txt
date
$PY benchmarks/throughput.py --methods $M --tag k4096 --rounds 5 --repeats 1 --threads 2 --lightly-reference --out $OUT > $OUT/log-k4096.txt
date
cd /tmp/ref; export PYTHONPATH=/tmp/ref/src
$PY benchmarks/throughput.py --methods dino --set method.num_prototypes=65536 --tag k65536 --rounds 5 --repeats 1 --threads 2 --out $OUT/e460262 > $OUT/e460262/log.txt
$PY benchmarks/throughput.py --methods dino --tag k4096 --rounds 5 --repeats 1 --threads 2 --out $OUT/e460262 >> $OUT/e460262/log.txt
date
# what the step spends, operator by operator, before and now (DINO, K = 4,096 and 65,536, no augmentation)
for K in 4096 65536; do
  cd /tmp/cur; export PYTHONPATH=/tmp/cur/src
  $PY /tmp/cur/benchmarks/step_profile.py --method dino --set method.num_prototypes=$K --threads 2 --out $OUT/profile/dino-k$K-now.json > /dev/null
  cd /tmp/ref; export PYTHONPATH=/tmp/ref/src
  $PY /tmp/cur/benchmarks/step_profile.py --tree /tmp/ref --method dino --set method.num_prototypes=$K --threads 2 --out $OUT/profile/dino-k$K-e460262.json > /dev/null
done
date
