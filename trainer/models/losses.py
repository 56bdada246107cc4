"""Draft losses and acceptance metrics, shared by Eagle-3 and P-EAGLE.

The training signal is the verifier's distribution over the draft vocabulary. ``kl_div`` is the
forward KL(target || draft) per position (the speculators default); ``ce`` is cross-entropy on
the verifier's argmax. Losses are computed on the supervised positions only (selected, never
multiplied by a zero mask), and their mean over an empty selection is 0, so an empty or fully
padded batch yields a zero loss, never NaN.

Shape letters: S supervised positions or elements, D draft vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_position_loss(logits_SD: torch.Tensor, target_logits_SD: torch.Tensor, loss_fn: str) -> torch.Tensor:
    """[X] fp32 divergence of the draft from the verifier at each position."""
    log_q_SD = F.log_softmax(logits_SD.float(), dim=-1)
    if loss_fn == "ce":
        return -log_q_SD.gather(-1, target_logits_SD.argmax(-1, keepdim=True)).squeeze(-1)
    log_p_SD = F.log_softmax(target_logits_SD.float(), dim=-1)
    return (log_p_SD.exp() * (log_p_SD - log_q_SD)).sum(-1)


def mean_over(values_S: torch.Tensor) -> torch.Tensor:
    """Mean over the supervised positions already selected; 0 (still in the graph) when none."""
    return values_S.sum() / max(values_S.shape[0], 1)


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """A detached fp32 rate; 0 when nothing was counted."""
    return (numerator.float() / denominator.float().clamp(min=1)).detach()


class ChainAccuracy:
    """Agreement of the draft's chains with the verifier's argmax, step by step: one definition for
    both drafts, so their metric names mean the same. Step ``k`` is the (k+1)-th drafted token:
    the TTT step for Eagle-3, the depth for P-EAGLE. A chain is anchored at each position.

    ``add(k, label_N, correct_N)``: ``label_N`` says which chains have a supervised step ``k``
    (P-EAGLE: sampled and labelled), ``correct_N`` which of those the draft got right. Metrics of
    step k: ``acc_{k}`` (right among chains supervised at k), ``full_acc_{k}`` (right at every step
    0..k, among chains supervised at every step 0..k) and ``cond_acc_{k}`` (right at k among those,
    right at 0..k-1), whose running product is the chance that k+1 drafted tokens are accepted.
    """

    def __init__(self, n: int, device: torch.device):
        self.right_N = torch.ones(n, dtype=torch.bool, device=device)
        self.supervised_N = torch.ones(n, dtype=torch.bool, device=device)

    @torch.no_grad()
    def add(self, k: int, label_N: torch.Tensor, correct_N: torch.Tensor) -> dict[str, torch.Tensor]:
        self.supervised_N &= label_N
        before_N = self.right_N & self.supervised_N
        self.right_N &= correct_N
        through = (self.right_N & self.supervised_N).sum()
        return {
            f"acc_{k}": ratio((correct_N & label_N).sum(), label_N.sum()),
            f"full_acc_{k}": ratio(through, self.supervised_N.sum()),
            f"cond_acc_{k}": ratio(through, before_N.sum()),
        }
