"""Cost of preprocess.py's audio checks (--audio-check header | tail | full), per file and per audio hour, and
what it comes to for LibriSpeech 960 h (281,241 files).

    python bench/audio_check.py                                   # 200 generated noise FLACs
    python bench/audio_check.py --audio-dir ../shared/realspeech  # real LibriSpeech files (any folder of .flac)

CPU time of one thread (best of --rounds), files in the page cache, so the figures are the decoding cost; the
disk's reads come on top (header and tail read a few kB per file, full reads every byte: ~60 GB at 960 h).
preprocess.py runs the check on one thread per core.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from bench.data_path import librispeech_like_lengths, write_corpus  # noqa: E402
from utils.common_utils import AUDIO_CHECKS, audio_problem, list_audio  # noqa: E402

LIBRISPEECH_HOURS, LIBRISPEECH_FILES = 960.0, 281241


def time_checks(files, rounds: int) -> dict:
    """CPU seconds of each check over all files (best of ``rounds``); every file must pass."""
    cpu = {}
    for check in AUDIO_CHECKS:
        best = float("inf")
        for _ in range(rounds):
            start = time.process_time()
            problems = [audio_problem(f, check)[1] for f in files]
            best = min(best, time.process_time() - start)
        if any(problems):
            raise ValueError(f"{check} check found problems: {[p for p in problems if p][:3]}")
        cpu[check] = best
    return cpu


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio-dir", type=Path, help="folder of .flac files (default: generated noise)")
    p.add_argument("--files", type=int, default=200, help="generated files")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.audio_dir:
            files = [args.audio_dir / rel for rel in list_audio(args.audio_dir)]
        else:
            write_corpus(Path(tmp), librispeech_like_lengths(args.files, seed=2))
            files = [Path(tmp) / "audio" / rel for rel in list_audio(Path(tmp) / "audio")]
        hours = sum(soundfile.info(str(f)).frames for f in files) / 16000 / 3600
        cpu = time_checks(files, args.rounds)
    print(f"{len(files)} files, {hours:.2f} h of audio ({3600 * hours / len(files):.1f} s per file), 1 thread")
    print(f"{'check':<8}{'ms / file':>11}{'CPU s / audio h':>17}{'CPU min at 960 h':>18}{'by file count':>15}")
    rows = {}
    for check, seconds in cpu.items():
        rows[check] = dict(ms_per_file=1e3 * seconds / len(files), s_per_hour=seconds / hours,
                           min_960h=seconds / hours * LIBRISPEECH_HOURS / 60,
                           min_files=seconds / len(files) * LIBRISPEECH_FILES / 60)
        r = rows[check]
        print(f"{check:<8}{r['ms_per_file']:>11.3f}{r['s_per_hour']:>17.2f}{r['min_960h']:>18.1f}{r['min_files']:>15.1f}")
    return rows


if __name__ == "__main__":
    main()
