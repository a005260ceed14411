"""The espeak-ng demo corpus tool (real synthesis into tmp_path) and the committed demo_data/ corpus."""
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tools.make_demo_corpus import (MAX_SAMPLES, MIN_SAMPLES, frame_phones, make_corpus, make_speakers,
                                    make_text, parse_args)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--train-speakers", "1", "--dev-speakers", "1", "--utts-per-speaker", "2", "--jobs", "2"]


def read_alignments(folder):
    alignments = {}
    for path in sorted((folder / "alignments").glob("*.tsv")):
        lines = path.read_text().splitlines()
        ids = [line.split("\t")[0] for line in lines]
        assert ids == sorted(ids), f"{path} is not sorted by utterance id"
        alignments.update((line.split("\t")[0], line.split("\t")[1].split()) for line in lines)
    return alignments


def digests(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "corpus"
    summary = make_corpus(parse_args(["--out", str(out)] + TINY))
    return out, summary


def test_frame_phones_takes_the_phone_at_each_frame_centre():
    # segments: sil [0, 500), a [500, 700), b [700, ...); frame centres 200, 360, 520, 680, 840
    phones = frame_phones(1040, [0, 500, 700], ["sil", "a", "b"])
    assert len(phones) == (1040 - 400) // 160 + 1 == 5
    assert phones == ["sil", "sil", "a", "a", "b"]


def test_text_and_speakers_are_drawn_from_the_seed():
    spoken, transcript = make_text(np.random.default_rng([3, 1]), 20)
    assert (spoken, transcript) == make_text(np.random.default_rng([3, 1]), 20)
    assert len(transcript.split()) >= 20 and re.fullmatch(r"[A-Z' ]+", transcript)
    train = make_speakers(0, "train-clean-100", 12, 1.0)
    dev = make_speakers(0, "dev-clean", 3, 1.0)
    assert len({s.voice for s in train + dev}) == 15  # distinct voices, dev unlike train
    assert [s.voice for s in make_speakers(0, "train-clean-100", 4, 1.0)] == [s.voice for s in train[:4]]


def test_tiny_corpus_layout_audio_and_transcripts(tiny):
    out, summary = tiny
    assert summary.startswith("2 speakers (1 train, 1 dev), 4 utterances")
    flacs = sorted((out / "LibriSpeech").rglob("*.flac"))
    assert [f.relative_to(out / "LibriSpeech").as_posix() for f in flacs] == [
        "dev-clean/900/9001/900-9001-0000.flac", "dev-clean/900/9001/900-9001-0001.flac",
        "train-clean-100/100/1001/100-1001-0000.flac", "train-clean-100/100/1001/100-1001-0001.flac"]
    for flac in flacs:
        info = sf.info(flac)
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        assert MIN_SAMPLES <= info.frames <= MAX_SAMPLES
    trans = (out / "LibriSpeech/train-clean-100/100/1001/100-1001.trans.txt").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in trans] == ["100-1001-0000", "100-1001-0001"]
    assert all(re.fullmatch(r"[A-Z' ]+", line.split(" ", 1)[1]) for line in trans)
    assert "python tools/make_demo_corpus.py --out" in (out / "README.txt").read_text()
    assert not list(out.rglob("*.tmp"))


def test_tiny_corpus_alignments_cover_the_audio(tiny):
    out, _ = tiny
    alignments = read_alignments(out)
    assert sorted(alignments) == ["100-1001-0000", "100-1001-0001", "900-9001-0000", "900-9001-0001"]
    for flac in (out / "LibriSpeech").rglob("*.flac"):
        audio, _ = sf.read(flac, dtype="float64")
        phones = alignments[flac.stem]
        assert len(phones) == (len(audio) - 400) // 160 + 1
        assert phones[0] == phones[-1] == "sil"  # noise-only lead and tail
        speech = [p for p in phones if p != "sil"]
        assert len(speech) > 0.5 * len(phones) and len(set(speech)) >= 10
        energy = np.array([np.mean(audio[160 * i:160 * i + 400] ** 2) for i in range(len(phones))])
        is_sil = np.array(phones) == "sil"
        assert np.median(energy[~is_sil]) > 100 * np.median(energy[is_sil])  # labels follow the audio


def test_rerun_is_byte_identical_and_independent_of_the_folder(tiny, tmp_path):
    out, _ = tiny
    before = digests(out)
    make_corpus(parse_args(["--out", str(out)] + TINY[:-1] + ["1"]))  # same corpus, one job
    assert digests(out) == before
    other = tmp_path / "other"
    make_corpus(parse_args(["--out", str(other)] + TINY))
    same = {k: v for k, v in digests(other).items() if k.name != "README.txt"}
    assert same == {k: v for k, v in before.items() if k.name != "README.txt"}


def test_refuses_to_mix_with_files_of_another_corpus(tiny):
    out, _ = tiny
    with pytest.raises(SystemExit, match=r"900-9001-0001.flac \(and 1 more\) is not part of this corpus"):
        make_corpus(parse_args(["--out", str(out), "--train-speakers", "1", "--dev-speakers", "1",
                                "--utts-per-speaker", "1"]))


def test_committed_demo_corpus_is_consistent():
    root = REPO / "demo_data"
    alignments = read_alignments(root)
    flacs = sorted((root / "LibriSpeech").rglob("*.flac"))
    assert sorted(f.stem for f in flacs) == sorted(alignments)
    speakers = {subset: {f.parent.parent.name for f in flacs if f"/{subset}/" in f.as_posix()}
                for subset in ("train-clean-100", "dev-clean")}
    assert len(speakers["train-clean-100"]) >= 8 and len(speakers["dev-clean"]) >= 2
    assert not speakers["train-clean-100"] & speakers["dev-clean"]
    total = 0
    for flac in flacs:
        info = sf.info(flac)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert MIN_SAMPLES <= info.frames <= MAX_SAMPLES, flac
        assert len(alignments[flac.stem]) == (info.frames - 400) // 160 + 1, flac
        transcripts = (flac.parent / f"{flac.parent.parent.name}-{flac.parent.name}.trans.txt").read_text()
        assert re.search(rf"^{flac.stem} [A-Z' ]+$", transcripts, re.M), flac
        total += info.frames
    assert 4 <= total / 16000 / 60 <= 6
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) <= 8e6
    assert "python tools/make_demo_corpus.py --out demo_data" in (root / "README.txt").read_text()
