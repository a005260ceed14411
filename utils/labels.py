"""Step 4 of preprocessing (upstream-spec §3.5): the frame labels of train and valid, one text line of
cluster ids per utterance, written per shard to ``label/label_{split}_{rank}_{num_rank}.part`` and then joined,
in shard order (= TSV order), into ``label/label_{split}.pt``. Each has a ``.done`` marker written last: the
hash of the shard's lines, the feature settings and the k-means model (for the joined file: of its parts), so
a re-run redoes only the parts that are missing or stale.

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

import torch
from torch import Tensor

from utils.common_utils import atomic_write, remove_stale_temp_files
from utils.feature_utils import Extractor, Shard, shard_features
from utils.kmeans import predict, predict_chunk

log = logging.getLogger(__name__)


def label_lines(features: Iterable[Tensor], centers: Tensor, chunk_frames: Optional[int] = None) -> Iterator[str]:
    """One line of nearest-centre ids per utterance of ``features`` ((T, D) tensors, in order), labelled in
    blocks of ``chunk_frames`` (``predict_chunk``) frames."""
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
            yield " ".join(map(str, labels[:length].tolist()))
            labels = labels[length:]


def label_paths(label_dir, split: str, shard: Optional[Shard] = None) -> Tuple[Path, Path]:
    """(labels, done marker) of a split's joined label file, or of one shard's part."""
    label_dir = Path(label_dir)
    if shard is None:
        return label_dir / f"label_{split}.pt", label_dir / f"label_{split}.done"
    name = f"label_{split}_{shard.rank}_{shard.num_rank}"
    return label_dir / f"{name}.part", label_dir / f"{name}.done"


def label_key(shard: Shard, extractor: Extractor, model_key: str) -> str:
    return hashlib.sha256(f"{shard.key(extractor)} {model_key}".encode()).hexdigest()


def split_key(shards: Sequence[Shard], extractor: Extractor, model_key: str) -> str:
    return hashlib.sha256(" ".join(label_key(s, extractor, model_key) for s in shards).encode()).hexdigest()


def is_done(paths: Tuple[Path, Path], key: str) -> bool:
    labels, done = paths
    return labels.is_file() and done.is_file() and done.read_text() == key


def write_done(done: Path, key: str) -> None:
    with atomic_write(done, "w") as f:
        f.write(key)


def label_shard(shard: Shard, extractor: Extractor, feat_dir, label_dir, centers: Tensor, model_key: str,
                keep: Optional[Sequence[int]] = ()) -> bool:
    """Write the label part of a shard; False if it was already done. The features of the utterances at
    ``keep`` (None: all) are read from the shard's feature file if it holds them, the others extracted."""
    part, done = paths = label_paths(label_dir, shard.split, shard)
    key = label_key(shard, extractor, model_key)
    if is_done(paths, key):
        log.info("%s labels are already done", shard.name)
        return False
    part.parent.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    remove_stale_temp_files(part, done)
    with atomic_write(part, "w") as f:
        for line in label_lines(shard_features(shard, extractor, feat_dir, keep, desc="labels"), centers):
            f.write(line + "\n")
    write_done(done, key)
    return True


def merge_label_parts(label_dir, shards: List[Shard], extractor: Extractor, model_key: str) -> Path:
    """Join the parts of a split's shards, in shard order, into ``label_{split}.pt`` and remove them."""
    split = shards[0].split
    path, done = label_paths(label_dir, split)
    parts = [label_paths(label_dir, split, shard) for shard in shards]
    for shard, paths in zip(shards, parts):
        if not is_done(paths, label_key(shard, extractor, model_key)):
            raise FileNotFoundError(f"label part {paths[0]} is missing or stale (run the label step for all shards)")
    done.unlink(missing_ok=True)
    remove_stale_temp_files(path, done)
    with atomic_write(path) as out:
        for part, _ in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    write_done(done, split_key(shards, extractor, model_key))
    for paths in parts:
        for p in paths:
            p.unlink()
    return path
