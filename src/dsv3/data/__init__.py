"""dsv3.data: tokenizer, corpora, token shards and the packed (FIM) training stream."""

from .corpus import Document, iter_documents, stdlib_files
from .packing import PackedLoader, val_batches
from .shards import ShardSet, build_shards
from .tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

__all__ = ["Tokenizer", "SPECIAL_TOKENS", "train_tokenizer", "stdlib_files", "iter_documents", "Document",
           "build_shards", "ShardSet", "PackedLoader", "val_batches"]
