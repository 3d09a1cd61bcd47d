"""The LALR parser of `grammar.lark`, stored as a JSON table so that no process builds it.

Building the parser from the grammar takes 150-450 ms; loading the stored table takes about
20 ms. The table is Lark's own serialization (`Lark.memo_serialize`, read back by
`Lark.load`), written as JSON rather than Lark's pickle, with dicts whose keys are not
strings kept as `{"#items": [[key, value], ...]}`. It records the SHA-256 of the grammar and
Lark's version: when either differs (the grammar was edited, another Lark is installed) the
parser is built from the grammar instead, so a stale table is never used. After editing the
grammar, regenerate it with `python -m gradlang.parse_table` (a test checks it is current).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import lark
from lark.grammar import Rule
from lark.lexer import TerminalDef

TABLE = "grammar.json"


def build(grammar: str) -> lark.Lark:
    """The parser built from the grammar's text."""
    # The basic lexer makes keywords reserved everywhere: with Lark's contextual lexer, a
    # keyword where the parser cannot take it (`let y = return x`) would lex as a name.
    return lark.Lark(grammar, parser="lalr", lexer="basic", propagate_positions=True,
                     maybe_placeholders=True)


def _stamp(grammar: str) -> dict[str, str]:
    return {"grammar_sha256": hashlib.sha256(grammar.encode()).hexdigest(),
            "lark": lark.__version__}


def table(grammar: str) -> str:
    """The JSON table of the parser of `grammar`."""
    data, memo = build(grammar).memo_serialize([TerminalDef, Rule])
    return json.dumps({**_stamp(grammar), "data": _encode(data), "memo": _encode(memo)},
                      separators=(",", ":"), sort_keys=True)


def parser() -> lark.Lark:
    """The parser of the packaged grammar: from the stored table when it is that grammar's for
    this Lark, else built."""
    files = resources.files("gradlang")
    grammar = files.joinpath("grammar.lark").read_text()
    stored = files.joinpath(TABLE)
    if stored.is_file():
        t = json.loads(stored.read_text())
        if all(t.get(k) == v for k, v in _stamp(grammar).items()):
            return lark.Lark.load({"data": _decode(t["data"]), "memo": _decode(t["memo"])})
    return build(grammar)


def _encode(x: object) -> object:
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: _encode(v) for k, v in x.items()}
        return {"#items": [[_encode(k), _encode(v)] for k, v in x.items()]}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    raise TypeError(f"cannot store {type(x).__name__} in the parse table")


def _decode(x: object) -> object:
    if isinstance(x, dict):
        if "#items" in x:
            return {_decode(k): _decode(v) for k, v in x["#items"]}
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


if __name__ == "__main__":
    here = Path(__file__).parent
    (here / TABLE).write_text(table((here / "grammar.lark").read_text()))
    print(f"wrote {here / TABLE}")
