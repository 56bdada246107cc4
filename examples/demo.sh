#!/usr/bin/env bash
# The main job on the embedded default: a tiny local target on CPU, 2 producers streaming hidden
# states into 1 trainer rank (no disk cache), an Eagle-3 checkpoint at the end.
#   bash examples/demo.sh [OUT_DIR]        (`make demo` runs this inside .venv)
set -euo pipefail
OUT=${1:-demo-out}
DS=${DRAFTSTREAM:-draftstream}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1/3 tiny target: Llama, 8 layers, hidden 64 (2 heads of 32), random weights, BPE tokenizer (all local) =="
$DS make-tiny-target --out "$OUT/target" --num-conversations 128

echo "== 2/3 prepare: chat template, assistant-only loss mask, token_freq.pt =="
$DS prepare --model "$OUT/target/model" --data "$OUT/target/conversations.jsonl" --output "$OUT/prepared" --seq-length 512

echo "== 3/3 run: 2 producers stream hidden states into 1 trainer rank =="
$DS run --model "$OUT/target/model" --data "$OUT/prepared" --save-path "$OUT/checkpoints" --num-producers 2 -- \
  --epochs 3 --lr 3e-3 --total-seq-len 1024 --draft-vocab-size 256 --log-every 10 --no-progress

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
ckpt = out / "checkpoints"
best = (ckpt / "checkpoint_best").resolve()
logs = [json.loads(l) for l in (ckpt / "train_log.jsonl").read_text().splitlines()]
train = [r for r in logs if r["kind"] == "train"]
val = [r for r in logs if r["kind"] == "val"]
config = json.loads((best / "config.json").read_text())
hs_files = list(out.rglob("hs_*.safetensors"))
print("\n== summary ==")
print(f"steps {train[-1]['global_step']}, train loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}")
print("validation loss per epoch: " + ", ".join(f"{r['val_loss']:.3f}" for r in val))
steady = train[1:] or train
stall = 100 * sum(r["data_wait_s"] for r in steady) / max(sum(r["step_wall_s"] for r in steady), 1e-9)
print(f"trainer stall after the first batch: {stall:.1f}% (first batch waited {train[0]['data_wait_s']:.1f}s for producers to load the target)")
print(f"hidden-state files written: {len(hs_files)} (streaming keeps them in memory)")
print(f"checkpoint_best -> {best.name}: {sorted(p.name for p in best.iterdir())}")
print(f"config: {config['speculators_model_type']}, aux layers {config['eagle_aux_hidden_state_layer_ids']}, "
      f"draft vocab {config['draft_vocab_size']}, K={config['speculators_config']['proposal_methods'][0]['speculative_tokens']}")
print(f"serve it: vllm serve {best}   (the verifier path recorded in its config.json must exist there)")
PY
