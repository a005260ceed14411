"""Labels: streamed in the blocks of the old whole-shard prediction, one part per shard (skipped when done,
redone when stale), joined in shard order."""
import numpy as np
import pytest
import torch

from tests.test_feature_utils import audio_list
from utils.feature_utils import dump_features, mfcc_extractor, read_shards
from utils.kmeans import predict
from dataset.label_files import open_labels, text_index
from utils.labels import label_arrays, label_paths, label_shard, merge_label_parts


def test_streamed_labels_are_the_whole_shard_prediction_per_utterance():
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 17, 3, 8, 2, 11]
    feats, centers = [torch.randn(n, 4, generator=generator) for n in lengths], torch.randn(9, 4, generator=generator)
    expected = predict(torch.cat(feats), centers).split(lengths)
    for chunk in (1, 4, 7, 16, 1000):  # blocks that cut utterances anywhere
        streamed = list(label_arrays(iter(feats), centers, chunk))
        assert [x.tolist() for x in streamed] == [x.tolist() for x in expected]
    assert list(label_arrays(iter([]), centers)) == []


def test_label_parts_are_skipped_when_done_redone_when_stale_and_joined_in_order(tmp_path):
    tsv = audio_list(tmp_path, [4000, 5000, 6001, 4500, 7000])
    extractor, feat_dir, label_dir = mfcc_extractor(), tmp_path / "feat", tmp_path / "label"
    shards = read_shards(tsv, "train", 2)
    centers = torch.randn(6, 39, generator=torch.Generator().manual_seed(0)) * 20
    dump_features(shards[0], feat_dir, extractor, keep=[1])  # shard 1's utterance 1 is read back, the rest extracted
    assert [label_shard(s, extractor, feat_dir, label_dir, centers, "model A", keep) for s, keep in
            zip(shards, ([1], ()))] == [True, True]
    assert not label_shard(shards[1], extractor, feat_dir, label_dir, centers, "model A")
    assert label_shard(shards[1], extractor, feat_dir, label_dir, centers, "model B")  # another model: redone
    label_shard(shards[1], extractor, feat_dir, label_dir, centers, "model A")
    path = merge_label_parts(label_dir, shards, extractor, "model A")
    assert path == label_paths(label_dir, "train")[0] and sorted(p.name for p in label_dir.iterdir()) == [
        "label_train.done", "label_train.pt", "label_train.pt.index.npz"]
    feats = [extractor.extract(shard.waveform(i)) for shard in shards for i in range(len(shard.lines))]
    lengths, expected = [len(f) for f in feats], []
    for part in (slice(0, 3), slice(3, 5)):  # the old path: each whole shard predicted at once
        expected += [" ".join(map(str, x.tolist())) + "\n"
                     for x in predict(torch.cat(feats[part]), centers).split(lengths[part])]
    assert path.read_text() == "".join(expected)
    with pytest.raises(FileNotFoundError, match="label_train_1_2.part is missing or stale"):
        merge_label_parts(label_dir, shards, extractor, "model A")


def test_npy_labels_hold_the_text_labels_and_replace_them(tmp_path):
    """--label-format npy: the same ids as the text file, read back through the dataset's reader; each format's
    merge removes the other's files (the dataset would read npy first) and the text merge writes the line index."""
    tsv = audio_list(tmp_path, [4000, 5000, 6001, 4500, 7000])
    extractor, feat_dir, label_dir = mfcc_extractor(), tmp_path / "feat", tmp_path / "label"
    shards = read_shards(tsv, "train", 2)
    centers = torch.randn(6, 39, generator=torch.Generator().manual_seed(0)) * 20
    for fmt in ("text", "npy"):
        for shard in shards:
            assert label_shard(shard, extractor, feat_dir, label_dir, centers, "model A", fmt=fmt)
        assert not label_shard(shards[0], extractor, feat_dir, label_dir, centers, "model A", fmt=fmt)
        merge_label_parts(label_dir, shards, extractor, "model A", fmt, num_classes=6)
        if fmt == "text":
            text = [line.split() for line in (label_dir / "label_train.pt").read_text().splitlines()]
            starts, counts = text_index(label_dir / "label_train.pt")
            assert counts.tolist() == [len(line) for line in text] and starts[-1] == len(
                (label_dir / "label_train.pt").read_bytes())
    assert sorted(p.name for p in label_dir.iterdir()) == [
        "label_train.done", "label_train.npy", "label_train.offsets.npy"]
    labels = open_labels(label_dir, "train")
    assert np.load(label_dir / "label_train.npy").dtype == np.uint16
    assert [labels[i].tolist() for i in range(len(labels))] == [[int(x) for x in line] for line in text]
