"""Eagle-3 draft with training-time test (TTT).

Alignment (SPEC): draft position p sees token x(p+1) and the fused aux state g(p), and is trained
towards the verifier's distribution at p+1 (verifier norm + lm_head on the last captured layer).
Positions whose p+1 lies outside their document carry no loss, nor do positions whose label
p+1 is not loss-masked (speculators' convention: the mask at the label position applies).

TTT unrolls ``ttt_steps`` steps with teacher forcing. Step s feeds the token stream shifted by s
more (x(p+1+s)), the previous step's output hidden state at p, rotary position ``pos(p)+1+s``, and
is trained towards the verifier at p+1+s. Keys and values of every step are kept; a position
attends to the step-0 causal context of its document plus its own position in every step so far
(``attention.ttt_mask_mod``).

Loss: per step a masked mean of the per-position divergence, summed over steps with weight
``ttt_step_loss_decay**s``. Metrics per step s: ``loss_{s}``, and ``acc_{s}``, ``full_acc_{s}``
(the chain started at p matches the verifier's argmax at every step <= s), ``cond_acc_{s}``
(matches at s given it matched at all steps < s) as ``losses.ChainAccuracy`` defines them for both
drafts.

Shape letters: N packed tokens (rows flattened), H hidden, X = A*H (the aux layers concatenated),
S the step's supervised positions, D draft vocab.
"""

from __future__ import annotations

import torch

from trainer.data.batch import PackedBatch
from trainer.models.attention import AttentionMask, resolve_backend, ttt_mask_mod
from trainer.models.base import DraftModel, DraftOutput, flatten_rows, shift_left
from trainer.models.layers import KVCache
from trainer.models.losses import ChainAccuracy, mean_over, per_position_loss


class Eagle3Draft(DraftModel):
    def forward(self, batch: PackedBatch, *, generator: torch.Generator | None = None) -> DraftOutput:
        cfg = self.config
        rows = flatten_rows(batch, self.config.num_aux)
        n, device = rows.input_ids_N.shape[0], rows.input_ids_N.device
        backend = resolve_backend(cfg.attention_backend, device)
        mask_mod = ttt_mask_mod(rows.doc_N)
        target_logits_ND = self.verifier_logits(rows.last_NH)
        target_ids_N = target_logits_ND.argmax(-1)
        hidden_1NH = self.fuse_aux(rows.aux_NX)[None]
        caches = [KVCache() for _ in self.layers]

        loss = hidden_1NH.new_zeros((), dtype=torch.float32)
        metrics: dict[str, torch.Tensor] = {}
        chains = ChainAccuracy(n, device)  # one chain starts at every position
        num_loss_tokens = None
        for step in range(cfg.ttt_steps):
            shift = 1 + step
            label_N = (
                (rows.doc_N >= 0)
                & (shift_left(rows.doc_N, shift, -1) == rows.doc_N)
                & shift_left(rows.loss_mask_N, shift, False)
            )
            tokens_1N = shift_left(rows.input_ids_N, shift, 0)[None]
            attn_mask = AttentionMask.build(mask_mod, n, n * shift, device=device, backend=backend)
            out_1NH = self.decode(
                hidden_1NH, self.embed_tokens(tokens_1N), (rows.position_ids_N + shift)[None], attn_mask, caches
            )
            normed_1NH = self.norm(out_1NH)
            hidden_1NH = normed_1NH if cfg.norm_output else out_1NH

            # Logits only where they are supervised: [N, D] logits are the largest activation.
            at_S = torch.nonzero(label_N).squeeze(1)
            logits_SD = self.lm_head(normed_1NH[0, at_S])
            step_loss = mean_over(per_position_loss(logits_SD, target_logits_ND[at_S + shift], cfg.loss_fn))
            loss = loss + cfg.ttt_step_loss_decay**step * step_loss

            with torch.no_grad():
                correct_N = torch.zeros_like(label_N)
                correct_N[at_S] = logits_SD.argmax(-1) == target_ids_N[at_S + shift]
                metrics[f"loss_{step}"] = step_loss.detach()
                metrics.update(chains.add(step, label_N, correct_N))
            if num_loss_tokens is None:
                num_loss_tokens = label_N.sum()
        metrics["loss"] = loss.detach()
        return DraftOutput(loss=loss, metrics=metrics, num_loss_tokens=num_loss_tokens)
