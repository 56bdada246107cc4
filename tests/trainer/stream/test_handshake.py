"""The handshake's rules, without sockets: a Hello checked against this rank's TargetSpec, and the replies
(tests/trainer/stream/test_source.py runs them over real sockets)."""

from __future__ import annotations

import dataclasses

from protocol.messages import PROTOCOL_VERSION, Hello, ProtocolVersionError
from protocol.target import TargetSpec
from trainer.stream.handshake import (
    hello_mismatch,
    hello_problems,
    refusal,
    refusal_reason,
    version_refusal,
    welcome,
)

SPEC = TargetSpec(
    target_model="/models/Llama-3.1-8B",
    layer_ids=[2, 16, 29, 32],
    hidden_size=4096,
    dtype="bfloat16",
    vocab_size=128256,
    dataset_fingerprint="abc",
)


def hello(**override) -> Hello:
    return Hello(producer_id="p0", **{**dataclasses.asdict(SPEC), **override})


def test_a_matching_hello_passes_whatever_the_model_path():
    assert hello_mismatch(SPEC, hello(target_model="meta-llama/Llama-3.1-8B")) == ""


def test_a_trainer_that_knows_its_dataset_refuses_a_producer_that_does_not_say_one():
    assert "prepared dataset (none given) != abc" in hello_mismatch(SPEC, hello(dataset_fingerprint=""))
    unknown = dataclasses.replace(SPEC, dataset_fingerprint="")
    assert hello_mismatch(unknown, hello(dataset_fingerprint="")) == ""  # a trainer without one checks nothing


def test_another_protocol_version_in_the_hello_is_refused():
    [(field, why)] = hello_problems(SPEC, hello(protocol_version=999))
    assert field == "protocol version" and "999" in why


def test_an_unauthenticated_peer_learns_which_fields_differ_but_not_the_trainers_values():
    problems = hello_problems(SPEC, hello(target_model="/other", layer_ids=[1, 2, 3, 32], dataset_fingerprint=""))
    told = refusal_reason(problems, authenticated=False)
    assert "target model" in told and "layer ids" in told and "dataset fingerprint" in told
    for secret in ("/models/Llama-3.1-8B", "16, 29", "abc"):
        assert secret not in told
    assert "/models/Llama-3.1-8B" in refusal_reason(problems, authenticated=True)


def test_a_mismatching_hello_names_every_difference_and_the_flag():
    problem = hello_mismatch(SPEC, hello(layer_ids=[1, 2, 3, 32], hidden_size=2048, dataset_fingerprint="xyz"))
    assert "layer ids" in problem and "--target-layer-ids" in problem
    assert "hidden size 2048 != 4096" in problem
    assert "prepared dataset xyz != abc (--data)" in problem


def test_replies():
    ranks = [f"tcp://h{r // 2}:{5600 + 2 * (r % 2)}" for r in range(4)]
    accepted = welcome(3, "tcp://h1:5603", ranks)
    assert accepted.accepted and accepted.trainer_rank == 3 and accepted.data_endpoint == "tcp://h1:5603"
    assert accepted.trainer_endpoints == ranks
    accepted.check()
    refused = refusal(1, "why")
    assert not refused.accepted and refused.reason == "why" and refused.trainer_rank == 1
    old = version_refusal(0, ProtocolVersionError(PROTOCOL_VERSION + 1))
    assert not old.accepted and "protocol version" in old.reason and f"speak {PROTOCOL_VERSION}" in old.reason
