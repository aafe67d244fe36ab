"""`trellis eval`: the shipped dataset, answer reading, and a small run through real router and worker."""

from __future__ import annotations

import json

from benchmarks.eval_data import DATASET_KINDS, generate
from client import cli
from client.eval import DATASET, answer_number, load_problems, split_spec


def test_the_shipped_dataset_is_what_the_seeded_generator_writes():
    shipped = load_problems(DATASET, None)
    assert len(shipped) == 300
    assert shipped == generate(300, 2026)
    assert {row["kind"] for row in shipped} == set(DATASET_KINDS)
    for row in shipped:
        assert int(row["answer"]) >= 0


def test_answer_number_prefers_boxed_then_the_last_number():
    assert answer_number("so 3 + 4 = 7, then \\boxed{12} and 99") == "12"
    assert answer_number("It is 1,234.0 apples") == "1234"
    assert answer_number("first 3 then 8.") == "8"
    assert answer_number("no number") == ""


def test_a_controller_spec_fixes_typed_parameters():
    assert split_spec("majority_vote") == ("majority_vote", {})
    assert split_spec("majority_vote?stop_decided=false&extractor=boxed&threshold=0.9&n=3") == (
        "majority_vote", {"stop_decided": False, "extractor": "boxed", "threshold": 0.9, "n": 3})


def test_eval_reports_every_cell_through_router_and_worker(tiny_router, tmp_path):
    out = tmp_path / "cells.json"
    table = tmp_path / "eval.md"
    code = cli.parser().parse_args([
        "--router", tiny_router.address, "eval", "--controllers", "native_generation,majority_vote",
        "--budgets", "1,2", "--limit", "3", "--max-tokens", "6", "--concurrency", "2",
        "--json", str(out), "--markdown", str(table)])
    code.router_given = True
    assert code.func(code) == 0
    cells = json.loads(out.read_text())
    assert [(c["controller"], c["budget"]) for c in cells] == [
        ("native_generation", 1), ("majority_vote", 1), ("majority_vote", 2)]
    for cell in cells:
        assert cell["errors"] == 0 and 0.0 <= cell["accuracy"] <= 1.0 and cell["tokens"] > 0
    # Twice the samples cost about twice the tokens.
    assert cells[2]["tokens"] > cells[1]["tokens"]
    assert "| majority_vote | 2 |" in table.read_text()
