#!/bin/bash
# Reproduce the FSDP2 exit abort (docs/distributed.md, "Shutdown"): run examples/ddp_train.py
# (FSDP2, DeepMomentum, a DCP save at step 12) N times back to back and count the runs that exit
# non-zero or print "terminate called". Run several copies at once to load the machine, as the
# measurement did (3 in parallel on 2 cores).
#   bash benchmarks/exit_abort.sh 50 [path/to/ddp_train.py]
set -u
N=${1:-20}
SCRIPT=${2:-examples/ddp_train.py}
PY=${PYTHON:-python}
work=$(mktemp -d)
fails=0
for i in $(seq 1 "$N"); do
  rm -rf "$work/ckpt"
  OMP_NUM_THREADS=1 timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 "$SCRIPT" \
    --engine fsdp2 --optimizer deep --steps 30 --ckpt "$work/ckpt" --stop-after 12 > "$work/out.txt" 2>&1
  rc=$?
  if [ $rc -ne 0 ] || grep -q "terminate called" "$work/out.txt"; then
    fails=$((fails + 1)); echo "run $i: rc $rc"; grep -m1 "terminate called" "$work/out.txt"
  fi
done
echo "$fails failures in $N runs of $SCRIPT"
rm -rf "$work"
