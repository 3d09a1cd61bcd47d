"""Every command the docs show works as shown.

The commands are collected from README.md and the docs pages (docs/**/*.md: the commands of
their console and sh blocks, the lines of their text blocks, their inline code; see
tests/docpages.py) and from the header comments of examples/*.grad and the docstrings of
examples/*.py (their lines and inline code): every `gradlang ...`, `python ...` and
`pip ...`. Each must name files that exist and options its parser knows (a synopsis such as
`gradlang compile FILE [-o DIR]` too); `pip install '.[extra]'` an extra that pyproject.toml
declares. The cheap ones run for real, in-process from the repository root: check, explain,
and compile into a temporary folder; verify runs with fewer samples and without --compare (as
shown, under `-m slow`). The check, explain and compile commands of the pages' console and sh
blocks are not collected here: tests/test_docs.py runs them in the page's working folder and
compares their output with the page's. A file that a page writes from a grad block
(`# file: model.grad`) counts as existing for its commands, which are checked, not run.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from docpages import not_in_process, pages, read
from gradlang.cli import _parser, main

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("gradlang", "python", "python3", "pip")
INLINE = re.compile(r"`([^`]+)`")
FEWER = ("--samples", "50", "--reference-samples", "256")
"""verify's fast twin: enough estimates for a variance, in a fraction of the time."""


@dataclass(frozen=True)
class Command:
    where: str
    """`FILE:LINE` of the text it was found in."""
    argv: tuple[str, ...]
    """Its words, without a `.venv/bin/` before the program."""
    local: frozenset[str] = frozenset()
    """The files its page writes from its grad blocks (`# file: model.grad`): they exist in
    the page's working folder only, where tests/test_docs.py runs the page."""

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"

    @property
    def on_file(self) -> bool:
        """A gradlang command on a file (not a synopsis `FILE [...]` or a mention)."""
        return self.argv[0] == "gradlang" and any(w.endswith(".grad") for w in self.argv)

    @property
    def runnable(self) -> bool:
        """A gradlang command on a file of the repository, which runs from its root."""
        return self.on_file and not self.local.intersection(self.argv)


def _program(words: str) -> bool:
    return words.split(" ", 1)[0].removeprefix(".venv/bin/") in PROGRAMS


def _lines(text: str, indent: int) -> Iterator[tuple[int, str]]:
    """(line offset, command) for each line indented by at least `indent` spaces (a command
    shown in prose is indented) that starts with a program (after a `$ `); the synopsis lines
    after it that start with `[` continue it."""
    found: list[tuple[int, int, str]] = []  # first line, last line, words
    for i, line in enumerate(text.splitlines()):
        words = line.strip().removeprefix("$ ")
        if _program(words) and line.startswith(" " * indent):
            found.append((i, i, words))
        elif words.startswith("[") and found and found[-1][1] == i - 1:
            found[-1] = (found[-1][0], i, f"{found[-1][2]} {words}")
    return ((first, words) for first, _, words in found)


def _inline(text: str) -> Iterator[tuple[int, str]]:
    """(line offset, command) for each inline code span that starts with a program."""
    for match in INLINE.finditer(text):
        words = " ".join(match.group(1).split())
        if _program(words):
            yield text.count("\n", 0, match.start()), words


def _commands(found, where: str, first_line: int,
              local: frozenset[str] = frozenset()) -> list[Command]:
    out = []
    for offset, words in found:
        for part in words.split("&&"):
            argv = shlex.split(part)
            argv[0] = argv[0].removeprefix(".venv/bin/")
            out.append(Command(f"{where}:{first_line + offset}", tuple(argv), local))
    return out


def _documented() -> list[Command]:
    commands = []
    for page in pages():
        blocks, prose, _ = read(page)
        local = frozenset(b.file for b in blocks if b.file)
        commands += _commands(_inline(prose), page, 1, local)
        for block in blocks:
            if block.lang == "text":
                commands += _commands(_lines(block.text, 0), page, block.line + 1, local)
            commands += [Command(where, tuple(argv), local)
                         for where, argv in not_in_process(block) if _program(" ".join(argv))]
    for path in sorted((ROOT / "examples").glob("*.grad")):
        header = []
        for text in path.read_text().splitlines():
            if text.strip() and not text.startswith("#"):
                break
            header.append(text.removeprefix("#"))
        text = "\n".join(header)
        commands += _commands([*_lines(text, 2), *_inline(text)], f"examples/{path.name}", 1)
    for path in sorted((ROOT / "examples").glob("*.py")):
        module = ast.parse(path.read_text())
        doc = ast.get_docstring(module, clean=False) or ""
        first = module.body[0].lineno if doc else 1
        commands += _commands([*_lines(doc, 2), *_inline(doc)], f"examples/{path.name}", first)
    return sorted(set(commands), key=str)


COMMANDS = _documented()


