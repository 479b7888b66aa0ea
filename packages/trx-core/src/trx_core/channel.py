"""Framed, authenticated message channel between launcher, agents and workers.

A frame is a small pickled *message* (one of the dataclasses of `trx_core.protocol`)
followed by an optional opaque *blob* of bytes. Blobs carry user data (the cloudpickled function, return
values, exceptions) and are only ever decoded by the process that needs them, so an agent
relays a 100 MB result without copying it into a new pickle.

Connections between machines are authenticated with a mutual HMAC challenge on the run's
secret before any frame is unpickled: a peer without the secret, or from another run,
is dropped having had nothing of its input unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from .protocol import Message

__all__ = [
    "HEARTBEAT_S",
    "AuthenticationFailed",
    "Channel",
    "ChannelClosed",
    "challenge_answer_size",
    "check_answer",
    "client_handshake",
    "new_challenge",
]

_PREFIX = struct.Struct("!QQ")  # header length, blob length
_MAX_HEADER = 64 * 1024 * 1024
_RELAY_CHUNK = 1 << 20
_RECV_CHUNK = 1 << 20  # liveness is noted after each: a slow link carrying a big blob is not silence

HEARTBEAT_S = 1.0
"""Launcher and agents send each other a heartbeat after this long without sending anything else."""
_NONCE = 32
_DIGEST = hashlib.sha256


class ChannelClosed(ConnectionError):
    """The peer closed the connection (or died), or the connection was reset or aborted."""

    def how(self) -> str:
        """How the connection ended, for an error message: "closed", or the reset or abort."""
        cause = self.__cause__
        if isinstance(cause, OSError) and cause.strerror:
            return f"was lost ({cause.strerror.lower()})"
        return "closed"


class AuthenticationFailed(ConnectionError):
    """The peer could not prove that it holds the run's secret."""


def _recv_exactly(sock: socket.socket, size: int, progress: Callable[[], None] | None = None) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], min(size - got, _RECV_CHUNK))
        if n == 0:
            raise ChannelClosed("connection closed by peer")
        got += n
        if progress is not None:
            progress()
    return buf


def _mac(secret: bytes, role: bytes, *nonces: bytes) -> bytes:
    return hmac.new(secret, role + b"".join(nonces), _DIGEST).digest()


def new_challenge() -> bytes:
    """A fresh nonce to send a connecting peer: the first step of authenticating it."""
    return os.urandom(_NONCE)


def challenge_answer_size() -> int:
    """How many bytes a peer's answer to a challenge has."""
    return _NONCE + _DIGEST().digest_size


def check_answer(secret: bytes, challenge: bytes, answer: bytes) -> bytes | None:
    """Second step: if the peer's `answer` to `challenge` proves it holds `secret`, the proof
    to send back that we hold it too; else None."""
    client_nonce, client_mac = answer[:_NONCE], answer[_NONCE:]
    if not hmac.compare_digest(client_mac, _mac(secret, b"agent", challenge, client_nonce)):
        return None
    return _mac(secret, b"launcher", client_nonce, challenge)


def client_handshake(sock: socket.socket, secret: bytes) -> None:
    """Answer the server's challenge and check that the server holds the secret too."""
    server_nonce = bytes(_recv_exactly(sock, _NONCE))
    client_nonce = os.urandom(_NONCE)
    sock.sendall(client_nonce + _mac(secret, b"agent", server_nonce, client_nonce))
    server_mac = bytes(_recv_exactly(sock, _DIGEST().digest_size))
    if not hmac.compare_digest(server_mac, _mac(secret, b"launcher", client_nonce, server_nonce)):
        raise AuthenticationFailed("server does not hold this run's secret")


