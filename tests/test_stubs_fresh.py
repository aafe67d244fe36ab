"""The checked-in stubs must be exactly what `python -m trellis_rpc.codegen` makes from protos/."""

from __future__ import annotations

from trellis_rpc.codegen import STUB_DIR, generate


def test_checked_in_stubs_match_the_protos(tmp_path):
    fresh = {p.name: p.read_text() for p in generate(tmp_path / "v1")}
    checked_in = {p.name: p.read_text() for p in STUB_DIR.iterdir() if p.is_file()}
    stale = sorted(name for name in fresh if checked_in.get(name) != fresh[name])
    extra = sorted(set(checked_in) - set(fresh))
    assert not stale and not extra, f"stale stubs {stale}, stray files {extra}: run `make protos`"
