"""dsv3.checkpoint: Hugging Face directories in and out, and atomic writes."""

from .atomic import atomic_directory
from .convert import convert_checkpoint
from .hf import CheckpointError, CheckpointReader, hf_name_map, load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained", "convert_checkpoint", "hf_name_map", "CheckpointReader",
           "CheckpointError", "atomic_directory"]
