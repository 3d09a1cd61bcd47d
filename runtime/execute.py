"""Build the JAX function of each export: the lowered function, or its (value and) gradient.

`grad` and `value_and_grad` use JAX's reverse mode on the lowered function (`by=dp`: made
private, `runtime.privacy`; another `by=`: a black-box estimate, `runtime.zeroth_order`);
gradients come back as a dict keyed by the `wrt` parameter names. `descend` returns the `wrt`
parameters after one step theta - lr * gradient, in the same dict. A stateful export (a
moving-average baseline, `dynamic` weights) also returns the updated state, last. `minimize`
combines its objectives' gradients (`runtime.multiobjective`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax

from gradlang.ir import Export, Module, Param, externs_of, jax_functions_of, reachable
from gradlang.types import KEY, DType, TensorType, Type, scalar

from .lower import Lowering
from .multiobjective import Objective, carried, minimize, takes_key
from .privacy import private_gradient
from .zeroth_order import black_box
from .signature import Signature, casting, without_derivatives


def signature_of(module: Module, export: Export) -> Signature:
    """The export's parameters (with a last `key` parameter when it draws) and result."""
    t = export.transform
    if t.kind == "minimize":
        return _minimize_signature(module, export)
    fn = module.function(t.fn)
    params = tuple((p.name, p.value.type) for p in fn.params)
    if t.kind == "descend" and t.lr is None:
        params += (("lr", scalar(DType.F32)),)
    if fn.name in module.facts.random or t.by is not None:
        params += (("key", KEY),)
    stateful = fn.name in module.facts.stateful
    aux = module.function(t.aux).result_type if t.aux is not None else None
    return Signature(export.name, t.kind, fn.name, params, fn.result_type, t.wrt, stateful,
                     externs_of(module, fn.name), jax_functions_of(module, fn.name), aux)


def _minimize_signature(module: Module, export: Export) -> Signature:
    """A `minimize` export takes its objectives' parameters (their union, in order of first
    appearance), then its state (`runtime.multiobjective.carried`: `dynamic`'s history, the
    objectives' own), then a key when an objective draws or PCGrad shuffles; its result type
    is that of the values, f32[k]."""
    t = export.transform
    fns = [module.function(o.fn) for o in t.objectives]
    k = len(fns)
    params = _union(module, t)
    if t.descend and t.lr is None:
        params += (("lr", scalar(DType.F32)),)
    state = carried(t.rule, [_state(module, o.fn) for o in t.objectives])
    stateful = state is not None
    if stateful:
        params += (state,)
    if takes_key(t.rule, [d or o.by is not None for d, o in zip(_draws(module, export),
                                                                 t.objectives)]):
        params += (("key", KEY),)
    externs = tuple(dict.fromkeys(n for fn in fns for n in externs_of(module, fn.name)))
    traced = tuple(dict.fromkeys(n for fn in fns for n in jax_functions_of(module, fn.name)))
    kind = "descend" if t.descend else t.kind  # it updates its parameters (donated) itself
    return Signature(export.name, kind, ", ".join(fn.name for fn in fns), params,
                     TensorType(DType.F32, (k,)), t.wrt, stateful, externs, traced)


class ScoreDrawGradientError(TypeError):
    """jax.grad / jax.jvp of a plain export whose draws carry no gradient."""


def _undifferentiable(f: Callable, export: Export, module: Module) -> Callable:
    """f (one sample of a function with score-function draws, which carry no gradient), whose
    forward-mode derivative (so also jax.grad's) raises: differentiating it would silently
    leave out the draws' contribution."""
    fn = module.facts.objectives.get(export.name, (export.transform.fn,))[0]
    reached = set(reachable(module, fn))
    sites = ", ".join(f"{s.site} ({s.function}, line {s.span.line})" for s in module.facts.estimators
                      if s.function in reached and s.estimator.name not in ("reparam", "dreg"))
    return without_derivatives(f, ScoreDrawGradientError(
        f"export '{export.name}' returns one sample of '{fn}', whose draws {sites} take the "
        f"score function and carry no gradient here: its jax.grad / jax.jvp would silently "
        f"leave their contribution out. Differentiate the expectation instead: `export g = "
        f"grad(expect({fn}, samples=N), wrt=[...])`, or jax.grad of `export e = expect({fn}, "
        f"samples=N)` (unbiased, through DiCE's magic box)"))


def _union(module: Module, t) -> tuple[tuple[str, Type], ...]:
    """A `minimize` export's objectives' parameters, by name in order of first appearance
    (the multiobjective pass checked that a name has one type)."""
    return tuple({p.name: p.value.type for o in t.objectives
                  for p in _own(module, o.fn)}.items())


def _own(module: Module, fn: str) -> tuple[Param, ...]:
    """The parameters of an objective's function, less the state a stateful one takes last."""
    params = module.function(fn).params
    return params[:-1] if fn in module.facts.stateful else params


def _state(module: Module, fn: str) -> Type | None:
    """The type of the state an objective's function carries (None: none)."""
    return module.function(fn).params[-1].value.type if fn in module.facts.stateful else None


def _draws(module: Module, export: Export) -> list[bool]:
    """Whether each objective of a `minimize` export draws (takes a key)."""
    return [o.fn in module.facts.random for o in export.transform.objectives]


