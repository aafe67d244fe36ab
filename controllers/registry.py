"""Controllers by name: what RunRequest.controller and ListControllers refer to.

Each controller module registers its own controllers (controllers.base.register); this module loads them
all, in the order ListControllers shows them: plain generation, the votes, best-of-N, the reasoning
controllers, the searches.
"""

from __future__ import annotations

# isort: off
import controllers.native  # noqa: F401
import controllers.majority_vote  # noqa: F401
import controllers.weighted_vote  # noqa: F401
import controllers.budget_vote  # noqa: F401
import controllers.best_of_n  # noqa: F401
import controllers.dynasor  # noqa: F401
import controllers.deepconf  # noqa: F401
import controllers.beam_search  # noqa: F401
import controllers.best_first  # noqa: F401
import controllers.mcts  # noqa: F401
import controllers.tree_of_thoughts  # noqa: F401
# isort: on
from controllers.base import REGISTRY, Controller
from controllers.errors import ParamError


def controller_class(name: str) -> type[Controller]:
    if not name:
        raise ParamError("controller", f"must be set (one of: {', '.join(REGISTRY)})")
    try:
        return REGISTRY[name]
    except KeyError:
        raise ParamError("controller", f"unknown controller {name!r} (known: {', '.join(REGISTRY)})") from None
