"""Editor support: the VS Code extension's TextMate grammar, and `gradlang lsp` (analysis of a
document, then the server driven in-process over pipes with JSON-RPC)."""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("pygls")

from gradlang import cli, lsp  # noqa: E402
from gradlang.builtins import BUILTINS  # noqa: E402
from gradlang.builder import SCOPES, TRANSFORMS  # noqa: E402
from gradlang.diagnostics import SourceFile  # noqa: E402
from gradlang.distributions import DISTRIBUTIONS  # noqa: E402
from gradlang.driver import stdlib_root  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRAMMAR = ROOT / "editors" / "vscode" / "syntaxes" / "grad.tmLanguage.json"
TIMEOUT = 10.0

HELPERS = """\
# Twice x.
fn scale(x: f32[B, O]) -> f32[B, O] {
  return 2.0 * x
}
"""

MAIN = """\
use std.nn
use helpers

fn loss(layer: Dense, x: f32[B, I], s: f32) -> f32 {
  let h = dense_tanh(layer, x)
  z ~ Normal(h, s)
  let q = sign(z) with ste
  let w = argmin v: f32[O] = zeros([O]) { sum((v - h[0]) ^ 2) } via gd(steps=10, lr=0.1)
  return mean(q * scale(h)) + sum(w)
}

export step = value_and_grad(expect(loss, samples=4), wrt=[layer])
"""

BAD = """\
fn f(x: f32[N]) -> f32 {
  return sum(x) + y
}
"""


def _at(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """The 0-based (line, character) of the nth occurrence of `needle` (ASCII text)."""
    offset = -1
    for _ in range(nth + 1):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset)
    return line, offset - (text.rfind("\n", 0, offset) + 1)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "helpers.grad").write_text(HELPERS)
    (tmp_path / "main.grad").write_text(MAIN)
    return tmp_path


# ---- the TextMate grammar

def _patterns(node: object):
    """Every pattern (a dict with a regex) in the grammar, nested ones included."""
    if isinstance(node, dict):
        if any(k in node for k in ("match", "begin")):
            yield node
        for value in node.values():
            yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


def _scoped(grammar: dict, word: str, prefixes: tuple[str, ...], after: str = " ") -> bool:
    """Some pattern whose scope starts with one of `prefixes` matches exactly `word`, when it
    is followed by `after`."""
    for p in _patterns(grammar):
        if "match" in p and p.get("name", "").startswith(prefixes):
            found = re.match(p["match"], word + after)
            if found is not None and found.group(0) == word:
                return True
    return False


