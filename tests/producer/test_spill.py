"""SpillSink: the exact file format, NaN/Inf handling, and writer errors surfacing to the caller."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from producer.spill import NonFiniteCaptureError, SpillConfig, SpillSink
from protocol.hsfile import hs_path, list_hs_indices, read_hs_file
from protocol.messages import Sample


def _sample(sample_id, num_tokens=6, *, dtype=torch.bfloat16, poison=None):
    hidden_TLH = torch.randn(num_tokens, 4, 32).to(dtype)
    if poison is not None:
        hidden_TLH[poison] = float("nan")
    return Sample(
        sample_id=sample_id,
        epoch=0,
        lease_id=0,
        token_ids=torch.arange(num_tokens, dtype=torch.int64) + sample_id,
        loss_mask=torch.ones(num_tokens, dtype=torch.uint8),
        hidden_states=hidden_TLH,
    )


def test_spilled_file_holds_exactly_hidden_states_and_token_ids(tmp_path):
    sink = SpillSink(SpillConfig(directory=str(tmp_path)))
    samples = [_sample(i, 3 + i) for i in (4, 0, 9)]
    for sample in samples:
        sink.put(sample)
    sink.close()

    assert list_hs_indices(tmp_path) == [0, 4, 9]
    assert sink.stats.num_written == 3 and sink.stats.num_bytes > 0
    for sample in samples:
        token_ids, hidden_TLH = read_hs_file(hs_path(tmp_path, sample.sample_id), expected_token_ids=sample.token_ids)
        assert hidden_TLH.dtype == torch.bfloat16 and torch.equal(hidden_TLH, sample.hidden_states)
        with safe_open(str(hs_path(tmp_path, sample.sample_id)), framework="pt") as f:
            assert sorted(f.keys()) == ["hidden_states", "token_ids"]


def test_nonfinite_capture_is_an_error_naming_the_row_and_the_flag(tmp_path):
    sink = SpillSink(SpillConfig(directory=str(tmp_path)))
    sink.put(_sample(1))
    sink.put(_sample(7, poison=(2, 3)))
    with pytest.raises(
        NonFiniteCaptureError, match=r"row 7: .*1 of 6 token positions \(capture slots \[3\]\).*--skip-nonfinite"
    ):
        sink.close()
    assert list_hs_indices(tmp_path) == [1]
    sink.close()  # idempotent, and the error was reported once


def test_writer_error_surfaces_on_the_next_put(tmp_path):
    sink = SpillSink(SpillConfig(directory=str(tmp_path), max_pending_samples=1))
    sink.put(_sample(3, poison=0))
    with pytest.raises(NonFiniteCaptureError, match="row 3"):
        for i in range(100):  # the writer fails while we keep putting; a put must see it
            sink.put(_sample(10 + i))
    sink.close()


def test_skip_nonfinite_skips_and_counts_the_row(tmp_path):
    sink = SpillSink(SpillConfig(directory=str(tmp_path), skip_nonfinite=True))
    for sample in (_sample(0), _sample(1, dtype=torch.float32, poison=(0, 0)), _sample(2)):
        sink.put(sample)
    sample_inf = _sample(3)
    sample_inf.hidden_states[1, 1, 1] = float("inf")
    sink.put(sample_inf)
    sink.close()
    assert list_hs_indices(tmp_path) == [0, 2]
    assert sink.stats.num_skipped_nonfinite == 2 and sink.stats.skipped_nonfinite_ids == [1, 3]
    with pytest.raises(RuntimeError, match="after close"):
        sink.put(_sample(5))
