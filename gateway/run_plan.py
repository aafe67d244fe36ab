"""Which controller runs, with what parameters, on which worker pool: chosen in ways an OpenAI client can
express without code changes.

- the `model` field: `majority_vote`, `majority_vote?n=8&extractor=boxed`, `majority_vote@SmolLM2?n=8` (the
  part after `@` picks the worker pool's model), or a worker model's own id (`SmolLM2`: native generation on
  that pool);
- an SDK's `extra_body={"trellis": {"controller": ..., "params": {...}, "model": ..., "priority": ...}}`,
  which wins over what the `model` field says.

Parameter values in the `model` field are text; they are typed by the controller's ParamSpec from the
router's catalog, so `n=8` arrives as the int 8 and `extractor=boxed` as a string.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from gateway.errors import bad_request
from trellis_client import Catalog, ControllerInfo

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


@dataclass
class RunPlan:
    controller: str
    params: dict[str, Any] = field(default_factory=dict)
    model: str = ""              # worker pool; "" = the router's default
    priority: int = 0
    events: bool = True          # stream controller events in each chunk's `trellis` field
    requested: str = ""          # the model field as the caller wrote it


def _guess(text: str) -> Any:
    """A value for a controller this caller's catalog does not list (the router will refuse or type-check it)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.lower() in _TRUE if text.lower() in _TRUE | _FALSE else text


def _typed(controller: ControllerInfo | None, name: str, text: str) -> Any:
    spec = next((p for p in controller.params if p.name == name), None) if controller else None
    if spec is None:
        return _guess(text)
    kind = spec.type
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise bad_request(f"params.{name}", f"expected {'an int' if kind == 'int' else 'a number'}, "
                                            f"got {text!r} (in the model field)") from None
    if kind == "bool":
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise bad_request(f"params.{name}", f"expected true or false, got {text!r} (in the model field)")
    return text


def plan(model_field: object, extra: object, catalog: Catalog) -> RunPlan:
    """The run a request asks for; APIError (400 naming the parameter, or 404 for an unknown model)."""
    if not isinstance(model_field, str) or not model_field.strip():
        raise bad_request("model", "required: a controller (e.g. majority_vote?n=8) or a worker model id; "
                                   "GET /v1/models lists them")
    if extra is not None and not isinstance(extra, Mapping):
        raise bad_request("trellis", 'must be an object, e.g. {"controller": "majority_vote", "params": {"n": 8}}')
    extra = dict(extra or {})
    unknown = sorted(set(extra) - {"controller", "params", "model", "priority", "events"})
    if unknown:
        raise bad_request(f"trellis.{unknown[0]}", "unknown; known: controller, params, model, priority, events")

    name, _, query = model_field.strip().partition("?")
    name, _, pool = name.partition("@")
    controller = catalog.controller(name)
    if controller is None and name in catalog.models and not pool:
        pool, name = name, "native_generation"
        controller = catalog.controller(name)
    # A name this caller's catalog does not list goes to the router as a controller all the same: it answers
    # "unknown controller" (404 here) or, for one the caller may not run, PERMISSION_DENIED (403).
    params = {k: _typed(controller, k, v) for k, v in parse_qsl(query, keep_blank_values=True)}

    if "controller" in extra:
        if not isinstance(extra["controller"], str) or not extra["controller"]:
            raise bad_request("trellis.controller", "must be a controller's name (GET /v1/models lists them)")
        if extra["controller"] != name:
            params = {}      # parameters from the model field belong to the controller named there
        name = extra["controller"]
    if "params" in extra:
        if not isinstance(extra["params"], Mapping):
            raise bad_request("trellis.params", "must be an object of controller parameters")
        params.update(extra["params"])
    if "model" in extra:
        if not isinstance(extra["model"], str):
            raise bad_request("trellis.model", "must be a string: a worker pool's model id")
        pool = extra["model"]
    priority = extra.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise bad_request("trellis.priority", f"must be an integer, got {priority!r}")
    events = extra.get("events", True)
    if not isinstance(events, bool):
        raise bad_request("trellis.events", f"must be true or false, got {events!r}")
    return RunPlan(name, params, pool, priority, events, model_field)


def names_known(model_field: object, catalog: Catalog) -> bool:
    """Whether the catalog knows the controller or model the model field names (else it may be stale)."""
    if not isinstance(model_field, str):
        return True
    name = model_field.strip().partition("?")[0].partition("@")[0]
    return catalog.controller(name) is not None or name in catalog.models