class Channel:
    """Frames over a connected stream socket. Owns the socket: `close()` closes it.

    Sending is thread-safe: a frame goes out whole under a lock, so that a heartbeat thread
    (`beat_if_quiet`) can keep the peer informed while the owner's thread is busy, e.g. reading
    a big blob for a minute. Receiving is for one thread only.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.last_sent = self.last_received = time.monotonic()  # for heartbeats
        self._send_lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def beat_if_quiet(self, beat: Message) -> None:
        """Send `beat` if nothing was sent for a heartbeat interval; skip it if a frame is going
        out right now (its bytes tell the peer we are alive). Never raises."""
        if time.monotonic() - self.last_sent < HEARTBEAT_S or not self._send_lock.acquire(blocking=False):
            return
        try:
            if not self._closed:
                self._send_head(beat, 0)
        except (ChannelClosed, OSError):
            pass  # the owner's thread finds out for itself
        finally:
            self._send_lock.release()

    def has_unread(self) -> bool:
        """Whether bytes (or the peer's end of the connection) wait to be read: a peer is not
        silent while what it sent is still queued here, unread because we were busy."""
        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True  # closed under us: reading says so

    def _heard(self) -> None:
        self.last_received = time.monotonic()

    def send(self, message: Message, *blob: bytes | bytearray | memoryview) -> None:
        """Send one frame. The blob may come in several parts (sent in order, never joined)."""
        with self._send_lock:
            self._send_head(message, sum(memoryview(part).nbytes for part in blob))
            try:
                for part in blob:
                    self.sock.sendall(part)
                    self.last_sent = time.monotonic()
            except ConnectionError as e:
                raise ChannelClosed(str(e)) from e

    def recv(self) -> tuple[Message, bytearray]:
        """Receive one frame: its message and its blob."""
        message, blob_len = self.recv_header()
        try:
            blob = _recv_exactly(self.sock, blob_len, self._heard) if blob_len else bytearray()
        except ConnectionError as e:
            raise ChannelClosed(str(e)) from e
        return message, blob

    def recv_header(self) -> tuple[Message, int]:
        """Receive a frame's message and the length of its blob, which the caller must then
        take with `forward` (or the frame is not fully read)."""
        try:
            head_len, blob_len = _PREFIX.unpack(_recv_exactly(self.sock, _PREFIX.size))
            if head_len > _MAX_HEADER:
                raise ChannelClosed(f"malformed frame (header of {head_len} bytes)")
            message: Message = pickle.loads(_recv_exactly(self.sock, head_len))
        except ConnectionError as e:
            raise ChannelClosed(str(e)) from e
        self.last_received = time.monotonic()
        return message, blob_len

    def forward(self, message: Message, blob_len: int, source: Channel) -> bool:
        """Send a frame whose blob is the next `blob_len` bytes of `source`, streamed through a
        small buffer: a large result is relayed while it is still arriving, and never held whole.

        If `source` closes before its blob is complete, the frame is padded to its announced
        length (so this channel stays in step) and False is returned: the receiver must be
        told to discard it. Failures to send raise `ChannelClosed`.
        """
        with self._send_lock:
            return self._forward(message, blob_len, source)

    def _forward(self, message: Message, blob_len: int, source: Channel) -> bool:
        self._send_head(message, blob_len)
        buf = memoryview(bytearray(min(blob_len, _RELAY_CHUNK)))
        left = blob_len
        while left:
            try:
                n = source.sock.recv_into(buf, min(left, len(buf)))
            except ConnectionError:
                n = 0
            if n == 0:
                buf[:] = bytes(len(buf))
                while left:
                    left -= self._send_all(buf[: min(left, len(buf))])
                return False
            left -= self._send_all(buf[:n])
        return True

    def _send_all(self, data: memoryview) -> int:
        try:
            self.sock.sendall(data)
        except ConnectionError as e:
            raise ChannelClosed(str(e)) from e
        self.last_sent = time.monotonic()
        return len(data)

    def _send_head(self, message: Message, blob_len: int) -> None:
        head = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.sock.sendall(_PREFIX.pack(len(head), blob_len) + head)
        except ConnectionError as e:
            raise ChannelClosed(str(e)) from e
        self.last_sent = time.monotonic()

    def close(self) -> None:
        # Under the send lock: a heartbeat thread must never write to a descriptor number that
        # closing here frees (and that the next socket or pipe may take).
        with self._send_lock:
            self._closed = True
            self.sock.close()
