"""Overlap reading, computing and writing: a three-stage thread pipeline with bounded memory.

A checkpoint merge reads gigabytes, does a little arithmetic on them and writes gigabytes. Done one
step after the other, the disk waits while the CPU merges and the CPU waits while the disk reads
or writes. :func:`run_pipeline` runs the three steps in three threads joined by bounded queues:
the file reads (``readinto``), the tensor math and the file writes all release the GIL, so they
run in parallel on separate cores.

Memory stays bounded because every block lives in a buffer taken from a :class:`BufferPool` of a
fixed number of fixed-size buffers: the reader waits for a free buffer when the writer falls
behind. Reusing buffers also avoids the page faults a fresh multi-megabyte allocation costs on
every block (the kernel zero-fills each new page; on small cloud VMs that costs as much as the
merge arithmetic itself).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from vlmsafe.errors import InternalError

T = TypeVar("T")
U = TypeVar("U")

_DONE = object()
_POLL_S = 0.1


class BufferPool:
    """``count`` reusable byte buffers of ``nbytes`` each, plus a byte budget for larger requests.

    :meth:`take` blocks while every buffer is in use, or while the larger buffers handed out exceed
    ``oversize_budget`` bytes (one request is always served when none is outstanding): that is what
    bounds the pipeline's memory. Buffers are allocated lazily, so pages a buffer never touches never
    become resident.
    """

    def __init__(self, count: int, nbytes: int, *, oversize_budget: int = 1 << 30) -> None:
        self.nbytes = nbytes
        self._count = count
        self._made = 0
        self._free: list[torch.Tensor] = []
        self._pooled: dict[int, torch.Tensor] = {}  # storage address -> pooled buffer
        self._budget = oversize_budget
        self._oversize: dict[int, int] = {}  # storage address -> bytes, for oversize buffers handed out
        self._cond = threading.Condition()

    def take(self, nbytes: int, stop: threading.Event | None = None) -> torch.Tensor:
        """A uint8 tensor of exactly ``nbytes`` (a view of a pooled buffer when it fits)."""
        with self._cond:
            if nbytes > self.nbytes:
                while self._oversize and sum(self._oversize.values()) + nbytes > self._budget:
                    self._wait(stop)
                buf = torch.empty(nbytes, dtype=torch.uint8)
                self._oversize[buf.untyped_storage().data_ptr()] = nbytes
                return buf
            while not self._free and self._made >= self._count:
                self._wait(stop)
            if not self._free:
                self._made += 1
                buf = torch.empty(self.nbytes, dtype=torch.uint8)
                self._pooled[buf.untyped_storage().data_ptr()] = buf
                self._free.append(buf)
            return self._free.pop()[:nbytes]

    def _wait(self, stop: threading.Event | None) -> None:
        self._cond.wait(timeout=_POLL_S)
        if stop is not None and stop.is_set():
            raise _Stopped

    def give(self, buffers: Iterable[torch.Tensor]) -> None:
        """Return buffers obtained from :meth:`take` (or views of them)."""
        with self._cond:
            for b in buffers:
                ptr = b.untyped_storage().data_ptr()
                if ptr in self._pooled:
                    if any(f.untyped_storage().data_ptr() == ptr for f in self._free):
                        raise InternalError("a pooled buffer was returned twice")
                    self._free.append(self._pooled[ptr])
                else:
                    self._oversize.pop(ptr, None)
            self._cond.notify_all()


class _Stopped(Exception):
    """Raised inside a stage when another stage failed and the pipeline is shutting down."""


def run_pipeline(
    source: Iterable[T],
    stage: Callable[[T], U],
    sink: Callable[[U], None],
    *,
    depth: int = 2,
    stop: threading.Event | None = None,
) -> None:
    """Iterate ``source`` in a reader thread, apply ``stage`` here, feed ``sink`` in a writer thread.

    Order is preserved. The first exception of any stage stops the others and is re-raised here
    (``KeyboardInterrupt`` included), after both threads have finished. Pass ``stop`` to let
    ``source`` (e.g. a :meth:`BufferPool.take` in it) notice the shutdown.
    """
    stop = stop or threading.Event()
    q_in: queue.Queue[object] = queue.Queue(maxsize=depth)
    q_out: queue.Queue[object] = queue.Queue(maxsize=depth)
    errors: list[BaseException] = []

    def fail(exc: BaseException) -> None:
        if not isinstance(exc, _Stopped):
            errors.append(exc)
        stop.set()

    def put(q: queue.Queue[object], x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue[object]) -> object:
        while not stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return _DONE

    def reader() -> None:
        try:
            for x in source:
                if not put(q_in, x):
                    return
            put(q_in, _DONE)
        except BaseException as exc:
            fail(exc)

    def writer() -> None:
        try:
            while (y := get(q_out)) is not _DONE:
                sink(y)  # type: ignore[arg-type]
        except BaseException as exc:
            fail(exc)
        finally:
            stop_writer.set()

    stop_writer = threading.Event()
    threads = [threading.Thread(target=reader, name="vlmsafe-read", daemon=True),
               threading.Thread(target=writer, name="vlmsafe-write", daemon=True)]
    for t in threads:
        t.start()
    try:
        while (x := get(q_in)) is not _DONE:
            if not put(q_out, stage(x)):  # type: ignore[arg-type]
                break
        else:
            put(q_out, _DONE)
        while not stop_writer.wait(_POLL_S):  # let the writer drain the queue (or fail)
            if stop.is_set():
                break
    except BaseException as exc:
        fail(exc)
    finally:
        if errors:
            stop.set()
        for t in threads:
            t.join()
        if hasattr(source, "close"):
            source.close()  # type: ignore[union-attr]
    if errors:
        raise errors[0]
