"""Compiling and calling generated programs (tests/fuzzgen.py): outcomes, reduction, campaigns.

`run(program)` compiles a program, runs `explain`, and calls every export with arguments of its
declared types (symbolic dims bound to the sizes the program was generated for). The outcome is
`ok`, `compile_error` (a diagnostic), `argument_error`, or `finding` (any other exception: an
internal error of the compiler or a crash of an accepted program), with its traceback.

`python tests/fuzzrun.py --programs N` runs a campaign and writes its counts, per-pass coverage
and findings (deduplicated by exception type, message pattern and top frames, each reduced to a
smaller program) as Markdown.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fuzzgen import Program, generate


# ---- running programs


@dataclass
class Outcome:
    status: str
    """"ok", "compile_error" (a diagnostic), "argument_error", "finding", or (in a campaign)
    "slow": past the time limit."""
    phase: str = ""
    """Where it ended: "compile", "explain", "call NAME", "call NAME again", "vmap NAME",
    "gradlang compile" or "load NAME"."""
    error: str = ""
    trace: str = ""
    compiled: bool = False
    calls: int = 0
    executed: bool = False
    """The calls ran (XLA compiled and executed them); else they were traced and lowered."""
    coverage: Counter = field(default_factory=Counter)
    """IR ops and chosen estimators of the compiled module."""

    def key(self) -> tuple:
        """The finding's class: exception type, message pattern (names, numbers, shapes and
        tuples blanked) and the two innermost frames of the compiler (gradlang, passes, runtime)."""
        return finding_key(self.error, self.trace)


def finding_key(error: str, trace: str) -> tuple:
    kind, _, message = error.partition(": ")
    first = message.splitlines()[0] if message else ""
    pattern = re.sub(r"'[^']*'|\"[^\"]*\"", "'X'", first)
    pattern = re.sub(r"\[[^\]]*\]|\([^)]*\)", "[...]", pattern)  # shapes and tuples
    pattern = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", pattern)[:120]
    frames = re.findall(r'File "[^"]*/(gradlang|passes|runtime)/([^"/]+)", line \d+, in (\w+)', trace)
    return kind, pattern, tuple(f"{d}/{f}:{fn}" for d, f, fn in frames[-2:])


def arguments(signature, sizes: dict, seed: int, python_scalars: bool = False) -> list:
    """Arguments of the export's declared types: floats in [-1, 1], integers in {0, 1}, coins;
    a compose state `inner` at zeros; with `python_scalars`, scalars as Python numbers."""
    import jax

    from gradlang.types import KEY, StructType, TensorType, TupleType

    rng = np.random.default_rng(seed)
    dtypes = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "bool": np.bool_}

    def make(t, zero: bool = False):
        if t is KEY:
            return jax.random.key(int(rng.integers(0, 2 ** 31)))
        if isinstance(t, TensorType):
            shape = tuple(sizes.get(d, 2) if isinstance(d, str) else d for d in t.shape)
            dtype = dtypes[t.dtype.value]
            if zero:
                return np.zeros(shape, dtype)
            value = (rng.uniform(-1, 1, shape) if t.dtype.is_float else rng.integers(0, 2, shape)).astype(dtype)
            return value.item() if python_scalars and not shape else value
        if isinstance(t, StructType):
            return {n: make(f, zero) for n, f in t.fields}
        assert isinstance(t, TupleType)
        return tuple(make(e, zero) for e in t.elems)

    return [make(t, zero=name == "inner" and isinstance(t, TupleType)) for name, t in signature.params]


def coverage(module) -> Counter:
    from gradlang.ir import walk

    found: Counter = Counter()
    for fn in module.functions:
        for op in walk(fn.body):
            found[f"ir:{op.name}"] += 1
            estimator = getattr(op.params, "estimator", None)
            if op.name == "sample" and estimator is not None:
                found[f"chosen:{estimator.name}"] += 1
    for e in module.exports:
        t = e.transform
        by = t.by.name if t.by is not None else t.rule.name if t.rule is not None else ""
        found[f"transform:{t.kind}{'/' + by if by else ''}{'/compose' if t.compose else ''}"] += 1
    return found


def run(program: Program, folder: Path, execute: bool | None = True, vmap: bool = False,
        cli: bool = False) -> Outcome:
    """Compile `program`, explain it and call each export (`execute=False`: trace and lower
    each call to StableHLO, all but XLA's compilation and the run; None: no calls); with
    `vmap`, also lower each export vmapped over two argument sets; with `cli`, also run
    `gradlang compile --emit stablehlo,artifact` on it (symbolic dims stay symbolic), whose
    exit status must not be 3 (an internal compiler error), and call the artifact's exports.

    A finding is any exception but CompileError (whose every diagnostic must be located: file,
    line, column, the source line and a caret) and ArgumentError, and an accepted export that
    has two parameters of one name."""
    import jax

    import gradlang
    from gradlang.explain import explain
    from gradlang.runtime.signature import ArgumentError

    path = folder / f"fuzz{program.seed}.grad"
    path.write_text(program.source)
    phase = "compile"
    outcome = Outcome("ok", executed=bool(execute))
    try:
        try:
            m = gradlang.compile_file(path, externs=program.externs)
        except gradlang.CompileError as exc:
            bad = unlocated(str(exc))
            if bad is not None:
                raise AssertionError(f"a diagnostic without 'file:line:col', source line and caret: {bad}")
            return Outcome("compile_error", phase, f"CompileError: {exc}")
        outcome.compiled = True
        outcome.coverage = coverage(m.ir)
        for name, fn in m.exports.items():  # a parameter name taken twice cannot be bound
            names = [n for n, _ in fn.signature.params]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise AssertionError(f"export '{name}' has two parameters named {twice[0]!r}: {names}")
        phase = "explain"
        explain(m.ir)
        for name, fn in m.exports.items() if execute is not None else ():
            phase = f"call {name}"
            args = arguments(fn.signature, program.sizes, program.seed)
            try:
                if execute:
                    jax.block_until_ready(fn(*args))
                    phase = f"call {name} again"  # other values, by keyword, scalars from Python
                    again = arguments(fn.signature, program.sizes, program.seed + 2, python_scalars=True)
                    jax.block_until_ready(fn(**{n: a for (n, _), a in zip(fn.signature.params, again)}))
                else:
                    jax.jit(fn).lower(*args)
                if vmap:
                    phase = f"vmap {name}"
                    pairs = [args, arguments(fn.signature, program.sizes, program.seed + 1)]
                    jax.jit(jax.vmap(fn)).lower(*jax.tree.map(lambda a, b: jax.numpy.stack([a, b]), *pairs))
            except ArgumentError as exc:
                outcome.status, outcome.phase, outcome.error = "argument_error", phase, f"ArgumentError: {exc}"
                return outcome
            outcome.calls += 1
        if cli:
            phase = "gradlang compile"
            build = folder / "build"
            status, err = command(["compile", str(path), "-o", str(build), "--emit", "stablehlo,artifact"])
            if status not in (0, 1, 2):
                raise RuntimeError(f"gradlang compile exited with status {status}: {err}")
            artifact = build / f"{path.stem}.gx"
            if status == 0 and artifact.exists():
                loaded = gradlang.load(artifact, externs=program.externs)
                artifact.unlink()
                for name, fn in loaded.exports.items():
                    phase = f"load {name}"
                    try:
                        jax.jit(fn).lower(*arguments(fn.signature, program.sizes, program.seed))
                    except ArgumentError:
                        pass
    except Exception as exc:  # noqa: BLE001 - every other exception is a finding
        outcome.status, outcome.phase = "finding", phase
        outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.trace = traceback.format_exc()
    finally:
        path.unlink(missing_ok=True)
    return outcome


def unlocated(rendered: str) -> str | None:
    """The first diagnostic of a rendered CompileError that is not `file:line:col: severity:
    message` followed by the source line and a caret line (None if all are)."""
    lines = rendered.splitlines()
    for i, line in enumerate(lines):
        if line[:1].isspace() or not line:
            continue
        if not re.match(r"\S+:\d+:\d+: (error|warning|note): ", line) or i + 2 >= len(lines) \
                or not lines[i + 2].strip() or set(lines[i + 2].strip()) != {"^"}:
            return line
    return None


def command(argv: list[str]) -> tuple[int, str]:
    """Run the `gradlang` command line in this process: (exit status, stderr)."""
    import contextlib
    import io

    from gradlang.cli import main as gradlang_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = gradlang_main(argv)
    return status, err.getvalue()


# ---- reducing a finding to a small program


def _chunks(lines: list[str]) -> list[tuple[int, int]]:
    """Line ranges [i, j) that can go as a whole: top-level declarations and statements whose
    brackets balance, largest first."""
    spans = []
    for i, line in enumerate(lines):
        depth = 0
        for j in range(i, len(lines)):
            depth += sum(lines[j].count(c) for c in "({[") - sum(lines[j].count(c) for c in ")}]")
            if depth <= 0:
                break
        if depth == 0 and (line.startswith(("fn ", "struct ", "extern ", "export ", "use ", "pragma "))
                           or re.match(r"\s+(let |z\d+ ~|argmin )", line)):
            spans.append((i, j + 1))
    return sorted(spans, key=lambda ij: ij[0] - ij[1])


def reduce(program: Program, outcome: Outcome, folder: Path, budget: int = 150) -> str:
    """A smaller source with the same finding (same exception type and message pattern), by
    deleting declarations and statements, then simplifying parenthesized subexpressions to
    literals, while the finding stays."""
    target = outcome.key()[:2]
    tries = 0
    flags = {"vmap": outcome.phase.startswith("vmap"), "cli": outcome.phase == "gradlang compile"}
    execute = False if run(program, folder, False, **flags).key()[:2] == target else outcome.executed

    def same(source: str) -> bool:
        nonlocal tries
        tries += 1
        candidate = Program(program.seed, source, program.sizes, program.externs, Counter(), 0)
        return run(candidate, folder, execute, **flags).key()[:2] == target

    source = program.source
    changed = True
    while changed and tries < budget:
        changed = False
        lines = source.splitlines()
        for i, j in _chunks(lines):
            candidate = "\n".join(lines[:i] + lines[j:]) + "\n"
            if tries < budget and same(candidate):
                source, changed = candidate, True
                break
    pos = 0
    while tries < budget:
        span = _group(source, pos)
        if span is None:
            break
        i, j = span
        for literal in ("1.0", "0"):
            candidate = source[:i] + literal + source[j:]
            if same(candidate):
                source = candidate
                break
        else:
            pos = i + 1
    return source


def _group(source: str, pos: int) -> tuple[int, int] | None:
    """The first grouping parenthesis at or after pos (not a call's): its span."""
    for i in range(pos, len(source)):
        if source[i] == "(" and (i == 0 or not (source[i - 1].isalnum() or source[i - 1] in "_]")):
            depth = 0
            for j in range(i, len(source)):
                depth += {"(": 1, ")": -1}.get(source[j], 0)
                if depth == 0:
                    return i, j + 1
    return None


# ---- campaigns


PASS_EVIDENCE: dict[str, tuple[str, Callable[[str], bool]]] = {
    "resolve, typecheck, gradflow": ("every accepted program", lambda k: True),
    "compose": ("a compose export", lambda k: k.endswith("/compose")),
    "zeroth_order": ("a by=spsa / es / eggroll export",
                     lambda k: k.startswith("transform:") and k.split("/")[1:2] in (["spsa"], ["es"], ["eggroll"])),
    "multiobjective": ("a minimize export", lambda k: k.startswith("transform:minimize")),
    "straight_through": ("a straight_through op", lambda k: k == "ir:straight_through"),
    "hypergrad": ("an argmin op", lambda k: k == "ir:argmin"),
    "estimators": ("a sample op with its estimator", lambda k: k.startswith("chosen:")),
    "surrogate": ("a surrogate or samples op", lambda k: k in ("ir:surrogate", "ir:samples")),
    "privacy": ("a by=dp export", lambda k: k.startswith("transform:") and "/dp" in k),
    "(runtime) externs": ("a host_call op", lambda k: k == "ir:host_call"),
    "(runtime) memory": ("checkpoint or wta_crs", lambda k: k in ("ir:checkpoint", "ir:sampled_matmul")),
    "(runtime) optimal transport": ("sliced_wasserstein", lambda k: k == "ir:sliced_wasserstein"),
}
"""Per pass (and runtime feature): what in a compiled module shows that it had work."""


@dataclass
class Campaign:
    """Counts and findings of many runs."""

    programs: int = 0
    statuses: Counter = field(default_factory=Counter)
    compiled: int = 0
    called: int = 0
    executed: int = 0
    vmapped: int = 0
    through_cli: int = 0
    deep: int = 0
    deep_accepted: int = 0
    max_depth: int = 0
    max_depth_accepted: int = 0
    features: Counter = field(default_factory=Counter)
    coverage: Counter = field(default_factory=Counter)
    diagnostics: Counter = field(default_factory=Counter)
    passes: Counter = field(default_factory=Counter)
    """Accepted programs in which each pass had work (PASS_EVIDENCE)."""
    findings: dict = field(default_factory=dict)
    """Finding class (str of the key) -> {"count", "seeds", "error", "phase", "source", "trace"}."""
    seconds: float = 0.0

    def add(self, program: Program, outcome: Outcome, executed: bool, vmapped: bool, cli: bool) -> None:
        self.programs += 1
        self.statuses[outcome.status] += 1
        self.compiled += outcome.compiled
        self.called += outcome.calls > 0
        self.executed += executed and outcome.calls > 0
        self.vmapped += vmapped and outcome.calls > 0
        self.through_cli += cli and outcome.calls > 0
        self.deep += program.deep
        self.deep_accepted += program.deep and outcome.compiled
        self.max_depth = max(self.max_depth, program.depth)
        if outcome.compiled:
            self.max_depth_accepted = max(self.max_depth_accepted, program.depth)
        self.features.update(program.features)
        self.coverage.update(outcome.coverage)
        for name, (_, reached) in PASS_EVIDENCE.items():
            self.passes[name] += outcome.compiled and any(reached(k) for k in outcome.coverage)
        if outcome.status == "compile_error":
            first = outcome.error.splitlines()[0] if outcome.error else ""
            self.diagnostics[re.sub(r"\d+", "N", first.split("error: ", 1)[-1])[:100]] += 1
        if outcome.status in ("finding", "slow"):
            key = str(outcome.key())
            entry = self.findings.setdefault(key, {"count": 0, "seeds": [], "error": outcome.error[:2000],
                                                   "phase": outcome.phase, "source": program.source,
                                                   "trace": outcome.trace[-4000:]})
            entry["count"] += 1
            entry["seeds"] = (entry["seeds"] + [program.seed])[:20]
            if len(program.source) < len(entry["source"]):
                entry.update(source=program.source, error=outcome.error[:2000], phase=outcome.phase,
                             trace=outcome.trace[-4000:])

    def markdown(self) -> str:
        s = self.statuses
        lines = [f"# Fuzz campaign: {self.programs} programs ({self.seconds / 3600:.2f} h)", "",
                 f"- compiled (accepted): {self.compiled}; rejected with a diagnostic: {s['compile_error']}",
                 f"- called (every export traced and lowered with arguments of its declared types): "
                 f"{self.called}; also compiled by XLA and run: {self.executed}; also lowered under "
                 f"jax.vmap: {self.vmapped}; also through 'gradlang compile' and its artifact: {self.through_cli}",
                 f"- argument errors: {s['argument_error']}; findings (other exceptions): {s['finding']}; "
                 f"past the time limit: {s['slow']}",
                 f"- deep programs: {self.deep} ({self.deep_accepted} accepted); deepest nesting generated: "
                 f"{self.max_depth}, accepted: {self.max_depth_accepted}", "",
                 f"## Findings ({len(self.findings)} classes)", ""]
        for i, (key, e) in enumerate(sorted(self.findings.items(), key=lambda kv: -kv[1]["count"])):
            lines += [f"### {i + 1}. {key}", "",
                      f"{e['count']} programs (seeds {', '.join(map(str, e['seeds']))}), at {e['phase']}:", "",
                      "```", e["error"][:1500], "```", "", "Reduced program:", "", "```",
                      e.get("reduced", "(not reduced)").rstrip(), "```", "", "Smallest program:", "", "```",
                      e["source"].rstrip(), "```", "", "<details><summary>traceback</summary>", "", "```", e["trace"][-2500:], "```",
                      "", "</details>", ""]
        lines += ["## Coverage", "", "Accepted programs in which each pass had work (from their IR after the "
                  "pipeline):", "", "| pass | programs | evidence |", "|---|---:|---|"]
        lines += [f"| {name} | {self.passes[name]} | {why} |" for name, (why, _) in PASS_EVIDENCE.items()]
        lines += ["", "Generated features:", "", "```"]
        lines += [f"{v:7d} {k}" for k, v in sorted(self.features.items())]
        lines += ["```", "", "Compiled IR ops, chosen estimators and transforms:", "", "```"]
        lines += [f"{v:7d} {k}" for k, v in sorted(self.coverage.items())]
        lines += ["```", "", "Diagnostics (rejected programs):", "", "```"]
        lines += [f"{v:7d} {k}" for k, v in self.diagnostics.most_common()]
        return "\n".join(lines + ["```", ""])


def _serve(conn, folder: str) -> None:
    """A campaign's worker: runs `("run", seed, execute, vmap, cli)` and
    `("reduce", seed, outcome)` requests until it receives None."""
    while (request := conn.recv()) is not None:
        kind, seed, *rest = request
        program = generate(seed)
        conn.send(run(program, Path(folder), *rest) if kind == "run"
                  else reduce(program, rest[0], Path(folder)))


class Worker:
    """A process that runs a campaign's programs, replaced when one runs past the time limit
    (a hung XLA computation cannot be interrupted from Python)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.start()

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, str(self.folder)), daemon=True)
        self.process.start()

    def ask(self, request: tuple, limit: float):
        """The answer, or None (and a fresh worker) past `limit` seconds."""
        self.conn.send(request)
        if self.conn.poll(limit):
            return self.conn.recv()
        self.process.kill()
        self.process.join()
        self.start()
        return None

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def campaign(start: int, count: int, out: Path, execute_every: int = 20, vmap_every: int = 10,
             cli_every: int = 20, limit: float = 300.0, every: int = 25) -> Campaign:
    """Run programs start .. start + count - 1 in a worker process: each compiled, explained
    and its exports lowered; every `execute_every`-th one's exports also executed, every
    `vmap_every`-th one's lowered under `jax.vmap`, every `cli_every`-th one through `gradlang
    compile` and its artifact loaded; a program past `limit` seconds is "slow". The report goes
    to `out` every `every` programs, a line per program to `out` with suffix .jsonl."""
    result = Campaign()
    t0 = time.time()
    worker = Worker(Path(tempfile.mkdtemp(prefix="gradlang-fuzz-")))
    log = out.with_suffix(".jsonl").open("w")
    for seed in range(start, start + count):
        program = generate(seed)
        execute = bool(execute_every) and seed % execute_every == 0
        vmap = bool(vmap_every) and seed % vmap_every == 1
        cli = bool(cli_every) and seed % cli_every == 3
        started = time.time()
        outcome = worker.ask(("run", seed, execute, vmap, cli), limit) \
            or Outcome("slow", "run (stopped)", f"Slow: past the limit of {limit:.0f} s")
        log.write(json.dumps({"seed": seed, "status": outcome.status, "phase": outcome.phase,
                              "calls": outcome.calls, "depth": program.depth, "deep": program.deep,
                              "seconds": round(time.time() - started, 2)}) + "\n")
        log.flush()
        key = str(outcome.key())
        new = outcome.status == "finding" and key not in result.findings
        result.add(program, outcome, execute, vmap, cli)
        if new:  # reduce each new class once, within three time limits
            reduced = worker.ask(("reduce", seed, outcome), 3 * limit)
            if reduced is not None:
                result.findings[key]["reduced"] = reduced
        result.seconds = time.time() - t0
        if result.programs % every == 0 or seed == start + count - 1:
            out.write_text(result.markdown())
            (out.with_suffix(".json")).write_text(json.dumps(
                {"programs": result.programs, "statuses": result.statuses, "compiled": result.compiled,
                 "called": result.called, "executed": result.executed, "vmapped": result.vmapped,
                 "through_cli": result.through_cli, "max_depth": result.max_depth,
                 "max_depth_accepted": result.max_depth_accepted, "deep": result.deep,
                 "deep_accepted": result.deep_accepted, "last_seed": seed, "seconds": result.seconds,
                 "findings": {k: {x: v[x] for x in ("count", "seeds", "error", "phase")}
                              for k, v in result.findings.items()}}, indent=1))
    log.close()
    worker.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--programs", type=int, default=10_000)
    p.add_argument("--execute-every", type=int, default=20,
                   help="also execute every N-th program with XLA (0: never)")
    p.add_argument("--vmap-every", type=int, default=10, help="also lower every N-th program under vmap")
    p.add_argument("--cli-every", type=int, default=20,
                   help="also run every N-th program through 'gradlang compile' and load its artifact")
    p.add_argument("--limit", type=float, default=300.0, help="seconds per program")
    p.add_argument("--out", type=Path, default=Path("/tmp/fuzz_campaign.md"))
    p.add_argument("--show", type=int, help="print program SEED and run it")
    args = p.parse_args(argv)
    if args.show is not None:
        program = generate(args.show)
        print(program.source)
        outcome = run(program, Path(tempfile.mkdtemp()), execute=True)
        print(outcome.status, outcome.phase, outcome.error, outcome.trace, sep="\n")
        return 0
    result = campaign(args.start, args.programs, args.out, args.execute_every, args.vmap_every,
                      args.cli_every, args.limit)
    print(f"{result.programs} programs: {dict(result.statuses)}; {len(result.findings)} finding classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
