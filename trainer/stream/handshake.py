"""The handshake on a rank's control socket: a producer's ``Hello`` checked against this rank's
``protocol.target.TargetSpec`` (the one description both sides share), and the ``Welcome`` that
accepts it or says why not. Pure functions: the IO thread (``trainer.stream.wire``) sends them.

A refusal goes to whoever sent the Hello. Without CURVE client authentication that can be any
local process, so it names the settings that differ but not this rank's values (model path,
layer ids, fingerprint); the rank's own log has the whole story. A peer authenticated by CURVE
(``--curve-authorized-keys``) is told both values, so an operator can fix a mistake at once.
"""

from __future__ import annotations

from protocol.messages import PROTOCOL_VERSION, Hello, ProtocolVersionError, Welcome
from protocol.target import TargetSpec


def hello_problems(target: TargetSpec, hello: Hello) -> list[tuple[str, str]]:
    """``(field, why)`` for each reason the producer saying ``hello`` cannot feed a rank expecting
    ``target``: another protocol version, or another target, layer ids, dtype, or dataset."""
    if hello.protocol_version != PROTOCOL_VERSION:
        return [
            (
                "protocol version",
                f"protocol version {hello.protocol_version} != {PROTOCOL_VERSION}; upgrade draftstream so both sides match",
            )
        ]
    return target.mismatches(TargetSpec.from_hello(hello))


def hello_mismatch(target: TargetSpec, hello: Hello) -> str:
    """Why the producer saying ``hello`` cannot feed a rank expecting ``target`` ("" if it can)."""
    return "; ".join(why for _, why in hello_problems(target, hello))


def refusal_reason(problems: list[tuple[str, str]], *, authenticated: bool) -> str:
    """What the refused peer is told: the full story if CURVE vouched for it, else field names only."""
    if authenticated:
        return "; ".join(why for _, why in problems)
    return "mismatch in " + ", ".join(field for field, _ in problems) + " (the trainer's log says more)"


def welcome(rank: int, data_endpoint: str, trainer_endpoints: list[str]) -> Welcome:
    """Accepted: push samples to ``data_endpoint``; the trainer's ranks answer at ``trainer_endpoints``."""
    return Welcome(accepted=True, trainer_rank=rank, data_endpoint=data_endpoint, trainer_endpoints=trainer_endpoints)


def refusal(rank: int, reason: str) -> Welcome:
    return Welcome(accepted=False, reason=reason, trainer_rank=rank)


def version_refusal(rank: int, error: ProtocolVersionError) -> Welcome:
    """A producer speaking another protocol version: refused, saying how to fix it."""
    return refusal(rank, f"{error}; upgrade draftstream so both sides speak {PROTOCOL_VERSION}")
