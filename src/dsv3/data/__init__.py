"""dsv3.data: tokenizer, chat encoding, corpora, token shards and the packed (FIM) training stream."""

from .chat import ChatTemplate, encode_chat
from .corpus import Document, iter_documents, stdlib_files
from .packing import PackedLoader, val_batches
from .shards import ShardSet, build_shards
from .tokenizer import SPECIAL_TOKENS, Tokenizer, read_chat_template, read_tokenizer_config, train_tokenizer

__all__ = ["Tokenizer", "SPECIAL_TOKENS", "train_tokenizer", "read_tokenizer_config", "read_chat_template",
           "ChatTemplate", "encode_chat", "stdlib_files", "iter_documents", "Document", "build_shards", "ShardSet",
           "PackedLoader", "val_batches"]
