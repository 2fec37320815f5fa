"""Input pipelines over tensorflow-datasets, and the offline default dataset `attn_flax_shapes`.

The training loop calls `dataset_info`, `train_batches`, `eval_batches` and `num_eval_batches`; it
passes `jax.process_index()` / `jax.process_count()` in, so this package does not depend on jax.
"""
from attn_flax.data.catalog import (
    DEFAULT_DATASET,
    SUPPORTED_DATASETS,
    DatasetInfo,
    DatasetNotPreparedError,
    dataset_info,
)
from attn_flax.data.pipeline import Batches, eval_batches, num_eval_batches, train_batches

__all__ = [
    "DEFAULT_DATASET",
    "SUPPORTED_DATASETS",
    "Batches",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "dataset_info",
    "eval_batches",
    "num_eval_batches",
    "train_batches",
]
