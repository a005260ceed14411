"""Step 1 of preprocessing: the TSV file lists (upstream-spec §1.1, §3.2), the audio checks that run before
any heavy work, and the atomic writes every output goes through."""
import glob
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import soundfile
import torch
from tqdm import tqdm

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # one 25 ms analysis window: shorter clips give no MFCC frame and no model frame

log = logging.getLogger(__name__)


class BadAudioError(ValueError):
    """Audio files that the recipe cannot use; the message lists every one of them and why."""


def decode_utf8(data: bytes, path, first_line: int = 1) -> str:
    """``data`` (whole lines of ``path`` from line ``first_line`` on) as text; a byte that is not UTF-8 is an
    error naming the file and its line rather than a traceback (paths are decoded when their audio is loaded)."""
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        start, end = data.rfind(b"\n", 0, e.start) + 1, data.find(b"\n", e.start)
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason}): {data[start:end if end >= 0 else None]!r}; "
                         "file lists are written as UTF-8") from None


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path`` and move it onto ``path`` only once it is complete, so a
    file under its final name is never half written (an interrupted run leaves at most a hidden .tmp). A write
    that fails (a full disk: ENOSPC, a file-size limit: EFBIG) names ``path``; what was there stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, f"{e.strerror} while writing", str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temp_files(*paths) -> None:
    """Remove what killed runs left of ``atomic_write(path)``: for outputs that one process alone writes (a
    shard's files), which can be as large as the shard."""
    for path in map(Path, paths):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def load_audio(path, num_samples: Optional[int] = None, listed_in: str = "the TSV") -> torch.Tensor:
    """Channel 0 of a 16 kHz file as float32 in [-1, 1) (what ``torchaudio.load`` gives); every reader of the
    recipe's audio goes through it, so a file that cannot be decoded (corrupt mid-file too), another rate, a
    length other than ``num_samples`` (as ``listed_in`` says) or NaN/inf samples (float audio; they would make
    every loss NaN) is an error naming the file."""
    try:
        waveform, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise ValueError(f"{path}: cannot decode audio: {e}") from e
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {sample_rate} Hz, expected {SAMPLE_RATE}")
    if num_samples is not None and len(waveform) != num_samples:
        raise ValueError(f"{path}: has {len(waveform)} samples but {listed_in} says {num_samples} "
                         "(file changed, truncated or corrupt since the file list was made)")
    problem = nonfinite_problem(waveform, 0)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return torch.from_numpy(waveform[:, 0].copy())


def nonfinite_problem(samples: np.ndarray, first: int) -> Optional[str]:
    """Where ``samples`` (frames x channels, from sample ``first`` of a file) hold NaN or inf, if they do."""
    bad = np.flatnonzero(~np.isfinite(samples).all(axis=1))
    return f"sample {first + int(bad[0])} is NaN or inf (float audio)" if len(bad) else None


AUDIO_CHECKS = ("header", "tail", "full")
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")  # the only ones that can hold NaN or inf
TAIL_SAMPLES = 4096  # the last ~0.26 s: a few FLAC frames


def audio_problem(path, check: str = "tail") -> Tuple[int, Optional[str]]:
    """(num_samples, None) for a usable clip, else (num_samples or 0, why it is unusable).

    ``check`` is how much is read: ``header`` the header only; ``tail`` also decodes the last TAIL_SAMPLES
    samples after a seek, which catches a file cut short (its header still gives the full length);
    ``full`` decodes every sample, which also catches corrupt frames in the middle. Float audio (whatever the
    file's name says: libsndfile reads the header) is decoded in full beyond ``header``, as any of its samples
    may be NaN or inf; ``load_audio`` refuses those too."""
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
    if not problems and check != "header":
        problems.append(decode_problem(path, info.frames, full=check == "full" or info.subtype in FLOAT_SUBTYPES))
    return info.frames, "; ".join(filter(None, problems)) or None


def decode_problem(path, num_samples: int, full: bool) -> Optional[str]:
    """None if the samples decode up to the length the header gives (all of them, or the tail after a seek), and
    are finite."""
    start = 0 if full else max(0, num_samples - TAIL_SAMPLES)
    decoded = start
    try:
        with soundfile.SoundFile(str(path)) as f:
            f.seek(start)
            for block in f.blocks(1 << 16, dtype="float32", always_2d=True):
                problem = nonfinite_problem(block, decoded)
                if problem:
                    return problem
                decoded += len(block)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        return f"cannot be decoded up to sample {num_samples}: truncated or corrupt ({e})"
    if decoded != num_samples:
        return f"decodes to {decoded} samples but its header says {num_samples}: truncated or corrupt"
    return None


def check_audio(paths: List[Path], check: str = "tail",
                workers: Optional[int] = None) -> List[Tuple[int, Optional[str]]]:
    """``audio_problem`` of every path, in order, on a pool of threads (libsndfile releases the GIL while it
    decodes, and reads overlap on network file systems); one thread per available core by default."""
    with ThreadPool(workers or len(os.sched_getaffinity(0))) as pool:
        return list(tqdm(pool.imap(partial(audio_problem, check=check), paths, chunksize=16), total=len(paths),
                         desc=f"checking audio ({check})", unit="file"))


