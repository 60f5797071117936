"""Local data files → TFDS (array_record) → grain batches of token arrays."""

from jrlhf.data.builders import build_dataset
from jrlhf.data.pipeline import Encoder, make_loader
from jrlhf.data.rows import BadRow, load_rows, ranks_from_scores, split_shared_prefix

__all__ = ["BadRow", "Encoder", "build_dataset", "load_rows", "make_loader", "ranks_from_scores",
           "split_shared_prefix"]
