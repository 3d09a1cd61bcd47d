"""The documentation (README.md and the mkdocs site in docs/): every builtin, pass, command,
distribution and named gradient method is documented on its page; the site builds offline in
strict mode (a broken link or anchor, a page missing from the nav, is an error); and every code
block runs, by the conventions of tests/docpages.py, so the docs cannot rot."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
from pathlib import Path

import pytest

from docpages import NOT_RUN, ROOT, RUN, Block, in_process, pages, read, shown
from gradlang.builtins import BUILTINS
from gradlang.cli import COMMANDS
from gradlang.passes.pipeline import PASSES

PAGES = pages()
README_LINES = 220


def _page(name: str) -> str:
    return (ROOT / name).read_text()


def _code_words(name: str) -> set[str]:
    """The words of a page's inline code (`by=plugin`, `implicit(cg)`) and code blocks."""
    blocks, prose, _ = read(name)
    code = [m.group(1) for m in re.finditer(r"`([^`]+)`", prose)] + [b.text for b in blocks]
    return set(re.findall(r"\w+", " ".join(code)))


# ---- coverage: each thing on its page


def test_every_builtin_is_documented_with_its_signature():
    language = _page("docs/reference/language.md")
    missing = [b.signature for b in BUILTINS.values() if f"`{b.signature}`" not in language]
    assert not missing


def test_every_pass_and_command_is_documented():
    cli = _page("docs/reference/cli.md")
    missing = [name for name in [*PASSES, *COMMANDS] if f"`{name}`" not in cli]
    assert not missing


def test_every_distribution_and_estimator_is_documented():
    """Every distribution in the random choices reference; every estimator of a random choice
    there and in the estimator guide."""
    from gradlang.distributions import DISTRIBUTIONS
    from gradlang.estimators import REGISTRY

    random = _page("docs/reference/random.md")
    guide = _page("docs/estimators.md")
    assert not [s.name for s in DISTRIBUTIONS.values() if f"`{s.name}(" not in random]
    for text in (random, guide):
        assert not [n for n in ["auto", *REGISTRY] if f"`with {n}" not in text]


def test_every_named_method_is_in_the_guide_and_its_reference():
    """Backward rules, solvers, hypergradient methods, black-box estimators, combination rules
    and composition estimators: each in the estimator guide and on its reference page."""
    from gradlang.estimators.backward import RULES as BACKWARD
    from gradlang.estimators.black_box import BLACK_BOX
    from gradlang.estimators.combine import RULES as COMBINE
    from gradlang.estimators.compose import ESTIMATORS as COMPOSE
    from gradlang.estimators.hypergrads import METHODS
    from gradlang.estimators.solvers import SOLVERS

    guide = _code_words("docs/estimators.md")
    for registry, page in [(BACKWARD, "nonsmooth"), (SOLVERS, "inner"), (METHODS, "inner"),
                           (BLACK_BOX, "black-box"), (COMBINE, "multi-objective"),
                           (COMPOSE, "compositional")]:
        reference = _code_words(f"docs/reference/{page}.md")
        for name in registry:
            assert name in guide, f"docs/estimators.md: {name}"
            assert name in reference, f"docs/reference/{page}.md: {name}"


def test_the_readme_is_short_and_its_links_resolve():
    text = _page("README.md")
    assert len(text.splitlines()) <= README_LINES
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to a missing {target}"


# ---- the site


def test_the_site_builds_offline_in_strict_mode(tmp_path):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("mkdocs").addHandler(handler)
    try:
        config = load_config(str(ROOT / "mkdocs.yml"), strict=True,
                             site_dir=str(tmp_path / "site"))
        build(config)
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}\n" + "\n".join(warnings))
    finally:
        logging.getLogger("mkdocs").removeHandler(handler)
    assert not warnings
    assert (tmp_path / "site" / "estimators" / "index.html").is_file()


# ---- the code blocks


def test_every_code_block_has_a_known_language():
    bad = []
    for page in PAGES:
        blocks, _, problems = read(page)
        bad += problems
        bad += [f"{b.where}: ```{b.lang}: use one of {', '.join(RUN + NOT_RUN)}"
                for b in blocks if b.lang not in RUN + NOT_RUN]
    assert not bad, "\n".join(bad)


def _grad(block: Block, folder: Path, namespace: dict) -> None:
    from gradlang.diagnostics import Diagnostics, SourceFile
    from gradlang.driver import compile_module

    name = block.file or "block.grad"
    path = folder / name
    if block.file:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text + "\n")
    diags = Diagnostics()
    compile_module(SourceFile(name, block.text + "\n"), path.parent, diags)
    assert not diags.has_errors, f"{block.where}: this program has errors:\n{diags.render()}"


def _python(block: Block, folder: Path, namespace: dict) -> None:
    exec(compile(block.text, block.where, "exec"), namespace)


def _matches(expected: list[str], actual: list[str]) -> bool:
    """`actual` is `expected` with each `...` line standing for any lines (none included)."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(_matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and _matches(expected[1:], actual[1:])


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _shell(block: Block, folder: Path, namespace: dict) -> None:
    """Run the gradlang check / explain / compile commands in-process, in `folder`, where a
    path of the repository (`examples/mlp.grad`) is reachable as it is from its root."""
    from gradlang.cli import main

    for command in shown(block):
        parts = command.parts()
        for argv in parts:
            if not in_process(argv):
                continue
            for word in argv[2:]:
                top = Path(word).parts[0] if not word.startswith("-") else None
                if top and not (folder / top).exists() and (ROOT / top).exists():
                    (folder / top).symlink_to(ROOT / top)
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                status = main(argv[1:])
            text = out.getvalue()
            expected = _lines("\n".join(command.output))
            failing = any(": error:" in line for line in expected)
            assert status == (1 if failing else 0), (
                f"{command.where}: `{shlex.join(argv)}` exited with {status}:\n{text}")
            if expected and len(parts) == 1:
                assert _matches(expected, _lines(text)), (
                    f"{command.where}: `{command.line}` printed\n{text}\nnot as shown")


RUNNERS = {"grad": _grad, "python": _python, "console": _shell, "sh": _shell}


@pytest.mark.parametrize("page", PAGES)
def test_the_code_blocks_of_each_page_run(page, tmp_path, monkeypatch):
    """The page's blocks in order, in a working folder of its own (see tests/docpages.py)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__docs__"}
    for block in read(page)[0]:
        if block.lang not in RUNNERS:
            continue
        RUNNERS[block.lang](block, tmp_path, namespace)
    assert os.getcwd() == str(tmp_path), "a block changed the working folder"
