"""The documentation's pages and their code blocks, read by tests/test_docs.py (which runs the
blocks) and tests/test_commands.py (which checks the commands the pages show but do not run).

Pages: README.md and every docs/**/*.md. A code block is a fence at the start of a line,
```LANG, closed by a line ```. Conventions, by LANG:

- `grad`: a complete program that `gradlang check` accepts (warnings allowed). A first line
  `# file: NAME.grad` also writes it into the page's working folder under that name, for the
  blocks after it on the same page.
- `python`: run in order in one namespace per page, in the page's working folder; each block
  self-contained with what the blocks before it defined (no hidden setup), and fast.
- `console`: each line starting with `$ ` is a command; the lines after it, up to the next
  `$ ` line, are its output (`...` on a line of its own stands for any lines).
- `sh`: every line that is not blank or a `#` comment is a command; no output is shown.
- `text`, `json`, `toml`, `lua`, `yaml`: notation, output and configuration, not run.

A bare fence or another language is an error, so that nothing meant to run goes unrun.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN = ("grad", "python", "console", "sh")
NOT_RUN = ("text", "json", "toml", "lua", "yaml")
IN_PROCESS = ("check", "explain", "compile")
"""The gradlang commands that tests/test_docs.py runs where a console or sh block shows them;
the others (verify, python, pip, pytest, mkdocs) are checked by tests/test_commands.py."""
FENCE = re.compile(r"^(\s*)```(.*)$")
FILE = re.compile(r"#\s*file:\s*(\S+\.grad)\s*")


@dataclass(frozen=True)
class Block:
    page: str
    """Its page, relative to the repository root."""
    line: int
    """The line of its opening fence (from 1)."""
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def file(self) -> str | None:
        """The NAME of a grad block's first line `# file: NAME`."""
        match = FILE.fullmatch(self.text.split("\n", 1)[0])
        return match.group(1) if self.lang == "grad" and match else None


@dataclass(frozen=True)
class Shown:
    """A command shown in a console or sh block, with the output shown after it."""

    where: str
    line: str
    """The command as written (after the `$ `)."""
    output: tuple[str, ...]

    def parts(self) -> list[list[str]]:
        """The words of each command of the line (`a && b`: two), `.venv/bin/` dropped."""
        out = []
        for part in self.line.split("&&"):
            argv = shlex.split(part)
            if argv:
                argv[0] = argv[0].removeprefix(".venv/bin/")
                out.append(argv)
        return out



def in_process(argv: list[str]) -> bool:
    """A gradlang check / explain / compile command: run by test_docs where a block shows it."""
    return len(argv) > 1 and argv[0] == "gradlang" and argv[1] in IN_PROCESS


def pages() -> list[str]:
    """README.md and the docs pages, relative to the repository root."""
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md"))]


def read(page: str) -> tuple[list[Block], str, list[str]]:
    """A page's code blocks; its prose (the text with the blocks' lines blank, so that line
    numbers stay); and its problems (a fence not at the start of a line, a block left open)."""
    blocks, problems = [], []
    lines = (ROOT / page).read_text().split("\n")
    prose = list(lines)
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        if match.group(1):
            problems.append(f"{page}:{i + 1}: a fence must start at the beginning of the line")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            problems.append(f"{page}:{i + 1}: this code block is never closed")
            end = len(lines)
        blocks.append(Block(page, i + 1, match.group(2).strip(), "\n".join(lines[i + 1:end])))
        prose[i:end + 1] = [""] * (min(end, len(lines) - 1) + 1 - i)
        i = end + 1
    return blocks, "\n".join(prose), problems


def shown(block: Block) -> list[Shown]:
    """The commands of a console or sh block."""
    if block.lang == "sh":
        return [Shown(f"{block.page}:{block.line + n + 1}", line.strip(), ())
                for n, line in enumerate(block.text.split("\n"))
                if line.strip() and not line.lstrip().startswith("#")]
    if block.lang != "console":
        return []
    out: list[Shown] = []
    for n, line in enumerate(block.text.split("\n")):
        if line.startswith("$ "):
            out.append(Shown(f"{block.page}:{block.line + n + 1}", line[2:].strip(), ()))
        elif out:
            last = out[-1]
            out[-1] = Shown(last.where, last.line, (*last.output, line))
    return out


def not_in_process(block: Block) -> list[tuple[str, list[str]]]:
    """(where, words) of each command of a console or sh block that test_docs does not run."""
    return [(s.where, argv) for s in shown(block) for argv in s.parts() if not in_process(argv)]
