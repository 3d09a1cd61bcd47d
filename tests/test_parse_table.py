"""The stored parse table (gradlang/grammar.json) is the grammar's, and parses as it does."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import lark
import pytest

from gradlang import parse_table

ROOT = Path(__file__).parent.parent
GRAMMAR = resources.files("gradlang").joinpath("grammar.lark").read_text()
STORED = json.loads(resources.files("gradlang").joinpath(parse_table.TABLE).read_text())
SOURCES = sorted([*ROOT.glob("examples/*.grad"), *ROOT.glob("stdlib/*.grad"),
                  *ROOT.glob("tests/diagnostics/*.grad")])


def test_the_stored_table_is_the_grammars():
    assert STORED["grammar_sha256"] == parse_table._stamp(GRAMMAR)["grammar_sha256"], \
        "grammar.lark changed: regenerate the table with `python -m gradlang.parse_table`"


def test_the_stored_table_is_used_when_it_is_this_larks(monkeypatch):
    if STORED["lark"] != lark.__version__:
        pytest.skip(f"the table is Lark {STORED['lark']}'s; Lark {lark.__version__} builds")

    def build(grammar):
        raise AssertionError("built the parser although the stored table is current")

    monkeypatch.setattr(parse_table, "build", build)
    assert isinstance(parse_table.parser(), lark.Lark)


def _parsed(parser: lark.Lark, text: str) -> object:
    """The tree with every node's position, or the syntax error's kind and position."""
    try:
        tree = parser.parse(text)
    except lark.exceptions.UnexpectedInput as exc:
        return type(exc).__name__, exc.line, exc.column, sorted(getattr(exc, "expected", ()) or ())
    return [(t.data, t.meta.line, t.meta.column, t.meta.end_line, t.meta.end_column)
            if not t.meta.empty else (t.data,) for t in tree.iter_subtrees()], tree


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_stored_table_parses_as_the_grammar_does(path):
    """Each declaration chunk of every example, stdlib module and diagnostics case (syntax
    errors included) gives the same tree, positions and errors."""
    text = path.read_text()
    assert _parsed(STORED_PARSER, text) == _parsed(BUILT, text)


STORED_PARSER = lark.Lark.load({"data": parse_table._decode(STORED["data"]),
                                "memo": parse_table._decode(STORED["memo"])})
BUILT = parse_table.build(GRAMMAR)
