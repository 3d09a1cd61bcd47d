"""IR infrastructure: verifier, pipeline text, dead-code elimination, printer naming."""

from dataclasses import fields, replace

import pytest

from gradlang.diagnostics import Diagnostics, SourceFile
from gradlang.driver import build_module, compile_module
from gradlang.ir import Facts, Op, Value
from gradlang.ops import NoParams
from gradlang.passes.pipeline import PIPELINE, check_order, parse_pipeline
from gradlang.passes.rewrite import dce_function
from gradlang.printer import print_function
from gradlang.verifier import VerifyError, verify_function, verify_module

SRC = """
fn f(x: f32[B], y: f32[B]) -> f32 {
  let unused = exp(y)
  let h = tanh(x) * 2.0
  let h = h + 1.0
  return sum(h)
}
export g = grad(f, wrt=[x])
"""


def typed():
    diags = Diagnostics()
    module = compile_module(SourceFile("t.grad", SRC), None, diags)
    assert module is not None, diags.render()
    return module


def test_pipeline_text_round_trip():
    assert parse_pipeline("resolve, typecheck,aux,compose,zeroth_order,multiobjective,gradflow,"
                          "straight_through,hypergrad,estimators,nested_grad,surrogate,privacy") == PIPELINE
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        parse_pipeline("resolve,nope")


def test_each_pass_runs_after_the_passes_that_provide_the_facts_it_reads():
    check_order(PIPELINE)
    with pytest.raises(ValueError, match="pass 'privacy' requires the fact 'stateful', which "
                                         "the 'compose' pass provides"):
        parse_pipeline("resolve,typecheck,privacy")
    provided = [f for p in PIPELINE for f in p.provides]
    assert sorted(set(provided)) == sorted(f.name for f in fields(Facts)), \
        "every fact is provided by a pass of the pipeline"


def test_verifier_accepts_every_stage():
    diags = Diagnostics()
    built = build_module(SourceFile("t.grad", SRC), None, diags)
    verify_module(built)
    verify_module(typed(), resolved=True, typed=True)


def test_verifier_rejects_use_before_definition():
    fn = typed().functions[0]
    ops = list(fn.body.ops)
    ops[1], ops[2] = ops[2], ops[1]  # mul before the const it uses
    bad = replace(fn, body=replace(fn.body, ops=tuple(ops)))
    assert any("not defined before" in p for p in verify_function(bad))


def test_verifier_rejects_untyped_values_after_typecheck():
    fn = typed().functions[0]
    stray = Op("exp", (fn.params[0].value,), (Value(),), NoParams())
    bad = replace(fn, body=replace(fn.body, ops=fn.body.ops + (stray,)))
    assert verify_function(bad) == []
    assert any("has type ?" in p for p in verify_function(bad, typed=True))


SCORED = """
fn f(t: f32[3]) -> f32 {
  z ~ Bernoulli(logits=t) with score(baseline=loo)
  return (sum(z) - 1.3) ^ 2
}
export g = grad(expect(f, samples=4), wrt=[t])
"""


def test_the_surrogate_and_samples_ops_check_their_operand_segments():
    """Each op's own invariants (`OpDef.verify`) run with the structural checks: dropping a
    score term, or a result of `samples`, is caught."""
    diags = Diagnostics()
    module = compile_module(SourceFile("t.grad", SCORED), None, diags)
    assert module is not None, diags.render()
    fn = next(f for f in module.functions if any(op.name == "surrogate" for op in f.body.ops))
    assert verify_function(fn, resolved=True, typed=True) == []
    i, sur = next((i, op) for i, op in enumerate(fn.body.ops) if op.name == "surrogate")
    ops = list(fn.body.ops)
    ops[i] = replace(sur, operands=sur.operands[:-1])
    bad = replace(fn, body=replace(fn.body, ops=tuple(ops)))
    assert any("its params describe" in p for p in verify_function(bad))
    j, samples = next((j, op) for j, op in enumerate(fn.body.ops) if op.name == "samples")
    ops = list(fn.body.ops)
    ops[j] = replace(samples, params=replace(samples.params, shifts=1))
    bad = replace(fn, body=replace(fn.body, ops=tuple(ops)))
    assert any("shifts" in p for p in verify_function(bad))


def test_verify_module_error_shows_the_function():
    module = typed()
    fn = module.functions[0]
    stray = Op("nonsense", (), (Value(),), NoParams())
    bad = replace(module, functions=(replace(fn, body=replace(fn.body, ops=(stray,) + fn.body.ops)),))
    with pytest.raises(VerifyError, match=r"unknown op 'nonsense'[\s\S]*func @f"):
        verify_module(bad)


def test_dead_code_is_removed_and_rebound_names_are_suffixed():
    fn = typed().functions[0]
    text = print_function(dce_function(fn))
    assert "exp" not in text  # `unused` is dead
    assert "%h = " in text and "%h.1 = " in text
