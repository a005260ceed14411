"""A TSV file list (spec §3.2: the audio root on the first line, then ``<relative path>\\t<num samples>`` per
utterance) held as three numpy arrays rather than a Python string per line, and parsed a block at a time with
numpy: at Libri-Light's 60 k h (17 M lines, ~1 GB) a rank holds ~0.3 GB and starts in seconds. A path is read
back from the file when its utterance is loaded."""
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import soundfile

from utils.common_utils import decode_utf8

from .text_blocks import FileRanges, whole_lines

BLOCK = 1 << 24  # bytes parsed at a time (the digit matrix of a block is ~5x its size)
TAB, ZERO = 9, 48
CHECK_ALL_UP_TO = 50_000  # utterances; longer lists check a sample of their files (each rank would stat them all)
CHECK_SAMPLE = 1000


class Manifest:
    """``lengths[i]`` samples at ``audio_path(i)``; ``starts``/``path_ends`` are byte offsets of the paths."""

    def __init__(self, tsv) -> None:
        self.tsv = Path(tsv)
        if not self.tsv.is_file():
            raise FileNotFoundError(f"{self.tsv}: TSV file list not found (run preprocess.py first)")
        self.root, self.starts, self.path_ends, self.lengths = _parse(self.tsv)
        if not len(self.lengths):
            raise ValueError(f"{self.tsv}: lists no utterances")
        self._file = FileRanges(self.tsv)

    def __len__(self) -> int:
        return len(self.lengths)

    def audio_path(self, index: int) -> str:
        return f"{self.root}/{self._file.read(int(self.starts[index]), int(self.path_ends[index])).decode()}"

    def check_files(self) -> None:
        """Every listed file exists and has the sample count listed (soundfile's header read, no decoding), or
        (long lists) a fixed sample of them, the first and the last: that catches a moved or unmounted corpus and
        a list made from other files, before training rather than at the file; a single file off is named when
        it is loaded."""
        n = len(self)
        picks = range(n) if n <= CHECK_ALL_UP_TO else sorted(
            {0, n - 1, *np.random.default_rng(0).choice(n, min(CHECK_SAMPLE, n), replace=False).tolist()})
        checked = "listed" if n <= CHECK_ALL_UP_TO else f"of {len(picks)} checked"
        missing = [p for p in map(self.audio_path, picks) if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{self.tsv}: {len(missing)} {checked} audio file(s) do not exist, "
                                    f"first: {missing[0]}")
        off = list(filter(None, map(self._length_problem, picks)))
        if off:
            raise ValueError(f"{self.tsv}: {len(off)} {checked} audio file(s) do not have the sample count it lists "
                             f"(files changed since the list was made: run preprocess.py again), first: {off[0]}")

    def _length_problem(self, index: int) -> Optional[str]:
        path = self.audio_path(index)
        try:
            frames = soundfile.info(path).frames
        except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
            return f"{path} (line {index + 2}): unreadable ({e})"
        if frames != self.lengths[index]:
            return f"{path} (line {index + 2}): {frames} samples, listed as {self.lengths[index]}"
        return None


def _parse(tsv: Path) -> Tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    starts, path_ends, lengths = [], [], []
    with open(tsv, "rb") as f:
        first = f.readline()
        root, lineno = decode_utf8(first, tsv).rstrip("\n"), 2
        for offset, block, ends in whole_lines(f, BLOCK):
            decode_utf8(block.tobytes(), tsv, lineno)  # paths are decoded when loaded: a bad byte is named now
            line_starts, tabs, values = _parse_lines(tsv, block, ends, lineno)
            starts.append(offset + line_starts)
            path_ends.append(offset + tabs)
            lengths.append(values)
            lineno += len(ends)
    join = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    return root, join(starts), join(path_ends), join(lengths)


def _parse_lines(tsv: Path, block: np.ndarray, ends: np.ndarray, lineno: int):
    """Line starts, tab positions and sample counts of whole lines; the first malformed line is named."""
    line_starts = np.concatenate([[0], ends[:-1] + 1])
    tabs = np.flatnonzero(block == TAB)
    tabs_per_line = np.bincount(np.searchsorted(ends, tabs), minlength=len(ends))
    bad = tabs_per_line != 1
    if not bad.any():
        width = ends - tabs - 1
        bad = (width < 1) | (width > 18)
    if not bad.any():
        columns = np.arange(width.max())
        inside = columns < width[:, None]
        digits = block[np.minimum(tabs[:, None] + 1 + columns, len(block) - 1)].astype(np.int64) - ZERO
        bad = (inside & ((digits < 0) | (digits > 9))).any(axis=1)
    if not bad.any():
        powers = 10 ** np.maximum(width[:, None] - 1 - columns, 0)
        return line_starts, tabs, (np.where(inside, digits, 0) * powers).sum(axis=1)
    i = int(np.flatnonzero(bad)[0])
    line = block[line_starts[i]:ends[i]].tobytes().decode(errors="replace")
    raise ValueError(f"{tsv}:{lineno + i}: expected '<relative path>\\t<num samples>', got {line!r}")
