"""P-EAGLE draft: all K depths predicted in one forward, over COD-sampled elements.

Alignment is Eagle-3's: draft position p sees x(p+1) and g(p) and is trained towards the
verifier at p+1; ``label_N`` marks positions p whose label p+1 is loss-masked and in p's document.

A *chain* anchored at position a drafts K tokens from the context ending at a: its depth-0
element is the ordinary element at a (real token, real fused aux state) and its depth-d element
predicts the verifier at a+d+1 from the learned ``mask_token_id`` embedding and ``mask_hidden``
(in place of the fused aux state), at rotary position ``pos(a)+d+1``.

COD sampling (SPEC): depth 0 holds every position; seeds are the labelled positions (at most
``max_anchors``, drawn at random); depth d keeps ``int(max(0, n_seeds - d) * max(r**d, r_min))``
chains, drawn from the chains present at depth d-1 whose next position is still labelled. An
element attends to the depth-0 elements of its document up to its anchor and to its own chain's
lower depths (``attention.cod_mask_mod``). All randomness comes from ``generator`` so a resumed
run draws the same elements.

Loss: one masked mean over all elements, no depth decay. Metrics per depth d: ``loss_{d}`` (the
mean over depth d's elements), and ``acc_{d}``, ``full_acc_{d}``, ``cond_acc_{d}`` over the chains
(by anchor) as ``losses.ChainAccuracy`` defines them for both drafts: a chain sampled at depth d
is present at every lower depth, so "right at every depth <= d" is known for it. Also, under their
earlier names: ``position_{d}_acc`` (= ``acc_{d}``) and ``full_acc`` (agreement over all elements).

Shape letters: N packed tokens (rows flattened), E sampled elements, S the supervised ones among
them, H hidden, X = A*H (the aux layers concatenated), D draft vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.data.batch import PackedBatch
from trainer.models.attention import AttentionMask, cod_mask_mod, resolve_backend
from trainer.models.base import DraftModel, DraftOutput, flatten_rows, shift_left
from trainer.models.config import DraftConfig
from trainer.models.losses import ChainAccuracy, mean_over, per_position_loss, ratio


def cod_sample(
    label_N: torch.Tensor, doc_N: torch.Tensor, config: DraftConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(anchor_E, depth_E)``: depth 0 at every position, then the sampled chains by depth."""
    n, device = label_N.shape[0], label_N.device

    def draw(pool: torch.Tensor, k: int) -> torch.Tensor:
        if pool.shape[0] <= k:
            return pool
        order = torch.randperm(pool.shape[0], generator=generator, device=generator.device if generator else "cpu")
        return pool[order[:k].to(device)].sort().values

    seeds = draw(torch.nonzero(label_N).squeeze(1), config.max_anchors)
    # A chain's depth-1 element sits at its seed s and is anchored at s-1, which must be a real
    # position of the same document.
    before = (seeds - 1).clamp(min=0)
    pool = seeds[(seeds > 0) & (doc_N[before] == doc_N[seeds])]
    anchors, depths = [torch.arange(n, device=device)], [torch.zeros(n, dtype=torch.int64, device=device)]
    for depth in range(1, config.num_depths):
        keep = int(max(0, seeds.shape[0] - depth) * max(config.down_sample_ratio**depth, config.down_sample_ratio_min))
        if keep <= 0 or pool.shape[0] == 0:
            break
        chosen = draw(pool, keep)
        anchors.append(chosen - depth)
        depths.append(torch.full_like(chosen, depth))
        following = chosen + 1
        following = following[following < n]
        pool = following[label_N[following]]
    return torch.cat(anchors), torch.cat(depths)


class PEagleDraft(DraftModel):
    def __init__(
        self, config: DraftConfig, layer_config, *, draft_vocab_size: int, target_hidden_size: int, mask_token_id: int
    ):
        super().__init__(config, layer_config, draft_vocab_size=draft_vocab_size, target_hidden_size=target_hidden_size)
        self.mask_token_id = mask_token_id
        self.mask_hidden = nn.Parameter(torch.randn(1, 1, config.num_aux * target_hidden_size))

    def forward(self, batch: PackedBatch, *, generator: torch.Generator | None = None) -> DraftOutput:
        cfg = self.config
        rows = flatten_rows(batch, cfg.num_aux)
        device = rows.input_ids_N.device
        label_N = (
            (rows.doc_N >= 0) & (shift_left(rows.doc_N, 1, -1) == rows.doc_N) & shift_left(rows.loss_mask_N, 1, False)
        )
        anchor_E, depth_E = cod_sample(label_N, rows.doc_N, cfg, generator)
        position_E = anchor_E + depth_E
        first_E = depth_E == 0

        tokens_E = torch.where(first_E, shift_left(rows.input_ids_N, 1, 0)[anchor_E], self.mask_token_id)
        mask_hidden_X = self.mask_hidden.reshape(-1)
        aux_EX = torch.where(first_E[:, None], rows.aux_NX[anchor_E].to(mask_hidden_X.dtype), mask_hidden_X)
        attn_mask = AttentionMask.build(
            cod_mask_mod(anchor_E, depth_E, rows.doc_N),
            anchor_E.shape[0],
            anchor_E.shape[0],
            device=device,
            backend=resolve_backend(cfg.attention_backend, device),
        )
        out_1EH = self.decode(
            self.fuse_aux(aux_EX)[None],
            self.embed_tokens(tokens_E)[None],
            (rows.position_ids_N[anchor_E] + 1 + depth_E)[None],
            attn_mask,
        )
        label_E = label_N[position_E]
        at_S = torch.nonzero(label_E).squeeze(1)
        logits_SD = self.lm_head(self.norm(out_1EH[0, at_S]))
        target_SD = self.verifier_logits(rows.last_NH[position_E[at_S] + 1])
        loss_S = per_position_loss(logits_SD, target_SD, cfg.loss_fn)
        loss = mean_over(loss_S)

        with torch.no_grad():
            correct_S = logits_SD.argmax(-1) == target_SD.argmax(-1)
            correct_E = torch.zeros_like(label_E)
            correct_E[at_S] = correct_S
            depth_S = depth_E[at_S]
            metrics = {"loss": loss.detach(), "full_acc": ratio(correct_S.sum(), label_E.sum())}
            n = rows.input_ids_N.shape[0]
            chains = ChainAccuracy(n, device)
            for depth in range(cfg.num_depths):
                at_depth_S = depth_S == depth
                metrics[f"loss_{depth}"] = mean_over(loss_S[at_depth_S]).detach()
                metrics[f"position_{depth}_acc"] = ratio((correct_S & at_depth_S).sum(), at_depth_S.sum())
                # A chain is its anchor: depth d holds at most one element per anchor.
                at_E = depth_E == depth
                label_N = torch.zeros(n, dtype=torch.bool, device=device)
                correct_N = torch.zeros(n, dtype=torch.bool, device=device)
                label_N[anchor_E[at_E]] = label_E[at_E]
                correct_N[anchor_E[at_E]] = correct_E[at_E]
                metrics.update(chains.add(depth, label_N, correct_N))
        return DraftOutput(loss=loss, metrics=metrics, num_loss_tokens=label_E.sum())
