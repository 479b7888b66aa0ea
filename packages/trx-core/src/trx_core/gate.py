"""The launcher's door for agents: one listening socket, and the handshakes of who connects.

A connection becomes an agent's channel only after it proved it holds the run's secret
(`trx_core.channel`'s HMAC challenge) and then said `Hello`. Nothing is unpickled before the
proof. Handshakes never block the launcher's loop: their bytes are read as they arrive, each
unproven connection has a short deadline, and only so many may be pending at once, so a
stranger that connects and says nothing (or one byte) delays no run.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from dataclasses import dataclass, field

from .channel import Channel, ChannelClosed, challenge_answer_size, check_answer, new_challenge
from .protocol import Hello

__all__ = ["AgentGate", "Arrival"]

HANDSHAKE_TIMEOUT_S = 2.0
"""An unproven connection that has not answered the challenge by then is dropped."""
MAX_PENDING = 64
"""Unproven connections beyond this many are dropped at once (the oldest go first)."""


@dataclass
class _Pending:
    sock: socket.socket
    challenge: bytes
    deadline: float
    answer: bytearray = field(default_factory=bytearray)
    proven: bool = False


@dataclass(frozen=True)
class Arrival:
    """An authenticated agent that said hello."""

    channel: Channel
    hello: Hello
    peer_address: str


class AgentGate:
    """Listens on `bind_host` (loopback for runs on this machine alone), in `selector`."""

    def __init__(self, selector: selectors.BaseSelector, bind_host: str, secret: bytes) -> None:
        self._selector = selector
        self._secret = secret
        self._pending: dict[int, _Pending] = {}  # by fd
        self.listener = socket.create_server((bind_host, 0), backlog=128)
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ, ("gate", None))

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def owns(self, data: tuple[str, object]) -> bool:
        return data[0] in ("gate", "pending")

    def on_ready(self, key: selectors.SelectorKey) -> Arrival | None:
        """Handle a readable listener or pending connection; an `Arrival` once one is complete."""
        if key.data[0] == "gate":
            self._accept()
            return None
        pending = self._pending[key.fd]
        try:
            if not pending.proven:
                self._read_answer(pending)
                return None
            return self._read_hello(pending)
        except (ChannelClosed, OSError, EOFError, ValueError):
            self._drop(pending)
            return None

    def expire(self, now: float) -> None:
        """Drop connections whose handshake is overdue."""
        for pending in [p for p in self._pending.values() if not p.proven and now > p.deadline]:
            self._drop(pending)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. out of descriptors: the peer retries or gives up
            sock.setblocking(False)
            try:
                challenge = new_challenge()
                sock.send(challenge)  # a few bytes into an empty buffer: never blocks
            except OSError:
                sock.close()
                continue
            unproven = [p for p in self._pending.values() if not p.proven]
            if len(unproven) >= MAX_PENDING:
                self._drop(min(unproven, key=lambda p: p.deadline))
            pending = _Pending(sock, challenge, time.monotonic() + HANDSHAKE_TIMEOUT_S)
            self._pending[sock.fileno()] = pending
            self._selector.register(sock, selectors.EVENT_READ, ("pending", None))

    def _read_answer(self, pending: _Pending) -> None:
        data = pending.sock.recv(challenge_answer_size() - len(pending.answer))
        if not data:
            raise ChannelClosed("closed during the handshake")
        pending.answer += data
        if len(pending.answer) < challenge_answer_size():
            return
        proof = check_answer(self._secret, pending.challenge, bytes(pending.answer))
        if proof is None:
            raise ChannelClosed("not one of ours")  # dropped: nothing it sent was unpickled
        pending.sock.send(proof)
        pending.proven = True
        # The agent says hello once it has imported torch; its frame is read in one go then.

    def _read_hello(self, pending: _Pending) -> Arrival | None:
        sock = pending.sock
        self._forget(pending)
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        channel = Channel(sock)
        message, _ = channel.recv()
        if not isinstance(message, Hello):
            channel.close()
            return None
        return Arrival(channel, message, sock.getpeername()[0])

    def _forget(self, pending: _Pending) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(pending.sock)
        self._pending.pop(pending.sock.fileno(), None)

    def _drop(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.sock.close()

    def close(self) -> None:
        """Close the listener and every connection not handed out."""
        for pending in list(self._pending.values()):
            self._drop(pending)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.listener)
        self.listener.close()
