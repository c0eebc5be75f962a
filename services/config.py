"""Typed job configs: YAML files validated by pydantic, with `--set a.b=c` overrides."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names field, value and rule."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value) where the value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for override in overrides:
        path, value = parse_override(override)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        value = item.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {field} = {shown[:120]}: {item['msg']}")
    return "\n".join(lines)


def load_config(model: type[ConfigT], path: str | Path | None = None, overrides: list[str] = ()) -> ConfigT:
    """Read `path` (YAML, optional), apply `key=value` overrides, validate against `model`."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    data = apply_overrides(data, list(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def dump_config(config: BaseModel) -> str:
    """The effective config as YAML, written next to every output."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def job_config_from_command_line(model: type[ConfigT], argv: list[str] | None, *, doc: str | None,
                                 example_config: str, example_override: str) -> ConfigT:  # fmt: skip
    """A job's `--config FILE [--set KEY=VALUE ...]` -> its validated config; an invalid one exits 2 with the error."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file ({example_config})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override, e.g. {example_override}")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        return load_config(model, args.config, args.set)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None

