"""gradlang: a compiler for gradients of stochastic, non-smooth and bilevel objectives.

    m = gradlang.compile_file("model.grad")
    loss, grads = m.step(params, x, y)
"""

from importlib import import_module

from .api import CompiledModule, LoadedModule, __version__, compile_file, compile_source, load
from .binding import batched
from .diagnostics import CompileError

_RUNTIME_ERRORS = {"ArgumentError": "signature", "ArtifactError": "artifact", "ExternError": "host",
                   "ForwardModeError": "reverse_only", "JaxFunctionError": "jax_functions",
                   "ScoreDrawGradientError": "execute", "ShardingError": "sharding"}
"""Errors raised when running or loading a module, imported on first use (they live beside
the JAX code of the runtime, which `import gradlang` does not load)."""


_TRAINING = ("Trainer", "TrainState", "StepOutput")
"""`gradlang.train`'s classes, imported on first use (they need JAX)."""


def __getattr__(name: str):
    if name in _RUNTIME_ERRORS:
        return getattr(import_module(f"gradlang.runtime.{_RUNTIME_ERRORS[name]}"), name)
    if name in _TRAINING:
        return getattr(import_module("gradlang.train"), name)
    raise AttributeError(f"module 'gradlang' has no attribute '{name}'")


__all__ = ["ArgumentError", "ArtifactError", "CompileError", "CompiledModule", "ExternError",
           "ForwardModeError", "JaxFunctionError", "LoadedModule", "ScoreDrawGradientError",
           "ShardingError", "StepOutput", "TrainState", "Trainer", "__version__", "batched",
           "compile_file", "compile_source", "load"]
