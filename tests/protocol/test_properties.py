"""Property tests (hypothesis): round trips over dtype x shape x contiguity x chunk size."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from protocol.codec import DTYPES, MIN_CHUNK_BYTES, decode, encode
from protocol.messages import Sample
from tests.protocol.probe import Probe, registered_probe

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=5)
chunks = st.sampled_from([MIN_CHUNK_BYTES, 8192, 1 << 20])


def random_tensor(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    return torch.randint(0, 100 if dtype == torch.uint8 else 1 << 30, shape, generator=gen).to(dtype)


@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=shapes,
    transpose=st.booleans(),
    chunk=chunks,
    seed=st.integers(0, 1 << 16),
)
def test_any_tensor_round_trips_with_exact_frame_count(dtype, shape, transpose, chunk, seed):
    tensor = random_tensor(shape, DTYPES[dtype], seed)
    if transpose and tensor.dim() >= 2:
        tensor = tensor.transpose(0, -1)
    with registered_probe():
        frames = encode(Probe(label=dtype, tensor=tensor), chunk_bytes=chunk)
        out = decode(frames).tensor
    nbytes = tensor.numel() * tensor.element_size()
    assert len(frames) == 2 + math.ceil(nbytes / chunk)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(
        out.view(-1).view(torch.uint8) if out.numel() else out,
        tensor.contiguous().view(-1).view(torch.uint8) if tensor.numel() else tensor,
    )


@given(
    num_tokens=st.integers(0, 300),
    num_layers=st.integers(1, 5),
    hidden=st.sampled_from([8, 64, 96]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    mask_dtype=st.sampled_from([torch.bool, torch.uint8, torch.int64]),
    chunk=chunks,
)
def test_any_sample_round_trips(num_tokens, num_layers, hidden, dtype, mask_dtype, chunk):
    sample = Sample(
        sample_id=num_tokens * 31,
        epoch=num_layers,
        lease_id=hidden,
        token_ids=torch.arange(num_tokens, dtype=torch.int64) * 7,
        loss_mask=(torch.arange(num_tokens) % 3 == 0).to(mask_dtype),
        hidden_states=torch.randn(num_tokens, num_layers, hidden).to(dtype),
    )
    assert decode(encode(sample, chunk_bytes=chunk)) == sample
