"""Eagle-3 and P-EAGLE drafts: alignment, masks, COD sampling, padding, overfitting a tiny target.

Hidden states come from the tiny fixture targets through hooks (``tiny_capture``). The overfit
tests use a target built with a larger init range so its next-token distributions are peaked:
the session fixture's are so flat (top-1 probability ~7%) that argmax agreement is decided by
near-ties rather than by what the draft learned.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.trainer.tiny_capture import capture_samples
from trainer.data.batch import PackedBatch, TrainSample, pack
from trainer.models.attention import AttentionMask, attend, cod_mask_mod, ttt_mask_mod
from trainer.models.base import flatten_rows, shift_left
from trainer.models.config import DraftConfig
from trainer.models.export import build_draft
from trainer.models.peagle import cod_sample

AUX = [2, 2, 1]  # explicit aux ids valid for every tiny target here (4 or 8 layers)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    from producer.tiny_target import TinyTargetConfig, build_tiny_target

    # Four heads of 16: the draft takes its attention shape from the verifier, and overfitting four
    # P-EAGLE depths wants the heads (two heads of 32, the vLLM-friendly default, reach 0.82 at depth 1).
    config = TinyTargetConfig(arch="llama", num_layers=4, initializer_range=1.0, num_heads=4, num_kv_heads=2)
    return build_tiny_target(tmp_path_factory.mktemp("sharp-llama"), config)


@pytest.fixture(scope="module")
def llama_samples(tiny_llama):
    return capture_samples(tiny_llama, 3, max_len=48)


def _config(verifier, speculator_type, **kw) -> DraftConfig:
    return DraftConfig(speculator_type=speculator_type, verifier_name_or_path=str(verifier), aux_layer_ids=AUX, **kw)


def _hf_logits(verifier, samples):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(verifier)).eval()
    with torch.no_grad():
        return [model(input_ids=s.token_ids[None]).logits[0].float() for s in samples]


def _kl_from_uniform(logits_TV: torch.Tensor) -> torch.Tensor:
    """KL(p || uniform) = log V - H(p) per position."""
    logp = logits_TV.log_softmax(-1)
    return math.log(logits_TV.shape[-1]) + (logp.exp() * logp).sum(-1)


def _uniform_draft(model):
    """Make the draft predict the uniform distribution, so its loss is a function of the
    targets and the loss mask alone."""
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


# --- alignment ------------------------------------------------------------------------------


def test_eagle3_step_s_is_trained_towards_the_verifier_at_p_plus_1_plus_s(tiny_llama, llama_samples):
    model = _uniform_draft(build_draft(_config(tiny_llama, "eagle3"), None))
    out = model(pack(llama_samples, 512, pad_to=160))
    hf = _hf_logits(tiny_llama, llama_samples)
    for step in range(3):
        shift = 1 + step
        terms = []
        for sample, logits in zip(llama_samples, hf):
            labels = sample.loss_mask[shift:].bool()  # label position p+shift for p = 0..T-1-shift
            terms.append(_kl_from_uniform(logits[shift:])[labels])
        expected = torch.cat(terms).mean()
        torch.testing.assert_close(out.metrics[f"loss_{step}"], expected, rtol=1e-4, atol=1e-4)
    expected_tokens = sum(int(s.loss_mask[1:].sum()) for s in llama_samples)
    assert int(out.num_loss_tokens) == expected_tokens


def test_peagle_element_at_anchor_a_depth_d_is_trained_towards_the_verifier_at_a_plus_d_plus_1(
    tiny_llama, llama_samples
):
    config = _config(tiny_llama, "peagle", num_depths=4)
    model = _uniform_draft(build_draft(config, None))
    batch = pack(llama_samples, 512)
    out = model(batch, generator=torch.Generator().manual_seed(3))

    rows = flatten_rows(batch, 3)
    label_N = (rows.doc_N >= 0) & (shift_left(rows.doc_N, 1, -1) == rows.doc_N) & shift_left(rows.loss_mask_N, 1, False)
    anchor_E, depth_E = cod_sample(label_N, rows.doc_N, config, torch.Generator().manual_seed(3))
    hf_N = torch.cat(_hf_logits(tiny_llama, llama_samples))
    target_E = (anchor_E + depth_E + 1).clamp(max=hf_N.shape[0] - 1)
    keep = label_N[anchor_E + depth_E]
    torch.testing.assert_close(out.loss, _kl_from_uniform(hf_N[target_E])[keep].mean(), rtol=1e-4, atol=1e-4)
    assert int(out.num_loss_tokens) == int(keep.sum())
    assert int((depth_E > 0).sum()) > 0


@pytest.mark.parametrize("speculator_type", ["eagle3", "peagle"])
def test_packed_documents_do_not_see_each_other(tiny_llama, llama_samples, speculator_type):
    """Loss of a packed row = token-weighted mean of each document alone, and padding (at the
    end, or as a second row) changes nothing."""
    torch.manual_seed(0)
    model = build_draft(_config(tiny_llama, speculator_type, num_depths=1), None)
    key = "loss_0" if speculator_type == "eagle3" else "loss"
    alone = [model(pack([s], 512)) for s in llama_samples]
    expected = sum(o.metrics[key] * o.num_loss_tokens for o in alone) / sum(o.num_loss_tokens for o in alone)
    packed = model(pack(llama_samples, 512, pad_to=200))
    torch.testing.assert_close(packed.metrics[key], expected, rtol=1e-4, atol=1e-5)

    rows = [pack(llama_samples[:2], 512, pad_to=120), pack(llama_samples[2:], 512, pad_to=120)]
    two_rows = PackedBatch(
        **{
            f.name: torch.cat([getattr(r, f.name) for r in rows])
            for f in dataclasses.fields(PackedBatch)
            if f.name != "sample_ids"
        },
        sample_ids=[i for r in rows for i in r.sample_ids],
    )
    torch.testing.assert_close(model(two_rows).metrics[key], expected, rtol=1e-4, atol=1e-5)


def test_eagle3_outputs_do_not_depend_on_later_tokens(tiny_llama, llama_samples):
    """Step-0 context is causal: changing the last tokens of a document changes no loss term
    whose label lies before them."""
    torch.manual_seed(0)
    model = build_draft(_config(tiny_llama, "eagle3", ttt_steps=1), None)
    sample = llama_samples[1]
    cut = sample.token_ids.shape[0] - 6
    head = TrainSample(
        sample_id=0,
        token_ids=sample.token_ids[:cut],
        loss_mask=sample.loss_mask[:cut],
        hidden_states=sample.hidden_states[:cut],
    )
    changed = dataclasses.replace(
        sample, token_ids=sample.token_ids.clone(), hidden_states=sample.hidden_states.clone()
    )
    changed.token_ids[cut:] = 7
    changed.hidden_states[cut:] += 1.0
    changed.loss_mask = sample.loss_mask.clone()
    changed.loss_mask[cut:] = False  # supervise only labels < cut, as in `head`
    torch.testing.assert_close(model(pack([changed], 512)).loss, model(pack([head], 512)).loss)


# --- masks ----------------------------------------------------------------------------------


def _dense(mask_mod, q_len, kv_len):
    return AttentionMask.build(mask_mod, q_len, kv_len, device=torch.device("cpu"), backend="sdpa").dense_QM


def test_ttt_mask_sees_step0_causal_context_and_its_own_position_in_later_steps():
    doc = torch.tensor([0, 0, 0, 1, 1, -1])
    m = _dense(ttt_mask_mod(doc), 6, 18)  # step 2: keys of steps 0, 1, 2
    assert torch.nonzero(m[2]).squeeze(1).tolist() == [0, 1, 2, 8, 14]
    assert torch.nonzero(m[3]).squeeze(1).tolist() == [3, 9, 15]
    assert torch.nonzero(m[4]).squeeze(1).tolist() == [3, 4, 10, 16]
    assert torch.nonzero(m[5]).squeeze(1).tolist() == [5, 11, 17]  # padding: itself only


def test_cod_mask_sees_its_documents_context_up_to_its_anchor_and_its_own_chain():
    doc = torch.tensor([0, 0, 0, 0, 1, 1, -1])
    # elements: depth 0 at 0..6, chain anchored at 1 (depths 1, 2), chain anchored at 4 (depth 1)
    anchor = torch.tensor([0, 1, 2, 3, 4, 5, 6, 1, 4, 1])
    depth = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 2])
    m = _dense(cod_mask_mod(anchor, depth, doc), 10, 10)
    assert torch.nonzero(m[9]).squeeze(1).tolist() == [0, 1, 7, 9]  # context <= anchor 1, own chain
    assert torch.nonzero(m[7]).squeeze(1).tolist() == [0, 1, 7]
    assert torch.nonzero(m[8]).squeeze(1).tolist() == [4, 8]  # other document's context excluded
    assert torch.nonzero(m[3]).squeeze(1).tolist() == [0, 1, 2, 3]
    assert torch.nonzero(m[6]).squeeze(1).tolist() == [6]  # padding: itself only


# --- COD sampling ---------------------------------------------------------------------------


def _cod_setup(n=300, docs=(0, 120, 200), max_anchors=512):
    doc = torch.full((n,), -1)
    bounds = list(docs) + [n - 20]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        doc[a:b] = i
    loss_mask = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.8
    label = (doc >= 0) & (shift_left(doc, 1, -1) == doc) & shift_left(loss_mask, 1, False)
    config = DraftConfig(
        speculator_type="peagle", verifier_name_or_path="unused", aux_layer_ids=AUX, max_anchors=max_anchors
    )
    return label, doc, config


def test_cod_chains_are_present_at_every_lower_depth_and_stay_in_one_document():
    label, doc, config = _cod_setup()
    anchor, depth = cod_sample(label, doc, config, torch.Generator().manual_seed(0))
    assert torch.equal(anchor[depth == 0], torch.arange(doc.shape[0]))
    present = set(zip(anchor.tolist(), depth.tolist()))
    assert len(present) == anchor.shape[0]
    for a, d in present:
        if d == 0:
            continue
        assert (a, d - 1) in present
        assert bool(label[a + d]), "a deeper element's own target must be supervised"
        assert doc[a] >= 0 and bool((doc[a : a + d + 2] == doc[a]).all())


def test_cod_keeps_the_spec_count_per_depth_from_at_most_max_anchors_seeds():
    label, doc, config = _cod_setup(max_anchors=100)
    anchor, depth = cod_sample(label, doc, config, torch.Generator().manual_seed(0))
    seeds = min(int(label.sum()), 100)
    counts = torch.bincount(depth, minlength=config.num_depths).tolist()
    assert counts[0] == doc.shape[0]
    assert counts[1] == int((seeds - 1) * 0.7)
    for d in range(1, config.num_depths):
        assert counts[d] <= int(max(0, seeds - d) * max(0.7**d, 0.2))
    assert counts[-1] > 0


def test_cod_sampling_is_driven_by_the_generator():
    label, doc, config = _cod_setup()
    a1, d1 = cod_sample(label, doc, config, torch.Generator().manual_seed(5))
    a2, d2 = cod_sample(label, doc, config, torch.Generator().manual_seed(5))
    a3, _ = cod_sample(label, doc, config, torch.Generator().manual_seed(6))
    assert torch.equal(a1, a2) and torch.equal(d1, d2)
    assert not torch.equal(a1, a3)


def test_cod_with_no_supervised_position_keeps_depth_zero_only():
    doc = torch.tensor([0, 0, 0, -1])
    config = DraftConfig(speculator_type="peagle", verifier_name_or_path="unused", aux_layer_ids=AUX)
    anchor, depth = cod_sample(torch.zeros(4, dtype=torch.bool), doc, config, None)
    assert anchor.tolist() == [0, 1, 2, 3] and depth.tolist() == [0, 0, 0, 0]


# --- padding never NaN ----------------------------------------------------------------------


def _padded_batches(samples):
    short = pack(samples[:1], 512, pad_to=256)
    empty_row = PackedBatch(
        input_ids=torch.zeros_like(short.input_ids),
        hidden_states=torch.zeros_like(short.hidden_states),
        loss_mask=torch.zeros_like(short.loss_mask),
        position_ids=torch.zeros_like(short.position_ids),
        document_ids=torch.full_like(short.document_ids, -1),
        sample_ids=[],
    )
    with_empty_row = PackedBatch(
        **{
            f.name: torch.cat([getattr(short, f.name), getattr(empty_row, f.name)])
            for f in dataclasses.fields(PackedBatch)
            if f.name != "sample_ids"
        },
        sample_ids=short.sample_ids,
    )
    unsupervised = dataclasses.replace(short, loss_mask=torch.zeros_like(short.loss_mask))
    return {"mostly_padding": short, "fully_padded_row": with_empty_row, "no_supervised_token": unsupervised}


@pytest.mark.parametrize("speculator_type", ["peagle", "eagle3"])
def test_padded_batches_never_give_nan(tiny_qwen3, speculator_type):
    samples = capture_samples(tiny_qwen3, 1, max_len=40)
    assert samples[0].hidden_states.dtype == torch.bfloat16
    torch.manual_seed(0)
    model = build_draft(_config(tiny_qwen3, speculator_type, num_depths=4), None)
    for name, batch in _padded_batches(samples).items():
        model.zero_grad()
        out = model(batch, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out.loss), name
        out.loss.backward()
        for pname, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (name, pname)
        assert all(torch.isfinite(v) for v in out.metrics.values()), name
        if name == "no_supervised_token":
            assert float(out.loss.detach()) == 0.0 and int(out.num_loss_tokens) == 0


# --- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("speculator_type", ["eagle3", "peagle"])
def test_verifier_parts_are_frozen_and_excluded_from_trainable_parameters(tiny_qwen3, speculator_type):
    model = build_draft(_config(tiny_qwen3, speculator_type, num_layers=2), None)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for n, p in model.named_parameters() if n in names}
    assert not names & {"lm_head.weight", "verifier_lm_head.weight", "verifier_norm.weight"}
    assert ("embed_tokens.weight" in names) == (speculator_type == "peagle")
    assert ("mask_hidden" in names) == (speculator_type == "peagle")
    assert len(model.decoder_layers) == 2 and model.decoder_layers is model.layers
    assert "layers.1.self_attn.q_norm.weight" in names  # Qwen3 layers for a Qwen3 verifier
    assert model.layers[0].self_attn.q_proj.in_features == 2 * model.layers[1].self_attn.q_proj.in_features


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--speculator-type"):
        DraftConfig(speculator_type="medusa", verifier_name_or_path="x", aux_layer_ids=AUX)
    with pytest.raises(ValueError, match="--target-layer-ids"):
        DraftConfig(speculator_type="eagle3", verifier_name_or_path="x", aux_layer_ids=[1, 2])
    with pytest.raises(ValueError, match="--num-depths"):
        DraftConfig(speculator_type="peagle", verifier_name_or_path="x", aux_layer_ids=AUX, num_depths=0)


# --- overfitting ----------------------------------------------------------------------------


def _train(model, batch, steps, lr):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(steps):
        out = model(batch, generator=generator)
        first = first if first is not None else float(out.loss.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return first


def test_eagle3_overfits_a_handful_of_samples(sharp_llama):
    batch = pack(capture_samples(sharp_llama, 3, max_len=64), 512)
    torch.manual_seed(0)
    model = build_draft(_config(sharp_llama, "eagle3"), None)
    first = _train(model, batch, steps=150, lr=1e-2)
    with torch.no_grad():
        metrics = model(batch).metrics
    assert float(metrics["loss"]) < 0.05 * first
    for step in range(3):
        assert float(metrics[f"cond_acc_{step}"]) >= 0.9, metrics
    assert float(metrics["full_acc_0"]) >= 0.9, metrics


def test_peagle_overfits_a_handful_of_samples(sharp_llama):
    batch = pack(capture_samples(sharp_llama, 3, max_len=64), 512)
    torch.manual_seed(0)
    model = build_draft(_config(sharp_llama, "peagle", num_depths=4), None)
    first = _train(model, batch, steps=200, lr=3e-3)
    with torch.no_grad():
        runs = [model(batch, generator=torch.Generator().manual_seed(100 + i)).metrics for i in range(4)]
    metrics = {k: sum(float(r[k]) for r in runs) / len(runs) for k in runs[0]}
    assert metrics["loss"] < 0.05 * first
    for depth in range(4):
        assert metrics[f"position_{depth}_acc"] >= 0.9, metrics
    assert metrics["full_acc"] >= 0.9, metrics


# --- FlexAttention vs SDPA -------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_block_masks_select_the_same_keys_as_dense_masks():
    """The CPU part of the comparison: FlexAttention's eager forward (its backward fails on CPU)
    under BlockMasks built from the same mask_mods as SDPA's dense masks."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    doc = torch.tensor([0] * 50 + [1] * 70 + [-1] * 30)
    n = doc.shape[0]
    label = torch.rand(n) < 0.7
    config = DraftConfig(speculator_type="peagle", verifier_name_or_path="unused", aux_layer_ids=AUX, num_depths=4)
    anchor, depth = cod_sample(
        label & (doc >= 0) & (shift_left(doc, 1, -1) == doc), doc, config, torch.Generator().manual_seed(0)
    )
    cases = [(ttt_mask_mod(doc), n, 3 * n), (cod_mask_mod(anchor, depth, doc), anchor.shape[0], anchor.shape[0])]
    for mask_mod, q_len, kv_len in cases:
        q = torch.randn(1, 4, q_len, 16)
        k, v = torch.randn(1, 2, kv_len, 16), torch.randn(1, 2, kv_len, 16)
        block_mask = create_block_mask(mask_mod, None, None, q_len, kv_len, device="cpu")
        flex = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
        dense = attend(
            q, k, v, AttentionMask.build(mask_mod, q_len, kv_len, device=torch.device("cpu"), backend="sdpa")
        )
        torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


