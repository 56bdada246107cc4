"""Greedy speculative decoding with a Hugging Face target and a draft, and vLLM's acceptance counters.

One round, for a committed sequence ``S`` of length ``n`` whose aux states ``g(0..n-2)`` are known
(the last token has not been fed to the target yet):

1. the draft proposes ``K`` tokens ``d_1..d_K`` from ``S`` and ``g`` (``trainer/eval/propose.py``);
2. the target runs once over ``x(n-1) + d`` on top of its KV cache of ``S[:n-1]`` and takes its
   greedy tokens ``t_0..t_K`` at positions ``n-1..n-1+K`` (``trainer/eval/target.py``);
3. the longest prefix with ``d_{j+1} == t_j`` is accepted (``a`` tokens) and the target's own
   ``t_a`` follows it, so a round commits ``a + 1`` tokens; the same forward holds the aux states
   of every newly committed position but the last, which is what the next round needs, and the
   target keeps only those positions in its cache (``n + a``).

The draft keeps its own cache of context keys (``propose.DraftCache``), so a round costs one
target forward of ``K + 1`` tokens and one draft forward of the ``a + 1`` new positions plus the
chain. ``generate_batch`` runs the rounds of several prompts in lockstep, one forward for all of
them, each sequence with its own positions, acceptances and stop; a finished sequence leaves the
batch. ``generate(..., use_cache=False)`` recomputes the target and the draft over the whole
sequence every round instead: the reference the cached path is tested against (cached, batched and
full forwards differ only in float rounding, which can flip an argmax only on a near-tie).

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

Shape letters: B sequences, T tokens, A aux layers, H hidden, X = A*H, V target vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from trainer.eval.propose import DraftCache, propose, propose_batch
from trainer.eval.target import HFTarget
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
    use_cache: bool = True,
) -> Generation:
    """Greedy speculative decoding of one prompt (see the module docstring)."""
    if use_cache:
        return generate_batch(
            target,
            draft,
            [prompt_ids],
            max_new_tokens=max_new_tokens,
            num_speculative_tokens=num_speculative_tokens,
            eos_ids=eos_ids,
            on_round=None if on_round is None else lambda _, record: on_round(record),
        )[0]
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
        accepted = _num_accepted(proposal, greedy)
        committed = proposal[:accepted] + [greedy[accepted]]
        record = Round(start=n - num_prompt, proposal=tuple(proposal), target=tuple(greedy), accepted=accepted)
        rounds.append(record)
        if on_round is not None:
            on_round(record)
        seq_T = torch.cat([seq_T, torch.tensor(_cut_at_eos(committed, eos), device=device)])
    output = seq_T[num_prompt:].tolist()[:max_new_tokens]
    return Generation(prompt_ids=list(prompt_ids), output_ids=output, rounds=rounds)


@torch.no_grad()
def generate_batch(
    target: HFTarget,
    draft: DraftModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_speculative_tokens: int,
    eos_ids: Sequence[int] = (),
    on_round: Callable[[int, Round], None] | None = None,
) -> list[Generation]:
    """Greedy speculative decoding of several prompts at once, with KV caches; the same rounds
    as ``generate`` of each prompt alone. ``on_round(i, round)`` for prompt ``i``."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("empty prompt")
    k, eos, device = num_speculative_tokens, set(eos_ids), target.device
    logits_BV, prompt_aux = target.start(prompts)
    seqs = [[*p, t] for p, t in zip(prompts, logits_BV.argmax(-1).tolist())]
    rounds: list[list[Round]] = [[] for _ in prompts]
    # Batch row r is sequence active[r]; the draft has yet to see its context positions
    # new_tokens[r] / new_aux[r] (x(m+1..n-1) and g(m..n-2)).
    active = list(range(len(prompts)))
    new_tokens = [torch.tensor(s[1:], device=device) for s in seqs]
    new_aux = list(prompt_aux)
    draft_cache = DraftCache()

    def running(i: int) -> bool:
        return len(seqs[i]) - len(prompts[i]) < max_new_tokens and seqs[i][-1] not in eos

    while True:
        rows = [r for r, i in enumerate(active) if running(i)]
        if not rows:
            break
        if len(rows) < len(active):
            target.select(rows)
            draft_cache.select(rows)
            active = [active[r] for r in rows]
            new_tokens = [new_tokens[r] for r in rows]
            new_aux = [new_aux[r] for r in rows]
        proposals = propose_batch(draft, new_tokens, new_aux, k, draft_cache)
        ids_BT = torch.tensor([[seqs[i][-1], *p] for i, p in zip(active, proposals)], device=device)
        logits_BTV, aux_BTX = target.extend(ids_BT)
        num_kept = []
        for r, (i, proposal, greedy) in enumerate(zip(active, proposals, logits_BTV.argmax(-1).tolist())):
            accepted = _num_accepted(proposal, greedy)
            committed = proposal[:accepted] + [greedy[accepted]]
            record = Round(
                start=len(seqs[i]) - len(prompts[i]), proposal=tuple(proposal), target=tuple(greedy), accepted=accepted
            )
            rounds[i].append(record)
            if on_round is not None:
                on_round(i, record)
            num_kept.append(accepted + 1)
            new_tokens[r] = torch.tensor(committed, device=device)
            new_aux[r] = aux_BTX[r, : accepted + 1]
            seqs[i].extend(_cut_at_eos(committed, eos))
        target.commit(num_kept)
    return [
        Generation(prompt_ids=list(p), output_ids=s[len(p) :][:max_new_tokens], rounds=r)
        for p, s, r in zip(prompts, seqs, rounds)
    ]


def _num_accepted(proposal: Sequence[int], greedy: Sequence[int]) -> int:
    accepted = 0
    while accepted < len(proposal) and proposal[accepted] == greedy[accepted]:
        accepted += 1
    return accepted


def _cut_at_eos(committed: list[int], eos: set[int]) -> list[int]:
    """Stop at an EOS inside the committed tokens, as the stop check would."""
    for j, token in enumerate(committed):
        if token in eos:
            return committed[: j + 1]
    return committed


def stats_of(generations: Sequence[Generation], num_speculative_tokens: int) -> AcceptanceStats:
    stats = AcceptanceStats(num_speculative_tokens)
    for generation in generations:
        for r in generation.rounds:
            stats.record(len(r.proposal), r.accepted)
    return stats
