"""Greedy speculative decoding with a Hugging Face target and a draft, and vLLM's acceptance counters.

One round, for a committed sequence ``S`` of length ``n`` whose aux states ``g(0..n-2)`` are known
(the last token has not been fed to the target yet):

1. the draft proposes ``K`` tokens ``d_1..d_K`` from ``S`` and ``g`` (``trainer/eval/propose.py``);
2. the target runs once over ``S + d`` (full recompute, no KV cache: correctness over speed) and
   takes its greedy tokens ``t_0..t_K`` at positions ``n-1..n-1+K``;
3. the longest prefix with ``d_{j+1} == t_j`` is accepted (``a`` tokens) and the target's own
   ``t_a`` follows it, so a round commits ``a + 1`` tokens; the same forward holds the aux states
   of every newly committed position but the last, which is what the next round needs.

The first generated token comes from the prompt's forward alone (vLLM's prefill; no draft round).
Rounds go on while fewer than ``max_new_tokens`` tokens are generated and none is an end-of-sequence
token; the output is cut at the first EOS and at ``max_new_tokens``. Each round always proposes
``K`` tokens and its counts are taken before that cut, as vLLM's scheduler records them before its
stop check.

Counters (vLLM ``SpecDecodingStats``): ``num_drafts`` rounds, ``num_draft_tokens`` proposed tokens,
``num_accepted_tokens``, and ``num_accepted_tokens_per_pos[p]`` = rounds whose position ``p`` was
accepted. Mean acceptance length = ``1 + num_accepted_tokens / num_drafts`` (the bonus token
included); per-position acceptance = ``num_accepted_tokens_per_pos[p] / num_drafts``.

Aux states are captured exactly as for training (``producer/capture.py``, vLLM's
``extract_hidden_states`` ids): id ``k < N`` is the input of decoder layer ``k``, id ``N`` the last
layer's output before the final norm.

Shape letters: T tokens, A aux layers, H hidden, X = A*H, V target vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from protocol.layer_capture import ResidualCapture
from trainer.eval.propose import propose
from trainer.models.base import DraftModel


@dataclasses.dataclass
class AcceptanceStats:
    """vLLM's speculative-decoding counters for ``num_spec_tokens`` = K."""

    num_spec_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        assert 0 <= num_accepted <= num_draft_tokens <= self.num_spec_tokens
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.num_accepted_tokens_per_pos[pos] += 1

    def merge(self, other: AcceptanceStats) -> None:
        assert other.num_spec_tokens == self.num_spec_tokens
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        for pos, count in enumerate(other.num_accepted_tokens_per_pos):
            self.num_accepted_tokens_per_pos[pos] += count

    @property
    def acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")

    @property
    def acceptance_per_pos(self) -> list[float]:
        if not self.num_drafts:
            return [float("nan")] * self.num_spec_tokens
        return [count / self.num_drafts for count in self.num_accepted_tokens_per_pos]


@dataclasses.dataclass(frozen=True)
class Round:
    """One draft round: ``start`` = tokens generated before it; ``proposal`` in target ids."""

    start: int
    proposal: tuple[int, ...]
    target: tuple[int, ...]  # the target's greedy tokens t_0..t_K at the proposal's positions
    accepted: int


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]  # cut at the first EOS (kept) and at max_new_tokens
    rounds: list[Round]


class HFTarget:
    """A ``transformers`` causal LM whose aux layers are captured on every forward with the same
    ``protocol.layer_capture`` hooks the producer's capture backend uses."""

    def __init__(self, model, aux_layer_ids: Sequence[int]):
        self.model = model.eval()
        layers = model.get_decoder().layers
        num_layers = len(layers)
        bad = [k for k in aux_layer_ids if not 0 <= k <= num_layers]
        if bad:
            raise ValueError(
                f"the draft's aux layer ids {list(aux_layer_ids)} do not fit this target's {num_layers} decoder layers "
                "(ids go from 0 to N): is --verifier-name-or-path the model the draft was trained on?"
            )
        self.aux_layer_ids = list(aux_layer_ids)
        self.device = next(model.parameters()).device
        self._capture = ResidualCapture(layers, self.aux_layer_ids)

    @torch.no_grad()
    def forward(self, ids_T: torch.Tensor, num_logits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[num_logits, V]`` of the last positions and the aux states ``[T, X]``."""
        out = self.model(input_ids=ids_T.to(self.device)[None], use_cache=False, logits_to_keep=num_logits)
        aux_TX = torch.cat([state[0] for state in self._capture.take()], dim=-1)
        return out.logits[0], aux_TX

    def close(self) -> None:
        self._capture.close()


@torch.no_grad()
def generate(
    target: HFTarget,
    draft: DraftModel,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    num_speculative_tokens: int,
    eos_ids: Sequence[int] = (),
    on_round: Callable[[Round], None] | None = None,
) -> Generation:
    """Greedy speculative decoding of one prompt (see the module docstring)."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    k, eos = num_speculative_tokens, set(eos_ids)
    device = target.device
    logits, aux_TX = target.forward(torch.tensor(list(prompt_ids)), 1)
    seq_T = torch.tensor([*prompt_ids, int(logits[-1].argmax())], device=device)
    num_prompt = len(prompt_ids)
    rounds: list[Round] = []
    while seq_T.shape[0] - num_prompt < max_new_tokens and int(seq_T[-1]) not in eos:
        n = seq_T.shape[0]
        proposal = propose(draft, seq_T[1:], aux_TX[: n - 1].to(device), k)
        logits, aux_TX = target.forward(torch.cat([seq_T, torch.tensor(proposal, device=device)]), k + 1)
        greedy = [int(t) for t in logits.argmax(-1)]
        accepted = 0
        while accepted < k and proposal[accepted] == greedy[accepted]:
            accepted += 1
        committed = proposal[:accepted] + [greedy[accepted]]
        record = Round(start=n - num_prompt, proposal=tuple(proposal), target=tuple(greedy), accepted=accepted)
        rounds.append(record)
        if on_round is not None:
            on_round(record)
        # Stop at an EOS inside the committed tokens, as the stop check would.
        for j, token in enumerate(committed):
            if token in eos:
                committed = committed[: j + 1]
                break
        seq_T = torch.cat([seq_T, torch.tensor(committed, device=device)])
    output = seq_T[num_prompt:].tolist()[:max_new_tokens]
    return Generation(prompt_ids=list(prompt_ids), output_ids=output, rounds=rounds)


def stats_of(generations: Sequence[Generation], num_speculative_tokens: int) -> AcceptanceStats:
    stats = AcceptanceStats(num_speculative_tokens)
    for generation in generations:
        for r in generation.rounds:
            stats.record(len(r.proposal), r.accepted)
    return stats
