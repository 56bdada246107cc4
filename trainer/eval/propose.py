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

Argmax is taken over the draft vocabulary and mapped to target ids with ``d2t`` when it is pruned.

Shape letters: N draft positions (n-1), E elements, H hidden, X = A*H aux features, D draft vocab.
"""

from __future__ import annotations

import torch

from trainer.models.attention import AttentionMask, cod_mask_mod
from trainer.models.base import DraftModel
from trainer.models.layers import KVCache


def _dense(mask_QM: torch.Tensor) -> AttentionMask:
    # Inference masks are small and built once per proposal: SDPA with a dense mask on any device.
    return AttentionMask("sdpa", dense_QM=mask_QM)


def to_target_ids(model: DraftModel, draft_ids: torch.Tensor) -> torch.Tensor:
    """Draft-vocabulary ids -> target ids (``target = i + d2t[i]``)."""
    return draft_ids if model.d2t is None else draft_ids + model.d2t[draft_ids]


@torch.no_grad()
def propose_eagle3(model: DraftModel, tokens_N: torch.Tensor, aux_NX: torch.Tensor, k: int) -> list[int]:
    """``tokens_N`` = ``x(1..n-1)``, ``aux_NX`` = ``g(0..n-2)``: the chain of ``k`` target ids."""
    n, device = tokens_N.shape[0], tokens_N.device
    caches = [KVCache() for _ in model.layers]
    hidden_1NH = model.fuse_aux(aux_NX)[None]
    embeds_1NH = model.embed_tokens(tokens_N)[None]
    position_1N = torch.arange(1, n + 1, device=device)[None]
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    out_1NH = model.decode(hidden_1NH, embeds_1NH, position_1N, _dense(causal), caches)
    out_11H = out_1NH[:, -1:]
    proposal: list[int] = []
    for step in range(k):
        normed_11H = model.norm(out_11H)
        token = to_target_ids(model, model.lm_head(normed_11H[0, 0]).argmax(-1))
        proposal.append(int(token))
        if step == k - 1:
            break
        hidden_11H = normed_11H if model.config.norm_output else out_11H
        # Step s+1 sees the n step-0 keys and the anchor's keys of steps 1..s+1 (its own included).
        num_keys = n + step + 1
        out_11H = model.decode(
            hidden_11H,
            model.embed_tokens(token.view(1, 1)),
            torch.tensor([[n + step + 1]], device=device),
            _dense(torch.ones(1, num_keys, dtype=torch.bool, device=device)),
            caches,
        )
    return proposal


@torch.no_grad()
def propose_peagle(model: DraftModel, tokens_N: torch.Tensor, aux_NX: torch.Tensor, k: int) -> list[int]:
    """Same inputs as ``propose_eagle3``; all ``k`` depths in one forward."""
    n, device = tokens_N.shape[0], tokens_N.device
    anchor = n - 1
    depth_E = torch.cat([torch.zeros(n, dtype=torch.int64), torch.arange(1, k)]).to(device)
    anchor_E = torch.cat([torch.arange(n), torch.full((k - 1,), anchor)]).to(device)
    doc_N = torch.zeros(n, dtype=torch.int64, device=device)
    first_E = depth_E == 0
    mask_hidden_X = model.mask_hidden.reshape(-1)
    tokens_E = torch.where(first_E, tokens_N[anchor_E], model.mask_token_id)
    aux_EX = torch.where(first_E[:, None], aux_NX[anchor_E].to(mask_hidden_X.dtype), mask_hidden_X)
    e = anchor_E.shape[0]
    q_idx, kv_idx = torch.arange(e, device=device)[:, None], torch.arange(e, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    mask_EE = cod_mask_mod(anchor_E, depth_E, doc_N)(zero, zero, q_idx, kv_idx)
    out_1EH = model.decode(
        model.fuse_aux(aux_EX)[None],
        model.embed_tokens(tokens_E)[None],
        (anchor_E + 1 + depth_E)[None],
        _dense(mask_EE),
    )
    # The chain's elements: depth 0 at the anchor (element ``anchor``), then depths 1..k-1 (the tail).
    chain_KH = torch.cat([out_1EH[0, anchor : anchor + 1], out_1EH[0, n:]])
    draft_ids = model.lm_head(model.norm(chain_KH)).argmax(-1)
    return [int(t) for t in to_target_ids(model, draft_ids)]


def propose(model: DraftModel, tokens_N: torch.Tensor, aux_NX: torch.Tensor, k: int) -> list[int]:
    """``k`` proposed target ids from the context ``tokens_N`` = ``x(1..n-1)``, ``aux_NX`` = ``g(0..n-2)``."""
    if tokens_N.shape[0] < 1 or tokens_N.shape[0] != aux_NX.shape[0]:
        raise ValueError(
            f"need one aux state per context token, got {tokens_N.shape[0]} tokens, {aux_NX.shape[0]} states"
        )
    if model.config.speculator_type == "eagle3":
        return propose_eagle3(model, tokens_N, aux_NX, k)
    return propose_peagle(model, tokens_N, aux_NX, k)
