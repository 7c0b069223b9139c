"""Configuration: dataclass schemas, the YAML/override loader with validation, and presets.

``schema.py`` holds every default and help text; ``loader.py`` builds validated config objects;
``reference.py`` generates ``--help`` text and ``docs/config.md`` from the schemas.
"""

from posttrain.config.loader import (
    config_to_dict,
    config_to_yaml,
    list_presets,
    load_config,
    register_validator,
    resolve_config_file,
    validate_config,
)
from posttrain.config.commands import SCHEMAS
from posttrain.config.schema import GRPOConfig

__all__ = [
    "SCHEMAS",
    "GRPOConfig",
    "config_to_dict",
    "config_to_yaml",
    "list_presets",
    "load_config",
    "register_validator",
    "resolve_config_file",
    "validate_config",
]
