"""The trainer end of the wire: the loop-facing stream source, its IO thread, the handshake,
leases, credit and the bytes-bounded replay buffer."""
