"""Label files read an utterance at a time: the text line index (scanned in blocks, cached, refreshed) and the
npy pair (checked, memory-mapped, not copied into workers)."""
import logging
import os
import pickle

import numpy as np
import pytest

from dataset import label_files
from dataset.label_files import NpyLabels, TextLabels, npy_header, open_labels, text_index, text_index_path
from dataset.text_blocks import FileRanges

LINES = ["1 2 3", "", "40  5 ", "7", " 8 9 10 11", "12"]  # double and edge spaces, an empty line


def test_text_index_in_blocks_cut_anywhere(tmp_path, monkeypatch):
    path = tmp_path / "label_train.pt"
    for end in ("\n", ""):  # with and without a final newline
        path.write_text("\n".join(LINES) + end)
        for block in (1, 3, 8, 1 << 24):
            monkeypatch.setattr(label_files, "BLOCK", block)
            starts, counts = label_files._scan(path)
            assert counts.tolist() == [len(line.split()) for line in LINES] and starts[-1] == path.stat().st_size
            labels = TextLabels.__new__(TextLabels)
            labels.path, labels.starts, labels.counts, labels._file = path, starts, counts, FileRanges(path)
            assert [labels[i].tolist() for i in range(len(LINES))] == [list(map(int, x.split())) for x in LINES]


def test_the_index_cache_is_used_and_refreshed(tmp_path, monkeypatch):
    path = tmp_path / "label_train.pt"
    path.write_text("1 2\n3\n")
    assert text_index(path)[1].tolist() == [2, 1] and text_index_path(path).is_file()
    monkeypatch.setattr(label_files, "_scan", lambda p: pytest.fail("scanned although the cache is this file's"))
    assert text_index(path)[1].tolist() == [2, 1]
    monkeypatch.undo()
    path.write_text("1 2\n3 4\n")  # one byte longer
    assert text_index(path)[1].tolist() == [2, 2]
    os.utime(path, ns=(0, 12345))  # same size, other mtime
    path.write_text("5 6\n7 8\n")
    os.utime(path, ns=(0, 67890))
    assert TextLabels(path)[1].tolist() == [7, 8]


def test_a_cache_that_cannot_be_written_is_only_a_warning(tmp_path, caplog):
    path = tmp_path / "label_train.pt"
    path.write_text("1 2\n3\n")
    text_index_path(path).mkdir()  # in the way of the cache file (as a read-only folder would be)
    with caplog.at_level(logging.WARNING):
        assert TextLabels(path)[0].tolist() == [1, 2]
    assert "could not cache the line index" in caplog.text


def write_npy(label_dir, labels, dtype=np.uint16):
    ids = np.concatenate([np.asarray(x, dtype=dtype) for x in labels])
    np.save(label_dir / "label_train.npy", ids)
    np.save(label_dir / "label_train.offsets.npy", np.concatenate([[0], np.cumsum([len(x) for x in labels])]))


def test_npy_labels_read_and_pickle_without_their_arrays(tmp_path):
    labels = [[1, 2, 3], [], [65535], [4]]
    write_npy(tmp_path, labels)
    (tmp_path / "label_train.pt").write_text("9\n")  # npy is read first
    read = open_labels(tmp_path, "train")
    assert isinstance(read, NpyLabels) and len(read) == 4 and read.counts.tolist() == [3, 0, 1, 1]
    assert [read[i].tolist() for i in range(4)] == labels and read[0].dtype == np.int64
    state = pickle.dumps(read)
    assert len(state) < 1000  # the memory maps stay behind; the copy opens them itself
    assert pickle.loads(state)[2].tolist() == [65535]


@pytest.mark.parametrize("offsets, problem", [([0, 2, 1, 5], "decreasing"), ([1, 5], "start"), ([0, 4], "end"),
                                              (np.array([0, 5], dtype=np.int32), "dtype")])
def test_npy_offsets_that_do_not_fit_are_named(tmp_path, offsets, problem):
    np.save(tmp_path / "label_train.npy", np.arange(5, dtype=np.uint16))
    np.save(tmp_path / "label_train.offsets.npy", np.asarray(offsets, dtype=getattr(offsets, "dtype", np.int64)))
    with pytest.raises(ValueError, match=r"label_train.offsets.npy: not the offsets of .*label_train.npy \(5 labels\)"):
        open_labels(tmp_path, "train")


def test_pickled_npy_labels_are_never_loaded(tmp_path):
    """An object-dtype .npy is a pickle: refused by name, the code in it never runs."""
    from tests.test_kmeans import WritesMarker

    marker = tmp_path / "code_ran"
    np.save(tmp_path / "label_train.npy", np.array([WritesMarker(marker), 1], dtype=object), allow_pickle=True)
    np.save(tmp_path / "label_train.offsets.npy", np.array([0, 2]))
    with pytest.raises(ValueError, match=r"label_train.npy: not a .npy array of integer labels \(.*Python objects"):
        open_labels(tmp_path, "train")
    (tmp_path / "label_train.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"label_train.npy: not a .npy array of integer labels"):
        open_labels(tmp_path, "train")
    assert not marker.exists()


@pytest.mark.parametrize("line", ["1 99999999999999999999 3", "1 -99999999999999999999", "1 x"])
def test_a_text_label_that_is_no_int64_is_named(tmp_path, line):
    (tmp_path / "label_train.pt").write_text(f"1 2\n{line}\n")
    labels = open_labels(tmp_path, "train")
    assert labels[0].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"label_train.pt:2: not a line of integer labels"):
        labels[1]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"label_train.pt: label file not found"):
        open_labels(tmp_path, "train")
    np.save(tmp_path / "label_train.npy", np.arange(5, dtype=np.uint16))
    with pytest.raises(FileNotFoundError, match=r"label_train.offsets.npy: npy label file not found"):
        open_labels(tmp_path, "train")


def test_streamed_header_is_numpys(tmp_path):
    path = tmp_path / "x.npy"
    ids = np.arange(70000, dtype=np.int32)
    path.write_bytes(npy_header(ids.dtype, len(ids)) + ids.tobytes())
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), ids)
