from .asr import (LIBRILIGHT_SUBSETS, TranscribedAudio, Utterance, collate_ctc, find_subset, librilight_folders,
                  list_utterances)
from .hubert_dataset import CollateFnHubert, HuBERTDataSet, expected_num_labels
from .sampler import BucketAligner, BucketizeBatchSampler, DistributedBatchSampler, bucket_boundaries
from .stats import LoaderStats, format_stats, loader_stats
from .updates import UpdateBatch, UpdateLoader, UpdateSampler

__all__ = [
    "BucketAligner",
    "BucketizeBatchSampler",
    "CollateFnHubert",
    "DistributedBatchSampler",
    "HuBERTDataSet",
    "LIBRILIGHT_SUBSETS",
    "LoaderStats",
    "UpdateBatch",
    "UpdateLoader",
    "UpdateSampler",
    "TranscribedAudio",
    "Utterance",
    "bucket_boundaries",
    "collate_ctc",
    "expected_num_labels",
    "find_subset",
    "format_stats",
    "librilight_folders",
    "list_utterances",
    "loader_stats",
]
