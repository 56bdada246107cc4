"""Endpoints: where each rank binds, how producers dial it, and which endpoints learnt from a peer a
producer agrees to dial."""

from __future__ import annotations

import socket

import pytest

from protocol.messages import ProtocolError, Welcome
from protocol.sockets import advertised_endpoint, check_dialable, rank_endpoints
from trainer.stream.config import StreamConfig


def test_ranks_bind_by_global_rank_over_ipc_and_by_local_rank_over_tcp():
    assert rank_endpoints("ipc:///run/ds", 5, local_rank=1) == (
        "ipc:///run/ds/rank5-control.sock",
        "ipc:///run/ds/rank5-data.sock",
    )
    # torchrun --nnodes 2, 2 ranks per node: rank 3 is local rank 1 of the second node's host
    assert rank_endpoints("tcp://10.0.0.2:5600", 3, local_rank=1) == ("tcp://10.0.0.2:5602", "tcp://10.0.0.2:5603")
    assert rank_endpoints("tcp://10.0.0.2:5600", 3) == ("tcp://10.0.0.2:5606", "tcp://10.0.0.2:5607")


def test_a_wildcard_tcp_bind_is_advertised_under_the_given_host_or_the_host_name():
    assert advertised_endpoint("tcp://0.0.0.0:5601", "node7") == "tcp://node7:5601"
    assert advertised_endpoint("tcp://0.0.0.0:5601", None) == f"tcp://{socket.gethostname()}:5601"
    assert advertised_endpoint("tcp://127.0.0.3:5601", None) == "tcp://127.0.0.3:5601"
    assert advertised_endpoint("ipc:///run/s/rank0-data.sock", "node7") == "ipc:///run/s/rank0-data.sock"
    config = StreamConfig(endpoint="tcp://0.0.0.0:5600", batch_tokens=64, rank=3, local_rank=1, advertise_host="n2")
    assert config.bound_endpoints() == ("tcp://0.0.0.0:5602", "tcp://0.0.0.0:5603")
    assert config.advertised_endpoints() == ("tcp://n2:5602", "tcp://n2:5603")


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://0.0.0.0:5600", "tcp://*:5600", "tcp://host:0", "tcp://host:99999", "tcp://host", "inproc://x", "ipc://*"],
)
def test_a_producer_refuses_to_dial_what_it_cannot_reach_or_should_not(endpoint):
    with pytest.raises(ValueError, match="not an endpoint a producer can dial"):
        check_dialable(endpoint)


def test_a_producer_dials_ordinary_endpoints():
    for endpoint in ("tcp://node7:5600", "tcp://127.0.0.2:5601", "ipc:///run/ds/rank1-control.sock"):
        assert check_dialable(endpoint) == endpoint
    with pytest.raises(ValueError):
        check_dialable("tcp://h:5600" + "0" * 600)


def test_a_welcome_must_list_the_rank_that_sends_it():
    Welcome(accepted=True, trainer_rank=1, trainer_endpoints=["ipc:///a", "ipc:///b"]).check()
    Welcome(accepted=True, trainer_rank=0).check()  # a lone rank may list nobody
    with pytest.raises(ProtocolError, match="lists 2 trainer endpoints"):
        Welcome(accepted=True, trainer_rank=2, trainer_endpoints=["ipc:///a", "ipc:///b"]).check()
