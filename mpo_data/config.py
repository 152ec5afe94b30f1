"""Settings declared once, as dataclass fields with help and default; YAML sections and flags come from them.

`build` turns a YAML mapping (or the flags `add_arguments` derived) into (nested) dataclasses, strictly: an
unknown or mistyped key is an error naming it and the file. Nested sections keep their field names: the
stage's `engine: {max_model_len: 8192}` in YAML is `--max-model-len 8192` on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mpo_data.errors import InputError

T = TypeVar("T")


class YamlMap(dict):
    """A YAML mapping that remembers where it and each of its keys stand in the file, for FILE:LINE messages."""

    line: int | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lines: dict[Any, int] = {}
        self.written: dict[Any, Any] = {}  # field -> the alias the file used for it (`canonical` renamed it)


# A config that keeps a YamlMap (a dict field such as `dpo`) is written back as a plain mapping (train's run config).
yaml.SafeDumper.add_representer(YamlMap, yaml.representer.SafeRepresenter.represent_dict)


class _Loader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error at its line (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> YamlMap:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:  # the mapping's own keys; `<<` merges may be overridden, as YAML allows
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                problem=f"duplicate key '{key}' (first given at line {seen[key]})", problem_mark=key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    loader.flatten_mapping(node)
    mapping = YamlMap()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` as a string (it wants `1.0e-4`), and a learning rate given so
# would reach the optimizer as text.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_scalar(text: str) -> Any:
    """A command-line value read as YAML (1 -> int, 1e-4 -> float, true -> bool, x -> str), as config files are."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path` (a `YamlMap`, lines kept); a missing file, bad YAML or a duplicate key
    raises InputError naming the file and line."""
    path = Path(path)
    try:
        data = yaml.load(path.read_bytes(), Loader=_Loader)  # bytes: PyYAML reads a BOM and UTF-16 itself
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def at(source: str, data: Any, key: Any = None) -> str:
    """`source` with the line of `key` in the YAML mapping `data` (or of the mapping itself) when known."""
    line = getattr(data, "lines", {}).get(key) if key is not None else None
    line = line or getattr(data, "line", None)
    return f"{source}:{line}" if line else source


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` command-line overrides (values parsed as YAML scalars) applied to a config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"override '{item}': expected KEY=VALUE")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override '{item}': '{part}' is not a section")
        node[leaf] = yaml_scalar(value)
    return data


def yaml_names(f: dataclasses.Field) -> list[str]:
    """The YAML keys of a field: its name and the names of its flag aliases (`--tp` -> `tp`)."""
    return [f.name, *(alias.lstrip("-").replace("-", "_") for alias in f.metadata.get("aliases", ()))]


def _key_paths(cls: type, prefix: str = "") -> dict[str, list[str]]:
    """Every YAML key of `cls` and its sections (aliases included) -> the key paths where it belongs."""
    hints = typing.get_type_hints(cls)
    paths: dict[str, list[str]] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        for name in yaml_names(f):
            paths.setdefault(name, []).append(
                f"{prefix}{name}" if name == f.name else f"{prefix}{name} ({prefix}{f.name})"
            )
        if dataclasses.is_dataclass(hints[f.name]):
            for name, found in _key_paths(hints[f.name], f"{prefix}{f.name}.").items():
                paths.setdefault(name, []).extend(found)
    return paths


def _unknown_key(name: Any, paths: dict[str, list[str]], known: list[str]) -> str:
    """Why `name` is refused, with where it (or the key it most resembles) belongs: "did you mean engine.model?"."""
    guesses = [str(name)] if str(name) in paths else difflib.get_close_matches(str(name), list(paths), n=2)
    elsewhere = [p for guess in guesses for p in paths[guess]]
    if elsewhere:
        return f"unknown key '{name}' here: did you mean {' or '.join(elsewhere)}?"
    return f"unknown key '{name}' (known: {', '.join(sorted(known))})"


def _yaml_keys(classes: tuple[type, ...]) -> dict[str, tuple[str, Any]]:
    """Every YAML key of `classes` (field names and their aliases) -> (field name, the field's type)."""
    keys = {}
    for c in classes:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            if f.init:
                keys.update({name: (f.name, hints[f.name]) for name in yaml_names(f)})
    return keys


def unknown_keys(cls: type, data: Any, source: str, key: str = "", classes: tuple[type, ...] = ()) -> list[str]:
    """A line for every key in `data` and its sections that `cls` (or any of `classes`) does not know."""
    classes = classes or (cls,)
    if not isinstance(data, dict):
        return []
    keys = _yaml_keys(classes)
    paths: dict[str, list[str]] = {}
    for c in classes:
        for name, found in _key_paths(c).items():
            paths.setdefault(name, []).extend(p for p in found if p not in paths.get(name, []))
    fields = sorted({field_name for field_name, _ in keys.values()})
    problems = []
    for name, value in data.items():
        if name not in keys:
            problems.append(
                f"{at(source, data, name)}: {key + ': ' if key else ''}{_unknown_key(name, paths, fields)}"
            )
        elif dataclasses.is_dataclass(keys[name][1]):
            problems += unknown_keys(keys[name][1], value, source, f"{key}.{name}" if key else name)
    return problems


def canonical(cls: type, data: Any, source: str, key: str = "") -> Any:
    """`data` with every alias key renamed to its field (`checkpoint` -> `model`), in `cls`'s sections too and
    YAML lines kept, so settings merged over defaults override them whichever name each one used."""
    if not isinstance(data, dict):
        return data
    keys = _yaml_keys((cls,))
    out = YamlMap()
    out.line, out.written = getattr(data, "line", None), dict(getattr(data, "written", {}))
    for name, value in data.items():
        field_name, hint = keys.get(name, (name, None))
        if field_name in out:
            raise InputError(
                f"{at(source, data, name)}: {key + ': ' if key else ''}'{name}' and "
                f"'{out.written.get(field_name, field_name)}' set the same setting ({field_name}): keep one"
            )
        out[field_name] = (
            canonical(hint, value, source, f"{key}.{name}" if key else name)
            if dataclasses.is_dataclass(hint)
            else value
        )
        if name != field_name:
            out.written[field_name] = name
        if name in getattr(data, "lines", {}):
            out.lines[field_name] = data.lines[name]
    return out


def build(cls: type[T], data: Any, source: str, key: str = "", base: T | None = None, _nested: bool = False) -> T:
    """Instantiate dataclass `cls` from a dict, recursing into dataclass, list and dict fields.

    Keys missing from `data` take their value from `base` (an instance) or else the field default; a nested
    section given in part keeps the defaults its owner declares for the rest. A field's flag aliases are
    YAML keys too (`engine: {checkpoint: M, tp: 2}`). Messages read "SOURCE[:LINE]: KEY.PATH: problem",
    e.g. "pipelines/demo.yaml:12: datasets[1].stage: ..."; every unknown key of a mapping is named at once.
    """
    where = f"{at(source, data)}: {key}" if key else at(source, data)
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if not _nested:  # the whole tree at once: every unknown key, then aliases renamed to their fields
        unknown = unknown_keys(cls, data, source, key)
        if unknown:
            raise InputError("\n".join(unknown))
        data = canonical(cls, data, source, key)
    values = {name: getattr(base, name) for name in fields} if base is not None else {}
    missing = [
        name
        for name, f in fields.items()
        if name not in data and name not in values and _default(f, None) is dataclasses.MISSING
    ]
    if missing:
        raise InputError(f"{where}: missing key '{missing[0]}'")
    for name, value in data.items():
        written = getattr(data, "written", {}).get(name, name)  # messages name the key as the file wrote it
        path = f"{key}.{written}" if key else written
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            nested = values.get(name, _default(fields[name], None))
            values[name] = build(
                hints[name], value, source, path, None if nested is dataclasses.MISSING else nested, True
            )
        else:
            values[name] = _convert(hints[name], value, source, path, at(source, data, name))
        choices = fields[name].metadata.get("choices")
        if choices and values[name] not in choices:
            raise InputError(
                f"{at(source, data, name)}: {path}: expected one of {list(choices)}, got {values[name]!r}"
            )
    return cls(**values)


def _convert(hint: Any, value: Any, source: str, key: str, loc: str | None = None) -> Any:
    """`value` as type `hint`; errors read "LOC: KEY: ..." (LOC: the source with the line of the key)."""
    where = f"{loc or source}: {key}"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, source, key, loc)
            except InputError as e:
                errors.append(str(e))
        raise InputError(errors[0] if len(options) == 1 else f"{where}: {value!r} fits none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise InputError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if hint is Path and isinstance(value, str):
        return Path(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise InputError(f"{where}: expected {len(args)} values, got {len(value)}")
        types_ = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args) or [Any] * len(value)
        return tuple(_convert(t, v, source, f"{key}[{i}]", loc) for i, (t, v) in enumerate(zip(types_, value)))
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, key)
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(args[0], v, source, f"{key}[{i}]", loc) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {type(value).__name__}")
        if not args:
            return value
        converted = YamlMap(
            {k: _convert(args[1], v, source, f"{key}.{k}", at(source, value, k)) for k, v in value.items()}
        )
        converted.line, converted.lines = getattr(value, "line", None), getattr(value, "lines", {})
        return converted
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise InputError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section (a nested mapping is merged, not replaced); the YAML
    lines of both are kept, so a merged key is still reported at the line that gave it."""
    merged = YamlMap(base)
    merged.line = getattr(over, "line", None) or getattr(base, "line", None)
    merged.lines = {**getattr(base, "lines", {}), **getattr(over, "lines", {})}
    merged.written = {**getattr(base, "written", {}), **getattr(over, "written", {})}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merge(merged[key], value)
        merged[key] = value
    return merged


# ---- command-line flags derived from the same dataclasses ----


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml_scalar(value)


def _flag_kwargs(hint: Any, f: dataclasses.Field) -> dict[str, Any]:
    """argparse arguments for one field type: bools get --x/--no-x, lists and mappings repeat the flag."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _flag_kwargs(options[0], f) if len(options) == 1 else {"type": yaml_scalar}
    choices = f.metadata.get("choices")
    if origin is typing.Literal:
        choices = args
    if choices:
        return {"choices": list(choices), "type": type(choices[0])}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is dict:
        return {"action": "append", "type": _key_value, "metavar": "KEY=VALUE"}
    if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed-size tuple: `--flag LO HI`
        return {"nargs": len(args), "type": args[0] if args[0] in (int, float, str) else yaml_scalar}
    if origin in (list, tuple):
        return {"action": "append", "type": args[0] if args and args[0] in (str, int, float) else yaml_scalar}
    if hint in (int, float, str):
        return {"type": hint}
    return {"type": str if hint is Path else yaml_scalar}


