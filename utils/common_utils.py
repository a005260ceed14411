"""Step 1 of preprocessing: the TSV file lists (upstream-spec §1.1, §3.2), the audio checks that run before
any heavy work, and the atomic writes every output goes through."""
import logging
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import soundfile
import torch
from tqdm import tqdm

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # one 25 ms analysis window: shorter clips give no MFCC frame and no model frame

log = logging.getLogger(__name__)


class BadAudioError(ValueError):
    """Audio files that the recipe cannot use; the message lists every one of them and why."""


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path`` and move it onto ``path`` only once it is complete, so a
    file under its final name is never half written (an interrupted run leaves at most a hidden .tmp)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def audio_problem(path) -> Tuple[int, Optional[str]]:
    """(num_samples, None) for a usable clip, else (0, why it is unusable). Reads only the header."""
    try:
        if os.path.getsize(path) == 0:
            return 0, "empty file (0 bytes)"
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        return 0, f"unreadable or corrupt ({e})"
    if info.frames <= 0:
        return 0, "no samples"
    problems = []
    if info.samplerate != SAMPLE_RATE:
        problems.append(f"sample rate {info.samplerate} Hz, expected {SAMPLE_RATE}")
    if info.channels != 1:
        problems.append(f"{info.channels} channels, expected mono")
    if info.frames < MIN_SAMPLES:
        problems.append(f"only {info.frames} samples, shorter than one 25 ms frame ({MIN_SAMPLES} samples)")
    return info.frames, "; ".join(problems) or None


def list_audio(root_dir: Path, extension: str = "flac") -> List[Path]:
    """Audio files under ``root_dir`` (symlinks followed), relative to it, sorted by path string so the
    order (and therefore the train/valid split) is the same on every filesystem. Hidden folders and
    files (name starting with '.') are ignored."""
    found = []
    for folder, dirs, files in os.walk(root_dir, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, f).relative_to(root_dir) for f in files
                  if f.endswith(f".{extension}") and not f.startswith(".")]
    return sorted(found, key=lambda p: p.as_posix())


@dataclass
class TsvSummary:
    train: List[Tuple[str, int]] = field(default_factory=list)  # (path relative to root, num_samples)
    valid: List[Tuple[str, int]] = field(default_factory=list)
    skipped: List[Tuple[Path, str]] = field(default_factory=list)  # (path, why)

    def hours(self) -> float:
        return sum(n for _, n in self.train + self.valid) / SAMPLE_RATE / 3600


def create_tsv(root_dir, tsv_dir, dataset: str = "librispeech", valid_percent: float = 0.01, seed: int = 0,
               extension: str = "flac", skip_bad: bool = False) -> TsvSummary:
    """Write ``{dataset}_train.tsv`` and ``{dataset}_valid.tsv`` (the latter only if valid_percent > 0).

    As upstream, only files whose full path contains "train" are used, and each draws one uniform number
    from a generator seeded with ``seed`` (a local ``torch.Generator``: same numbers as
    ``torch.manual_seed(seed)``, global RNG untouched); it goes to valid if the number <= valid_percent.
    Unlike upstream the files are taken in sorted order. Every used file's header is checked first; bad
    files raise one BadAudioError listing all of them, or with ``skip_bad`` are left out as if absent
    (they draw no number).
    """
    if not 0 <= valid_percent <= 1:
        raise ValueError(f"valid_percent must be in [0, 1], got {valid_percent}")
    root_dir, tsv_dir = Path(root_dir), Path(tsv_dir)
    if not root_dir.is_dir():
        raise FileNotFoundError(f"--root-dir {root_dir} is not a folder")
    generator = torch.Generator().manual_seed(seed)
    summary = TsvSummary()
    for rel in tqdm(list_audio(root_dir, extension), desc="checking audio", unit="file"):
        path = root_dir / rel
        if not re.match(".*train.*", str(path)):
            continue
        num_samples, problem = audio_problem(path)
        if problem:
            summary.skipped.append((path, problem))
            continue
        draw = torch.rand(1, generator=generator).item()
        in_valid = valid_percent > 0 and draw <= valid_percent  # a draw of exactly 0 stays in train at 0
        (summary.valid if in_valid else summary.train).append((str(rel), num_samples))
    if summary.skipped and not skip_bad:
        listing = "\n".join(f"  {path}: {why}" for path, why in summary.skipped)
        raise BadAudioError(f"{len(summary.skipped)} bad audio file(s) under {root_dir} (fix or remove them, "
                            f"or pass --skip-bad to leave them out):\n{listing}")
    for path, why in summary.skipped:
        log.warning("skipped %s: %s", path, why)
    if not summary.train:
        raise ValueError(f"no usable .{extension} file with 'train' in its path under {root_dir}")
    if valid_percent > 0 and not summary.valid:
        raise ValueError(f"no file fell into the valid split ({len(summary.train)} train files, valid_percent "
                         f"{valid_percent}): use more data or a larger --valid-percent")
    tsv_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": summary.train, "valid": summary.valid} if valid_percent > 0 else {"train": summary.train}
    for name, rows in splits.items():
        with atomic_write(tsv_dir / f"{dataset}_{name}.tsv", "w") as f:
            f.write(f"{root_dir}\n")
            f.writelines(f"{rel}\t{n}\n" for rel, n in rows)
    log.info("listed %d train / %d valid files (%d skipped) in %s", len(summary.train), len(summary.valid),
             len(summary.skipped), tsv_dir)
    return summary