def list_audio(root_dir: Path, extension: str = "flac",
               keep: Callable[[Path], bool] = lambda rel: True) -> List[Path]:
    """Audio files under ``root_dir``, relative to it, that ``keep`` accepts, sorted by path string so the order
    (and therefore the train/valid split) is the same on every filesystem. Hidden folders and files (name
    starting with '.') are ignored. Symbolic links are followed (corpora are assembled with them), but not into
    a folder being walked (a link loop ends), and each real file (reached through links, or hard-linked) is
    listed once, under the first of its accepted paths: an alias folder cannot list one utterance twice, e.g.
    in both train and valid."""
    ancestors = {os.fspath(root_dir): {_identity(root_dir)}}
    paths = {}
    for folder, dirs, files in os.walk(root_dir, followlinks=True):
        below = ancestors.pop(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and _identity(os.path.join(folder, d)) not in below]
        ancestors.update({os.path.join(folder, d): below | {_identity(os.path.join(folder, d))} for d in dirs})
        for f in files:
            rel = Path(folder, f).relative_to(root_dir)
            if f.endswith(f".{extension}") and not f.startswith(".") and keep(rel):
                paths.setdefault(_identity(Path(folder, f)), []).append(rel)
    return sorted((min(same, key=lambda p: p.as_posix()) for same in paths.values()), key=lambda p: p.as_posix())


def _identity(path) -> tuple:
    """(device, inode) of what ``path`` points to; the path itself for a dangling link (listed, then reported
    unreadable by the audio check)."""
    try:
        st = os.stat(path)
    except OSError:
        return (str(path),)
    return st.st_dev, st.st_ino


@dataclass
class TsvSummary:
    train: List[Tuple[str, int]] = field(default_factory=list)  # (path relative to root, num_samples)
    valid: List[Tuple[str, int]] = field(default_factory=list)
    skipped: List[Tuple[Path, str]] = field(default_factory=list)  # (path, why)

    def hours(self) -> float:
        return sum(n for _, n in self.train + self.valid) / SAMPLE_RATE / 3600


def create_tsv(root_dir, tsv_dir, dataset: str = "librispeech", valid_percent: float = 0.01, seed: int = 0,
               extension: str = "flac", skip_bad: bool = False, check: str = "tail",
               workers: Optional[int] = None) -> TsvSummary:
    """Write ``{dataset}_train.tsv`` and ``{dataset}_valid.tsv`` (the latter only if valid_percent > 0).

    As upstream, only files whose path contains "train" are used, but only the path below ``root_dir`` counts
    (upstream matched the full path, so a root under a folder named like "train..." let dev and test in), and
    each real file once (``list_audio``). Each draws one uniform number from a generator seeded with ``seed``
    (a local ``torch.Generator``: same numbers as ``torch.manual_seed(seed)``, global RNG untouched); it goes
    to valid if the number <= valid_percent.
    Unlike upstream the files are taken in sorted order, and when no draw falls into valid (a small corpus)
    the file with the smallest draw goes there. Every used file is checked first (``audio_problem`` with
    ``check``); bad files raise one BadAudioError listing all of them, or with ``skip_bad`` are left out as
    if absent (they draw no number).
    """
    if not 0 <= valid_percent <= 1:
        raise ValueError(f"valid_percent must be in [0, 1], got {valid_percent}")
    root_dir, tsv_dir = Path(root_dir), Path(tsv_dir)
    if not root_dir.is_dir():
        raise FileNotFoundError(f"--root-dir {root_dir} is not a folder")
    used = list_audio(root_dir, extension, keep=lambda rel: "train" in rel.as_posix())
    generator = torch.Generator().manual_seed(seed)
    summary, rows = TsvSummary(), []
    for rel, (num_samples, problem) in zip(used, check_audio([root_dir / rel for rel in used], check, workers)):
        if problem:
            summary.skipped.append((root_dir / rel, problem))
        else:
            rows.append((str(rel), num_samples, torch.rand(1, generator=generator).item()))
    if summary.skipped and not skip_bad:
        listing = "\n".join(f"  {path}: {why}" for path, why in summary.skipped)
        raise BadAudioError(f"{len(summary.skipped)} bad audio file(s) under {root_dir} (fix or remove them, "
                            f"or pass --skip-bad to leave them out):\n{listing}")
    for path, why in summary.skipped:
        log.warning("skipped %s: %s", path, why)
    if not rows:
        raise ValueError(f"no usable .{extension} file with 'train' in its path below {root_dir} (its own name "
                         "does not count: for a folder such as train-clean-100, pass the folder above it)")
    in_valid = [valid_percent > 0 and draw <= valid_percent for _, _, draw in rows]  # a draw of 0 stays at 0
    if valid_percent > 0 and not any(in_valid):
        if len(rows) < 2:
            raise ValueError(f"a valid split needs at least 2 usable files, {root_dir} has 1: add files or "
                             "pass --valid-percent 0")
        smallest = min(range(len(rows)), key=lambda i: rows[i][2])
        in_valid[smallest] = True
        log.info("no draw of the %d files fell into the valid split (valid_percent %g): moved %s (the smallest "
                 "draw) to valid", len(rows), valid_percent, rows[smallest][0])
    for (rel, num_samples, _), valid in zip(rows, in_valid):
        (summary.valid if valid else summary.train).append((rel, num_samples))
    if not summary.train:
        raise ValueError(f"every file of {root_dir} fell into the valid split: lower --valid-percent")
    tsv_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": summary.train, "valid": summary.valid} if valid_percent > 0 else {"train": summary.train}
    for name, split_rows in splits.items():
        with atomic_write(tsv_dir / f"{dataset}_{name}.tsv", "w") as f:
            f.write(f"{root_dir}\n")
            f.writelines(f"{rel}\t{n}\n" for rel, n in split_rows)
    log.info("listed %d train / %d valid files (%d skipped) in %s", len(summary.train), len(summary.valid),
             len(summary.skipped), tsv_dir)
    return summary