def _flags(f: dataclasses.Field) -> list[str]:
    name = f.name.replace("_", "-")
    return [f"-{name}" if len(name) == 1 else f"--{name}", *f.metadata.get("aliases", ())]


def _default(f: dataclasses.Field, base: Any) -> Any:
    if base is not None:
        return getattr(base, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, base: Any = None, prefix: str = ""
) -> None:
    """One flag per field of dataclass `cls`, nested dataclass fields flattened (their flags carry no prefix).

    Flag, type, choices, default and help all come from the field; `base` (an instance) gives the defaults
    of a nested section when its owner declares other ones (e.g. 8 samples per item for correctness).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = _default(f, base)
        if dataclasses.is_dataclass(hints[f.name]):
            section = hints[f.name]
            # one help group per section (argparse groups do not nest: deeper sections join their parent's)
            group = (
                parser.add_argument_group(f"{prefix}{f.name}", section.__doc__)
                if isinstance(parser, argparse.ArgumentParser)
                else parser
            )
            add_config_arguments(
                group, section, default if default is not dataclasses.MISSING else None, f"{prefix}{f.name}."
            )
            continue
        kwargs = _flag_kwargs(hints[f.name], f)
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        elif (
            default is not None
            and default is not False
            and default not in ({}, [])
            and kwargs.get("action") != "append"
        ):
            kwargs["default"] = default
            help_text += f" (default: {default})"
        if "choices" not in kwargs and kwargs.get("action") is not argparse.BooleanOptionalAction:
            kwargs.setdefault("metavar", f.metadata.get("metavar", f.name.upper()))
        parser.add_argument(*_flags(f), dest=prefix + f.name, help=help_text, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, base: T | None = None) -> T:
    """The dataclass that `add_config_arguments(parser, cls)` flags describe, checked as a YAML config is."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    data: dict[str, Any] = {}
    for dest, value in vars(args).items():
        *parents, leaf = dest.split(".")
        if value is None or (parents or [leaf])[0] not in names:
            continue  # not given (the field default applies), or another part of the command line
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = dict(value) if isinstance(value, list) and value and isinstance(value[0], tuple) else value
    return build(cls, data, "command line", base=base)