def export_function(module: Module, export: Export, externs: Mapping[str, object] | None = None,
                    mesh=None) -> tuple[Signature, Callable]:
    """The signature and a JAX-traceable function of positional arguments for `export`
    (`externs`: the Python bindings of the extern functions it calls; `mesh`: the devices a
    black-box estimator's population is sharded over)."""
    signature, f = _export_function(module, export, externs, mesh)
    aux = export.transform.aux
    if aux is None:
        return signature, f
    aux_f = Lowering(module, externs).function(aux)
    return signature, casting(signature, _with_aux(f, signature, module, aux, aux_f))


def _with_aux(f: Callable, signature: Signature, module: Module, name: str,
              aux: Callable) -> Callable:
    """`f` returning also the auxiliary values `aux` computes at the same arguments (and key),
    after the gradient (or the value and gradient), before the state."""
    names = [n for n, _ in signature.params]
    picks = [names.index(p.name) for p in module.function(name).params]
    if name in module.facts.random:
        picks.append(names.index("key"))
    first = 2 if signature.kind == "value_and_grad" else 1

    def with_aux(*args):
        out = f(*args)
        out = out if signature.kind == "value_and_grad" or signature.stateful else (out,)
        values = jax.lax.stop_gradient(aux(*(args[i] for i in picks)))
        return (*out[:first], values, *out[first:])

    return with_aux


def _export_function(module: Module, export: Export, externs: Mapping[str, object] | None,
                     mesh) -> tuple[Signature, Callable]:
    signature = signature_of(module, export)
    t = export.transform
    if t.kind == "minimize":
        lowering = Lowering(module, externs)
        objectives = [Objective(lowering.function(o.fn), tuple(p.name for p in _own(module, o.fn)),
                                draws, o.by, _state(module, o.fn))
                      for o, draws in zip(t.objectives, _draws(module, export))]
        names = [n for n, _ in _union(module, t)]
        step = minimize(objectives, names, t.wrt, t.rule)
        return signature, casting(signature, _stepping(step, names, t) if t.descend else step)
    f = Lowering(module, externs).function(signature.function)
    if signature.kind == "fn":
        if signature.function.endswith("@draw"):  # one sample, score-function draws
            f = _undifferentiable(f, export, module)
        return signature, casting(signature, f)
    split = _step_size(t, len(module.function(t.fn).params))
    runtime_lr = t.kind == "descend" and t.lr is None
    names = [n for n, _ in signature.params if not (runtime_lr and n == "lr")]
    if t.by is not None:
        draws = signature.function in module.facts.random
        value = t.kind == "value_and_grad"
        if t.private is not None:
            est = private_gradient(f, names[:-1], signature.wrt,
                                   module.facts.privacy[export.name], draws, value)
        elif signature.stateful:
            raise NotImplementedError("a black-box estimator of a function with a moving-average "
                                      "baseline state is not supported")
        else:
            est = black_box(f, names[:-1], signature.wrt, t.by, draws, value, mesh)
        return signature, casting(signature, _descending(est, split) if t.kind == "descend"
                                  else est)
    wrt = signature.wrt
    argnums = tuple(names.index(w) for w in wrt)
    aux = signature.stateful
    if signature.kind == "descend":
        g = jax.grad(f, argnums=argnums, has_aux=aux)

        def descend_fn(*args):
            args, lr = split(args)
            grads, state = g(*args) if aux else (g(*args), None)
            new = {w: jax.tree.map(lambda t, d: t - lr * d, args[i], d)
                   for w, i, d in zip(wrt, argnums, grads)}
            return (new, state) if aux else new

        return signature, casting(signature, descend_fn)
    if signature.kind == "grad":
        g = jax.grad(f, argnums=argnums, has_aux=aux)

        def grad_fn(*args):
            if aux:
                grads, state = g(*args)
                return dict(zip(wrt, grads)), state
            return dict(zip(wrt, g(*args)))

        return signature, casting(signature, grad_fn)
    vg = jax.value_and_grad(f, argnums=argnums, has_aux=aux)

    def value_and_grad_fn(*args):
        value, grads = vg(*args)
        if aux:
            (value, state), grads = value, grads
            return value, dict(zip(wrt, grads)), state
        return value, dict(zip(wrt, grads))

    return signature, casting(signature, value_and_grad_fn)


def _stepping(step: Callable, names: list[str], t) -> Callable:
    """`descend(minimize(...))`: the minimize step's results with its direction d replaced by
    the parameters p - lr * d (lr as written, or the argument after the parameters)."""
    split = _step_size(t, len(names))

    def descend_fn(*args):
        args, lr = split(args)
        values, direction, *rest = step(*args)
        named = dict(zip(names, args))
        new = {w: jax.tree.map(lambda p, d: p - lr * d, named[w], direction[w]) for w in t.wrt}
        return (values, new, *rest)

    return descend_fn


def _descending(estimate: Callable, split: Callable) -> Callable:
    """A `descend` export from an estimate that takes the step size as `lr=`."""

    def descend_fn(*args):
        rest, lr = split(args)
        return estimate(*rest, lr=lr)

    return descend_fn


def _step_size(t, at: int) -> Callable[[tuple], tuple[tuple, object]]:
    """Splits a `descend` export's arguments into the function's (and its key) and the step
    size: `lr=` as written, or the argument `lr` at position `at` (after the function's)."""
    if t.lr is not None:
        return lambda args: (args, t.lr)
    return lambda args: (args[:at] + args[at + 1:], args[at])