def test_grammar_is_json_with_every_keyword_of_the_parser_grammar():
    grammar = json.loads(GRAMMAR.read_text())
    assert grammar["scopeName"] == "source.grad"
    lark = re.sub(r"//[^\n]*", "", (ROOT / "gradlang" / "grammar.lark").read_text())
    keywords = set(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"', lark))
    assert {"fn", "let", "argmin", "f32", "via", "with"} <= keywords
    missing = sorted(k for k in keywords if not _scoped(grammar, k, ("keyword.", "storage.",
                                                                      "constant.language.")))
    assert not missing, f"add these keywords of grammar.lark to {GRAMMAR.name}: {missing}"


def test_grammar_highlights_every_builtin_distribution_and_transform():
    grammar = json.loads(GRAMMAR.read_text())
    for names, scope in ((BUILTINS, "support.function.builtin."),
                         ((*TRANSFORMS, *SCOPES, "compose"), "support.function.transform."),
                         (DISTRIBUTIONS, "support.class.distribution.")):
        missing = sorted(n for n in names if not _scoped(grammar, n, (scope,), "("))
        assert not missing, f"add these names to {GRAMMAR.name} ({scope}): {missing}"


def test_grammar_regexes_compile_and_match():
    grammar = json.loads(GRAMMAR.read_text())
    regexes = [p[k] for p in _patterns(grammar) for k in ("match", "begin", "end") if k in p]
    assert len(regexes) > 20
    for regex in regexes:  # written in the syntax Oniguruma and Python's re share
        re.compile(regex)
    by_scope = {p["name"]: p["match"] for p in _patterns(grammar) if "name" in p and "match" in p}
    assert re.fullmatch(by_scope["comment.line.number-sign.grad"], "# a comment")
    assert re.fullmatch(by_scope["string.quoted.double.grad"], '"ij,jk->ik"')
    for number in ("1.5", "2e-3", "0.5E+2"):
        assert re.fullmatch(by_scope["constant.numeric.float.grad"], number)
    assert re.fullmatch(by_scope["constant.numeric.integer.grad"], "42")
    annotation = next(p for p in _patterns(grammar) if p.get("match", "").startswith(r"\b(with)"))
    found = re.search(annotation["match"], "z ~ Normal(m, s) with score(baseline=loo)")
    assert found.group(2) == "score"
    assert annotation["captures"]["2"]["name"].startswith("entity.name.function.estimator")
    tensor = next(p for p in _patterns(grammar) if "begin" in p)
    assert re.match(tensor["begin"], "f32[B, D]") and re.match(tensor["end"], "]")


# ---- analysis of a document, without the transport

def test_diagnostics_have_the_source_range_and_severity():
    analysis = lsp.analyze(BAD, None)
    (d,) = analysis.diagnostics
    assert "unknown name 'y'" in d.message
    found = lsp._diagnostic(d, analysis, "untitled:bad", lsp._Units())
    line, character = _at(BAD, "y\n")
    assert (found.range.start.line, found.range.start.character) == (line, character)
    assert (found.range.end.line, found.range.end.character) == (line, character + 1)
    assert found.severity == lsp.types.DiagnosticSeverity.Error


def test_a_file_that_does_not_parse_gets_a_diagnostic():
    analysis = lsp.analyze("fn f(x: f32) -> f32 {\n  return x +\n}\n", None)
    assert analysis.diagnostics and analysis.symbols == ()
    assert analysis.diagnostics[0].span.line == 3


def test_warnings_are_warnings():
    text = ("fn f(lam: f32, x: f32[N]) -> f32[N] {\n"
            "  return argmin w: f32[N] = x { sum(abs(w - x)) + lam * sum(w * w) }\n"
            "    via gd(steps=5, lr=0.1)\n"
            "}\n"
            "fn g(lam: f32, x: f32[N]) -> f32 { return sum(f(lam, x)) }\n"
            "export h = grad(g, wrt=[lam])\n")
    analysis = lsp.analyze(text, None)
    (d,) = analysis.diagnostics
    found = lsp._diagnostic(d, analysis, "untitled:w", lsp._Units())
    assert found.severity == lsp.types.DiagnosticSeverity.Warning


def test_an_error_in_an_imported_file_is_shown_at_the_start_with_its_place(project: Path):
    (project / "helpers.grad").write_text("fn scale(x: f32[B]) -> f32[B] {\n  return x +\n}\n")
    analysis = lsp.analyze(MAIN, project / "main.grad")
    uri = (project / "main.grad").as_uri()
    found = [lsp._diagnostic(d, analysis, uri, lsp._Units()) for d in analysis.diagnostics]
    assert found and found[0].range.start.line == 0
    assert "helpers.grad:3:1" in found[0].message
    assert found[0].related_information[0].location.uri == (project / "helpers.grad").as_uri()


def test_an_unsaved_document_imports_from_the_standard_library_only():
    analysis = lsp.analyze("use helpers\nfn f(x: f32) -> f32 { return x }\n", None)
    assert "no folder to import from" in analysis.diagnostics[0].message


def test_a_compiler_crash_is_a_diagnostic(monkeypatch):
    def crash(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(lsp, "analyze", crash)
    analysis = lsp._analyze("fn f() -> f32 { return 1.0 }\n", "untitled:x")
    (d,) = analysis.diagnostics
    assert "internal compiler error: RuntimeError: boom" in d.message


def _symbol(analysis: lsp.Analysis, text: str, needle: str, nth: int = 0) -> lsp.Symbol | None:
    """The symbol at the first character of the nth `needle` in `text`."""
    line, character = _at(text, needle, nth)
    return analysis.at(line + 1, character + 1)


def _hover(analysis: lsp.Analysis, text: str, needle: str, nth: int = 0) -> str:
    found = _symbol(analysis, text, needle, nth)
    assert found is not None, needle
    return found.hover


def test_hover_shows_types_estimators_methods_and_backward_rules(project: Path):
    analysis = lsp.analyze(MAIN, project / "main.grad")
    assert not analysis.diagnostics
    assert "let h: f32[B, O]" in _hover(analysis, MAIN, "h, s)")
    assert "param layer: std.nn.Dense" in _hover(analysis, MAIN, "layer, x")
    draw = _hover(analysis, MAIN, "z ~")
    assert "draw z: f32[B, O]" in draw
    assert "pathwise (reparam)" in draw and "reparameterizable" in draw
    assert _hover(analysis, MAIN, "z) with") == draw
    argmin = _hover(analysis, MAIN, "argmin")
    assert "argmin v: f32[O]" in argmin and "gd(steps=10" in argmin and "implicit" in argmin
    assert "the default: implicit differentiation" in argmin
    assert "**backward rule**: ste" in _hover(analysis, MAIN, "sign")
    assert "**backward rule**: ste" in _hover(analysis, MAIN, "ste")
    assert "An affine layer followed by tanh." in _hover(analysis, MAIN, "dense_tanh")
    scale = _hover(analysis, MAIN, "scale")
    assert "fn helpers.scale(x: f32[B, O]) -> f32[B, O]" in scale and "Twice x." in scale
    assert "helpers.grad, line 2" in scale and "here: `f32[B, O]`" in scale
    assert "random choices (1)" in _hover(analysis, MAIN, "step =")
    assert analysis.at(3, 1) is None  # the blank line


def test_a_position_just_after_a_name_is_on_it(project: Path):
    analysis = lsp.analyze(MAIN, project / "main.grad")
    line, character = _at(MAIN, "h = dense")
    assert analysis.at(line + 1, character + 2).hover.startswith("```grad\nlet h")


def test_definitions_across_imports_and_locals(project: Path):
    analysis = lsp.analyze(MAIN, project / "main.grad")

    def definition(needle: str, nth: int = 0):
        found = _symbol(analysis, MAIN, needle, nth).definition
        return Path(found.source.path), found.line, found.col

    assert definition("scale") == (project / "helpers.grad", 2, 4)
    nn = (stdlib_root() / "nn.grad").read_text()
    line, character = _at(nn, "dense_tanh(layer")
    assert definition("dense_tanh") == (stdlib_root() / "nn.grad", line + 1, character + 1)
    line, character = _at(nn, "Dense {")
    assert definition("Dense") == (stdlib_root() / "nn.grad", line + 1, character + 1)
    assert definition("use helpers") == (project / "helpers.grad", 1, 1)
    assert definition("h, s)") == (project / "main.grad", 5, 7)
    assert definition("v - h") == (project / "main.grad", 8, 18)
    assert definition("loss, samples") == (project / "main.grad", 4, 4)
    assert definition("layer])") == (project / "main.grad", 4, 9)


@pytest.mark.parametrize("encoding, characters", [("utf-16", (2, 4, 6)), ("utf-8", (2, 6, 9)),
                                                   ("utf-32", (2, 3, 5))])
def test_positions_count_the_code_units_of_the_encoding(encoding, characters):
    """Columns 3, 4 and 6 of the first line: the astral character, the one after it, the end."""
    source = SourceFile("x", "# \U0001d4b3 \u00e9\nlet\n")
    units = lsp._Units(encoding)
    assert [units.position(source, 1, c).character for c in (3, 4, 6)] == list(characters)
    assert [units.column(source.line(1), c) for c in characters] == [3, 4, 6]
    assert units.position(source, 2, 9) == lsp.types.Position(line=1, character=8)  # past the end


# ---- the server, in-process over pipes

class _Client:
    """A JSON-RPC client of a server started in a thread on two pipes."""

    def __init__(self) -> None:
        to_server, self._to_server = os.pipe()
        self._from_server, from_server = os.pipe()
        self.writer = os.fdopen(self._to_server, "wb")
        self.reader = os.fdopen(self._from_server, "rb")
        server_in, server_out = os.fdopen(to_server, "rb"), os.fdopen(from_server, "wb")
        self.files = (self.writer, self.reader, server_in, server_out)
        self.inbox: queue.Queue[dict] = queue.Queue()
        self.held: list[dict] = []
        self.ids = 0
        self.server = threading.Thread(
            target=lambda: lsp.server().start_io(server_in, server_out), daemon=True)
        self.server.start()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """Put each message from the server in the inbox, until the pipe closes."""
        try:
            while True:
                length = None
                while True:
                    header = self.reader.readline()
                    if not header:
                        return
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                    if header in (b"\r\n", b"\n"):
                        break
                self.inbox.put(json.loads(self.reader.read(length)))
        except (OSError, ValueError):  # closed by close()
            return

    def send(self, message: dict) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        self.writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.writer.flush()

    def notify(self, method: str, params: dict) -> None:
        self.send({"method": method, "params": params})

    def request(self, method: str, params: dict):
        self.ids += 1
        self.send({"id": self.ids, "method": method, "params": params})
        reply = self._next(lambda m: m.get("id") == self.ids and "method" not in m)
        assert "error" not in reply, reply["error"]
        return reply["result"]

    def diagnostics(self, uri: str) -> list[dict]:
        """The next diagnostics published for `uri`."""
        return self._next(lambda m: m.get("method") == "textDocument/publishDiagnostics"
                          and m["params"]["uri"] == uri)["params"]["diagnostics"]

    def _next(self, wanted) -> dict:
        for i, m in enumerate(self.held):
            if wanted(m):
                return self.held.pop(i)
        while True:
            try:
                m = self.inbox.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no answer from the server in {TIMEOUT} s") from None
            if wanted(m):
                return m
            self.held.append(m)

    def close(self) -> None:
        self.request("shutdown", None)
        self.notify("exit", None)
        self.server.join(TIMEOUT)
        for f in self.files:
            f.close()


def _position(text: str, needle: str) -> dict:
    line, character = _at(text, needle)
    return {"line": line, "character": character}


def test_server_diagnostics_hover_and_definition(project: Path):
    client = _Client()
    try:
        init = client.request("initialize", {"processId": None, "rootUri": project.as_uri(),
                                              "capabilities": {}})
        capabilities = init["capabilities"]
        assert capabilities["hoverProvider"] and capabilities["definitionProvider"]
        client.notify("initialized", {})

        bad = (project / "bad.grad").as_uri()
        client.notify("textDocument/didOpen", {"textDocument": {
            "uri": bad, "languageId": "grad", "version": 1, "text": BAD}})
        (d,) = client.diagnostics(bad)
        assert "unknown name 'y'" in d["message"] and d["severity"] == 1
        assert d["range"]["start"] == _position(BAD, "y\n")
        fixed = BAD.replace("+ y", "+ 1.0")
        client.notify("textDocument/didChange", {
            "textDocument": {"uri": bad, "version": 2},
            "contentChanges": [{"text": fixed}]})
        assert client.diagnostics(bad) == []
        client.notify("textDocument/didChange", {
            "textDocument": {"uri": bad, "version": 3},
            "contentChanges": [{"text": "fn f(x: f32) -> {\n"}]})
        assert client.diagnostics(bad)[0]["severity"] == 1

        main = (project / "main.grad").as_uri()
        client.notify("textDocument/didOpen", {"textDocument": {
            "uri": main, "languageId": "grad", "version": 1, "text": MAIN}})
        assert client.diagnostics(main) == []
        at = {"textDocument": {"uri": main}}
        hover = client.request("textDocument/hover", {**at, "position": _position(MAIN, "h, s)")})
        assert hover["contents"]["kind"] == "markdown"
        assert "let h: f32[B, O]" in hover["contents"]["value"]
        hover = client.request("textDocument/hover", {**at, "position": _position(MAIN, "z ~")})
        assert "pathwise (reparam)" in hover["contents"]["value"]
        assert "reparameterizable" in hover["contents"]["value"]
        blank = {"line": 2, "character": 0}
        assert client.request("textDocument/hover", {**at, "position": blank}) is None
        found = client.request("textDocument/definition",
                               {**at, "position": _position(MAIN, "scale(h)")})
        assert Path(lsp.uris.to_fs_path(found["uri"])) == project / "helpers.grad"
        assert found["range"]["start"] == {"line": 1, "character": 3}
        found = client.request("textDocument/definition",
                               {**at, "position": _position(MAIN, "dense_tanh")})
        assert Path(lsp.uris.to_fs_path(found["uri"])) == stdlib_root() / "nn.grad"
        client.notify("textDocument/didClose", {"textDocument": {"uri": main}})
        assert client.diagnostics(main) == []
    finally:
        client.close()


# ---- the command

def _without_pygls(monkeypatch) -> None:
    """Imports of pygls and lsprotocol fail, as when they are not installed."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("pygls", "lsprotocol")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pygls", None)
    monkeypatch.delitem(sys.modules, "gradlang.lsp", raising=False)


def test_lsp_command_without_pygls_says_how_to_install_it(monkeypatch, capsys):
    _without_pygls(monkeypatch)
    assert cli.main(["lsp"]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "error: gradlang lsp needs pygls: pip install 'gradlang[lsp]'" in err
    assert "Traceback" not in err


def test_check_works_without_pygls(monkeypatch, project: Path):
    _without_pygls(monkeypatch)
    assert cli.main(["check", str(project / "main.grad")]) == cli.EXIT_OK
