"""Controllers by name: what RunRequest.controller and ListControllers refer to."""

from __future__ import annotations

from controllers.base import Controller, ParamError
from controllers.beam_search import BeamSearch
from controllers.best_first import BestFirstSearch
from controllers.best_of_n import BestOfN
from controllers.budget_vote import BudgetMajorityVote
from controllers.deepconf import DeepConfOffline, DeepConfOnline
from controllers.dynasor import DynasorCoT
from controllers.majority_vote import MajorityVote
from controllers.mcts import MCTS
from controllers.native import NativeGeneration
from controllers.tree_of_thoughts import TreeOfThoughts
from controllers.weighted_vote import WeightedMajorityVote

REGISTRY: dict[str, type[Controller]] = {c.name: c for c in (
    NativeGeneration, MajorityVote, WeightedMajorityVote, BudgetMajorityVote, BestOfN, DynasorCoT,
    DeepConfOffline, DeepConfOnline, BeamSearch, BestFirstSearch, MCTS, TreeOfThoughts,
)}


def controller_class(name: str) -> type[Controller]:
    if not name:
        raise ParamError("controller", f"must be set (one of: {', '.join(REGISTRY)})")
    try:
        return REGISTRY[name]
    except KeyError:
        raise ParamError("controller", f"unknown controller {name!r} (known: {', '.join(REGISTRY)})") from None
