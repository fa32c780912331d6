"""A step's output, kept within a cap: the head and the tail of stdout and of stderr, the middle
cut out with a visible marker saying how many bytes were cut.

Each stream keeps at most `cap` bytes while the step runs (its first half-cap and its last
half-cap), so memory stays bounded however much a task writes. When the step ends, stdout and
stderr share the cap: each gets half, and what one does not use the other may.

Output is text: bytes that are not UTF-8, and NUL characters (which PostgreSQL cannot store in
text), become U+FFFD.
"""

from __future__ import annotations


class CappedStream:
    """One stream's first `cap // 2` bytes and its last `cap - cap // 2`, and how many it wrote."""

    def __init__(self, cap: int) -> None:
        self._head_max = cap // 2
        self._tail_max = cap - self._head_max
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self._head_max - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self._tail_max:
                del self.tail[: len(self.tail) - self._tail_max]

    def kept(self, budget: int) -> str:
        """The stream within `budget` bytes (at most its cap): all of it, or head, marker, tail."""
        if self.total <= budget:
            return as_text(bytes(self.head) + bytes(self.tail))
        head_n = budget // 2
        tail_n = budget - head_n
        # nothing dropped yet: the tail may be shorter than its share, the head holds the rest
        whole = self.head + self.tail if self.total == len(self.head) + len(self.tail) else None
        head = bytes((whole or self.head)[:head_n])
        tail_of = whole or self.tail
        tail = bytes(tail_of[len(tail_of) - tail_n :]) if tail_n else b""
        return as_text(head) + cut_marker(self.total - len(head) - len(tail)) + as_text(tail)


def as_text(data: bytes) -> str:
    """Output bytes as text: what is not UTF-8, and NUL, shown as U+FFFD."""
    return data.decode(errors="replace").replace("\x00", "\ufffd")


def cut_marker(cut: int) -> str:
    """The line that stands where output was cut."""
    return f"\n[tickle] ... {cut} bytes cut here ...\n"


def cut_to_cap(stdout: CappedStream, stderr: CappedStream, cap: int) -> tuple[str, str]:
    """stdout and stderr together within `cap` bytes (plus markers): half each, and what one
    leaves unused goes to the other."""
    half = cap // 2
    out_budget = min(stdout.total, max(half, cap - stderr.total))
    err_budget = min(stderr.total, cap - out_budget)
    return stdout.kept(out_budget), stderr.kept(err_budget)
