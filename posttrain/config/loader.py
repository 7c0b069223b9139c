"""Loading a config: schema defaults <- YAML file (or preset) <- dotted overrides, then validation.

Every problem is a :class:`~posttrain.errors.ConfigError` that names the dotted key, what is
wrong and how to fix it. OmegaConf does the merging and type conversion, but its exceptions are
translated here and never reach the user.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from posttrain.config.fields import field_types, format_value, iter_fields, iter_sections, type_name
from posttrain.config.validate import validate_config
from posttrain.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
T = TypeVar("T")


def list_presets() -> list[str]:
    """Names of the bundled presets (``posttrain/config/presets/NAME.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config_file(name_or_path: str | Path) -> Path:
    """An existing YAML file path, else a preset name (with or without ``.yaml``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    preset = PRESETS_DIR / f"{stem}.yaml"
    if "/" not in stem and "\\" not in stem and preset.is_file():
        return preset
    what = "is a folder, not a file" if path.is_dir() else "does not exist and is not a preset"
    raise ConfigError(f"Config file '{name}' {what}. Pass a path to a YAML file or a preset name; "
                      f"presets: {', '.join(list_presets())}.")


def load_config(schema: type[T], config_file: str | Path | None = None, overrides: Sequence[str] = (),
                run_config: str | Path | None = None, validate: bool = True) -> T:
    """Build a validated ``schema`` instance from its defaults, a YAML file and ``KEY=VALUE`` overrides.

    Later sources win. ``config_file`` is a path or a preset name. ``run_config``: the config.yaml of
    a run being resumed, applied after the defaults and before ``config_file``, so a resume continues
    with the run's own settings where the command line gives none. ``validate=False`` skips the
    checks across options (types are still checked). Raises ConfigError.
    """
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    cfg = OmegaConf.structured(schema)
    if run_config:
        run_config = Path(run_config)
        layer = _read_yaml(run_config)
        trainer = layer.get("trainer")
        saved_dir = trainer.get("output_dir") if isinstance(trainer, dict) else None
        if saved_dir and Path(str(saved_dir)).resolve() != run_config.parent.resolve():
            # The run folder was moved or copied (or the saved path was relative to another working
            # folder): the resumed run goes on where its config.yaml is now, not at the old path.
            trainer["output_dir"] = str(run_config.parent)
        _apply(cfg, schema, layer, f"in the run's saved config {run_config}")
    if config_file:
        path = resolve_config_file(config_file)
        _apply(cfg, schema, _read_yaml(path), f"in file {path}")
    for item in overrides:
        key, value = _parse_override(schema, item)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _apply(cfg, schema, nested, f"in override '{item}'")
    try:
        obj = OmegaConf.to_object(cfg)  # resolves ${...} interpolations, checks the types again
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    if validate:
        validate_config(obj)
    return obj  # type: ignore[return-value]


def config_to_yaml(cfg: Any) -> str:
    """The full config as YAML (``--print-config``); loading it back gives an equal object."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts (for logging hyperparameters)."""
    return dataclasses.asdict(cfg)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = e.problem or "invalid YAML"
        if e.context and e.context_mark:
            what += f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(f"YAML syntax error in {path}{where}: {what}. Fix the file: indent with "
                          "spaces, and quote values that contain ': ' or ' #'.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"Cannot parse {path} as YAML: {e}") from None
    except OSError as e:
        # OmegaConf reports a top-level scalar as an OSError too ("Invalid loaded object type").
        if "Invalid loaded object type" not in str(e):
            raise ConfigError(f"Cannot read config file {path}: {e.strerror or e}") from None
        loaded = None
    except OmegaConfBaseException as e:
        raise ConfigError(f"Cannot load config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if loaded is not None else "a single value"
        raise ConfigError(f"Config file {path} holds {kind} at its top level; it must be a mapping of "
                          "sections to options, e.g.\ntrainer:\n  lr: 1.0e-06")
    return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]


def _parse_override(schema: type, item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"Override '{item}' has no '='. Write overrides as KEY=VALUE with a dotted "
                          "key, e.g. trainer.lr=1e-6 or rollout.stop=[a,b].")
    if not key or any(not part or part != part.strip() or "[" in part for part in key.split(".")):
        raise ConfigError(f"Override '{item}' has an invalid key '{key}'. Use a dotted key such as "
                          "trainer.lr (list items cannot be set one by one: give the whole list).")
    if raw == "":
        return key, ""  # `key=` means an empty string: no option accepts null
    info = _field_info(schema, key)
    if info is not None and info.type_name == "str" and raw[0] not in "'\"":
        return key, raw  # verbatim, so 'You are: helpful' or '1e-6' stay the text typed
    try:
        # Parsed as YAML (as OmegaConf does), so 1e-6 is a float and [a,b] a list.
        return key, OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        detail = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"Cannot parse the value of override '{item}': {detail}. Quote values with "
                          f"special characters, e.g. {key}='\"...\"'.") from None


def _field_info(schema: type, key: str) -> Any:
    return next((f for f in iter_fields(schema) if f.key == key), None)


def _apply(cfg: DictConfig, schema: type, layer: dict[str, Any], source: str) -> None:
    """Merge one source into ``cfg`` key by key, so a bad value is reported with its own key."""
    for key, value in _flatten(layer, schema, schema, "", source):
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException:
            info = _field_info(schema, key)
            given = format_value(value) + ("" if value is None else f" ({type(value).__name__})")
            raise ConfigError(
                f"Wrong type for config key '{key}' ({source}): expected {info.type_name}, got {given}. "
                f"Example of a valid value (the default): {key}={format_value(info.default)}") from None


def _flatten(layer: dict[str, Any], root: type, section: type, prefix: str, source: str) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs of the leaf options in ``layer``; unknown keys raise ConfigError."""
    types = field_types(section)
    pairs: list[tuple[str, Any]] = []
    for name, value in layer.items():
        key = f"{prefix}{name}"
        if name not in types:
            raise ConfigError(_unknown_key_message(root, section, key, source))
        tp = types[name]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue  # `trainer:` with every option commented out: nothing to set
            if not isinstance(value, dict):
                raise ConfigError(f"Config key '{key}' ({source}) is a section, not a single value "
                                  f"(got {format_value(value)}). Set its options instead, e.g. {key}."
                                  f"{dataclasses.fields(tp)[0].name}=...; options: "
                                  f"{', '.join(f.name for f in dataclasses.fields(tp))}.")
            pairs += _flatten(value, root, tp, key + ".", source)
        elif isinstance(value, dict) and tp not in (dict, Any) and value:
            raise ConfigError(f"Unknown config key '{key}.{next(iter(value))}' ({source}): '{key}' is an "
                              f"option of type {type_name(tp)}, not a section. Set it directly, e.g. "
                              f"{key}={format_value(_field_info(root, key).default)}.")
        else:
            pairs.append((key, value))
    return pairs


def _unknown_key_message(root: type, section: type, key: str, source: str) -> str:
    known = [f.key for f in iter_fields(root)] + [s.key.rstrip(".") for s in iter_sections(root) if s.key]
    leaf = key.rpartition(".")[2]
    # Same option name in another section first ('lr' -> 'trainer.lr'), then near spellings.
    candidates = [k for k in known if k.rpartition(".")[2] == leaf]
    candidates += difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    by_leaf = {k.rpartition(".")[2]: k for k in known}
    candidates += [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75)]
    message = f"Unknown config key '{key}'."
    if candidates:
        message += f" Did you mean '{candidates[0]}'?"
    parent = key.rpartition(".")[0]
    names = ", ".join(f.name for f in dataclasses.fields(section))
    message += f"\n  Valid keys in '{parent}': {names}" if parent else f"\n  Valid top-level keys: {names}"
    return message + f"\n  (set {source})"


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, MissingMandatoryValue):
        return f"Config key '{key}' has no value ('???'). Set it in the config file or with {key}=VALUE."
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (f"Invalid value for config key '{key}': {first}. Fix the value in the config file or "
            "override (interpolations look like ${section.key}).")
