"""Drafts that accept, for the real-engine serve tests: a tiny sharp target and Eagle-3 / P-EAGLE
drafts self-distilled on its own greedy continuations, saved as speculators checkpoints.

The recipe is ``tests/trainer/eval/test_evaluate.py``'s: the target's greedy continuation of each
prompt goes through the producer's capture backend (the training data path) and the draft is trained
in-process on it. The first ``NUM_TRAIN`` served prompts are the ones trained on (memorisation, by
design: on unseen prompts a random tiny target gives about 1.00), so the drafts accept and the
acceptance counters have something to count; the other prompts are held out and add drafts that are
(almost) never accepted, which the counters must agree on too.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
from pathlib import Path

import torch

K = 3  # speculative tokens (ttt_steps / num_depths)
NUM_NEW = 32  # max new tokens, in training and in every generation
NUM_PROMPTS = 8  # served and evaluated
NUM_TRAIN = 6  # the first NUM_TRAIN of them are trained on; the rest are unseen by the drafts
LAYER_IDS = [2, 4, 5, 8]  # default capture of the 8-layer tiny target: 3 aux + the last


@dataclasses.dataclass(kw_only=True)
class Drafts:
    target: Path
    conversations: Path  # the eval prompts' source (a conversations .jsonl)
    prompts: list[list[int]]  # token ids, chat template applied, as `draftstream eval` reads them
    num_train: int  # prompts[:num_train] were trained on (memorised), the rest are held out
    greedy: list[list[int]]  # the target's fp32 greedy continuation of each prompt (NUM_NEW tokens)
    eos_token_id: int
    checkpoints: dict[str, Path]  # "eagle3" / "peagle" -> checkpoint dir

    def to_json(self) -> dict:
        return {
            "target": str(self.target),
            "conversations": str(self.conversations),
            "prompts": self.prompts,
            "num_train": self.num_train,
            "greedy": self.greedy,
            "eos_token_id": self.eos_token_id,
            "checkpoints": {k: str(v) for k, v in self.checkpoints.items()},
        }


@contextlib.contextmanager
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is several times faster than two
    contending with other processes (the build took 118 s with two threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _greedy(model, prompt: list[int], num: int, eos: int) -> list[int]:
    """Plain greedy decoding, one full forward per token (no cache), stopping after an EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt) :]


def _train(model, samples, steps: int, lr: float):
    from trainer.data.batch import pack

    batch = pack(samples, 4096)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        out = model(batch, generator=generator)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def build_drafts(root: Path) -> Drafts:
    """Target, prompts, greedy continuations and both trained checkpoints under ``root``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from producer.backend import CaptureRow
    from producer.capture import CaptureConfig, HFCapture
    from producer.tiny_target import TinyTargetConfig, build_tiny_target, write_conversations
    from trainer.data.batch import TrainSample
    from trainer.eval.evaluate import conversation_prompts
    from trainer.models.config import DraftConfig
    from trainer.models.export import build_draft, save_draft

    root = Path(root)
    # Peaked next-token distributions (init range 1.0): greedy tokens are decided by clear margins,
    # so fp32 HF and fp32 vLLM agree token for token.
    target = build_tiny_target(root / "target", TinyTargetConfig(initializer_range=1.0))
    conversations = write_conversations(root / "conversations.jsonl", NUM_PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    prompts = conversation_prompts(conversations, tokenizer)[0][:NUM_PROMPTS]
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    eos = int(model.config.eos_token_id)
    greedy = [_greedy(model, p, NUM_NEW, eos) for p in prompts]

    # Training rows: prompt + continuation + K+1 more greedy tokens, supervised on the continuation.
    train = list(zip(prompts, greedy))[:NUM_TRAIN]
    extended = [g + _greedy(model, p + g, K + 1, eos) if g[-1] != eos else g for p, g in train]
    capture = HFCapture(CaptureConfig(model=str(target), device="cpu", layer_ids=LAYER_IDS), model=model)
    rows = [
        CaptureRow(
            i,
            torch.tensor(p + e),
            torch.tensor([0] * len(p) + [1] * len(g) + [0] * (len(e) - len(g)), dtype=torch.uint8),
        )
        for i, ((p, g), e) in enumerate(zip(train, extended))
    ]
    samples = [
        TrainSample(
            sample_id=s.sample_id,
            token_ids=s.token_ids,
            loss_mask=s.loss_mask.bool(),
            hidden_states=s.hidden_states.clone(),
        )
        for s in capture.capture(rows)
    ]
    capture.close()

    def config(kind: str, **kw) -> DraftConfig:
        return DraftConfig(speculator_type=kind, verifier_name_or_path=str(target), aux_layer_ids=LAYER_IDS[:3], **kw)

    token_freq = dict(collections.Counter(t for e in extended for t in e))
    torch.manual_seed(0)
    # Eagle-3 with a pruned vocabulary (d2t/t2d in the checkpoint), as training builds it.
    eagle3 = _train(build_draft(config("eagle3", ttt_steps=K, draft_vocab_size=512), token_freq), samples, 120, 1e-2)
    torch.manual_seed(0)
    peagle = _train(build_draft(config("peagle", num_depths=K), None), samples, 160, 3e-3)
    checkpoints = {}
    for name, draft in (("eagle3", eagle3), ("peagle", peagle)):
        save_draft(draft, root / name)
        checkpoints[name] = root / name
    return Drafts(
        target=target,
        conversations=conversations,
        prompts=prompts,
        num_train=NUM_TRAIN,
        greedy=greedy,
        eos_token_id=eos,
        checkpoints=checkpoints,
    )


if __name__ == "__main__":  # python -m tests.vllm.engine.serve_drafts ROOT: build and print the summary
    import sys
    import time

    start = time.perf_counter()
    built = build_drafts(Path(sys.argv[1]))
    print(json.dumps({**built.to_json(), "seconds": round(time.perf_counter() - start, 1)}))
