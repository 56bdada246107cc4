"""Draft vocabulary: the d2t/t2d rule (SPEC), on a known token_freq, and its use by build_draft."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.models.config import DraftConfig
from trainer.models.export import build_draft
from trainer.models.vocab import build_vocab_mapping, draft_to_target, select_draft_ids


def test_most_frequent_ids_win_and_ties_go_to_the_lower_id():
    freq = {7: 5, 3: 9, 12: 5, 1: 5, 9: 1, 4: 9}
    # ranked: 3(9) 4(9) 1(5) 7(5) 12(5) 9(1)
    assert select_draft_ids(freq, 4, 20) == [1, 3, 4, 7]
    assert select_draft_ids(freq, 2, 20) == [3, 4]


def test_too_few_seen_ids_are_topped_up_with_the_lowest_unused_ids():
    freq = {5: 3, 2: 1, 17: 8}
    assert select_draft_ids(freq, 6, 20) == [0, 1, 2, 3, 5, 17]


def test_d2t_holds_offsets_and_t2d_marks_the_chosen_ids():
    freq = {10: 4, 2: 9, 7: 4, 30: 1}
    d2t, t2d = build_vocab_mapping(freq, 3, 40)
    assert d2t.dtype == torch.int64 and d2t.shape == (3,)
    assert t2d.dtype == torch.bool and t2d.shape == (40,)
    assert draft_to_target(d2t).tolist() == [2, 7, 10]
    assert d2t.tolist() == [2, 6, 8]
    assert torch.nonzero(t2d).squeeze(1).tolist() == [2, 7, 10]


def test_mapping_rejects_ids_outside_the_verifier_vocab():
    with pytest.raises(ValueError, match="outside the verifier vocab"):
        build_vocab_mapping({50: 1}, 2, 40)
    with pytest.raises(ValueError, match="--draft-vocab-size"):
        build_vocab_mapping({1: 1}, 41, 40)


def test_pruned_draft_heads_are_the_verifier_rows_picked_by_t2d(tiny_llama):
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    freq = {i: (i * 37) % 101 for i in range(vocab)}
    config = DraftConfig(
        speculator_type="eagle3", verifier_name_or_path=str(tiny_llama), aux_layer_ids=[1, 2, 3], draft_vocab_size=64
    )
    model = build_draft(config, freq)
    d2t, t2d = build_vocab_mapping(freq, 64, vocab)
    assert torch.equal(model.d2t, d2t) and torch.equal(model.t2d, t2d)

    from safetensors import safe_open

    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as f:
        lm_head = f.get_tensor("lm_head.weight")
    rows = lm_head[draft_to_target(d2t)]
    assert torch.equal(model.lm_head.weight, rows)
    assert torch.equal(model.verifier_lm_head.weight, rows)


def test_full_vocab_draft_has_no_mapping(tiny_llama):
    config = DraftConfig(speculator_type="eagle3", verifier_name_or_path=str(tiny_llama), aux_layer_ids=[1, 2, 3])
    model = build_draft(config, None)
    assert model.d2t is None and model.t2d is None
    assert model.lm_head.weight.shape[0] == model.embed_tokens.weight.shape[0]


def test_pruned_vocab_without_token_freq_is_a_clear_error(tiny_llama):
    config = DraftConfig(
        speculator_type="eagle3", verifier_name_or_path=str(tiny_llama), aux_layer_ids=[1, 2, 3], draft_vocab_size=64
    )
    with pytest.raises(ValueError, match="token_freq.pt"):
        build_draft(config, None)
