"""Training data: indexed token datasets, GPT samples and their distribution, tokenizer, demo corpus."""
from mtrain.data.build import build_gpt_dataset, default_cache_dir
from mtrain.data.demo import ensure_demo_dataset
from mtrain.data.gpt_dataset import (DataPosition, GPTDataset, StepLoader, batch_for_step, epoch_permutation,
                                     rank_sample_indices)
from mtrain.data.indexed import CorruptDatasetError, IndexedDataset, IndexedDatasetWriter
from mtrain.data.preprocess import tokenizer_path, write_indexed_dataset
from mtrain.data.tokenizer import Tokenizer

__all__ = [
    "CorruptDatasetError", "DataPosition", "GPTDataset", "IndexedDataset", "IndexedDatasetWriter", "StepLoader",
    "Tokenizer", "batch_for_step", "build_gpt_dataset", "default_cache_dir", "ensure_demo_dataset", "epoch_permutation", "rank_sample_indices",
    "tokenizer_path", "write_indexed_dataset",
]
