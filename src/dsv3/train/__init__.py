"""dsv3.train: the single-device pre-training pipeline (config, schedules, balancing, checkpoints, the loop)."""

from .config import RunConfig, load_run_config
from .export import export_run, load_run_model
from .trainer import Trainer, TrainingDiverged

__all__ = ["RunConfig", "load_run_config", "Trainer", "TrainingDiverged", "export_run", "load_run_model"]
