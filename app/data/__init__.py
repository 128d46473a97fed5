"""Datasets as WebDataset-style tar shards + a parquet index + `_stats.json` (DESIGN.md §3).

    from app.data import ShardWriter, Dataset, iter_samples, decode_image
    ds = Dataset("s3://bucket/datasets/pool")
    for sample in ds.iter_samples(rank, world_size):
        img = decode_image(sample.image_bytes, sample.key)
"""

from app.data.decode import CorruptImage, decode_image, probe_image, to_stored_jpeg
from app.data.index import CorruptSample, Dataset, read_index, read_stats, shards_for_rank, write_index
from app.data.shards import Sample, ShardWriter, iter_samples, iter_shard, iter_tar_samples

__all__ = [
    "CorruptImage", "CorruptSample", "decode_image", "probe_image", "to_stored_jpeg", "Dataset",
    "read_index",
    "read_stats", "shards_for_rank", "write_index", "Sample", "ShardWriter", "iter_samples", "iter_shard",
    "iter_tar_samples",
]
