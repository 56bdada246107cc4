"""The target model of ``draftstream eval``: greedy verification forwards that capture the aux
states, over a KV cache shared by a batch of sequences.

A ``transformers`` causal LM with the same ``protocol.layer_capture`` hooks the producer's capture
backend uses, so the draft sees the aux states it was trained on. Each prompt is prefilled alone
(exactly as an unbatched run would), then the batch's caches are merged, right-padded, into one
``DynamicCache``. Every verification forward feeds ``K + 1`` tokens per sequence at that
sequence's own positions; afterwards each sequence keeps only the slots of its accepted tokens.
Rows accept different counts, so the cache stays slot-aligned and the rejected slots of one row
become holes that its attention mask (the 2-D ``attention_mask``, combined with the causal mask
over slots by transformers) hides; slots that are holes in every row are cropped. Holes hold
finite values, and every query is a real token that sees itself, so no attention row is empty.

Shape letters: B sequences, S cache slots, T tokens fed per sequence, P prompt tokens, H hidden,
X = A*H (the aux layers concatenated), V target vocab.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from protocol.layer_capture import ResidualCapture


class HFTarget:
    """Verification forwards of one batch of sequences at a time: ``start`` (prefill), then per
    round ``extend`` and ``commit``, and ``select`` when sequences finish. ``forward`` is the
    cache-free reference for one whole sequence."""

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
        # transformers renamed ``past_key_values`` to ``cache`` in 5.2x (the old name warns).
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._cache = None
        self._valid_BS: torch.Tensor | None = None  # which slots hold a token of that row
        self._length_B: torch.Tensor | None = None  # tokens each row has kept: its next position
        self._num_fed = 0  # tokens per row of the last ``extend``, until ``commit``

    def _aux(self, num_tokens: int) -> torch.Tensor:
        """The last forward's aux states of its last ``num_tokens`` positions, ``[B, T, X]``."""
        return torch.cat([state[:, -num_tokens:] for state in self._capture.take()], dim=-1)

    @torch.no_grad()
    def forward(self, ids_T: torch.Tensor, num_logits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole sequence, no cache: logits ``[num_logits, V]`` of the last positions and the aux
        states ``[T, X]``. The reference the cached path is tested against."""
        out = self.model(input_ids=ids_T.to(self.device)[None], use_cache=False, logits_to_keep=num_logits)
        return out.logits[0], self._aux(ids_T.shape[0])[0]

    @torch.no_grad()
    def start(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Prefill a new batch: each prompt's last logits ``[B, V]`` and its aux states ``[P, X]``."""
        from transformers import DynamicCache

        logits, aux, layer_kv = [], [], []
        for prompt in prompts:
            cache = DynamicCache(config=self.model.config)
            ids_1P = torch.tensor([list(prompt)], device=self.device)
            out = self.model(input_ids=ids_1P, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
            logits.append(out.logits[0, -1])
            aux.append(self._aux(len(prompt))[0])
            layer_kv.append([(layer.keys, layer.values) for layer in cache.layers])
        width = max(len(p) for p in prompts)
        self._cache = DynamicCache(config=self.model.config)
        if any(getattr(self._cache, "is_sliding", ())):
            # Holes count towards a sliding window, which would then hide real tokens.
            raise ValueError("targets with sliding-window attention layers are not supported by draftstream eval")
        for i in range(len(layer_kv[0])):
            keys = torch.cat([_pad_slots(kv[i][0], width) for kv in layer_kv])
            values = torch.cat([_pad_slots(kv[i][1], width) for kv in layer_kv])
            self._cache.update(keys, values, i)
        self._length_B = torch.tensor([len(p) for p in prompts], device=self.device)
        self._valid_BS = torch.arange(width, device=self.device)[None] < self._length_B[:, None]
        self._num_fed = 0
        return torch.stack(logits), aux

    @torch.no_grad()
    def extend(self, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``T`` tokens per row after its kept ones: logits ``[B, T, V]`` and aux ``[B, T, X]``.
        ``commit`` must follow, before the next ``extend``."""
        b, t = ids_BT.shape
        assert self._num_fed == 0, "extend needs a commit before the next extend"
        self._num_fed = t
        position_BT = self._length_B[:, None] + torch.arange(t, device=self.device)[None]
        self._valid_BS = torch.cat([self._valid_BS, self._valid_BS.new_ones(b, t)], dim=1)
        out = self.model(
            input_ids=ids_BT.to(self.device),
            attention_mask=self._valid_BS.long(),
            position_ids=position_BT,
            use_cache=True,
            logits_to_keep=t,
            **{self._cache_arg: self._cache},
        )
        return out.logits, self._aux(t)

    def commit(self, num_kept: Sequence[int]) -> None:
        """Row ``b`` keeps the first ``num_kept[b]`` tokens of the last ``extend``; its other slots
        become holes."""
        t = self._num_fed
        kept_B = torch.tensor(list(num_kept), device=self.device)
        assert t > 0 and bool((kept_B >= 1).all() and (kept_B <= t).all())
        self._valid_BS[:, -t:] = torch.arange(t, device=self.device)[None] < kept_B[:, None]
        self._length_B = self._length_B + kept_B
        self._num_fed = 0
        self._crop_holes()

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` of the batch (finished sequences leave it)."""
        index = torch.tensor(list(rows), dtype=torch.int64, device=self.device)
        self._cache.batch_select_indices(index)
        self._valid_BS = self._valid_BS[index]
        self._length_B = self._length_B[index]
        self._crop_holes()

    def _crop_holes(self) -> None:
        """Drop the trailing slots that are holes in every row."""
        used_S = self._valid_BS.any(0)
        num_slots = int(used_S.nonzero().max()) + 1
        if num_slots < used_S.shape[0]:
            self._cache.crop(num_slots - used_S.shape[0])  # a negative count: tokens to remove
            self._valid_BS = self._valid_BS[:, :num_slots]

    def close(self) -> None:
        self._capture.close()
        self._cache = None


def _pad_slots(kv_1gSK: torch.Tensor, width: int) -> torch.Tensor:
    """Zero slots after the last, up to ``width`` (dim 2 of ``[1, kv heads, S, head dim]``)."""
    return F.pad(kv_1gSK, (0, 0, 0, width - kv_1gSK.shape[2]))
