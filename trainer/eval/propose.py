"""Draft proposals at inference: K target-vocabulary tokens from a trained Eagle-3 / P-EAGLE draft.

The inputs follow the training alignment exactly (``eagle3.py`` / ``peagle.py``). Given a
committed sequence ``x(0..n-1)`` whose target forward gave the aux states ``g(0..n-2)`` (the last
token ``x(n-1)`` has not been fed to the target yet), draft position ``i`` in ``0..n-2`` sees token
``x(i+1)`` and ``g(i)``; the chain is anchored at the last position ``a = n-2``, whose output
predicts ``x(n)``:

- Eagle-3: step 0 runs all ``n-1`` positions causally at rotary positions ``i+1``; step ``s >= 1``
  runs the anchor alone with the token proposed at step ``s-1``, the anchor's previous output
  hidden state (post-``norm`` with ``norm_output``) and rotary position ``a+1+s``, attending to the
  step-0 keys and its own keys of the earlier steps: the training-time-test mask restricted to the
  anchor's row.
- P-EAGLE: one forward over the ``n-1`` depth-0 elements plus depths ``1..K-1`` anchored at ``a``
  (``mask_token_id`` embedding, ``mask_hidden`` in place of the aux state, rotary position
  ``a+1+d``) under the COD mask; depth ``d`` proposes ``x(n+d)``.

Context keys are cacheable: an Eagle-3 step-0 position and a P-EAGLE depth-0 element attend only
to context positions at or before their own, so their keys and values never change once the
position is committed. ``DraftCache`` keeps them for a batch of sequences across rounds, and each
``propose_batch`` runs only the positions committed since the previous one, plus the chain.
Sequences advance by different amounts, so the cache is slot-aligned across the batch: each call
appends as many slots as the longest row needs, and the slots a row does not fill are holes that
its mask hides (the target's cache in ``speculate.py`` works the same way).

Argmax is taken over the draft vocabulary and mapped to target ids with ``d2t`` when it is pruned.

Shape letters: B sequences, N draft positions (n-1), S cached slots, Q new positions per row
(padded to the longest), C = K-1 chain elements after them (P-EAGLE), E = Q + C, M keys, K the
proposed tokens, H hidden, X = A*H aux features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.models.attention import AttentionMask
from trainer.models.base import DraftModel
from trainer.models.layers import KVCache


class DraftCache:
    """Keys/values of the cached context positions of B sequences, per draft layer
    (``[B, kv heads, S, head dim]``), with ``valid_BS`` marking which slots hold a position of
    that row. Only committed positions enter it, so nothing is ever rolled back."""

    def __init__(self) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.valid_BS: torch.Tensor | None = None
        self.num_positions: list[int] = []  # per row

    @property
    def num_slots(self) -> int:
        return 0 if self.valid_BS is None else self.valid_BS.shape[1]

    def layer_caches(self, num_layers: int) -> list[KVCache]:
        """Fresh per-layer ``KVCache``s holding the cached context, for one ``decode`` chain."""
        caches = [KVCache() for _ in range(num_layers)]
        for cache, kv in zip(caches, self.kv):
            cache.append(kv)
        return caches

    def keep(self, caches: list[KVCache], new_valid_BQ: torch.Tensor) -> None:
        """After a forward whose first ``Q`` new keys are context positions (``new_valid_BQ``
        marks the real ones), take them in; the keys after them (the chain's) are dropped."""
        num_slots = self.num_slots + new_valid_BQ.shape[1]
        self.kv = []
        for cache in caches:
            keys = torch.cat([k for k, _ in cache], dim=2)[:, :, :num_slots]
            values = torch.cat([v for _, v in cache], dim=2)[:, :, :num_slots]
            self.kv.append((keys, values))
        self.valid_BS = new_valid_BQ if self.valid_BS is None else torch.cat([self.valid_BS, new_valid_BQ], dim=1)
        self.num_positions = [m + int(q) for m, q in zip(self.num_positions, new_valid_BQ.sum(1).tolist())]

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (finished sequences leave the batch), and drop the slots that are
        holes in every remaining row."""
        if self.valid_BS is None:  # nothing cached yet
            return
        index = torch.tensor(list(rows), dtype=torch.int64, device=self.valid_BS.device)
        valid_BS = self.valid_BS[index]
        slots = valid_BS.any(0)
        self.valid_BS = valid_BS[:, slots]
        self.kv = [(k[index][:, :, slots], v[index][:, :, slots]) for k, v in self.kv]
        self.num_positions = [self.num_positions[i] for i in rows]


def _dense(mask_BQM: torch.Tensor) -> AttentionMask:
    # Inference masks are small and built once per proposal: SDPA with a dense mask on any device.
    # [B, 1, Q, M] broadcasts over the heads.
    return AttentionMask("sdpa", dense_QM=mask_BQM[:, None])


def to_target_ids(model: DraftModel, draft_ids: torch.Tensor) -> torch.Tensor:
    """Draft-vocabulary ids -> target ids (``target = i + d2t[i]``)."""
    return draft_ids if model.d2t is None else draft_ids + model.d2t[draft_ids]


def _pad(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Rows of different lengths, zero-padded at the end to ``length``: ``[B, length, ...]``."""
    out = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for b, row in enumerate(rows):
        out[b, : row.shape[0]] = row
    return out


@torch.no_grad()
def propose_batch(
    model: DraftModel,
    new_tokens: Sequence[torch.Tensor],
    new_aux: Sequence[torch.Tensor],
    k: int,
    cache: DraftCache,
) -> list[list[int]]:
    """``k`` proposed target ids per sequence. Row ``b`` brings the context positions committed
    since its previous proposal (all of them on the first): tokens ``x(m+1..n-1)`` and aux states
    ``g(m..n-2)``, where ``m`` is ``cache.num_positions[b]``; ``cache`` is extended in place."""
    if len(new_tokens) != len(new_aux) or any(
        t.shape[0] < 1 or t.shape[0] != a.shape[0] for t, a in zip(new_tokens, new_aux)
    ):
        raise ValueError("need one aux state per new context token, and at least one new token per sequence")
    if not cache.num_positions:
        cache.num_positions = [0] * len(new_tokens)
    assert len(cache.num_positions) == len(new_tokens), "one cache row per sequence"
    device = new_tokens[0].device
    q = max(t.shape[0] for t in new_tokens)
    num_new_B = torch.tensor([t.shape[0] for t in new_tokens], device=device)
    cached_B = torch.tensor(cache.num_positions, device=device)
    new_valid_BQ = torch.arange(q, device=device)[None] < num_new_B[:, None]
    position_BQ = cached_B[:, None] + 1 + torch.arange(q, device=device)[None]  # position i+1 for draft position i
    # A new position sees the row's cached context and the new positions up to its own. Padding
    # slots see the same (never nothing, which would make SDPA return NaN) and are never seen.
    cached_BS = cache.valid_BS if cache.valid_BS is not None else new_valid_BQ.new_zeros(len(new_tokens), 0)
    causal_BQQ = new_valid_BQ[:, None, :] & torch.ones(q, q, dtype=torch.bool, device=device).tril()
    context = dict(
        tokens_BQ=_pad(new_tokens, q),
        aux_BQX=_pad(new_aux, q),
        position_BQ=position_BQ,
        new_valid_BQ=new_valid_BQ,
        mask_BQM=torch.cat([cached_BS[:, None].expand(-1, q, -1), causal_BQQ], dim=2),
        context_BM=torch.cat([cached_BS, new_valid_BQ], dim=1),  # all of the row's context, once cached
        anchor_B=num_new_B - 1,
        next_position_B=cached_B + num_new_B + 1,  # rotary position of the chain's depth/step 1
    )
    if model.config.speculator_type == "eagle3":
        return _propose_eagle3(model, k, cache, **context)
    return _propose_peagle(model, k, cache, **context)


def _propose_eagle3(
    model: DraftModel,
    k: int,
    cache: DraftCache,
    *,
    tokens_BQ,
    aux_BQX,
    position_BQ,
    new_valid_BQ,
    mask_BQM,
    context_BM,
    anchor_B,
    next_position_B,
) -> list[list[int]]:
    b, device = tokens_BQ.shape[0], tokens_BQ.device
    caches = cache.layer_caches(len(model.layers))
    out_BQH = model.decode(
        model.fuse_aux(aux_BQX), model.embed_tokens(tokens_BQ), position_BQ, _dense(mask_BQM), caches
    )
    cache.keep(caches, new_valid_BQ)
    caches = cache.layer_caches(len(model.layers))
    out_B1H = out_BQH[torch.arange(b, device=device), anchor_B][:, None]
    proposals_BK = []
    for step in range(k):
        normed_B1H = model.norm(out_B1H)
        token_B1 = to_target_ids(model, model.lm_head(normed_B1H).argmax(-1))
        proposals_BK.append(token_B1)
        if step == k - 1:
            break
        hidden_B1H = normed_B1H if model.config.norm_output else out_B1H
        # Step s+1 sees the row's step-0 keys and the anchor's keys of steps 1..s+1 (its own included).
        own_B1M = torch.ones(b, 1, step + 1, dtype=torch.bool, device=device)
        out_B1H = model.decode(
            hidden_B1H,
            model.embed_tokens(token_B1),
            (next_position_B + step)[:, None],
            _dense(torch.cat([context_BM[:, None], own_B1M], dim=2)),
            caches,
        )
    return torch.cat(proposals_BK, dim=1).tolist()


def _propose_peagle(
    model: DraftModel,
    k: int,
    cache: DraftCache,
    *,
    tokens_BQ,
    aux_BQX,
    position_BQ,
    new_valid_BQ,
    mask_BQM,
    context_BM,
    anchor_B,
    next_position_B,
) -> list[list[int]]:
    b, q, device = tokens_BQ.shape[0], tokens_BQ.shape[1], tokens_BQ.device
    c = k - 1
    # The chain's depths 1..k-1 follow the new depth-0 elements: ``mask_token_id`` embedding,
    # ``mask_hidden`` in place of the aux state. Depth d sees every depth-0 element of its row and
    # the depths 1..d; the depth-0 elements never see the chain.
    mask_hidden_X = model.mask_hidden.reshape(-1)
    tokens_BE = torch.cat([tokens_BQ, tokens_BQ.new_full((b, c), model.mask_token_id)], dim=1)
    aux_BEX = torch.cat([aux_BQX.to(mask_hidden_X.dtype), mask_hidden_X.expand(b, c, -1)], dim=1)
    depth_C = torch.arange(1, k, device=device)
    position_BE = torch.cat([position_BQ, next_position_B[:, None] + depth_C[None] - 1], dim=1)
    chain_CC = torch.ones(c, c, dtype=torch.bool, device=device).tril()
    mask_BEM = torch.cat(
        [
            torch.cat([mask_BQM, mask_BQM.new_zeros(b, q, c)], dim=2),
            torch.cat([context_BM[:, None].expand(-1, c, -1), chain_CC.expand(b, -1, -1)], dim=2),
        ],
        dim=1,
    )
    caches = cache.layer_caches(len(model.layers))
    out_BEH = model.decode(
        model.fuse_aux(aux_BEX), model.embed_tokens(tokens_BE), position_BE, _dense(mask_BEM), caches
    )
    cache.keep(caches, new_valid_BQ)
    # The chain: depth 0 at the anchor (the row's last new depth-0 element), then depths 1..k-1.
    anchor_B1H = out_BEH[torch.arange(b, device=device), anchor_B][:, None]
    chain_BKH = torch.cat([anchor_B1H, out_BEH[:, q:]], dim=1)
    draft_ids_BK = model.lm_head(model.norm(chain_BKH)).argmax(-1)
    return to_target_ids(model, draft_ids_BK).tolist()


def propose(model: DraftModel, tokens_N: torch.Tensor, aux_NX: torch.Tensor, k: int) -> list[int]:
    """``k`` proposed target ids from the whole context ``tokens_N`` = ``x(1..n-1)``,
    ``aux_NX`` = ``g(0..n-2)`` of one sequence, with no cache."""
    if tokens_N.shape[0] < 1 or tokens_N.shape[0] != aux_NX.shape[0]:
        raise ValueError(
            f"need one aux state per context token, got {tokens_N.shape[0]} tokens, {aux_NX.shape[0]} states"
        )
    return propose_batch(model, [tokens_N], [aux_NX], k, DraftCache())[0]