# --- FlexAttention (CUDA) vs SDPA -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention runs on CUDA only")
@pytest.mark.parametrize("speculator_type", ["eagle3", "peagle"])
def test_flex_attention_matches_sdpa(tiny_llama, llama_samples, speculator_type):
    device = torch.device("cuda")
    batch = pack(llama_samples, 512, pad_to=256).to(device)
    losses, grads = {}, {}
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = build_draft(_config(tiny_llama, speculator_type, num_depths=4, attention_backend=backend), None).to(
            device
        )
        out = model(batch, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        losses[backend] = out.loss.detach()
        grads[backend] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["flex"], losses["sdpa"], rtol=2e-3, atol=2e-3)
    assert grads["flex"].keys() == grads["sdpa"].keys()
    for name in grads["sdpa"]:
        torch.testing.assert_close(grads["flex"][name], grads["sdpa"][name], rtol=2e-2, atol=2e-3, msg=name)

    # The kernels alone, on the same masks.
    doc = batch.document_ids[0]
    n = doc.shape[0]
    q = torch.randn(1, 4, n, 16, device=device)
    k, v = torch.randn(1, 2, 3 * n, 16, device=device), torch.randn(1, 2, 3 * n, 16, device=device)
    outs = [
        attend(q, k, v, AttentionMask.build(ttt_mask_mod(doc), n, 3 * n, device=device, backend=b))
        for b in ("sdpa", "flex")
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3)
