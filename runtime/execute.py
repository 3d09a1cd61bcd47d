"""Build the JAX function of each export: the lowered function, or its (value and) gradient.

`grad` and `value_and_grad` use JAX's reverse mode on the lowered function; gradients come
back as a dict keyed by the `wrt` parameter names. `descend` returns the `wrt` parameters after
one step theta - lr * gradient, in the same dict. A stateful export (a moving-average
baseline) also returns the updated state, last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax

from gradlang.ir import Export, Module, externs_of
from gradlang.types import KEY

from .lower import Lowering
from .zeroth_order import black_box
from .signature import Signature, casting


def signature_of(module: Module, export: Export) -> Signature:
    """The export's parameters (with a last `key` parameter when it draws) and result."""
    t = export.transform
    fn = module.function(t.fn)
    params = tuple((p.name, p.value.type) for p in fn.params)
    if fn.name in module.facts.get("random", ()) or t.by is not None:
        params += (("key", KEY),)
    stateful = fn.name in module.facts.get("stateful", ())
    return Signature(export.name, t.kind, fn.name, params, fn.result_type, t.wrt, stateful,
                     externs_of(module, fn.name))


def export_function(module: Module, export: Export, externs: Mapping[str, object] | None = None,
                    mesh=None) -> tuple[Signature, Callable]:
    """The signature and a JAX-traceable function of positional arguments for `export`
    (`externs`: the Python bindings of the extern functions it calls; `mesh`: the devices a
    black-box estimator's population is sharded over)."""
    signature = signature_of(module, export)
    f = Lowering(module, externs).function(signature.function)
    if signature.kind == "fn":
        return signature, casting(signature, f)
    names = [n for n, _ in signature.params]
    by = export.transform.by
    if by is not None:
        if signature.stateful:
            raise NotImplementedError("a black-box estimator of a function with a moving-average "
                                      "baseline state is not supported")
        draws = signature.function in module.facts.get("random", ())
        g = black_box(f, names[:-1], signature.wrt, by, draws, signature.kind == "value_and_grad",
                      mesh, export.transform.lr)
        return signature, casting(signature, g)
    wrt = signature.wrt
    argnums = tuple(names.index(w) for w in wrt)
    aux = signature.stateful
    if signature.kind == "descend":
        g = jax.grad(f, argnums=argnums, has_aux=aux)
        lr = export.transform.lr

        def descend_fn(*args):
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