def _options(words) -> list[str]:
    """The option names among the words of a command or synopsis (`[--json [PATH]]`: --json)."""
    return [w.strip("[]").split("=")[0] for w in words if w.strip("[]").startswith("-")]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _check_gradlang(command: Command) -> None:
    args = list(command.argv[1:])
    if not args:  # the program named in prose
        return
    parser = _parser()
    sub = _subcommands(parser)
    if args[0].startswith("-"):  # a top-level option alone: gradlang --version
        assert args == [args[0]] and args[0] in parser._option_string_actions, (
            f"{command}: no option {args[0]!r}")
        return
    assert args[0] in sub, f"{command}: no command {args[0]!r}"
    known = {*sub[args[0]]._option_string_actions, *parser._option_string_actions}
    unknown = [o for o in _options(args[1:]) if o not in known]
    assert not unknown, f"{command}: unknown options {unknown}"
    if command.on_file:
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{command}: the command line does not parse")
        for name in (parsed.file, getattr(parsed, "at", None)):
            assert name is None or (ROOT / name).is_file() or name in command.local, (
                f"{command}: no file {name}")


def _check_python(command: Command) -> None:
    args = list(command.argv[1:])
    if not args:  # the program named in prose
        return
    if args[0] == "-m":
        assert importlib.util.find_spec(args[1]) is not None, f"{command}: no module {args[1]}"
        return
    script = ROOT / args[0]
    if script.stem.isupper():  # a pattern: `python examples/X.py`
        return
    assert script.is_file(), f"{command}: no script {args[0]}"
    unknown = [o for o in _options(args[1:]) if o not in _script_options(script)]
    assert not unknown, f"{command}: {args[0]} has no options {unknown}"


def _script_options(script: Path) -> set[str]:
    """The options a script's argparse parser declares (`add_argument("--x", ...)` calls in it
    and in the modules of its folder it imports, such as benchmarks/timing.py), read from the
    source: running the script would import JAX and train."""
    trees = [ast.parse(script.read_text())]
    for node in ast.walk(trees[0]):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        trees += [ast.parse((script.parent / f"{n}.py").read_text()) for n in names
                  if (script.parent / f"{n}.py").is_file()]
    return {arg.value for tree in trees for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)}


def _check_pip(command: Command) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for word in command.argv:
        for group in re.findall(r"^\.\[([\w,-]+)\]$", word):
            missing = [e for e in group.split(",") if e not in extras]
            assert not missing, f"{command}: pyproject.toml declares no extra {missing}"


def test_the_commands_are_found():
    """The collection itself: the README's, the docs' and the examples' commands are in it."""
    shown = {str(c).split(":", 1)[0] for c in COMMANDS}
    assert {"README.md", "docs/reference/cli.md", "examples/verify_demo.grad",
            "examples/mlp.py"} <= shown
    assert any(c.runnable and c.argv[1] == "compile" for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_each_command_names_what_exists(command: Command):
    {"gradlang": _check_gradlang, "pip": _check_pip}.get(command.argv[0], _check_python)(command)


def _into(args: list[str], folder: Path) -> list[str]:
    """`args` with every output (compile's -o, verify's --json and --plot) inside `folder`."""
    out = list(args)
    for i, word in enumerate(args[:-1]):
        if word in ("-o", "--out", "--plot") or (word == "--json" and args[i + 1] != "-"):
            out[i + 1] = str(folder / Path(args[i + 1]).name)
    if out[0] == "compile" and "-o" not in out and "--out" not in out:
        out += ["-o", str(folder)]
    return out


def _run(args: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    status = main(_into(args, tmp_path))
    assert status == 0, capsys.readouterr().err


def _once(commands: list[Command]) -> list[Command]:
    """The first of each command shown in several places: it runs once."""
    first: dict[tuple[str, ...], Command] = {}
    for command in commands:
        first.setdefault(command.argv, command)
    return list(first.values())


@pytest.mark.parametrize("command", _once([c for c in COMMANDS if c.runnable and c.argv[1] in
                                           ("check", "explain", "compile")]), ids=str)
def test_each_cheap_command_runs(command: Command, tmp_path, monkeypatch, capsys):
    _run(list(command.argv[1:]), tmp_path, monkeypatch, capsys)


VERIFY = _once([c for c in COMMANDS if c.runnable and c.argv[1] == "verify"])


@pytest.mark.parametrize("command", VERIFY, ids=str)
def test_each_verify_command_runs_with_fewer_samples(command: Command, tmp_path, monkeypatch,
                                                    capsys):
    args = [w for w in command.argv[1:] if w != "--compare"]
    _run([*args, *FEWER], tmp_path, monkeypatch, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("command", VERIFY, ids=str)
def test_each_verify_command_runs_as_shown(command: Command, tmp_path, monkeypatch, capsys):
    _run(list(command.argv[1:]), tmp_path, monkeypatch, capsys)
