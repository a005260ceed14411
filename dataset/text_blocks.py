"""A text file read as numpy blocks of whole lines: how the TSV and the text labels are parsed at any size
with bounded memory (a block, not the file) and without a Python object per line; and read back a range at a
time (``FileRanges``)."""
import os
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Tuple

import numpy as np

NEWLINE = 10


def whole_lines(f: BinaryIO, block_size: int) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """(file offset, bytes of whole lines as uint8, positions of their newlines) for the rest of ``f``, about
    ``block_size`` bytes at a time; a last line without a newline is given one."""
    offset, rest = f.tell(), b""
    while True:
        data = f.read(block_size)
        buf = rest + data
        if not data and buf and not buf.endswith(b"\n"):
            buf += b"\n"
        block = np.frombuffer(buf, dtype=np.uint8)
        ends = np.flatnonzero(block == NEWLINE)
        used = int(ends[-1]) + 1 if len(ends) else 0
        if used:
            yield offset, block[:used], ends
            offset += used
        rest = buf[used:]
        if not data:
            return


class FileRanges:
    """Byte ranges of a file, read with pread from a descriptor each process opens on first use: pickled into a
    DataLoader worker it carries the path, not an open file."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def read(self, start: int, end: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, end - start, start)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
