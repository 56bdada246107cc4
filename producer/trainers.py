"""The trainers a producer serves, and where their ranks are.

Each ``--connect`` address is one trainer (a job), reached first through its *door*: the rank that
answers at that address (rank 0, normally). An accepted ``Welcome`` lists the control endpoint of
every rank of the trainer, wherever it runs (``torchrun --nnodes N``); ``Ranks.adopt`` makes the
trainer's ranks those it lists: ranks not known yet are greeted, ranks that moved (a restarted
trainer whose ranks came back on other hosts) are dialled again, ranks that are gone are dropped.
Endpoints learnt from a peer are checked (``welcome_problem``) before anything dials them.

``Ranks`` owns the control sockets (one DEALER per rank, no fixed identity) and the poller over
them; ``producer.stream_client.StreamProducer`` owns everything about grants and samples.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable

import zmq

from protocol.messages import EndOfStream, Welcome
from protocol.sockets import SocketConfig, check_dialable, make_socket, send_message

logger = logging.getLogger(__name__)

MAX_TRAINER_RANKS = 4096  # a Welcome listing more ranks than this is refused


@dataclasses.dataclass(eq=False)
class Trainer:
    """One ``--connect`` address: a trainer whose ranks are found through the rank at ``door``."""

    base: str
    door: str  # the control endpoint dialled first (rank 0's, from --connect)


@dataclasses.dataclass(eq=False)
class Rank:
    trainer: Trainer
    index: int | None  # the trainer rank; None until the door rank says which it is
    control_endpoint: str
    control: zmq.Socket
    data: zmq.Socket | None = None
    data_endpoint: str = ""
    welcomed: bool = False
    refused: str = ""
    done: bool = False
    last_heard: float = 0.0
    last_hello: float = 0.0
    hellos_unanswered: int = 0
    backlog: collections.deque = dataclasses.field(default_factory=collections.deque)  # (work, sample) to push
    stuck_since: float | None = None  # when the head of the backlog last failed to go out

    @property
    def name(self) -> str:
        return f"{self.trainer.base}#{'?' if self.index is None else self.index}"

    @property
    def is_door(self) -> bool:
        return self.control_endpoint == self.trainer.door


def welcome_problem(message: Welcome, num_ranks: int | None) -> str:
    """Why an accepting ``message`` cannot be followed ("" if it can): an endpoint no producer
    should dial, too many ranks, or not the ``--num-ranks`` the user expects."""
    endpoints = message.trainer_endpoints
    try:
        check_dialable(message.data_endpoint)
        for endpoint in endpoints:
            check_dialable(endpoint)
    except ValueError as e:
        return f"its Welcome names {e}"
    if len(endpoints) > MAX_TRAINER_RANKS:
        return f"its Welcome lists {len(endpoints)} ranks, more than {MAX_TRAINER_RANKS}"
    if num_ranks is not None and len(endpoints) != num_ranks:
        return f"the trainer has {len(endpoints)} ranks but --num-ranks is {num_ranks}"
    return ""


class Ranks:
    """Every trainer rank this producer knows: their control sockets and the poller over them."""

    def __init__(self, ctx: zmq.Context, socket: SocketConfig):
        self.ctx = ctx
        self.socket = socket
        self.all: list[Rank] = []
        self.poller = zmq.Poller()

    def add_trainer(self, base: str, door: str) -> None:
        self._add(Trainer(base=base, door=door), None, door)

    def expected_jobs(self) -> set[Trainer]:
        """Trainers still to be served: those with a rank that has not ended the stream or refused
        us (a trainer that has not answered yet is expected too)."""
        return {r.trainer for r in self.all if not (r.done or r.refused)}

    def refuse(self, trainer: Trainer, reason: str) -> None:
        for rank in self.all:
            if rank.trainer is trainer:
                rank.refused = reason

    def connect_data(self, rank: Rank, endpoint: str, *, holding: bool) -> None:
        """Push to ``endpoint`` from now on (``holding``: this process sends the samples itself)."""
        if rank.data is not None and rank.data_endpoint != endpoint:  # the rank restarted elsewhere
            rank.data.close(linger=0)
            rank.data = None
        rank.data_endpoint = endpoint
        if rank.data is None and holding:
            rank.data = make_socket(self.ctx, zmq.PUSH, self.socket, connect=endpoint)

    def adopt(self, welcomed: Rank, endpoints: list[str], *, gone: Callable[[Rank], None]) -> None:
        """Make ``welcomed``'s trainer's ranks those its Welcome lists (``gone`` is told of each rank
        dropped first). The door and ``welcomed`` stay as dialled: the list may name the same place
        differently (a host name for a loopback address, say)."""
        trainer = welcomed.trainer
        for rank in [r for r in self.all if r.trainer is trainer]:
            moved = rank.index is not None and (
                rank.index >= len(endpoints) or endpoints[rank.index] != rank.control_endpoint
            )
            if rank is not welcomed and not rank.is_door and moved:
                logger.info("rank %s is no longer at %s", rank.name, rank.control_endpoint)
                gone(rank)
                self.poller.unregister(rank.control)
                self._close(rank, linger=0)
                self.all.remove(rank)
        known = {r.index for r in self.all if r.trainer is trainer}
        for index, endpoint in enumerate(endpoints):
            if index not in known:
                logger.info("trainer %s: greeting rank %d at %s", trainer.base, index, endpoint)
                self._add(trainer, index, endpoint)

    def reconnect(self, rank: Rank) -> None:
        """Our hellos go unanswered: the route may be dead (a half-open pipe, a rank that lost
        it). A new socket is a new connection with a new route."""
        logger.warning("rank %s answers no hello; reconnecting", rank.name)
        self.poller.unregister(rank.control)
        rank.control.close(linger=0)
        rank.control = self._control_socket(rank.control_endpoint)
        self.poller.register(rank.control, zmq.POLLIN)
        rank.hellos_unanswered = 0

    def close(self, *, linger: int) -> None:
        for rank in self.all:
            self._close(rank, linger=linger)

    def _add(self, trainer: Trainer, index: int | None, endpoint: str) -> None:
        rank = Rank(trainer=trainer, index=index, control_endpoint=endpoint, control=self._control_socket(endpoint))
        self.poller.register(rank.control, zmq.POLLIN)
        self.all.append(rank)

    def _control_socket(self, endpoint: str) -> zmq.Socket:
        # No fixed identity: the rank's ROUTER names each connection itself, so no other peer can
        # claim (or squat) this producer's route. The producer id travels in the Hello.
        return make_socket(self.ctx, zmq.DEALER, self.socket, connect=endpoint)

    @staticmethod
    def _close(rank: Rank, *, linger: int) -> None:
        if rank.welcomed and not rank.done:
            try:
                send_message(rank.control, EndOfStream(reason="producer stopping"), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for sock in (rank.control, rank.data):
            if sock is not None:
                sock.close(linger=linger)
