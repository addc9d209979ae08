"""The declarative pipeline: typed configuration, datasets and the resumable stages."""

from .config import SCHEMA, ConfigError, load_config, parse_overrides, resolve, schema_text, to_toml
from .datasets import Dataset, load_dataset, synthetic
from .stages import STAGES, Pipeline, run_pipeline

__all__ = [
    "SCHEMA",
    "ConfigError",
    "load_config",
    "parse_overrides",
    "resolve",
    "schema_text",
    "to_toml",
    "Dataset",
    "load_dataset",
    "synthetic",
    "STAGES",
    "Pipeline",
    "run_pipeline",
]
