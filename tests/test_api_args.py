"""Calls with Python scalars and NumPy values: every value that would be converted with loss
(a float for an `i32`, an int that overflows, a bool for a float) is an ArgumentError naming the
argument, the declared type and the value; values that convert exactly are accepted."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import gradlang
from gradlang.runtime import artifact, host, signature

SOURCE = """
fn f(n: i32, b: bool, x: f32) -> f32 { return if b then x * f32(n) else x }
fn g(n: i32[B]) -> i32 { return sum(n) }
export f = f
export g = g
"""

GOOD = {"n": 3, "b": True, "x": 0.5}
I32_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def m():
    return gradlang.compile_source(SOURCE)


def test_errors_are_importable_from_gradlang():
    assert gradlang.ArgumentError is signature.ArgumentError
    assert gradlang.ArtifactError is artifact.ArtifactError
    assert gradlang.ExternError is host.ExternError
    assert {"ArgumentError", "ArtifactError", "ExternError"} <= set(gradlang.__all__)


BAD_SCALARS = {
    "float-for-i32": ("n", 2.7, r"argument 'n': expected i32, got float 2\.7$"),
    "integral-float-for-i32": ("n", 2.0, r"argument 'n': expected i32, got float 2\.0$"),
    "nan-for-i32": ("n", float("nan"), r"argument 'n': expected i32, got float nan$"),
    "bool-for-i32": ("n", True, r"argument 'n': expected i32, got bool True$"),
    "too-large-for-i32": ("n", 2**40, r"argument 'n': expected i32, got int 1099511627776, "
                                      r"outside the i32 range \[-2147483648, 2147483647\]"),
    "too-small-for-i32": ("n", -2**31 - 1, r"argument 'n': expected i32, got int -2147483649"),
    "uint64-for-i32": ("n", np.uint64(2**63), r"argument 'n': expected i32, got an array of "
                                              r"dtype uint64 holding 9223372036854775808"),
    "int64-for-i32": ("n", np.int64(2**40), r"argument 'n': expected i32, got an array of "
                                            r"dtype int64 holding 1099511627776"),
    "numpy-float-for-i32": ("n", np.float64(2.7), r"argument 'n': expected i32, got float64 2\.7$"),
    "int-for-bool": ("b", 1, r"argument 'b': expected bool, got int 1$"),
    "float-for-bool": ("b", 0.0, r"argument 'b': expected bool, got float 0\.0$"),
    "bool-for-f32": ("x", True, r"argument 'x': expected f32, got bool True$"),
    "numpy-bool-for-f32": ("x", np.bool_(True), r"argument 'x': expected f32, got an array of "
                                                r"dtype bool"),
    "huge-int-for-f32": ("x", 2**40, r"argument 'x': expected f32, got int 1099511627776, which "
                                     r"JAX reads as int32 and cannot hold; pass a float"),
}


@pytest.mark.parametrize("case", list(BAD_SCALARS))
def test_lossy_scalars_raise_argument_error(m, case):
    name, value, message = BAD_SCALARS[case]
    if case == "huge-int-for-f32" and jax.config.jax_enable_x64:
        pytest.skip("with 64-bit mode JAX reads 2**40 as an int64")
    m.f(**GOOD)  # a good call first: its checked layout must not let a bad one through
    with pytest.raises(gradlang.ArgumentError, match=message):
        m.f(**{**GOOD, name: value})
    args = [value if n == name else v for n, v in GOOD.items()]
    with pytest.raises(gradlang.ArgumentError, match=message):
        m.f(*args)


def test_a_cached_layout_still_checks_integer_ranges(m):
    """The first call caches its layout (types and shapes); the range of an int is its value's."""
    assert float(m.f(I32_MAX, True, 1.0)) == float(np.float32(I32_MAX))
    with pytest.raises(gradlang.ArgumentError, match="outside the i32 range"):
        m.f(I32_MAX + 1, True, 1.0)
    labels = np.array([1, 2, 3], np.int64)
    assert int(m.g(labels)) == 6
    with pytest.raises(gradlang.ArgumentError, match=r"argument 'n': expected i32\[B\], got an "
                                                     r"array of dtype int64 holding -4294967296"):
        m.g(np.array([1, -2**32, 3], np.int64))
    with pytest.raises(gradlang.ArgumentError, match="holding 18446744073709551615"):
        m.g(np.array([1, 2**64 - 1], np.uint64))


EXACT = {  # values that convert without loss, and the result f(n, b, x) = x * n if b else x
    "python-scalars": ((3, True, 0.5), 1.5),
    "int-for-f32": ((3, True, 2), 6.0),
    "numpy-scalars": ((np.int64(4), np.bool_(True), np.float64(0.25)), 1.0),
    "small-unsigned": ((np.uint8(5), False, 2.0), 2.0),
    "i32-extremes": ((-2**31, True, 1.0), float(np.float32(-2**31))),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_exactly_convertible_values_are_accepted(m, case):
    args, expected = EXACT[case]
    assert float(m.f(*args)) == expected


def test_integer_ranges_under_jit_and_vmap(m):
    """Traced values cannot be range-checked (their values are unknown); the call still runs."""
    labels = np.array([[1, 2], [3, 4]], np.int64)
    np.testing.assert_array_equal(jax.vmap(m.g)(labels), [3, 7])
    assert int(jax.jit(m.g)(labels[0])) == 3


def test_compile_file_refuses_a_file_that_is_not_utf8(tmp_path):
    """A compile error at the first byte that is not UTF-8, not a UnicodeDecodeError."""
    path = tmp_path / "latin.grad"
    path.write_bytes(b"fn f(x: f32) -> f32 { return x }\n# caf\xe9\n")
    with pytest.raises(gradlang.CompileError, match=r"latin.grad:2:6: error: this file is not "
                                                    r"UTF-8 text: byte 38 is 0xe9"):
        gradlang.compile_file(path)


def test_a_random_key_for_an_array_parameter():
    m = gradlang.compile_source("fn f(key: f32) -> f32 { return key * 2.0 }\nexport f = f\n")
    with pytest.raises(gradlang.ArgumentError, match=r"argument 'key': expected f32, got a "
                                                     r"random key"):
        m.f(key=jax.random.key(0))
