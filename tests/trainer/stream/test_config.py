"""StreamConfig: each knob's one default and check; the replay buffer's budget resolved from the target."""

from __future__ import annotations

import math

import pytest
import torch

from protocol.target import TargetSpec, sample_nbytes
from trainer.stream.config import BATCHES_BUFFERED, BUFFER_HEADROOM, StreamConfig, peak_live_bytes

SPEC = TargetSpec(target_model="m", layer_ids=[2, 16, 29, 32], hidden_size=4096, dtype="bfloat16", vocab_size=128256)


def test_buffer_default_is_four_full_batches_of_this_rank():
    total_seq_len, grad_accum_steps = 8192, 3
    config = StreamConfig(endpoint="ipc:///tmp/x", batch_tokens=total_seq_len * grad_accum_steps)
    # what draftstream train sized before StreamConfig owned the rule
    assert config.buffer_budget(SPEC) == 4 * sample_nbytes(total_seq_len, 4, 4096, torch.bfloat16) * grad_accum_steps


def test_given_buffer_bytes_win_and_no_batch_size_means_the_fixed_default():
    assert StreamConfig(endpoint="ipc:///tmp/x", buffer_bytes=12345, batch_tokens=8192).buffer_budget(SPEC) == 12345


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(buffer_bytes=0), "--buffer-bytes"),
        (dict(buffer_bytes=-1), "--buffer-bytes"),
        (dict(batch_tokens=0), "--total-seq-len"),
        (dict(lease_seconds=0), "--lease-seconds"),
        (dict(stall_timeout_seconds=-1), "--stall-timeout"),
        (dict(samples_per_lease=0), "samples per lease"),
        (dict(endpoint="udp://x"), "--stream-endpoint"),
    ],
)
def test_bad_settings_are_refused_naming_the_flag(bad, match):
    with pytest.raises(ValueError, match=match):
        StreamConfig(**{"endpoint": "ipc:///tmp/x", "batch_tokens": 8192, **bad})


def test_buffer_default_fits_the_plan_with_headroom():
    per_batch = sample_nbytes(8192, 4, 4096, torch.bfloat16)
    small = StreamConfig(endpoint="ipc:///tmp/x", batch_tokens=8192, planned_peak_bytes=per_batch)
    assert small.buffer_budget(SPEC) == BATCHES_BUFFERED * per_batch  # never below the fixed default
    reuse = StreamConfig(endpoint="ipc:///tmp/x", batch_tokens=8192, planned_peak_bytes=10 * per_batch)
    assert reuse.buffer_budget(SPEC) == math.ceil(BUFFER_HEADROOM * 10 * per_batch)


def test_a_given_buffer_below_the_plan_is_refused_naming_the_flags():
    with pytest.raises(ValueError, match=r"need 2\.0 MB at once but --buffer-bytes is 1\.0 MB.*--reuse-window"):
        StreamConfig(endpoint="ipc:///tmp/x", batch_tokens=8192, buffer_bytes=1_000_000, planned_peak_bytes=2_000_000)
    exact = StreamConfig(
        endpoint="ipc:///tmp/x", batch_tokens=8192, buffer_bytes=2_000_000, planned_peak_bytes=2_000_000
    )
    assert exact.buffer_budget(SPEC) == 2_000_000


def test_peak_live_bytes_counts_samples_from_first_to_last_use():
    size = {1: 10, 2: 20, 3: 40}.__getitem__
    assert peak_live_bytes([1, 2, 3], size) == 40  # one use each: one sample at a time
    assert peak_live_bytes([1, 2, 1, 3, 2], size) == 60  # 2 waits while 3 passes; 1 is done by then
    assert peak_live_bytes([1, 2, 3, 1, 2, 3], size) == 70
    assert peak_live_bytes([], size) == 0
