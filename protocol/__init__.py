"""The wire between producers and trainer ranks: messages, codec, sockets and credit.

The only package that both ``producer`` and ``trainer`` import.
"""

from protocol.codec import DEFAULT_CHUNK_BYTES, DTYPES, decode, encode
from protocol.credit import CreditLedger, sample_nbytes
from protocol.messages import (
    PROTOCOL_VERSION,
    EndOfStream,
    Error,
    Grant,
    Heartbeat,
    Hello,
    Kind,
    LeaseDone,
    LeaseFailed,
    Message,
    ProtocolError,
    ProtocolVersionError,
    Sample,
    Welcome,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DTYPES",
    "PROTOCOL_VERSION",
    "CreditLedger",
    "EndOfStream",
    "Error",
    "Grant",
    "Heartbeat",
    "Hello",
    "Kind",
    "LeaseDone",
    "LeaseFailed",
    "Message",
    "ProtocolError",
    "ProtocolVersionError",
    "Sample",
    "Welcome",
    "decode",
    "encode",
    "sample_nbytes",
]
