"""A safe, bounded, exact evaluator for Countdown answer expressions (never `eval`, never raises).

Grammar (tokens: ASCII digits, `+ - * / ( )`, and spaces, nothing else):

    expression := term (("+" | "-") term)*
    term       := factor (("*" | "/") factor)*
    factor     := ("+" | "-") factor | NUMBER | "(" expression ")"

Arithmetic is exact over the rationals (`fractions.Fraction`), so `6 / 4 * 4` is exactly 6.
Anything else is an invalid result with a reason, never an exception: other characters (letters,
`_`, `.`, `**`, `//`, newlines), text over `max_length` characters, nesting (parentheses and unary
signs) deeper than `max_depth`, a literal with more than `max_digits` digits, an intermediate
numerator or denominator wider than `max_bits` bits, and division by zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_ALLOWED = re.compile(r"[0-9+\-*/() ]*")
_TOKEN = re.compile(r"[0-9]+|[-+*/()]")


@dataclass(frozen=True)
class Limits:
    """Bounds that keep evaluation time and memory small whatever the input."""

    max_length: int = 256
    max_depth: int = 32
    max_digits: int = 12
    max_bits: int = 256


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Evaluation:
    """The exact value of an expression and the sorted numbers it uses, or why it is invalid."""

    value: Fraction | None
    numbers: tuple[int, ...] = ()
    error: str = ""

    @property
    def valid(self) -> bool:
        return self.value is not None


class _Invalid(Exception):
    """Why an expression is rejected; never escapes `evaluate`."""


def evaluate(text: str, limits: Limits = DEFAULT_LIMITS) -> Evaluation:
    """Evaluate `text` under `limits`; invalid input gives `Evaluation(None, (), reason)`."""
    try:
        tokens = _tokenize(text, limits)
        value, pos = _expression(tokens, 0, 0, limits)
        if pos != len(tokens):
            raise _Invalid(f"unexpected {tokens[pos]!r}")
    except _Invalid as why:
        return Evaluation(None, (), str(why))
    return Evaluation(value, tuple(sorted(int(t) for t in tokens if t.isdigit())))


def _tokenize(text: str, limits: Limits) -> list[str]:
    if not isinstance(text, str):
        raise _Invalid("not a string")
    if len(text) > limits.max_length:
        raise _Invalid(f"longer than {limits.max_length} characters")
    if not _ALLOWED.fullmatch(text):
        raise _Invalid("characters other than digits, + - * / ( ) and spaces")
    tokens = _TOKEN.findall(text)
    if any(t.isdigit() and len(t) > limits.max_digits for t in tokens):
        raise _Invalid(f"a number with more than {limits.max_digits} digits")
    return tokens


def _peek(tokens: list[str], pos: int) -> str:
    return tokens[pos] if pos < len(tokens) else ""


def _expression(tokens: list[str], pos: int, depth: int, limits: Limits) -> tuple[Fraction, int]:
    value, pos = _term(tokens, pos, depth, limits)
    while (op := _peek(tokens, pos)) in ("+", "-"):
        rhs, pos = _term(tokens, pos + 1, depth, limits)
        value = _bounded(value + rhs if op == "+" else value - rhs, limits)
    return value, pos


def _term(tokens: list[str], pos: int, depth: int, limits: Limits) -> tuple[Fraction, int]:
    value, pos = _factor(tokens, pos, depth, limits)
    while (op := _peek(tokens, pos)) in ("*", "/"):
        rhs, pos = _factor(tokens, pos + 1, depth, limits)
        if op == "/" and rhs == 0:
            raise _Invalid("division by zero")
        value = _bounded(value * rhs if op == "*" else value / rhs, limits)
    return value, pos


def _factor(tokens: list[str], pos: int, depth: int, limits: Limits) -> tuple[Fraction, int]:
    # Depth bounds the recursion, so no input can reach Python's recursion limit.
    if depth > limits.max_depth:
        raise _Invalid(f"nested deeper than {limits.max_depth}")
    token = _peek(tokens, pos)
    if token in ("+", "-"):
        value, pos = _factor(tokens, pos + 1, depth + 1, limits)
        return (value if token == "+" else -value), pos
    if token == "(":
        value, pos = _expression(tokens, pos + 1, depth + 1, limits)
        if _peek(tokens, pos) != ")":
            raise _Invalid("missing ')'")
        return value, pos + 1
    if token.isdigit():
        return Fraction(int(token)), pos + 1
    raise _Invalid(f"expected a number or '(' but found {token or 'the end'!r}")


def _bounded(value: Fraction, limits: Limits) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > limits.max_bits:
        raise _Invalid(f"an intermediate value wider than {limits.max_bits} bits")
    return value
