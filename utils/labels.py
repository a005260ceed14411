"""Step 4 of preprocessing (upstream-spec §3.5): the frame labels of train and valid, written per shard to
``label/label_{split}_{rank}_{num_rank}.part`` and then joined, in shard order (= TSV order), into upstream's
``label/label_{split}.pt`` (text: one line of cluster ids per utterance; with its line index, so training does
not scan it) or, with ``fmt="npy"``, the binary pair ``label_{split}.npy`` + ``label_{split}.offsets.npy``
(dataset.label_files; an npy part holds raw ids, its ``.lengths`` the ids per utterance). Each has a ``.done``
marker written last: the hash of the shard's lines, the feature settings, the k-means model and the format (for
the joined file: of its parts), so a re-run redoes only the parts that are missing or stale.

Utterances are labelled as their features come (read back from the k-means sample or extracted on the fly),
in blocks of ``predict_chunk`` frames counted from the shard's first frame: the blocks in which the whole
stored shard used to be labelled, so the labels are the same while memory holds one block, not the shard.
"""
import hashlib
import logging
import shutil
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from dataset.label_files import label_dtype, npy_header, npy_paths, text_index_path, text_path, write_text_index
from utils.common_utils import atomic_write, remove_stale_temp_files
from utils.feature_utils import Extractor, Shard, shard_features
from utils.kmeans import predict, predict_chunk

log = logging.getLogger(__name__)


FORMATS = ("text", "npy")


def label_arrays(features: Iterable[Tensor], centers: Tensor, chunk_frames: Optional[int] = None) -> Iterator[Tensor]:
    """The nearest-centre ids of each utterance of ``features`` ((T, D) tensors, in order), labelled in blocks
    of ``chunk_frames`` (``predict_chunk``) frames."""
    chunk = chunk_frames or predict_chunk(len(centers))
    pending, num_pending = [], 0  # features not labelled yet
    labels, lengths = torch.zeros(0, dtype=torch.long), deque()  # labels not written yet, and their utterances
    for feats in chain(features, [None]):
        if feats is not None:
            pending.append(feats)
            num_pending += len(feats)
            lengths.append(len(feats))
        while num_pending >= chunk or (feats is None and num_pending):
            block = torch.cat(pending)
            take = min(chunk, num_pending)
            labels = torch.cat([labels, predict(block[:take], centers, chunk)])
            pending, num_pending = [block[take:]], num_pending - take
        while lengths and len(labels) >= lengths[0]:
            length = lengths.popleft()
            yield labels[:length]
            labels = labels[length:]


def label_paths(label_dir, split: str, shard: Optional[Shard] = None, fmt: str = "text") -> Tuple[Path, Path]:
    """(labels, done marker) of a split's joined label file (npy: its ids), or of one shard's part."""
    label_dir = Path(label_dir)
    if shard is None:
        return (text_path(label_dir, split) if fmt == "text" else npy_paths(label_dir, split)[0],
                label_dir / f"label_{split}.done")
    name = f"label_{split}_{shard.rank}_{shard.num_rank}"
    return label_dir / f"{name}.part", label_dir / f"{name}.done"


def lengths_path(part: Path) -> Path:
    return part.with_suffix(".lengths")


def label_key(shard: Shard, extractor: Extractor, model_key: str, fmt: str = "text") -> str:
    extra = "" if fmt == "text" else f" {fmt}"  # text keeps the keys that runs before the formats wrote
    return hashlib.sha256(f"{shard.key(extractor)} {model_key}{extra}".encode()).hexdigest()


def split_key(shards: Sequence[Shard], extractor: Extractor, model_key: str, fmt: str = "text") -> str:
    return hashlib.sha256(" ".join(label_key(s, extractor, model_key, fmt) for s in shards).encode()).hexdigest()


def is_done(paths: Tuple[Path, Path], key: str) -> bool:
    labels, done = paths
    return labels.is_file() and done.is_file() and done.read_text() == key


def write_done(done: Path, key: str) -> None:
    with atomic_write(done, "w") as f:
        f.write(key)


def label_shard(shard: Shard, extractor: Extractor, feat_dir, label_dir, centers: Tensor, model_key: str,
                keep: Optional[Sequence[int]] = (), fmt: str = "text") -> bool:
    """Write the label part of a shard; False if it was already done. The features of the utterances at
    ``keep`` (None: all) are read from the shard's feature file if it holds them, the others extracted."""
    part, done = paths = label_paths(label_dir, shard.split, shard)
    key = label_key(shard, extractor, model_key, fmt)
    if is_done(paths, key):
        log.info("%s labels are already done", shard.name)
        return False
    part.parent.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    remove_stale_temp_files(part, done, lengths_path(part))
    labels = label_arrays(shard_features(shard, extractor, feat_dir, keep, desc="labels"), centers)
    if fmt == "text":
        with atomic_write(part, "w") as f:
            for ids in labels:
                f.write(" ".join(map(str, ids.tolist())) + "\n")
    else:
        dtype, lengths = label_dtype(len(centers)), []
        with atomic_write(part) as f:
            for ids in labels:
                f.write(ids.numpy().astype(dtype).tobytes())
                lengths.append(len(ids))
        with atomic_write(lengths_path(part)) as f:
            f.write(np.array(lengths, dtype=np.int64).tobytes())
    write_done(done, key)
    return True


def merge_label_parts(label_dir, shards: List[Shard], extractor: Extractor, model_key: str, fmt: str = "text",
                      num_classes: Optional[int] = None) -> Path:
    """Join the parts of a split's shards, in shard order, into its label file(s), remove the parts and any
    labels of the split in the other format (the dataset would read npy first)."""
    split = shards[0].split
    path, done = label_paths(label_dir, split, fmt=fmt)
    parts = [label_paths(label_dir, split, shard) for shard in shards]
    for shard, paths in zip(shards, parts):
        if not is_done(paths, label_key(shard, extractor, model_key, fmt)):
            raise FileNotFoundError(f"label part {paths[0]} is missing or stale (run the label step for all shards)")
    done.unlink(missing_ok=True)
    remove_stale_temp_files(path, done)
    if fmt == "text":
        with atomic_write(path) as out:
            for part, _ in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        write_text_index(path)
        stale = npy_paths(label_dir, split)
    else:
        lengths = np.concatenate([np.fromfile(lengths_path(part), dtype=np.int64) for part, _ in parts])
        offsets = npy_paths(label_dir, split)[1]
        remove_stale_temp_files(offsets)
        with atomic_write(path) as out:
            out.write(npy_header(label_dtype(num_classes), int(lengths.sum())))
            for part, _ in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        with atomic_write(offsets) as out:
            np.save(out, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        text = text_path(label_dir, split)
        stale = (text, text_index_path(text))
    write_done(done, split_key(shards, extractor, model_key, fmt))
    for p in [*stale, *(p for paths in parts for p in paths), *(lengths_path(part) for part, _ in parts)]:
        p.unlink(missing_ok=True)
    return path
