"""Shapes and padding of the training batches (upstream ``--show-traindataloader-stats``), computed from
the utterance lengths alone, so it takes a second rather than a pass over the audio."""
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np


@dataclass
class LoaderStats:
    num_batches: int = 0
    shapes: Dict[Tuple[int, int], int] = field(default_factory=dict)  # (batch_size, seq_len) -> batches
    collated_samples: int = 0  # sum of batch_size * seq_len: what the model is fed
    audio_samples: int = 0  # real audio among them
    cropped_samples: int = 0  # audio cut away to crop a batch to its shortest sample (pad=False)

    @property
    def padding_fraction(self) -> float:
        return 1 - self.audio_samples / self.collated_samples if self.collated_samples else 0.0

    @property
    def cropped_fraction(self) -> float:
        total = self.audio_samples + self.cropped_samples
        return self.cropped_samples / total if total else 0.0


def loader_stats(batches: Iterable[List[int]], lengths: Sequence[int], pad: bool = False,
                 aligner: Optional[Callable[[int], int]] = None) -> LoaderStats:
    """What ``CollateFnHubert(pad=pad, aligner=aligner)`` makes of each batch of ``batches`` (a batch
    sampler), given the sample count of every dataset index in ``lengths``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    shapes: Counter = Counter()
    stats = LoaderStats()
    for batch in batches:
        n = lengths[batch]
        target = int(n.max() if pad else n.min())
        width = aligner(target) if aligner is not None else target
        kept = int(np.minimum(n, target).sum())
        shapes[(len(batch), width)] += 1
        stats.num_batches += 1
        stats.collated_samples += len(batch) * width
        stats.audio_samples += kept
        stats.cropped_samples += int(n.sum()) - kept
    stats.shapes = dict(shapes.most_common())
    return stats


def format_stats(stats: LoaderStats, top: int = 20) -> str:
    """A short report: totals, then the ``top`` most frequent (batch_size, seq_len) shapes."""
    seq_lens = {seq_len for _, seq_len in stats.shapes}
    lines = [
        f"batches: {stats.num_batches}, distinct (batch_size, seq_len) shapes: {len(stats.shapes)}, "
        f"distinct seq_len: {len(seq_lens)}",
        f"collated samples: {stats.collated_samples}, padding: {stats.padding_fraction:.2%}, "
        f"cropped away: {stats.cropped_fraction:.2%} of the audio",
        f"{'batches':>8} {'batch_size':>10} {'seq_len':>8}",
    ]
    lines += [f"{count:>8} {bs:>10} {seq_len:>8}" for (bs, seq_len), count in list(stats.shapes.items())[:top]]
    if len(stats.shapes) > top:
        lines.append(f"... {len(stats.shapes) - top} more shapes")
    return "\n".join(lines)
