"""Work leases: which producer owes which samples, until when, and what to grant again.

A trainer rank needs a known list of samples, keyed ``(epoch, sample_id)``, in plan order. It
hands them out as *leases*: a lease names a producer, some keys, a deadline and a secret token. A
key is in exactly one of three states:

    pending  --grant-->  outstanding  --accepted arrival-->  received
       ^                      |
       +-- expiry / failure / producer lost --+

- A sample is accepted only if it answers the live lease that holds its key, carrying that lease's
  token (``admit``): a peer that was never granted the key cannot fill it, and a lease that expired
  or failed is void (its late copies are dropped; the key was or will be granted again).
- Keys that return to pending go back in their plan position, ahead of every key never granted:
  they are the oldest, so the trainer is most likely waiting on them.
- Nothing here blocks or touches sockets; the stream source calls it from its IO thread.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import hmac
import itertools
import secrets
import time
from collections.abc import Callable, Hashable, Iterable, Iterator

Key = tuple[int, int]  # (epoch, sample_id)


@dataclasses.dataclass(kw_only=True)
class Lease:
    lease_id: int
    producer: Hashable
    epoch: int
    sample_ids: tuple[int, ...]
    deadline: float
    outstanding: set[int]
    token: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16), repr=False)


class LeaseTable:
    """State of every needed key; see the module docstring for the transitions.

    Pending keys live in two places: ``_fresh`` (never granted, plan order) and ``_returned`` (a
    heap by plan position). Grants always take the head of the pending order, so every key ever
    granted precedes every fresh key in the plan: pending order is sorted(returned) + fresh.
    """

    def __init__(self, *, lease_seconds: float, clock: Callable[[], float] = time.monotonic):
        if lease_seconds <= 0:
            raise ValueError(f"--lease-seconds must be positive, got {lease_seconds}")
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._position: dict[Key, int] = {}  # plan position of every tracked key
        self._next_position = 0
        self._fresh: collections.deque[Key] = collections.deque()
        self._returned: list[tuple[int, Key]] = []  # heap; entries not in _pending_set are stale
        self._pending_set: set[Key] = set()
        self._owner: dict[Key, int] = {}  # outstanding key -> lease id
        self._received: set[Key] = set()
        self._leases: dict[int, Lease] = {}
        self._ids = itertools.count(1)
        self.num_expired = 0

    # ---- needs ------------------------------------------------------------------------------

    def need(self, keys: Iterable[Key]) -> None:
        """Append keys (in plan order) to the pending queue. A key can be needed only once."""
        for key in keys:
            if key in self._position:
                raise ValueError(f"sample {key} is already needed")
            self._position[key] = self._next_position
            self._next_position += 1
            self._fresh.append(key)
            self._pending_set.add(key)

    def forget(self, keys: Iterable[Key]) -> None:
        """Stop tracking consumed keys. Until then a late copy of a key counts as a duplicate;
        after, it is unknown and also dropped."""
        for key in keys:
            if key in self._received:
                self._received.discard(key)
                del self._position[key]

    def cancel(self, keys: Iterable[Key]) -> None:
        """These keys are no longer needed (the loop abandoned them): not granted again, and a
        copy that still arrives is "not needed"."""
        for key in keys:
            self._pending_set.discard(key)
            lease_id = self._owner.pop(key, None)
            if lease_id is not None:
                lease = self._leases[lease_id]
                lease.outstanding.discard(key[1])
                if not lease.outstanding:
                    del self._leases[lease_id]
            self._received.discard(key)
            self._position.pop(key, None)

    @property
    def num_pending(self) -> int:
        return len(self._pending_set)

    @property
    def num_outstanding(self) -> int:
        return len(self._owner)

    @property
    def leases(self) -> dict[int, Lease]:
        return dict(self._leases)

    def is_needed(self, key: Key) -> bool:
        return key in self._pending_set or key in self._owner

    def admit(self, key: Key, lease_id: int, token: str) -> str:
        """Why a sample for ``key`` on ``lease_id`` with ``token`` must be dropped ("" if it answers
        the live lease holding its key). Changes nothing: ``on_sample`` records the arrival."""
        owner = self._owner.get(key)
        if owner is None:
            if key in self._received:
                return "duplicate"
            return "not granted" if key in self._pending_set else "not needed"
        if owner != lease_id:
            return "not its lease"
        if not hmac.compare_digest(self._leases[owner].token.encode(), token.encode("utf-8", "replace")):
            return "bad token"
        return ""

    def _pending_in_order(self) -> Iterator[Key]:
        # A key returned more than once has a heap entry per return: yield it once.
        seen: set[Key] = set()
        for _, key in sorted(self._returned):
            if key in self._pending_set and key not in seen:
                seen.add(key)
                yield key
        # A fresh key can leave the pending set without a grant: its sample arrived unasked (a
        # producer still serving a restarted trainer's old lease). It stays in the deque until it
        # reaches the head, so filter here.
        yield from (key for key in self._fresh if key in self._pending_set)

    def peek_pending(self, limit: int) -> list[Key]:
        return list(itertools.islice(self._pending_in_order(), limit))

    # ---- transitions ------------------------------------------------------------------------

    def take(
        self,
        producer: Hashable,
        limit: int,
        fits: Callable[[Key], bool] = lambda key: True,
        *,
        seconds: float | None = None,
    ) -> Lease | None:
        """Lease up to ``limit`` keys from the head of the pending order to ``producer``, due in
        ``seconds`` (default ``lease_seconds``): one epoch per lease, stopping at the first key
        for which ``fits`` says no (the caller reserves buffer credit there). None when nothing
        was taken."""
        taken: list[Key] = []
        for key in self._pending_in_order():
            if len(taken) == limit or (taken and key[0] != taken[0][0]) or not fits(key):
                break
            taken.append(key)
        if not taken:
            return None
        for key in taken:
            self._pending_set.discard(key)
        while self._fresh and self._fresh[0] not in self._pending_set:
            self._fresh.popleft()
        lease = Lease(
            lease_id=next(self._ids),
            producer=producer,
            epoch=taken[0][0],
            sample_ids=tuple(sid for _, sid in taken),
            deadline=self._clock() + (self.lease_seconds if seconds is None else seconds),
            outstanding={sid for _, sid in taken},
        )
        self._leases[lease.lease_id] = lease
        for key in taken:
            self._owner[key] = lease.lease_id
        return lease

    def on_sample(self, epoch: int, sample_id: int) -> Lease:
        """An admitted sample (see ``admit``) is kept: its key is received. Returns its lease."""
        key = (epoch, sample_id)
        lease = self._leases[self._owner.pop(key)]
        lease.outstanding.discard(sample_id)
        if not lease.outstanding:
            del self._leases[lease.lease_id]
        self._received.add(key)
        return lease

    def _return(self, lease: Lease, sample_ids: Iterable[int]) -> list[Key]:
        returned = []
        for sid in sample_ids:
            key = (lease.epoch, sid)
            if self._owner.get(key) == lease.lease_id:
                del self._owner[key]
                lease.outstanding.discard(sid)
                self._pending_set.add(key)
                heapq.heappush(self._returned, (self._position[key], key))
                returned.append(key)
        if not lease.outstanding:
            self._leases.pop(lease.lease_id, None)
        if len(self._returned) > 4 * len(self._pending_set) + 64:  # drop stale heap entries
            self._returned = [e for e in self._returned if e[1] in self._pending_set]
            heapq.heapify(self._returned)
        return returned

    def fail(
        self, lease_id: int, sample_ids: Iterable[int] | None = None, *, producer: Hashable | None = None
    ) -> list[Key] | None:
        """The producer gave up (some of) a lease, or the rank refused what it sent: those keys go
        back to pending. With ``producer``, only that lease's holder may do this: None if another
        producer holds it (nothing changes)."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return []
        if producer is not None and lease.producer != producer:
            return None
        return self._return(lease, sorted(lease.outstanding) if sample_ids is None else sample_ids)

    def producer_lost(self, producer: Hashable) -> list[Key]:
        """Everything ``producer`` still owed goes back to pending."""
        returned: list[Key] = []
        for lease in [lease for lease in self._leases.values() if lease.producer == producer]:
            returned += self._return(lease, sorted(lease.outstanding))
        return returned

    def expire(self) -> list[Lease]:
        """Leases past their deadline give their outstanding keys back to pending; returns them."""
        now = self._clock()
        expired = [lease for lease in self._leases.values() if lease.deadline <= now]
        for lease in expired:
            self.num_expired += 1
            self._return(lease, sorted(lease.outstanding))
        return expired

    def outstanding_for(self, producer: Hashable) -> int:
        return sum(len(lease.outstanding) for lease in self._leases.values() if lease.producer == producer)

    def leases_of(self, producer: Hashable) -> int:
        return sum(1 for lease in self._leases.values() if lease.producer == producer)
