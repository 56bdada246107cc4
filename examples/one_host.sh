#!/usr/bin/env bash
# Streaming on one GPU host: producers on some GPUs, FSDP2 trainer ranks on the others, no disk cache.
#   bash examples/one_host.sh MODEL PREPARED OUT
# Example split for 8 GPUs: 4 producers (GPUs 0-3) feed 4 trainer ranks (GPUs 4-7) over ipc://.
set -euo pipefail
MODEL=$1 PREPARED=$2 OUT=$3
draftstream run --model "$MODEL" --data "$PREPARED" --save-path "$OUT" \
  --num-producers 4 --producer-gpus 0,1,2,3 \
  --nproc-per-node 4 --trainer-gpus 4,5,6,7 \
  --producer-args "--dtype bfloat16 --max-batch-tokens 16384" \
  -- --draft-vocab-size 32000 --epochs 5 --lr 1e-4 --total-seq-len 8192 --buffer-bytes 17179869184
