#!/usr/bin/env bash
# The classic offline workflow, file-compatible with vLLM's hidden-state connector and the
# speculators trainer: prepare -> produce --spill (hs_{i}.safetensors) -> train from the files.
#   bash examples/offline.sh MODEL DATA OUT [extra train flags...]
# e.g. bash examples/offline.sh meta-llama/Llama-3.1-8B-Instruct sharegpt ./out --draft-vocab-size 32000
set -euo pipefail
MODEL=$1 DATA=$2 OUT=$3
shift 3
draftstream prepare --model "$MODEL" --data "$DATA" --output "$OUT/prepared" --seq-length 8192
# One producer per GPU; they share the folder and skip rows already on disk when re-run.
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)
if [ "$NGPU" -gt 1 ]; then
  for r in $(seq 0 $((NGPU - 1))); do
    CUDA_VISIBLE_DEVICES=$r draftstream produce --model "$MODEL" --data "$OUT/prepared" --spill "$OUT/hidden_states" \
      --world-size "$NGPU" --rank "$r" --validate &
  done
  wait
else
  draftstream produce --model "$MODEL" --data "$OUT/prepared" --spill "$OUT/hidden_states" --validate
fi
draftstream train --verifier-name-or-path "$MODEL" --data-path "$OUT/prepared" --hidden-states-path "$OUT/hidden_states" \
  --save-path "$OUT/checkpoints" --epochs 5 --lr 1e-4 --total-seq-len 8192 "$@"
