"""A text file read as numpy blocks of whole lines: how the TSV and the text labels are parsed at any size
with bounded memory (a block, not the file) and without a Python object per line."""
from typing import BinaryIO, Iterator, Tuple

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
