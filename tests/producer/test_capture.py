"""HFCapture: vLLM layer-id semantics, padding that never leaks, Sample fields, describe()."""

from __future__ import annotations

import pytest
import torch

from producer.backend import CaptureRow, plan_batches
from producer.capture import CaptureConfig, HFCapture
from protocol.target import default_layer_ids

# Batched and single-row forwards use different kernels (masked SDPA, other matmul shapes), so
# they agree to rounding: relative Frobenius error, well under bf16's own ~1% error against fp32.
# bf16 keeps 8 mantissa bits (eps 3.9e-3); batched and single-row SDPA round differently through 8
# layers: measured up to 0.9% (4 heads of 16) and 1.1% (2 heads of 32) on a 5-token row. fp32: 1e-5.
RELATIVE_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
TARGETS = [("tiny_llama", "float32"), ("tiny_llama", "bfloat16"), ("tiny_qwen3", "bfloat16"), ("tiny_qwen3", "float32")]


def _rows(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        CaptureRow(i, torch.randint(0, vocab, (n,), generator=g), (torch.rand(n, generator=g) > 0.5).long())
        for i, n in enumerate(lengths)
    ]


def _reference_model(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()


@pytest.mark.parametrize("target,dtype", TARGETS)
def test_slots_are_residual_stream_entering_each_layer_and_last_slot_gives_logits(request, target, dtype):
    path = request.getfixturevalue(target)
    reference = _reference_model(path, dtype)
    num_layers = reference.config.num_hidden_layers
    layer_ids = list(range(num_layers + 1))
    # One row per forward, like the reference: the batched path has its own test below.
    capture = HFCapture(
        CaptureConfig(model=str(path), dtype=dtype, device="cpu", layer_ids=layer_ids, max_batch_tokens=1)
    )
    rows = _rows([23, 7, 40], reference.config.vocab_size)

    samples = list(capture.capture(rows))

    assert [s.sample_id for s in samples] == [0, 1, 2]
    with torch.no_grad():
        for sample, row in zip(samples, rows):
            assert sample.hidden_states.dtype == getattr(torch, dtype)
            assert sample.hidden_states.shape == (row.input_ids.shape[0], num_layers + 1, reference.config.hidden_size)
            out = reference(row.input_ids[None], output_hidden_states=True)
            # Hugging Face's hidden_states[k] (k < N) is the input of layer k: an independent check.
            for k in range(num_layers):
                torch.testing.assert_close(sample.hidden_states[:, k], out.hidden_states[k][0])
            last_TH = sample.hidden_states[:, num_layers]
            torch.testing.assert_close(reference.lm_head(reference.model.norm(last_TH)), out.logits[0])
            # ... and its hidden_states[N] is post-norm, which slot N must not be.
            assert not torch.allclose(last_TH, out.hidden_states[num_layers][0])


@pytest.mark.parametrize("target,dtype", [("tiny_llama", "float32"), ("tiny_qwen3", "bfloat16")])
def test_batched_capture_with_padding_equals_capturing_each_row_alone(request, target, dtype):
    path = request.getfixturevalue(target)
    alone = HFCapture(CaptureConfig(model=str(path), dtype=dtype, device="cpu", max_batch_tokens=1))
    batched = HFCapture(CaptureConfig(model=str(path), dtype=dtype, device="cpu", max_batch_tokens=4 * 64))
    rows = _rows([64, 5, 33, 17, 64, 1, 48], alone.describe().vocab_size, seed=1)
    batches = list(plan_batches(rows, batched.config.max_batch_tokens))
    assert len(batches) < len(rows) and any(len({r.input_ids.shape[0] for r in b}) > 1 for b in batches)

    for a, b in zip(alone.capture(rows), batched.capture(rows), strict=True):
        assert a.sample_id == b.sample_id
        assert a.hidden_states.shape == b.hidden_states.shape
        error = (b.hidden_states.float() - a.hidden_states.float()).norm() / a.hidden_states.float().norm()
        assert error <= RELATIVE_TOLERANCE[dtype], (a.sample_id, float(error))
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.loss_mask, b.loss_mask)


def test_padding_and_neighbours_never_leak_into_a_row(tiny_qwen3):
    """Same batch shape, different neighbour tokens: the row's tensors are bit-identical."""
    capture = HFCapture(CaptureConfig(model=str(tiny_qwen3), device="cpu", max_batch_tokens=3 * 40))
    vocab = capture.describe().vocab_size
    row = _rows([25], vocab, seed=2)[0]
    first = [row, *_rows([40, 31], vocab, seed=3)[:2]]
    second = [row, *_rows([40, 31], vocab, seed=4)[:2]]
    assert len(list(plan_batches(first, capture.config.max_batch_tokens))) == 1

    a, b = next(capture.capture(first)), next(capture.capture(second))
    assert torch.equal(a.hidden_states, b.hidden_states)


