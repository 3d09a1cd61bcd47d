"""Fuzzing the whole compiler: type-directed random programs (tests/fuzzgen.py) are compiled,
explained and called with arguments of their declared types (tests/fuzzrun.py).

A program is either rejected with located diagnostics (CompileError: `file:line:col`, the line
and a caret, for each) or accepted; an accepted program's exports raise nothing but
ArgumentError. Anything else (an internal error of a pass, a lowering rule that fails, a crash
inside JAX) is a finding. The default run checks a fixed budget of
derandomized programs (every one through the front end, the passes and `explain`; every
CALL_EVERY-th one's exports traced and lowered to StableHLO, every EXECUTE_EVERY-th one's
compiled by XLA and run); `-m slow` runs a campaign of 10^4 programs (hours on 2 cores), as
`python tests/fuzzrun.py --programs 10000` does with a Markdown report of its findings.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

import fuzzgen
import fuzzrun

BUDGET = 90
"""Programs of the default run (seeds 0 .. BUDGET - 1): about 22 s in one process."""
CALL_EVERY = 3
EXECUTE_EVERY = 15
VMAP_EVERY = 9
CLI_EVERY = 30


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="gradlang-fuzz-") as name:
        yield Path(name)


def report(program: fuzzgen.Program, outcome: fuzzrun.Outcome) -> str:
    return (f"seed {program.seed}: {outcome.error[:1000]} at {outcome.phase}\n"
            f"{program.source}\n{outcome.trace[-3000:]}")


@pytest.mark.parametrize("seed", range(BUDGET))
def test_accepted_programs_never_crash(seed, folder):
    program = fuzzgen.generate(seed)
    execute = None if seed % CALL_EVERY else seed % EXECUTE_EVERY == 0
    outcome = fuzzrun.run(program, folder, execute, vmap=seed % VMAP_EVERY == 3,
                          cli=seed % CLI_EVERY == 6)
    assert outcome.status in ("ok", "compile_error", "argument_error"), report(program, outcome)


FOUND = {3880: "newton_cg's backtracking while_loop in an argmin in a scan under vmap never "
               "ended in XLA's optimized CPU code (now a loop of fixed trip count)",
         812: "the surrogate op's invariant wanted a credit for every operand, not only for the "
              "score terms (a branched draw beside score terms with costs)",
         8649: "descend(compose(...)) whose outer function has a parameter 'lr' (an internal "
               "error, now a diagnostic)"}
"""Programs that campaigns found slow or failing, rerun (compiled and executed) each time."""


@pytest.mark.parametrize("seed", sorted(FOUND))
def test_programs_campaigns_found_run_to_the_end(seed):
    """In a child process with a time limit, since XLA computations cannot be interrupted."""
    code = (f"import sys, tempfile, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"import fuzzgen, fuzzrun; o = fuzzrun.run(fuzzgen.generate({seed}), "
            f"pathlib.Path(tempfile.mkdtemp()), execute=True); print(o.status, o.error)")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"seed {seed} ran past 240 s: {FOUND[seed]}")
    assert done.returncode == 0 and done.stdout.split()[0] in ("ok", "compile_error",
                                                               "argument_error"), done.stdout + done.stderr


def test_most_generated_programs_are_accepted(folder):
    """The fuzz test means something only if the generator's programs get past the front end:
    most are well typed by construction (measured: about 90%; the rest break rules on purpose)."""
    statuses = Counter(fuzzrun.run(fuzzgen.generate(seed), folder, execute=None).status
                       for seed in range(1000, 1040))
    assert statuses["ok"] >= 30, statuses


def test_generation_is_deterministic():
    assert [fuzzgen.generate(s).source for s in range(20)] == [fuzzgen.generate(s).source for s in range(20)]


REQUIRED = {
    "plan": [p for p in fuzzgen.PLANS],
    "export": ["fn", "grad", "value_and_grad", "expect", "grad(expect)", "value_and_grad(expect)",
               "logmeanexp", "grad(logmeanexp)", "grad(by=black-box)", "descend(by=black-box)",
               "value_and_grad(by=dp)", "descend(by=dp)", "descend", "minimize", "compose",
               "grad(compose)", "descend(compose)"],
    "estimator": ["default", "auto", "reparam", "score", "gumbel", "st_gumbel", "enum", "mvd", "arm",
                  "disarm", "rebar", "relax", "swor", "unordered", "dreg"],
    "family": list(fuzzgen.FAMILIES),
    "solver": list(fuzzgen.SOLVERS),
    "hypergrad": ["implicit-cg", "implicit-gmres", "implicit-neumann", "value_function", "unrolled",
                  "truncated"],
    "argmin": ["argmin", "argmax", "subject-to", "report", "struct"],
    "rule": ["ste", "reste", "approx_sign", "swish_sign", "st_gumbel", "trust"],
    "nonsmooth": ["sign", "round", "floor", "ceil", "step", "binarize", "argmax", "topk", "sort",
                  "quantize", "quest"],
    "memory": ["checkpoint", "truncated", "wta_crs"],
    "by": ["spsa", "es", "eggroll"],
    "minimize": ["mgda", "pcgrad", "weights", "dynamic"],
    "compose": ["scgd", "plugin", "default"],
    "control_variate": ["none", "gaussian_lower", "gaussian_upper"],
    "extern": ["plain", "batched"],
    "deep": ["parens", "unary", "neg", "binary", "if", "for", "checkpoint", "expect", "argmin", "calls"],
    "builtin": ["sliced_wasserstein", "stochastic_round", "hadamard", "log_prob", "entropy", "kl",
                "cross_entropy", "mse", "solve", "cholesky", "reshape", "transpose", "concat", "stack",
                "one_hot", "softmax", "log_softmax", "where", "arange", "outer"],
    "use": [f"std.{m}" for m in fuzzgen.STD_MODULES],
}


def test_the_generator_writes_every_feature():
    """Over the first 3,000 seeds (generation only: a few seconds), every export form,
    estimator, family, solver, hypergradient method, backward rule and deep construct appears."""
    seen: Counter = Counter()
    for seed in range(3000):
        seen.update(fuzzgen.generate(seed).features)
    missing = [f"{group}:{name}" for group, names in REQUIRED.items() for name in names
               if seen[f"{group}:{name}"] == 0]
    assert not missing, missing


@pytest.mark.slow
def test_ten_thousand_programs(tmp_path):
    """The long campaign: 10^4 programs, each compiled and its exports lowered; every 20th
    executed, every 10th vmapped, every 20th through `gradlang compile` and its artifact."""
    result = fuzzrun.campaign(0, 10_000, tmp_path / "campaign.md")
    assert not result.findings, (tmp_path / "campaign.md").read_text()
