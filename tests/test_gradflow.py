"""Gradient-flow analysis: forward dependence on wrt params, backward reach to the result."""

from gradlang.diagnostics import Diagnostics, SourceFile
from gradlang.driver import compile_module


def analyse(src: str):
    diags = Diagnostics()
    module = compile_module(SourceFile("t.grad", src), None, diags)
    assert module is not None, diags.render()
    facts = {f.export: f for f in module.facts.gradflow}
    return module, facts, diags


def carried(module, facts, export: str) -> dict[str, frozenset]:
    """hint -> wrt names, for the named values of the export's function."""
    return {v.hint: names for v, names in facts[export].carries.items() if v.hint}


def test_only_differentiable_paths_carry_gradient():
    module, facts, diags = analyse("""
fn f(w: f32[D], x: f32[B, D], y: i32[B]) -> f32 {
  let s = x @ w
  let mask = s > 0.0
  let k = f32(y)
  let dead = exp(w)
  return sum(where(mask, s, 0.0) * k)
}
export g = grad(f, wrt=[w])
""")
    names = carried(module, facts, "g")
    assert names["s"] == {"w"}
    assert "mask" not in names          # comparisons stop gradient
    assert "k" not in names             # depends only on integer data
    assert "dead" not in names          # depends on w but never reaches the result
    assert facts["g"].zero == ()
    assert not diags.items


def test_zero_gradient_parameter_is_warned():
    module, facts, diags = analyse("""
fn f(w: f32[D], b: f32) -> f32 {
  let t = stop_gradient(b)
  return sum(w) + t + f32(b > 0.0)
}
export g = grad(f, wrt=[w, b])
""")
    assert facts["g"].zero == ("b",)
    (warning,) = diags.items
    assert warning.severity.value == "warning"
    assert "with respect to 'b' is always zero" in warning.message
    assert (warning.span.line, warning.span.col) == (6, 28)


def test_tuple_elements_and_calls_are_tracked_separately():
    module, facts, _ = analyse("""
fn pick(a: f32, b: f32) -> f32 { return stop_gradient(a) + b }
fn f(u: f32, v: f32) -> f32 {
  let (p, q) = (u * 2.0, v * 3.0)
  let r = pick(u, v)
  return p + q + r
}
export g = grad(f, wrt=[u])
""")
    names = carried(module, facts, "g")
    assert names["p"] == {"u"} and "q" not in names
    assert "r" not in names              # pick's result does not depend on its first argument


def test_loop_carries_reach_a_fixpoint():
    module, facts, _ = analyse("""
fn f(w: f32, z: f32) -> f32 {
  let (a, b) = for i in range(4) carry (a = 0.0, b = 1.0) { (b, a + w) }
  return a
}
export g = grad(f, wrt=[w, z])
""")
    # w enters b in the first iteration and a in the second: only a fixpoint sees it in a.
    assert carried(module, facts, "g")["a"] == {"w"}
    assert facts["g"].zero == ("z",)