def test_samples_carry_row_ids_epoch_lease_and_protocol_dtypes(tiny_qwen3):
    capture = HFCapture(CaptureConfig(model=str(tiny_qwen3), device="cpu"))
    rows = _rows([9, 12], capture.describe().vocab_size)
    rows = [rows[0]._replace(sample_id=41), rows[1]._replace(sample_id=7)]

    samples = list(capture.capture(rows, epoch=3, lease_id=99))

    for sample, row in zip(samples, rows, strict=True):
        sample.check()
        assert (sample.sample_id, sample.epoch, sample.lease_id) == (row.sample_id, 3, 99)
        assert sample.token_ids.dtype == torch.int64 and torch.equal(sample.token_ids, row.input_ids)
        assert sample.loss_mask.dtype == torch.uint8 and torch.equal(sample.loss_mask.long(), row.loss_mask)
        assert sample.hidden_states.dtype == torch.bfloat16  # the checkpoint's dtype under --dtype auto
        assert sample.hidden_states.shape == (row.input_ids.shape[0], 4, 64)


def test_describe_reports_default_layer_ids_and_target_shape(tiny_llama):
    capture = HFCapture(CaptureConfig(model=str(tiny_llama), device="cpu"))
    info = capture.describe()
    assert info.layer_ids == default_layer_ids(8) == [2, 4, 5, 8]
    assert (capture.num_layers, info.hidden_size, info.dtype) == (8, 64, "float32")
    assert info.target_model == str(tiny_llama) and info.vocab_size > 256


def test_layer_id_beyond_last_layer_is_refused_naming_the_flag(tiny_llama):
    with pytest.raises(ValueError, match="--target-layer-ids"):
        HFCapture(CaptureConfig(model=str(tiny_llama), device="cpu", layer_ids=[2, 9]))


def test_token_id_outside_target_vocabulary_is_refused_naming_the_row(tiny_llama):
    capture = HFCapture(CaptureConfig(model=str(tiny_llama), device="cpu"))
    vocab = capture.describe().vocab_size
    rows = [CaptureRow(12, torch.tensor([1, 2, vocab + 5]), torch.ones(3, dtype=torch.long))]
    with pytest.raises(ValueError, match="row 12 .*vocabulary"):
        list(capture.capture(rows))


def test_batches_stay_within_token_budget_and_keep_order():
    rows = _rows([10, 30, 20, 90, 5, 5, 5, 5], vocab=50)
    batches = list(plan_batches(rows, max_batch_tokens=60))
    assert [r.sample_id for b in batches for r in b] == list(range(8))
    for batch in batches:
        padded = len(batch) * max(r.input_ids.shape[0] for r in batch)
        assert padded <= 60 or len(batch) == 1  # a row over budget goes alone
    assert [len(b) for b in batches] == [2, 1, 1, 4]


def test_unpadded_batches_count_real_tokens_and_keep_order():
    rows = _rows([10, 30, 20, 90, 5, 5, 5, 5], vocab=50)
    batches = list(plan_batches(rows, max_batch_tokens=60, padded=False))
    assert [r.sample_id for b in batches for r in b] == list(range(8))
    for batch in batches:
        assert sum(r.input_ids.shape[0] for r in batch) <= 60 or len(batch) == 1  # a row over budget goes alone
    assert [len(b) for b in batches] == [3, 1, 4]


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--dtype"):
        CaptureConfig(model="m", dtype="float64")
    with pytest.raises(ValueError, match="--max-batch-tokens"):
        CaptureConfig(model="m", max_batch_tokens=0)
    with pytest.raises(ValueError, match="--device"):
        CaptureConfig(model="m", device="tpu")


@pytest.mark.gpu
def test_cuda_capture_with_pinned_async_copies_matches_cpu(tiny_qwen3):
    cpu = HFCapture(CaptureConfig(model=str(tiny_qwen3), device="cpu", dtype="float32", max_batch_tokens=256))
    gpu = HFCapture(CaptureConfig(model=str(tiny_qwen3), device="cuda", dtype="float32", max_batch_tokens=256))
    rows = _rows([64, 3, 50, 64, 20, 7, 64, 64, 1], cpu.describe().vocab_size)
    for a, b in zip(cpu.capture(rows), gpu.capture(rows), strict=True):
        assert b.hidden_states.device.type == "cpu" and b.hidden_states.is_pinned()
        torch.testing.assert_close(b.hidden_states, a.hidden_states, rtol=1e-4, atol=1e-4)
