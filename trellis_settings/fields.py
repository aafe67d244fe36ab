"""How a setting is declared: its type, default and bounds (pydantic), the command-line flag that sets it (the
flag names every Trellis command already had), whether it is a secret, and whether it can change without a
restart."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A table of settings: unknown keys are errors (a typo must not silently fall back to a default)."""
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


def setting(default: Any, help: str, *, flag: str | None = None, env: str | None = None, secret: bool = False,
            reload: bool = False, **bounds: Any) -> Any:
    """A setting's field. flag: the argparse dest it maps to (its `--flag`); env: an older variable also read
    (below the TRELLIS_<PROCESS>__... name); secret: masked wherever settings are shown or logged; reload:
    applied on SIGHUP or a change of the config file, without a restart."""
    return Field(default, description=help,
                 json_schema_extra={"flag": flag, "env": env, "secret": secret, "reload": reload}, **bounds)


def extra(field) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
