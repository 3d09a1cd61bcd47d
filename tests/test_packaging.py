"""Packaging: one version (gradlang/version.py) read by the package metadata, the command
line and the API; the license file matches pyproject.toml's; the package is marked typed."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import tomllib
from pathlib import Path

import pytest

import gradlang
from gradlang.cli import main
from gradlang.version import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_one_version_everywhere(capsys):
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "gradlang.version.__version__"}
    assert gradlang.__version__ == __version__ == importlib.metadata.version("gradlang")
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"gradlang {__version__}"
    assert f"({__version__})" in (ROOT / "CHANGELOG.md").read_text()


def test_the_license_file_is_the_declared_license():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_package_is_typed():
    assert importlib.resources.files("gradlang").joinpath("py.typed").is_file()
