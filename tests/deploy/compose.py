"""Compose files merged the way Docker Compose v2 (compose-go) merges them, without Docker.

Enough of compose-go's loader for this repository's files: `${VAR:-default}` interpolation, `extends`
from another file, the override of one file by the next (mappings merged key by key, `environment`
and `depends_on` merged by name, `command`/`entrypoint`/`healthcheck.test` replaced, other
sequences appended, then `volumes`, `ports` and `profiles` kept unique: the later entry wins), the
`!override` and `!reset` tags, and services left out by inactive profiles. Paths stay as written.
``test_models.py`` compares the result with Compose's own `config` where a Compose v2 binary exists.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Override:
    """A value tagged ``!override``: it replaces what the files before it say, instead of merging."""

    value: Any


class Reset:
    """A value tagged ``!reset``: the key is removed."""


class _Loader(yaml.SafeLoader):
    pass


def _construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_Loader.add_constructor("!override", lambda loader, node: Override(_construct(loader, node)))
_Loader.add_constructor("!reset", lambda loader, node: Reset())

_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``."""

    def substitute(match: re.Match) -> str:
        escaped, name, operator, default, bare = match.groups()
        if escaped:
            return "$"
        if bare:
            return env.get(bare, "")
        current = env.get(name)
        if operator in (":-", ":?") and not current or operator in ("-", "?") and current is None:
            if operator.endswith("?"):
                raise ValueError(f"required variable {name} is missing: {default}")
            return default
        return current or ""

    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, str):
        return _VARIABLE.sub(substitute, value)
    return value


def _mapping(value: Any, *, default: Any = None) -> dict:
    """``environment``/``depends_on`` in either form, as a mapping."""
    if isinstance(value, dict):
        return dict(value)
    result = {}
    for entry in value or []:
        key, sep, item = str(entry).partition("=")
        result[key] = item if sep else copy.deepcopy(default)
    return result


_BY_NAME = {"environment": None, "depends_on": {"condition": "service_started", "required": True}}
_REPLACED = {("command",), ("entrypoint",), ("healthcheck", "test")}


def merge(base: Any, other: Any, path: tuple[str, ...] = ()) -> Any:
    """``other`` (a later file, or the service that extends) over ``base``."""
    if isinstance(other, Override):
        return strip(other.value)
    if isinstance(other, Reset):
        return Reset()
    relative = path[2:] if path[:1] == ("services",) else ()  # the key path inside one service
    if len(relative) == 1 and relative[0] in _BY_NAME:
        merged = _mapping(base, default=_BY_NAME[relative[0]])
        for key, item in _mapping(other, default=_BY_NAME[relative[0]]).items():
            merged[key] = merge(merged[key], item, (*path, key)) if isinstance(merged.get(key), dict) else item
        return merged
    if relative in _REPLACED or other is None:
        return base if other is None else other
    if isinstance(base, dict) and isinstance(other, dict):
        merged = dict(base)
        for key, item in other.items():
            merged[key] = merge(merged[key], item, (*path, key)) if key in merged else strip(item)
        return {key: item for key, item in merged.items() if not isinstance(item, Reset)}
    if isinstance(base, list) and isinstance(other, list):
        return base + strip(other)
    return strip(other)


def strip(value: Any) -> Any:
    """The value without its tags."""
    if isinstance(value, Override):
        return strip(value.value)
    if isinstance(value, dict):
        return {key: strip(item) for key, item in value.items() if not isinstance(item, Reset)}
    if isinstance(value, list):
        return [strip(item) for item in value]
    return value


def _volume_target(entry: Any) -> str:
    if isinstance(entry, dict):
        return entry["target"]
    parts = str(entry).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _unique(entries: list, key) -> list:
    kept: dict[str, Any] = {}
    for entry in entries:
        kept[key(entry)] = entry  # a later definition replaces the earlier one, in its place
    return list(kept.values())


def _load_file(path: Path, env: dict[str, str]) -> dict:
    return interpolate(yaml.load(path.read_text(), Loader=_Loader) or {}, env)


def _extend(name: str, service: dict, directory: Path, env: dict[str, str]) -> dict:
    extends = service.get("extends")
    if extends is None:
        return service
    reference = extends if isinstance(extends, dict) else {"service": extends}
    assert "file" in reference, f"{name}: only `extends` from another file is modelled here"
    other = _load_file(directory / reference["file"], env)["services"]
    base = _extend(reference["service"], other[reference["service"]], directory, env)
    return merge(copy.deepcopy(base), {k: v for k, v in service.items() if k != "extends"}, ("services", name))


def project(files: list[Path], env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()) -> dict:
    """The merged model of ``docker compose -f files[0] -f files[1] …`` with these profiles
    active; ``env`` is the interpolation environment (empty: every default applies)."""
    env = env or {}
    model: dict = {}
    for path in files:
        document = _load_file(path, env)
        for name, service in (document.get("services") or {}).items():
            document["services"][name] = _extend(name, service, path.parent, env)
        model = merge(model, document) if model else strip(document)
    services = model.get("services", {})
    for service in services.values():
        if "volumes" in service:
            service["volumes"] = _unique(service["volumes"], _volume_target)
        if "environment" in service:
            service["environment"] = _mapping(service["environment"])
        if "depends_on" in service:
            service["depends_on"] = _mapping(service["depends_on"], default=_BY_NAME["depends_on"])
        for key in ("ports", "profiles"):
            if key in service:
                service[key] = _unique(service[key], str)
    model["services"] = {
        name: service
        for name, service in services.items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }
    return model
