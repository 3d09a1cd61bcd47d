"""The README documents every builtin, pass and CLI command that exists."""

from pathlib import Path

from gradlang.builtins import BUILTINS
from gradlang.cli import COMMANDS
from gradlang.passes.pipeline import PASSES

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_builtin_is_documented_with_its_signature():
    missing = [b.signature for b in BUILTINS.values() if f"`{b.signature}`" not in README]
    assert not missing


def test_every_pass_and_command_is_documented():
    for name in [*PASSES, *COMMANDS]:
        assert f"`{name}`" in README, name


def test_every_distribution_and_estimator_is_documented():
    from gradlang.distributions import DISTRIBUTIONS
    from gradlang.estimators import REGISTRY

    for spec in DISTRIBUTIONS.values():
        assert f"`{spec.name}(" in README, spec.name
    for name in ["auto", *REGISTRY]:
        assert f"`with {name}" in README, name
