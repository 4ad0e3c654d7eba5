"""An upload's undo log: what a streamed sum took in from one upload, kept out of memory, so
the sum can give it back when the upload is refused after part of it was folded.

Every run of values folded into a sum is also written, at its own byte offset, to an unlinked
temporary file: the kernel's page cache holds it (written back to disk under memory pressure,
freed with the file), never the process's RSS. Refused, the runs are read back in bounded
blocks and subtracted (`fedsky.streaming`, `fedsky.streaming_masked`); accepted, the file is
closed and its space is freed. The directory must be on a disk, not a tmpfs (where the file
would be memory after all): the coordinator uses the run's output directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedsky.errors import FedskyError

BLOCK_BYTES = 4 << 20  # what one read-back holds in memory


class UndoLog:
    """Byte ranges of one upload's folded values, as folded (weighted, masked: as summed)."""

    def __init__(self, directory: str | Path | None, what: str) -> None:
        self.what = what  # for errors: "the update from site-a"
        try:
            # it lives until `close` (when the round is summed), not for one block
            self._file = tempfile.TemporaryFile(  # noqa: SIM115
                dir=directory, prefix="fedsky-undo-")
        except OSError as err:
            raise FedskyError(f"cannot open an undo log for {what} in {directory}: {err}"
                              ) from None
        self._fd = self._file.fileno()

    def record(self, offset: int, data: memoryview | np.ndarray) -> None:
        """Keep bytes [offset, offset + len) as they went into the sum."""
        view = memoryview(data).cast("B")
        try:
            while len(view):
                done = os.pwrite(self._fd, view, offset)
                view, offset = view[done:], offset + done
        except OSError as err:  # e.g. the disk is full: refuse the upload, keep the round
            raise FedskyError(f"cannot record {self.what} in its undo log: {err}") from None

    def blocks(self, start: int, end: int) -> Iterator[tuple[int, memoryview]]:
        """Bytes [start, end) back, in blocks of at most BLOCK_BYTES, as (offset, bytes); each
        block is valid until the next is read (one buffer is reused)."""
        buf = bytearray(min(BLOCK_BYTES, max(end - start, 0)))
        while start < end:
            view = memoryview(buf)[: min(len(buf), end - start)]
            got = os.preadv(self._fd, [view], start)
            if got != len(view):
                raise FedskyError(f"the undo log of {self.what} is short: {got} of "
                                  f"{len(view)} bytes at {start}")
            yield start, view
            start += got

    def close(self) -> None:
        self._file.close()
