"""Draft vocabulary: which verifier token ids the draft's lm_head predicts.

SPEC rule (the speculators one): the ``draft_vocab_size`` most frequent ids of ``token_freq.pt``
(ties: lower id first), topped up with the lowest unused ids when fewer were seen, sorted
ascending. ``d2t`` [D] int64 holds offsets (``target_id = i + d2t[i]``), ``t2d`` [V] bool marks the
chosen ids; vLLM maps draft logits back to the verifier vocabulary with ``d2t``.
"""

from __future__ import annotations

import torch


def select_draft_ids(token_freq: dict[int, int], draft_vocab_size: int, target_vocab_size: int) -> list[int]:
    """The chosen verifier ids, ascending."""
    if draft_vocab_size > target_vocab_size:
        raise ValueError(f"--draft-vocab-size {draft_vocab_size} exceeds the verifier vocab {target_vocab_size}")
    bad = [t for t in token_freq if not 0 <= int(t) < target_vocab_size]
    if bad:
        raise ValueError(
            f"token_freq.pt has ids outside the verifier vocab [0, {target_vocab_size}): {sorted(bad)[:5]}"
        )
    ranked = sorted(token_freq, key=lambda t: (-token_freq[t], int(t)))
    chosen = [int(t) for t in ranked[:draft_vocab_size]]
    taken = set(chosen)
    top_up = (t for t in range(target_vocab_size) if t not in taken)
    while len(chosen) < draft_vocab_size:
        chosen.append(next(top_up))
    return sorted(chosen)


def build_vocab_mapping(
    token_freq: dict[int, int], draft_vocab_size: int, target_vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d2t [D] int64, t2d [V] bool)`` per the rule above."""
    ids = torch.tensor(select_draft_ids(token_freq, draft_vocab_size, target_vocab_size), dtype=torch.int64)
    d2t = ids - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def draft_to_target(d2t: torch.Tensor) -> torch.Tensor:
    """Verifier id of each draft id."""
    return torch.arange(d2t.shape[0], device=d2t.device) + d2t
