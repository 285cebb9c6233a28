#!/usr/bin/env bash
# On a lent GPU machine: resumes a run whose checkpoint.safetensors and config.toml are carried in
# RUN_IN (default .gpu/run1, e.g. what finetune.sh brought back) with the total raised to STEPS,
# for at most TRAIN_S seconds; leaves the best model, checkpoint, config and validation lines in
# $OUT. A raised total restarts the cosine part-way up (0.4 of the peak at 12,293 of 21,600).
set -uo pipefail
T0=$(date +%s)
TRAIN_S=${TRAIN_S:-300}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STEPS=${STEPS:-21500}
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
if [ -z "${TORCHLIB:-}" ]; then
  TORCHLIB=$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
fi
export LD_LIBRARY_PATH=$TORCHLIB:${LD_LIBRARY_PATH:-}
B=/tmp/dn/denoise-cli
mkdir -p /tmp/dn && gunzip -c .gpu/denoise-cli.gz > $B && chmod +x $B
$B prepare-data --src .gpu/bsd432 --out /tmp/dn/data > /dev/null 2>&1 || { log "prepare failed"; exit 4; }
R=/tmp/dn/run
rm -rf $R
RUN_IN=${RUN_IN:-.gpu/run1}
mkdir -p $R && cp "$RUN_IN/checkpoint.safetensors" "$RUN_IN/config.toml" $R/
# The best model so far, if carried: a resumed run replaces it only with a better one.
cp "$RUN_IN/model.safetensors" $R/ 2>/dev/null || true
log "resume to $STEPS"
timeout -s INT $TRAIN_S $B train --out $R --resume --steps $STEPS ${EXTRA:-} > "$OUT/train.log" 2>&1
log "train rc=$?"; tail -5 "$OUT/train.log"
grep '"val' $R/train.jsonl > "$OUT/val.jsonl"
cp $R/model.safetensors $R/checkpoint.safetensors $R/config.toml "$OUT/"
log "done"; ls -la "$OUT"
