"""File lists (create_tsv), the audio checks and atomic writes, on real FLAC files.

A file is used if "train" appears in its path below the root (upstream looked at the root's path too, so
pytest's tmp_path, which holds the test name, could let files in).
"""
import os
import resource

import numpy as np
import pytest
import soundfile
import torch

from utils.common_utils import BadAudioError, atomic_write, audio_problem, create_tsv, list_audio, load_audio

# Sample counts of the corpus's train files, in sorted path order: 0.5 s to 2.3 s, none a round number of
# frames, so frame-count formulas are really exercised.
TRAIN_SAMPLES = [8000 + 4123 * i for i in range(8)]


def tone(num_samples: int, freq: float, seed: int, channels: int = 1) -> np.ndarray:
    t = np.arange(num_samples) / 16000
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(seed).standard_normal(num_samples)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def make_corpus(root):
    """A LibriSpeech-like tree: 8 train clips over 2 speakers, a dev-clean clip (no 'train' in its path),
    and a hidden folder and a hidden file that must be ignored. Returns the train clips' relative paths
    (sorted) with their sample counts."""
    files = []
    for i, n in enumerate(TRAIN_SAMPLES):
        speaker = 103 + i % 2
        rel = f"LibriSpeech/train-clean-100/{speaker}/1240/{speaker}-1240-{i:04d}.flac"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(root / rel, tone(n, 150 + 40 * i, i), 16000, subtype="PCM_16")
        files.append((rel, n))
    (root / "LibriSpeech/dev-clean/1/2").mkdir(parents=True)
    soundfile.write(root / "LibriSpeech/dev-clean/1/2/1-2-0000.flac", tone(9000, 300, 99), 16000)
    (root / ".trash/train-clean-100").mkdir(parents=True)
    soundfile.write(root / ".trash/train-clean-100/old.flac", tone(9000, 300, 98), 16000)
    soundfile.write(root / "LibriSpeech/train-clean-100/.hidden-train.flac", tone(9000, 300, 97), 16000)
    return sorted(files)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def read_lines(path):
    return path.read_text().splitlines()


def test_tsv_format_sorted_order_and_seeded_split(corpus, tmp_path):
    root, files = corpus
    summary = create_tsv(root, tmp_path / "tsv", valid_percent=0.3, seed=0)
    draws = torch.Generator().manual_seed(0)
    expected = {"train": [], "valid": []}
    for rel, n in files:  # one draw per train file, in sorted order, as with torch.manual_seed(0)
        expected["train" if torch.rand(1, generator=draws).item() > 0.3 else "valid"].append(f"{rel}\t{n}")
    assert expected["valid"] and expected["train"]
    for split in ("train", "valid"):
        lines = read_lines(tmp_path / "tsv" / f"librispeech_{split}.tsv")
        assert lines[0] == str(root)
        assert lines[1:] == expected[split]
    assert len(summary.train) + len(summary.valid) == 8 and not summary.skipped
    assert summary.hours() == pytest.approx(sum(TRAIN_SAMPLES) / 16000 / 3600)
    # The same seed gives the same files byte for byte; another seed another split.
    first = (tmp_path / "tsv" / "librispeech_valid.tsv").read_bytes()
    create_tsv(root, tmp_path / "again", valid_percent=0.3, seed=0)
    assert (tmp_path / "again" / "librispeech_valid.tsv").read_bytes() == first
    create_tsv(root, tmp_path / "seed1", valid_percent=0.3, seed=1)
    assert (tmp_path / "seed1" / "librispeech_valid.tsv").read_bytes() != first


