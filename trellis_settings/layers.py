"""The layers a process's settings come from, merged in order of precedence (flag > env > file > default), each
value's source kept, and the result validated by the process's settings model.

Why not pydantic-settings' own sources: its command-line source renames the flags (`--admission.max_queued_runs`)
where every existing command and manifest must keep working, and no source says where a value came from, which
`--print-config` shows. So the layering (this module) is ours; typing, bounds and coercion of env/file text are
pydantic's; the file is TOML read by the standard library's tomllib.
"""

from __future__ import annotations

import difflib
import functools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from trellis_settings.fields import extra

M = TypeVar("M", bound=BaseModel)
PROCESSES = ("router", "worker_cpu", "worker_gpu", "worker_openai", "gateway")


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it (`router.admission.max_queued_runs: ...`)."""


@dataclass
class Loaded(Generic[M]):
    settings: M
    process: str
    # dotted path -> where its value came from: "default", "file PATH", "env NAME" or "flag --name"
    sources: dict[str, str] = field(default_factory=dict)
    config: Path | None = None


@functools.cache
def leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every setting of a model: path -> its pydantic FieldInfo (computed once per model; callers only read it)."""
    out: dict[tuple[str, ...], Any] = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out.update(leaves(kind, (*prefix, name)))
        else:
            out[(*prefix, name)] = info
    return out


def env_name(process: str, path: tuple[str, ...]) -> str:
    return "__".join(("TRELLIS_" + process, *path)).upper()


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(choices))}"


def _file_layer(model: type[BaseModel], process: str, path: Path) -> dict[tuple[str, ...], Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise SettingsError(f"--config: cannot read {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"--config: {path} is not valid TOML: {err}") from None
    for top in data:
        if top not in PROCESSES:
            raise SettingsError(f"{top}: not a Trellis process's table in {path}{_suggest(top, list(PROCESSES))}")
    out: dict[tuple[str, ...], Any] = {}

    def walk(node: Mapping[str, Any], kind: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for key, value in node.items():
            info = kind.model_fields.get(key)
            dotted = ".".join((process, *prefix, key))
            if info is None:
                raise SettingsError(f"{dotted}: unknown setting in {path}{_suggest(key, list(kind.model_fields))}")
            sub = info.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                if not isinstance(value, Mapping):
                    raise SettingsError(f"{dotted}: is a table of settings, got {value!r} in {path}")
                walk(value, sub, (*prefix, key))
            else:
                out[(*prefix, key)] = value

    section = data.get(process, {})
    if not isinstance(section, Mapping):
        raise SettingsError(f"{process}: must be a table in {path}")
    walk(section, model, ())
    return out


def _env_layer(model: type[BaseModel], process: str, env: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    names = {env_name(process, p): p for p in leaves(model)}
    prefix = f"TRELLIS_{process.upper()}__"
    out = {}
    for path, info in leaves(model).items():      # older names (TRELLIS_WORKERS, ...): below the canonical one
        alias = extra(info).get("env")
        if alias and env.get(alias):
            out[path] = env[alias]
    for key, value in env.items():
        if not key.startswith(prefix):
            continue
        if key not in names:
            raise SettingsError(f"{key}: not a setting of {process}{_suggest(key, list(names))}")
        out[names[key]] = value
    return out


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, value in flat.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return root


_MESSAGES = {"greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}",
             "less_than_equal": "must be <= {le}", "less_than": "must be < {lt}",
             "literal_error": "must be one of {expected}"}


def _explain(err: ValidationError, process: str, sources: Mapping[str, str]) -> str:
    lines = []
    for e in err.errors():
        path = ".".join((process, *[str(p) for p in e["loc"] if isinstance(p, str)]))
        template = _MESSAGES.get(e["type"])
        message = template.format(**e.get("ctx", {})) if template else e["msg"][0].lower() + e["msg"][1:]
        source = sources.get(path, "")
        got = e["input"] if source.startswith("env") else repr(e["input"])   # the environment's text as written
        lines.append(f"{path}: {message}, got {got}" + (f" (from {source})" if source else ""))
    return "\n".join(lines)


def load(model: type[M], process: str, flags: Mapping[tuple[str, ...], Any] | None = None,
         env: Mapping[str, str] | None = None, config: Path | None = None,
         flag_names: Mapping[tuple[str, ...], str] | None = None) -> Loaded[M]:
    """The settings from every layer. flags: the paths set on the command line (only those given); env: the
    environment (default os.environ); config: the TOML file. Raises SettingsError naming the setting."""
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[tuple[str, ...], Any]]] = []
    if config is not None:
        layers.append((f"file {config}", _file_layer(model, process, config)))
    layers.append(("env", _env_layer(model, process, env)))
    layers.append(("flag", dict(flags or {})))
    merged: dict[tuple[str, ...], Any] = {}
    sources = {".".join((process, *p)): "default" for p in leaves(model)}
    for name, layer in layers:
        for path, value in layer.items():
            merged[path] = value
            dotted = ".".join((process, *path))
            if name == "env":
                alias = extra(leaves(model)[path]).get("env")
                canonical = env_name(process, path)
                sources[dotted] = f"env {canonical if canonical in env or not alias else alias}"
            elif name == "flag":
                sources[dotted] = f"flag --{(flag_names or {}).get(path, path[-1]).replace('_', '-')}"
            else:
                sources[dotted] = name
    try:
        settings = model.model_validate(_nest(merged))
    except ValidationError as err:
        raise SettingsError(_explain(err, process, sources)) from None
    return Loaded(settings, process, sources, config)


def flat(settings: BaseModel, model: type[BaseModel] | None = None, masked: bool = True) -> dict[str, Any]:
    """dotted path (without the process) -> value, secrets masked."""
    out = {}
    for path, info in leaves(model or type(settings)).items():
        value: Any = settings
        for part in path:
            value = getattr(value, part)
        if masked and extra(info).get("secret") and value:
            value = "***"
        elif isinstance(value, Path):
            value = str(value)       # as written, for logs and TOML alike
        out[".".join(path)] = value
    return out
