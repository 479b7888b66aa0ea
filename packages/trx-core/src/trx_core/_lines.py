"""Cutting a worker's output (a byte stream from its pipe) into text lines, one record each."""

from __future__ import annotations

__all__ = ["LineSplitter"]

_MAX_LINE = 1 << 16


class LineSplitter:
    """Cuts a worker's byte stream into text lines, for one record per line.

    ``\n`` ends a line (blank lines are kept: they are output too). A carriage return also
    ends a line, so each state of a progress bar (tqdm) becomes a readable record as soon as
    it is drawn, and blank pieces between carriage returns (a bar erasing itself) are
    dropped. ``\r\n`` is one line end even when split across two reads. A line longer than
    `_MAX_LINE` bytes is cut (at a UTF-8 character boundary), so no line holds memory unbounded.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._after_cr = False

    def feed(self, data: bytes) -> list[str]:
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        if data:
            self._after_cr = data.endswith(b"\r")
        *lines, rest = (self._pending + data).split(b"\n")
        pieces: list[bytes] = []
        for line in lines:
            pieces.extend(_cr_pieces(line) if b"\r" in line else (line,))
        if b"\r" in rest:
            done, _, rest = rest.rpartition(b"\r")
            pieces.extend(_cr_pieces(done))
        while len(rest) > _MAX_LINE:
            cut = _utf8_boundary(rest, _MAX_LINE)
            pieces.append(rest[:cut])
            rest = rest[cut:]
        self._pending = rest
        return [p.decode("utf-8", "backslashreplace") for p in pieces]

    def flush(self) -> list[str]:
        """The unterminated rest of the stream (at its end, or when its writer is gone)."""
        rest, self._pending = self._pending, b""
        return [rest.decode("utf-8", "backslashreplace")] if rest.strip() else []


def _cr_pieces(line: bytes) -> list[bytes]:
    return [p for p in line.split(b"\r") if p.strip()]


def _utf8_boundary(data: bytes, limit: int) -> int:
    cut = limit
    while cut > limit - 4 and (data[cut] & 0xC0) == 0x80:  # a continuation byte: back up
        cut -= 1
    return cut if cut > limit - 4 else limit
