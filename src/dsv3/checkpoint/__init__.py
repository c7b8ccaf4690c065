"""dsv3.checkpoint: Hugging Face directories in and out, and atomic writes."""

from .atomic import atomic_directory
from .hf import CheckpointError, hf_name_map, load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained", "hf_name_map", "CheckpointError", "atomic_directory"]
