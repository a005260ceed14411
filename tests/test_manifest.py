"""Manifest: the TSV parsed in blocks into arrays, paths read back from the file, the start-up check of the files."""
import pickle
import re
import shutil

import numpy as np
import pytest
import soundfile

from dataset import manifest
from dataset.manifest import Manifest
from utils.feature_utils import read_tsv


def write_tsv(path, root, rows, end="\n"):
    path.write_text(f"{root}\n" + "\n".join(f"{rel}\t{n}" for rel, n in rows) + end)
    return path


def test_blocks_cut_anywhere_give_the_same_list(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = [(f"spk{i % 7}/ch{i % 3}/utt-{i}-{'x' * int(rng.integers(0, 30))}.flac", int(rng.integers(0, 10 ** 12)))
            for i in range(500)]
    rows += [("a.flac", 0), ("b.flac", 999999999999999999)]  # the widest count a line may hold: 18 digits
    tsv = write_tsv(tmp_path / "x.tsv", "/data/root", rows, end="")  # and no final newline
    for block in (7, 64, 1000, 1 << 24):  # smaller than a line, a few lines, many lines, the whole file
        monkeypatch.setattr(manifest, "BLOCK", block)
        m = Manifest(tsv)
        assert m.root == "/data/root" and m.lengths.tolist() == [n for _, n in rows]
        assert [m.audio_path(i) for i in range(len(m))] == [f"/data/root/{rel}" for rel, _ in rows]


@pytest.mark.parametrize("line", ["a.flac 123", "a.flac\t12x", "a.flac\t", "a.flac\t1\t2", "a.flac\t-5",
                                  "a.flac\t1234567890123456789", ""])
def test_malformed_line_is_named(tmp_path, line):
    tsv = tmp_path / "x.tsv"
    tsv.write_text(f"/root\ngood.flac\t16000\n{line}\nalso.flac\t3\n")
    want = "x.tsv:3: " + re.escape(f"expected '<relative path>\\t<num samples>', got {line!r}")
    with pytest.raises(ValueError, match=want):
        Manifest(tsv)


def test_empty_or_missing_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv: TSV file list not found"):
        Manifest(tmp_path / "nope.tsv")
    (tmp_path / "x.tsv").write_text("/root\n")
    with pytest.raises(ValueError, match="x.tsv: lists no utterances"):
        Manifest(tmp_path / "x.tsv")


def test_pickled_copy_reads_paths_itself(tmp_path):
    m = Manifest(write_tsv(tmp_path / "x.tsv", "/r", [("a.flac", 1), ("bb.flac", 2)]))
    assert m.audio_path(1) == "/r/bb.flac"  # opens the file
    copy = pickle.loads(pickle.dumps(m))
    assert copy._file._fd is None and copy.audio_path(0) == "/r/a.flac"


def test_long_lists_check_a_sample_of_their_files(tmp_path, monkeypatch):
    (tmp_path / "audio").mkdir()
    rows = [(f"{i}.flac", 400) for i in range(300)]
    soundfile.write(tmp_path / "audio" / "0.flac", np.zeros(400), 16000)
    for i in range(1, 300):
        shutil.copyfile(tmp_path / "audio" / "0.flac", tmp_path / "audio" / f"{i}.flac")
    tsv = write_tsv(tmp_path / "x.tsv", tmp_path / "audio", rows)
    Manifest(tsv).check_files()
    (tmp_path / "audio" / "7.flac").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 listed audio file\(s\) do not exist, first: .*/7.flac"):
        Manifest(tsv).check_files()
    monkeypatch.setattr(manifest, "CHECK_ALL_UP_TO", 100)
    monkeypatch.setattr(manifest, "CHECK_SAMPLE", 20)
    checked, exists = [], manifest.os.path.exists
    monkeypatch.setattr(manifest.os.path, "exists", lambda p: checked.append(p) or exists(p))
    Manifest(tsv).check_files()  # 7.flac is not in the sample
    assert len(checked) <= 22 and checked[0].endswith("/0.flac") and checked[-1].endswith("/299.flac")
    for i in range(300):
        (tmp_path / "audio" / f"{i}.flac").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"x.tsv: (\d+) of \1 checked audio file\(s\) do not exist"):
        Manifest(tsv).check_files()  # a moved corpus


@pytest.mark.parametrize("off", [-3, 2])
def test_a_sample_count_off_by_a_few_is_named_at_start_up(tmp_path, off):
    """Found by the header read at start-up, not when training reaches the file."""
    for i, n in enumerate((16000, 12345)):
        soundfile.write(tmp_path / f"{i}.flac", np.zeros(n), 16000)
    tsv = write_tsv(tmp_path / "x.tsv", tmp_path, [("0.flac", 16000), ("1.flac", 12345 + off)])
    with pytest.raises(ValueError, match=rf"x.tsv: 1 listed audio file\(s\) do not have the sample count it lists .*"
                                         rf"first: .*/1.flac \(line 3\): 12345 samples, listed as {12345 + off}"):
        Manifest(tsv).check_files()
    (tmp_path / "1.flac").write_bytes(b"not audio")
    with pytest.raises(ValueError, match=r"first: .*/1.flac \(line 3\): unreadable"):
        Manifest(tsv).check_files()


@pytest.mark.parametrize("where", ["root", "path"])
def test_a_list_that_is_not_utf8_is_named_with_its_line(tmp_path, where):
    tsv = tmp_path / "x.tsv"
    root, path = (b"/data/caf\xe9", b"a.flac") if where == "root" else (b"/data", b"caf\xe9/a.flac")
    tsv.write_bytes(root + b"\ngood.flac\t16000\n" + path + b"\t400\n")
    line = 1 if where == "root" else 3
    with pytest.raises(ValueError, match=rf"x.tsv:{line}: not UTF-8 text \(invalid continuation byte\): .*caf"):
        Manifest(tsv)
    with pytest.raises(ValueError, match=rf"x.tsv:{line}: not UTF-8 text"):
        read_tsv(tsv)  # preprocess.py's reader (--rank jobs)
