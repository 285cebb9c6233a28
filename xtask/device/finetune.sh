#!/usr/bin/env bash
# On a lent GPU machine (see README.md here): fine-tunes INIT (default: the shipped default) with
# CONFIG for about TRAIN_S seconds and leaves in $OUT the best and the last validated model, the
# checkpoint, the run's config, its validation lines and the logs (7 files: the device tool
# brings back 8 at most). EXTRA adds train options to the first start (EXTRA="--precision bf16").
# Fails fast (doctor, then a 35 s probe) so that a failed start leaves device time to rerun.
# A probe measures the step rate first, and the run is resumed with the step count that ends its
# cosine schedule in time. The probe's closing 'time:' line says whether the run waits for patches
# and how many CPU cores it keeps busy; PROFILE=1 also times each phase of a step (the waits for
# the device lower the probe's rate, so the run that follows is planned a little short).
set -uo pipefail
T0=$(date +%s)
TRAIN_S=${TRAIN_S:-400}
DEVICE=${DEVICE:-cuda}
INIT=${INIT:-assets/models/default.safetensors}
CONFIG=${CONFIG:-configs/ffdnet-finetune-gpu.toml}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
if [ -z "${TORCHLIB:-}" ]; then
  TORCHLIB=$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
fi
export LD_LIBRARY_PATH=$TORCHLIB:${LD_LIBRARY_PATH:-}
python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -1
B=/tmp/dn/denoise-cli
mkdir -p /tmp/dn && gunzip -c .gpu/denoise-cli.gz > $B && chmod +x $B
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
$B doctor > "$OUT/doctor.txt" 2>&1 || { cat "$OUT/doctor.txt"; log "doctor failed"; exit 3; }
cat "$OUT/doctor.txt"
if [ "$DEVICE" = cuda ] && grep -q "CUDA *not available" "$OUT/doctor.txt"; then log "no CUDA"; exit 6; fi
log "prepare-data"
$B prepare-data --src .gpu/bsd432 --out /tmp/dn/data > "$OUT/prepare.log" 2>&1 || { cat "$OUT/prepare.log"; exit 4; }
cp /tmp/dn/data/manifest.json "$OUT/"
R=/tmp/dn/run
rm -rf $R
# Phase 1: a probe of about 35 s (step-0 validation of the start included), stopped by SIGINT.
log "probe"
$B train --init "$INIT" --config "$CONFIG" \
  --data /tmp/dn/data/manifest.json --out $R --device "$DEVICE" --steps 200000 ${PROFILE:+--profile} ${EXTRA:-} \
  > "$OUT/train1.log" 2>&1 &
P=$!
sleep 35
kill -INT $P; wait $P; rc=$?
log "probe rc=$rc"; tail -5 "$OUT/train1.log"; grep '^time:' "$OUT/train1.log"
echo "libtorch warnings in the probe's log: $(grep -c 'Warning:' "$OUT/train1.log")"
[ -f $R/checkpoint.safetensors ] || { log "no checkpoint after the probe"; cp -r $R "$OUT/run" 2>/dev/null; exit 5; }
STEP=$(grep -o '"step":[0-9]*' $R/train.jsonl | tail -1 | cut -d: -f2)
RATE=$(grep -o '"patches_per_s":[0-9.]*' $R/train.jsonl | tail -1 | cut -d: -f2)
LEFT=$(( TRAIN_S - ($(date +%s) - T0) ))
BATCH=$(sed -n 's/^batch_size = //p' $R/config.toml)
N=$(python3 -c "print(int($STEP + $RATE/$BATCH*$LEFT*0.85))")
log "probe: step $STEP at $RATE patches/s; $LEFT s left -> --steps $N"
# Phase 2: the same run resumed with the total that fits, so its cosine ends in time.
timeout -s INT $(( LEFT + 30 )) $B train --out $R --resume --steps $N > "$OUT/train2.log" 2>&1
log "train rc=$?"; tail -4 "$OUT/train2.log"
grep '"val' $R/train.jsonl > "$OUT/val.jsonl"
cat "$OUT/train1.log" "$OUT/train2.log" > "$OUT/train.log" && rm "$OUT/train1.log" "$OUT/train2.log"
rm -f "$OUT/manifest.json" "$OUT/prepare.log"
cp $R/model.safetensors $R/checkpoint.safetensors $R/config.toml "$OUT/"
cp $R/last.safetensors "$OUT/" 2>/dev/null || true
if [ "$DEVICE" = cuda ]; then timeout 40 $B bench --model $R/model.safetensors --device cuda --size 512 --json 2>&1 | tail -3; fi
log "done"; ls -la "$OUT"
