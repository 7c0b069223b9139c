"""Configuration: dataclass schemas, the YAML/override loader with validation, and presets.

``schema.py`` (and one ``*_schema.py`` per other command) holds every default and help text;
``loader.py`` builds config objects and ``validate/`` checks them; ``fields.py`` walks the schemas,
and ``reference.py`` turns them into ``--help`` text and ``docs/config.md``.
"""

from posttrain.config.loader import (
    config_to_dict,
    config_to_yaml,
    list_presets,
    load_config,
    resolve_config_file,
)
from posttrain.config.validate import validate_config
from posttrain.config.commands import SCHEMAS
from posttrain.config.schema import GRPOConfig

__all__ = [
    "SCHEMAS",
    "GRPOConfig",
    "config_to_dict",
    "config_to_yaml",
    "list_presets",
    "load_config",
    "resolve_config_file",
    "validate_config",
]
