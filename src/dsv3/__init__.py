"""dsv3: DeepSeek-V3 in PyTorch: the model, its checkpoints, training, inference and serving."""

from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import ConfigError, ModelConfig, load_model_config
from .model import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "load_pretrained", "save_pretrained", "load_model_config",
           "ConfigError", "CheckpointError"]
