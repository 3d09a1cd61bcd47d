"""gradlang: a compiler for gradients of stochastic, non-smooth and bilevel objectives.

    m = gradlang.compile_file("model.grad")
    loss, grads = m.step(params, x, y)
"""

from .api import CompiledModule, LoadedModule, __version__, compile_file, compile_source, load
from .binding import batched
from .diagnostics import CompileError

__all__ = ["CompileError", "CompiledModule", "LoadedModule", "__version__", "batched",
           "compile_file", "compile_source", "load"]
