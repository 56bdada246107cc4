"""StreamConfig: each knob's one default and check; the replay buffer's budget resolved from the target."""

from __future__ import annotations

import pytest
import torch

from protocol.target import TargetSpec, sample_nbytes
from trainer.stream.config import StreamConfig

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
