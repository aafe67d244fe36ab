"""A process's command line on top of its settings model: the existing flags keep their names and help, but
their defaults come from the model (one place), `--config FILE` and `--print-config` are added, and a bad
setting exits 2 naming it."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic

from pydantic import BaseModel

from trellis_settings.fields import extra
from trellis_settings.layers import Loaded, M, SettingsError, env_name, flat, leaves, load


@dataclass
class Configured(Generic[M]):
    loaded: Loaded[M]
    args: argparse.Namespace      # the parsed flags, every setting's flag filled in from the effective settings
    given: dict[tuple[str, ...], Any]   # the settings set by flags (kept for reloads: flags still win)
    flag_names: dict[tuple[str, ...], str]

    @property
    def settings(self) -> M:
        return self.loaded.settings

    def reload(self) -> Loaded[M]:
        """The settings again from the same flags and environment and the config file as it is now."""
        return load(type(self.loaded.settings), self.loaded.process, self.given, None, self.loaded.config,
                    self.flag_names)


def value_at(settings: BaseModel, path: tuple[str, ...]) -> Any:
    for part in path:
        settings = getattr(settings, part)
    return settings


def configure(parser: argparse.ArgumentParser, model: type[M], process: str,
              argv: list[str] | None = None) -> Configured[M]:
    infos = leaves(model)
    paths = {extra(info)["flag"]: path for path, info in infos.items() if extra(info).get("flag")}
    options: dict[tuple[str, ...], str] = {}
    for action in parser._actions:
        if action.dest in paths:
            path = paths[action.dest]
            options[path] = action.option_strings[0].lstrip("-")
            action.default = argparse.SUPPRESS
            shown = infos[path].default
            action.help = (f"{action.help or infos[path].description} "
                           f"[setting {process}.{'.'.join(path)}, env {env_name(process, path)}, "
                           f"default {shown if shown not in (None, '') else 'unset'}]").replace("%", "%%")
    parser.add_argument("--config", type=Path, default=os.environ.get("TRELLIS_CONFIG") or None,
                        help="settings file (TOML, a table per process: [router], [worker_cpu], ...); flags and "
                             "TRELLIS_<PROCESS>__<SECTION>__<KEY> variables override it (env TRELLIS_CONFIG)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective settings and where each came from (secrets masked), and exit")
    args = parser.parse_args(argv)
    given = {paths[dest]: value for dest, value in vars(args).items() if dest in paths}
    try:
        loaded = load(model, process, given, None, args.config, options)
    except SettingsError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for dest, path in paths.items():
        setattr(args, dest, value_at(loaded.settings, path))
    if args.print_config:
        print(render(loaded), end="")
        parser.exit(0)
    return Configured(loaded, args, given, options)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def render(loaded: Loaded) -> str:
    """The effective settings as a TOML file (it loads back), each value's source in a comment."""
    lines = [f"# Effective settings of {loaded.process}: flags > environment > file > defaults; secrets masked."]
    table = None
    for dotted, value in flat(loaded.settings).items():
        section, _, key = dotted.rpartition(".")
        if section != table:
            table = section
            lines += ["", f"[{loaded.process}.{section}]"] if section else [f"[{loaded.process}]"]
        source = loaded.sources[f"{loaded.process}.{dotted}"]
        if value is None:
            lines.append(f"# {key} = (unset)  # {source}")
        elif value == "***":       # a secret: shown as set, commented out so the printed file never carries "***"
            lines.append(f'# {key} = "***"  # {source}; secret, masked')
        else:
            lines.append(f"{key} = {_toml(value)}  # {source}")
    return "\n".join(lines) + "\n"


def log_settings(loaded: Loaded, log) -> None:
    """Once at start: every effective setting (secrets masked) and the ones not left at their default."""
    log.info("settings", config=str(loaded.config) if loaded.config else None,
             settings=flat(loaded.settings),
             overridden={k: v for k, v in loaded.sources.items() if v != "default"})
