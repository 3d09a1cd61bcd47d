"""The package's layers: the IR, types, ops and diagnostics at the bottom; passes, estimators
and the runtime above them; the driver, API, CLI, explain, verify, the language server and
the training loop on top. A module imports only from its own layer or below, even for
annotations (under `if TYPE_CHECKING:`), and neither the runtime nor the estimators import
the passes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = {"gradlang": ROOT / "gradlang", "gradlang.passes": ROOT / "passes",
            "gradlang.runtime": ROOT / "runtime", "gradlang.estimators": ROOT / "estimators"}
TOP = {"gradlang", "gradlang.driver", "gradlang.api", "gradlang.cli", "gradlang.explain",
       "gradlang.verify", "gradlang.lsp", "gradlang.train"}
MIDDLE = {"gradlang.passes", "gradlang.runtime", "gradlang.estimators"}


def layer(module: str) -> int:
    """0: the bottom (every other module of gradlang/), 1: passes, runtime, estimators, 2: top."""
    if module in TOP or any(module.startswith(t + ".") for t in TOP - {"gradlang"}):
        return 2
    if any(module == m or module.startswith(m + ".") for m in MIDDLE):
        return 1
    return 0


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """The gradlang modules `name` imports (relative imports resolved), at run time or for
    annotations."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                      for a in node.names}
    return {m for m in found if m == "gradlang" or m.startswith("gradlang.")}


MODULES = modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_its_layer_and_below(name):
    for imported in imports(name, MODULES[name]):
        assert layer(imported) <= layer(name), f"{name} (layer {layer(name)}) imports {imported}"
        if name.startswith(("gradlang.runtime", "gradlang.estimators")):
            assert not imported.startswith("gradlang.passes"), f"{name} imports {imported}"


def test_the_layers_are_those_documented():
    assert layer("gradlang.ir") == 0 and layer("gradlang.passes.surrogate") == 1
    assert layer("gradlang.verify.case") == 2 and layer("gradlang.api") == 2
    assert {"gradlang.ir", "gradlang.passes.pipeline", "gradlang.runtime.lower",
            "gradlang.estimators.base", "gradlang.verify.case"} <= set(MODULES)
    assert layer("gradlang.facts") == 0


def test_the_bottom_layer_does_not_import_jax():
    """The IR, the parser and the builder load without JAX: the bottom layer never imports
    the estimators or the runtime (the builder once did, for the name of an option)."""
    import subprocess
    import sys
    code = ("import sys, gradlang.driver, gradlang.builder, gradlang.ir_parser, "
            "gradlang.printer, gradlang.verifier, gradlang.facts; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