def test_dataset_name_and_no_valid_split(corpus, tmp_path):
    root, _ = corpus
    create_tsv(root, tmp_path, dataset="librilight", valid_percent=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["librilight_train.tsv"]
    assert len(read_lines(tmp_path / "librilight_train.tsv")) == 1 + 8


def test_small_corpus_gets_one_valid_file_the_smallest_draw(corpus, tmp_path, caplog):
    root, files = corpus
    caplog.set_level("INFO")
    summary = create_tsv(root, tmp_path, valid_percent=0.01)  # the 8 seed-0 draws are all above 0.01
    draws = torch.rand(8, generator=torch.Generator().manual_seed(0))
    assert draws.min() > 0.01
    smallest = files[int(draws.argmin())]
    assert summary.valid == [smallest] and summary.train == [f for f in files if f != smallest]
    assert read_lines(tmp_path / "librispeech_valid.tsv")[1:] == [f"{smallest[0]}\t{smallest[1]}"]
    assert f"moved {smallest[0]} (the smallest draw) to valid" in caplog.text
    (one := tmp_path / "one" / "train").mkdir(parents=True)
    soundfile.write(one / "a.flac", tone(16000, 200, 0), 16000)
    with pytest.raises(ValueError, match="a valid split needs at least 2 usable files"):
        create_tsv(one.parent, tmp_path / "one_tsv", valid_percent=0.01)
    assert create_tsv(one.parent, tmp_path / "one_tsv", valid_percent=0).train == [("train/a.flac", 16000)]


def test_only_the_path_below_the_root_counts_for_train(tmp_path):
    """Upstream's quirk: the root's own path counted, so a root inside a folder named like train... let dev in."""
    root = tmp_path / "train_runs" / "corpus"
    for rel in ("dev-clean/1/1-0.flac", "train-clean-100/2/2-0.flac", "train-clean-100/2/2-1.flac"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(root / rel, tone(8000, 200, 0), 16000)
    summary = create_tsv(root, tmp_path / "tsv", valid_percent=0)
    assert summary.train == [("train-clean-100/2/2-0.flac", 8000), ("train-clean-100/2/2-1.flac", 8000)]
    with pytest.raises(ValueError, match="with 'train' in its path below .*train-clean-100 \\(its own name"):
        create_tsv(root / "train-clean-100", tmp_path / "tsv2", valid_percent=0)


def test_symlink_loops_end_and_aliases_list_each_real_file_once(corpus, tmp_path):
    """A loop (a link to an ancestor), an alias folder of the train data, a linked and a hard-linked file:
    each real file is listed once, under its first path, and gets one draw: never both in train and valid."""
    src, files = corpus
    root = tmp_path / "linked"
    root.mkdir()
    (root / "LibriSpeech").symlink_to(src / "LibriSpeech")
    (root / "A-train-alias").symlink_to(src / "LibriSpeech" / "train-clean-100")  # sorts first: its paths win
    (root / "loop").symlink_to(root)
    (root / "LibriSpeech-extra" / "train").mkdir(parents=True)
    first = src / files[0][0]
    (root / "LibriSpeech-extra" / "train" / "linked.flac").symlink_to(first)
    os.link(first, root / "LibriSpeech-extra" / "train" / "hard.flac")

    listed = [p.as_posix() for p in list_audio(root)]
    assert len(listed) == len(files) + 1  # the 8 train files and the dev file, once each
    assert listed == sorted(listed) and "LibriSpeech/dev-clean/1/2/1-2-0000.flac" in listed
    assert [p for p in listed if "train" in p] == [rel.replace("LibriSpeech/train-clean-100", "A-train-alias")
                                                   for rel, _ in files]
    summary = create_tsv(root, tmp_path / "tsv", valid_percent=0.5)
    assert len(summary.train) + len(summary.valid) == len(files)


def test_listing_ignores_hidden_and_sorts(corpus):
    root, files = corpus
    listed = [p.as_posix() for p in list_audio(root)]
    assert listed == sorted(listed)
    assert "LibriSpeech/dev-clean/1/2/1-2-0000.flac" in listed
    assert not [p for p in listed if "/." in f"/{p}"]
    assert [p for p in listed if "train" in p] == [rel for rel, _ in files]


def test_audio_checks_name_every_bad_file_at_once(tmp_path_factory):
    root = tmp_path_factory.mktemp("badcorpus")
    folder = root / "train-clean-100/1/1"
    folder.mkdir(parents=True)
    soundfile.write(folder / "good.flac", tone(16000, 200, 0), 16000)
    soundfile.write(folder / "short_but_fine.flac", tone(400, 200, 0), 16000)  # below 2 s: not an error
    (folder / "corrupt.flac").write_bytes(b"this is not FLAC" * 64)
    (folder / "empty.flac").write_bytes(b"")
    soundfile.write(folder / "rate8k.flac", tone(8000, 200, 1), 8000)
    soundfile.write(folder / "stereo.flac", tone(16000, 200, 2, channels=2), 16000)
    soundfile.write(folder / "tiny.flac", tone(100, 200, 3), 16000)
    assert audio_problem(folder / "good.flac") == (16000, None)
    with pytest.raises(BadAudioError) as error:
        create_tsv(root, root / "tsv", valid_percent=0.0)
    message = str(error.value)
    assert message.startswith("5 bad audio file(s)")
    for name, why in [("corrupt.flac", "unreadable or corrupt"), ("empty.flac", "empty file"),
                      ("rate8k.flac", "sample rate 8000 Hz"), ("stereo.flac", "2 channels"),
                      ("tiny.flac", "only 100 samples")]:
        assert f"{folder / name}: {why}" in message
    assert "good.flac" not in message and "short_but_fine" not in message
    assert not (root / "tsv").exists()

    summary = create_tsv(root, root / "tsv", valid_percent=0.0, skip_bad=True)
    assert len(summary.skipped) == 5
    assert read_lines(root / "tsv/librispeech_train.tsv")[1:] == [
        "train-clean-100/1/1/good.flac\t16000", "train-clean-100/1/1/short_but_fine.flac\t400"]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_float_audio_with_nan_or_inf_is_refused_by_name(tmp_path, value):
    """Float WAV content under a .flac name (libsndfile reads the header, not the name), a bad sample in the
    middle: the tail check decodes float files in full and names it; load_audio (labels, training, fine-tuning)
    refuses it too, whatever --audio-check was."""
    folder = tmp_path / "c" / "train-clean-100" / "1"
    folder.mkdir(parents=True)
    soundfile.write(folder / "good.flac", tone(16000, 200, 0), 16000)
    wave = tone(48000, 200, 1).astype(np.float32)
    wave[20000] = value
    soundfile.write(folder / "bad.flac", wave, 16000, format="WAV", subtype="FLOAT")
    assert audio_problem(folder / "bad.flac", "header") == (48000, None)
    for check in ("tail", "full"):
        assert audio_problem(folder / "bad.flac", check) == (48000, "sample 20000 is NaN or inf (float audio)")
    with pytest.raises(BadAudioError, match=f"{folder / 'bad.flac'}: sample 20000 is NaN or inf"):
        create_tsv(tmp_path / "c", tmp_path / "tsv", valid_percent=0)
    with pytest.raises(ValueError, match=f"{folder / 'bad.flac'}: sample 20000 is NaN or inf"):
        load_audio(folder / "bad.flac", 48000)
    assert load_audio(folder / "good.flac", 16000).shape == (16000,)


def test_truncated_and_corrupt_flac_are_caught_by_decoding(tmp_path):
    """A FLAC cut after its header still reports its full length: only decoding finds out. Decoding the tail
    after a seek catches the cut; a corrupt frame in the middle takes the full decode."""
    soundfile.write(tmp_path / "good.flac", tone(64000, 200, 0), 16000)
    flac = (tmp_path / "good.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(flac[:len(flac) * 2 // 3])
    (tmp_path / "cut_early.flac").write_bytes(flac[:3000])
    middle = bytearray(flac)
    middle[len(flac) // 2:len(flac) // 2 + 300] = bytes(300)
    (tmp_path / "middle.flac").write_bytes(bytes(middle))
    expected = {"header": {"good": None, "cut": None, "cut_early": None, "middle": None},
                "tail": {"good": None, "cut": "truncated", "cut_early": "truncated", "middle": None},
                "full": {"good": None, "cut": "truncated", "cut_early": "truncated", "middle": "corrupt"}}
    for check, outcomes in expected.items():
        for name, problem in outcomes.items():
            num_samples, why = audio_problem(tmp_path / f"{name}.flac", check)
            assert num_samples == 64000 and (why is None if problem is None else problem in why), (check, name, why)


def test_truncated_and_8khz_files_are_named_in_one_error_and_skipped(tmp_path):
    folder = tmp_path / "train-clean-100/1/1"
    folder.mkdir(parents=True)
    for i in range(2):
        soundfile.write(folder / f"good{i}.flac", tone(16000, 200, i), 16000)
    soundfile.write(folder / "rate8k.flac", tone(8000, 200, 1), 8000)
    soundfile.write(folder / "cut.flac", tone(48000, 200, 2), 16000)
    flac = (folder / "cut.flac").read_bytes()
    (folder / "cut.flac").write_bytes(flac[:len(flac) // 3])
    with pytest.raises(BadAudioError) as error:
        create_tsv(tmp_path, tmp_path / "tsv", valid_percent=0.0)
    assert str(error.value).startswith("2 bad audio file(s)")
    assert f"{folder / 'rate8k.flac'}: sample rate 8000 Hz" in str(error.value)
    assert f"{folder / 'cut.flac'}: cannot be decoded up to sample 48000: truncated or corrupt" in str(error.value)
    summary = create_tsv(tmp_path, tmp_path / "tsv", valid_percent=0.0, skip_bad=True, workers=2)
    assert [rel for rel, _ in summary.train] == [f"train-clean-100/1/1/good{i}.flac" for i in range(2)]
    assert sorted(path.name for path, _ in summary.skipped) == ["cut.flac", "rate8k.flac"]


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) fails write() with EFBIG, as a full disk fails it with ENOSPC."""
    target = tmp_path / "label_train.pt"
    target.write_text("old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(OSError, match=r"File too large while writing: '.*label_train.pt'"):
            with atomic_write(target) as f:
                for _ in range(4):
                    f.write(bytes(1 << 15))
                    f.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["label_train.pt"]
