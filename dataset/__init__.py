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
    "LoaderStats",
    "UpdateBatch",
    "UpdateLoader",
    "UpdateSampler",
    "bucket_boundaries",
    "expected_num_labels",
    "format_stats",
    "loader_stats",
]
