"""Consul's ``?filter=`` expression language (HashiCorp go-bexpr), parsed and evaluated over JSON.

Consul filters the rows of a listing with a small boolean language; clients
(Dapr's watcher, Prometheus relabelling recipes, ``consul catalog`` users)
send it unchanged, so meshd reads the same text and means the same thing.
This module is pure: text in, a compiled :class:`Filter` out, and a
predicate over the JSON objects (``Mapping[str, Any]``) an endpoint answers.

Grammar (``not`` binds tighter than ``and``, ``and`` tighter than ``or``)::

    expr      := and ("or" and)*
    and       := unary ("and" unary)*
    unary     := "not" unary | "(" expr ")" | match
    match     := selector ("==" | "!=") value
               | selector ["not"] ("contains" | "matches") value
               | selector "is" ["not"] "empty"
               | value ["not"] "in" selector
    selector  := name ("." name | "[" string "]")*       name := [A-Za-z][A-Za-z0-9_]*
    value     := string | number | selector               (a bare word is its own text)
    string    := '"' Go escapes '"' | '`' raw text '`'
    number    := -?(0|[1-9][0-9]*)(.[0-9]+)?              followed by space, ")" or the end

Keywords are lower case; whitespace is space, tab, CR and LF.  ``Meta["a.b"]``
reaches a map key that is not a name.

Values are text, as in bexpr: ``Port == 80``, ``Port == "80"`` and
``Port == `80``` are the same test.  The text is read as the type of the field
it meets: a string field compares text, a number field the number the text
spells (Go's ``ParseInt``/``ParseFloat``), a boolean field ``true``/``false``
(also ``1``/``0``/``t``/``f``, as Go's ``ParseBool``).

What each operator does with the value its selector reaches:

- ``==`` / ``!=``: equality as above; a list or object is never equal.
- ``in`` / ``contains`` (and their ``not`` forms): a substring of a string,
  an element of a list (compared as ``==``), a key of an object.
- ``matches``: a regular-expression search (unanchored, as Go's
  ``regexp.Match``) in a string.
- ``is empty``: a string, list or object of length 0; ``null`` and a missing
  key are empty.

Lists in the middle of a selector (bexpr's rule, which Consul relies on for
``Checks.Status``): the rest of the selector and the whole operator, negation
included, are applied to every element, and the match holds if it holds for
ANY element.  So ``Checks.Status == "critical"`` means "some check is
critical", ``Checks.Status != "passing"`` means "some check is not passing"
(which is not ``not (Checks.Status == "passing")``), and over an empty list
both are false.  A list at the END of a selector is the operand itself:
``"web" in Service.Tags``, ``Service.Tags contains "web"``, ``Checks is empty``.

Missing values (bexpr's "not present" rule for map keys): when a key below
the top level is absent, or the selector runs into ``null`` or through a
string or number, ``==``, ``in``/``contains``, ``matches`` and
``is not empty`` are false, and ``!=``, ``not in``/``not contains``,
``not matches`` and ``is empty`` are true.

Unknown top-level fields are an error, not a quiet ``false``.  Consul checks
every selector against its Go types before it filters, so ``Servicename ==
"web"`` is a 400 there; meshd has no Go types, but every row an endpoint
answers has the same top-level keys, so a selector whose first name is not a
key of the row is a typo (or a field meshd does not serve) and
:meth:`Filter.matches` raises :class:`FilterError` naming it.  Below the top
level Consul's objects mix structs and maps (``Meta``, ``TaggedAddresses``),
which JSON cannot tell apart, so there the missing-key rule applies.  Where
the value meets a field of another kind than Consul would allow (``Port
contains "8"``, ``Tags == "x"``), Consul refuses at parse time; meshd
evaluates it as not equal / not found rather than guess a type.

Caps (the expression comes from any API client): the expression's length,
its nesting (each ``(`` and ``not``), its number of match terms, a selector's
number of parts, a value's length, and a regular expression's length and
shape.  Python's ``re`` backtracks, so a ``matches`` pattern is compiled once
(``re.ASCII``, as Go's ``\\d``, ``\\w``, ``\\s`` are ASCII) and refused if it
could backtrack exponentially or with more than a quadratic cost in the
subject's length: no backreferences, lookarounds or conditionals, no repeated
group that itself holds a quantifier or an alternation, at most
:data:`MAX_PATTERN_ALTERNATIVES` ways through its alternations, and one
repetition operator (two if the pattern starts with ``^``).  The worst
accepted pattern then costs about 16 x n^2 steps on an n-character subject.
Every violation is a :class:`FilterError` with the offset it concerns.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "MAX_DEPTH",
    "MAX_EXPRESSION_LENGTH",
    "MAX_PATTERN_ALTERNATIVES",
    "MAX_PATTERN_LENGTH",
    "MAX_PATTERN_REPEATS",
    "MAX_SELECTOR_PARTS",
    "MAX_TERMS",
    "MAX_VALUE_LENGTH",
    "Filter",
    "FilterError",
    "compile_filter",
]

#: Characters in one expression; a URL query parameter, so a few KiB is ample.
MAX_EXPRESSION_LENGTH: Final = 4096
#: Nested ``(`` and ``not``; bounds the parser's and the evaluator's recursion.
MAX_DEPTH: Final = 32
#: Match terms in one expression; each costs one walk of every row.
MAX_TERMS: Final = 256
#: Parts of one selector (``Service.Meta.x`` has 3); Consul's deepest is 4.
MAX_SELECTOR_PARTS: Final = 16
#: Characters of one value after unquoting; bexpr's own default cap.
MAX_VALUE_LENGTH: Final = 512
#: Characters of one ``matches`` pattern.
MAX_PATTERN_LENGTH: Final = 256
#: The degree of the polynomial a backtracking search may cost in the
#: subject's length: each repetition operator (``*``, ``+``, ``?``, ``{m,n}``)
#: adds one, and so does a search not anchored by a leading ``^`` (it retries
#: at every start).  2 means quadratic: about 0.1 s on a 4 KiB subject for the
#: worst accepted shape (``^a*a*c``), where a third degree took 11 s on 2 KiB.
MAX_PATTERN_REPEATS: Final = 2
#: Ways through a pattern's alternations, multiplied over its groups
#: (``(a|b)-(c|d|e)`` has 6): a backtracking search may try each of them, so a
#: chain of alternations is exponential without this cap.
MAX_PATTERN_ALTERNATIVES: Final = 16


class FilterError(ValueError):
    """A filter that cannot be used; one sentence naming the 0-based ``position``."""

    def __init__(self, problem: str, position: int) -> None:
        super().__init__(f"filter: {problem} at position {position}")
        self.position = position


# ---------------------------------------------------------------------------
# The syntax tree: small frozen values, built once by the parser.


class _Op(enum.Enum):
    EQUAL = "=="
    IN = "in"
    EMPTY = "is empty"
    MATCHES = "matches"


@dataclass(frozen=True, slots=True)
class _Match:
    """One term: ``path`` reaches a value, ``op`` tests it, ``negated`` flips each test."""

    path: tuple[str, ...]
    op: _Op
    negated: bool
    value: str
    position: int
    # The value read once as each kind a field may have (None: it does not spell one).
    as_int: int | None
    as_float: float | None
    as_bool: bool | None
    pattern: re.Pattern[str] | None


@dataclass(frozen=True, slots=True)
class _Not:
    operand: _Node


@dataclass(frozen=True, slots=True)
class _And:
    operands: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Or:
    operands: tuple[_Node, ...]


_Node = _Match | _Not | _And | _Or


@dataclass(frozen=True, slots=True)
class Filter:
    """A compiled expression; ``matches`` and ``apply`` never change it."""

    text: str
    root: _Node
    # Each distinct first selector name with where it first appears, checked
    # against every row before evaluation so that a typo is an error whatever
    # the short-circuiting of ``and``/``or`` would have reached.
    fields: tuple[tuple[str, int], ...]

    def matches(self, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` passes; FilterError if a selector names no top-level field of it."""
        for name, position in self.fields:
            if name not in obj:
                raise FilterError(f"unknown field {_show(name)}", position)
        return _evaluate(self.root, obj)

    def apply(self, rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The rows that pass, in their order."""
        return [row for row in rows if self.matches(row)]


def compile_filter(text: str) -> Filter:
    """Parse ``text``; raises FilterError with the offending position."""
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise FilterError(
            f"expression longer than {MAX_EXPRESSION_LENGTH} characters", MAX_EXPRESSION_LENGTH
        )
    parser = _Parser(text)
    root = parser.parse()
    return Filter(text=text, root=root, fields=tuple(parser.fields.items()))


# ---------------------------------------------------------------------------
# Lexer.


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "word", "string", "number", "punct" or "end"
    text: str  # as written (a string's decoded value is in ``value``)
    value: str
    position: int


_WHITESPACE = " \t\r\n"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_NUMBER_RUN = re.compile(r"-?[0-9A-Za-z_.]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_PUNCT = ("==", "!=", "(", ")", "[", "]", ".")
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_OCTAL = "01234567"
_HEX = "0123456789abcdefABCDEF"


def _show(text: str) -> str:
    """``text`` quoted for a message, cut short so an error stays one line."""
    text = text if len(text) <= 40 else text[:40] + "..."
    # Printable text as the client wrote it ("\q", "é"); anything else escaped.
    return f'"{text}"' if text.isprintable() else json.dumps(text)


def _lex(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
        elif ch.isascii() and ch.isalpha():
            m = _NAME.match(text, i)
            assert m is not None
            tokens.append(_Token("word", m.group(), m.group(), i))
            i = m.end()
        elif ch == "-" or ch in "0123456789":
            i = _lex_number(text, i, tokens)
        elif ch == '"':
            i = _lex_quoted(text, i, tokens)
        elif ch == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise FilterError("unterminated string", i)
            # Go's raw strings drop carriage returns; so does bexpr's unquoting.
            raw = text[i + 1 : end].replace("\r", "")
            tokens.append(_Token("string", text[i : end + 1], raw, i))
            i = end + 1
        else:
            for punct in _PUNCT:
                if text.startswith(punct, i):
                    tokens.append(_Token("punct", punct, punct, i))
                    i += len(punct)
                    break
            else:
                raise FilterError(f"unexpected {_show(ch)}", i)
    tokens.append(_Token("end", "", "", n))
    return tokens


def _lex_number(text: str, start: int, tokens: list[_Token]) -> int:
    m = _NUMBER_RUN.match(text, start)
    assert m is not None
    run = m.group()
    if run == "-":
        raise FilterError('unexpected "-"', start)
    end = m.end()
    # bexpr wants a number to end at a space, a ")" or the end: "80x" and
    # "1.0.0" are not numbers, and not words either.
    if not _NUMBER.fullmatch(run) or (end < len(text) and text[end] not in _WHITESPACE + ")"):
        raise FilterError(f"invalid number {_show(text[start : max(end, start + 1)])}", start)
    tokens.append(_Token("number", run, run, start))
    return end


def _lex_quoted(text: str, start: int, tokens: list[_Token]) -> int:
    """A double-quoted string with Go's escapes (and ``\\"``, which bexpr cannot write)."""
    out: list[str] = []
    i, n = start + 1, len(text)
    while True:
        if i >= n:
            raise FilterError("unterminated string", start)
        ch = text[i]
        if ch == '"':
            tokens.append(_Token("string", text[start : i + 1], "".join(out), start))
            return i + 1
        if ch == "\n":
            raise FilterError("line break inside a string", i)
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            raise FilterError("unterminated string", start)
        kind = text[i + 1]
        if kind in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[kind])
            i += 2
        elif kind in _HEX_ESCAPES:
            digits = text[i + 2 : i + 2 + _HEX_ESCAPES[kind]]
            if len(digits) != _HEX_ESCAPES[kind] or any(d not in _HEX for d in digits):
                raise FilterError(f"invalid escape {_show(text[i : i + 2])}", i)
            code = int(digits, 16)
            if code > 0x10FFFF or (kind != "x" and 0xD800 <= code <= 0xDFFF):
                raise FilterError(f"invalid escape {_show(text[i : i + 2 + len(digits)])}", i)
            # Go's \xNN is a byte; as text it can only mean the same code point.
            out.append(chr(code))
            i += 2 + len(digits)
        elif kind in _OCTAL:
            digits = text[i + 1 : i + 4]
            if len(digits) != 3 or any(d not in _OCTAL for d in digits) or int(digits, 8) > 255:
                raise FilterError(f"invalid escape {_show(text[i : i + 2])}", i)
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise FilterError(f"invalid escape {_show(text[i : i + 2])}", i)


# ---------------------------------------------------------------------------
# Parser: recursive descent over the token list, one method per grammar rule.


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _lex(text)
        self.index = 0
        self.terms = 0
        self.fields: dict[str, int] = {}

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        token = self.peek()
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def is_word(self, word: str, ahead: int = 0) -> bool:
        token = self.peek(ahead)
        return token.kind == "word" and token.text == word

    def is_punct(self, punct: str) -> bool:
        token = self.peek()
        return token.kind == "punct" and token.text == punct

    @staticmethod
    def unexpected(token: _Token) -> FilterError:
        if token.kind == "end":
            return FilterError("unexpected end of expression", token.position)
        if token.kind == "string":
            return FilterError("unexpected string", token.position)
        return FilterError(f"unexpected {_show(token.text)}", token.position)

    def parse(self) -> _Node:
        node = self.expr(0)
        if self.peek().kind != "end":
            raise self.unexpected(self.peek())
        return node

    def expr(self, depth: int) -> _Node:
        operands = [self.conjunction(depth)]
        while self.is_word("or"):
            self.advance()
            operands.append(self.conjunction(depth))
        return operands[0] if len(operands) == 1 else _Or(tuple(operands))

    def conjunction(self, depth: int) -> _Node:
        operands = [self.unary(depth)]
        while self.is_word("and"):
            self.advance()
            operands.append(self.unary(depth))
        return operands[0] if len(operands) == 1 else _And(tuple(operands))

    def unary(self, depth: int) -> _Node:
        token = self.peek()
        if self.is_word("not") or self.is_punct("("):
            if depth >= MAX_DEPTH:
                raise FilterError(f"nesting deeper than {MAX_DEPTH}", token.position)
            self.advance()
            if token.kind == "word":
                return _Not(self.unary(depth + 1))
            node = self.expr(depth + 1)
            if not self.is_punct(")"):
                raise self.unexpected(self.peek())
            self.advance()
            return node
        return self.match()

    def match(self) -> _Match:
        start = self.peek()
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise FilterError(f"more than {MAX_TERMS} terms", start.position)
        if start.kind == "word" and start.text not in ("and", "or"):
            path = self.selector()
        elif start.kind in ("string", "number"):
            self.advance()
            path = None
        else:
            raise self.unexpected(start)
        op_token = self.peek()
        negated = self.is_word("not")
        if negated:
            self.advance()
        keyword = self.peek()
        if self.is_word("in"):
            # ``value [not] in selector``: what looked like a selector was the value.
            self.advance()
            value = start.value if path is None else ".".join(path)
            self.check_value(value, start.position)
            selector_start = self.peek()
            if selector_start.kind != "word":
                raise self.unexpected(selector_start)
            path = self.selector()
            return self.term(path, _Op.IN, negated, value, start.position, selector_start.position)
        if path is None:
            raise self.unexpected(op_token)
        if negated and not (self.is_word("contains") or self.is_word("matches")):
            raise self.unexpected(keyword)
        if self.is_word("contains") or self.is_word("matches"):
            self.advance()
            op = _Op.IN if keyword.text == "contains" else _Op.MATCHES
            value, value_position = self.value()
            return self.term(path, op, negated, value, value_position, start.position)
        if self.is_word("is"):
            self.advance()
            negated = self.is_word("not")
            if negated:
                self.advance()
            if not self.is_word("empty"):
                raise self.unexpected(self.peek())
            self.advance()
            return self.term(path, _Op.EMPTY, negated, "", start.position, start.position)
        if self.is_punct("==") or self.is_punct("!="):
            self.advance()
            negated = op_token.text == "!="
            value, value_position = self.value()
            return self.term(path, _Op.EQUAL, negated, value, value_position, start.position)
        raise self.unexpected(op_token)

    def selector(self) -> tuple[str, ...]:
        start = self.advance()
        parts = [start.text]
        while True:
            if self.is_punct("."):
                self.advance()
                if self.peek().kind != "word":
                    raise self.unexpected(self.peek())
                parts.append(self.advance().text)
            elif self.is_punct("["):
                self.advance()
                if self.peek().kind != "string":
                    raise self.unexpected(self.peek())
                parts.append(self.advance().value)
                if not self.is_punct("]"):
                    raise self.unexpected(self.peek())
                self.advance()
            else:
                break
            if len(parts) > MAX_SELECTOR_PARTS:
                raise FilterError(
                    f"selector with more than {MAX_SELECTOR_PARTS} parts", start.position
                )
        return tuple(parts)

    def value(self) -> tuple[str, int]:
        token = self.peek()
        if token.kind == "word":
            # bexpr lets a bare selector stand for its own text: ``ServiceName == web``.
            text = ".".join(self.selector())
        elif token.kind in ("string", "number"):
            text = self.advance().value
        else:
            raise self.unexpected(token)
        self.check_value(text, token.position)
        return text, token.position

    @staticmethod
    def check_value(value: str, position: int) -> None:
        if len(value) > MAX_VALUE_LENGTH:
            raise FilterError(f"value longer than {MAX_VALUE_LENGTH} characters", position)

    def term(
        self,
        path: tuple[str, ...],
        op: _Op,
        negated: bool,
        text: str,
        value_position: int,
        position: int,
    ) -> _Match:
        """A term; ``position`` is its selector's offset, ``value_position`` its value's."""
        self.fields.setdefault(path[0], position)
        pattern = _compile_pattern(text, value_position) if op is _Op.MATCHES else None
        return _Match(
            path=path,
            op=op,
            negated=negated,
            value=text,
            position=position,
            as_int=_parse_int(text),
            as_float=_parse_float(text),
            as_bool=_BOOLS.get(text),
            pattern=pattern,
        )


# Go's strconv.ParseBool spellings.
_BOOLS: Final = {
    "1": True,
    "t": True,
    "T": True,
    "TRUE": True,
    "true": True,
    "True": True,
    "0": False,
    "f": False,
    "F": False,
    "FALSE": False,
    "false": False,
    "False": False,
}
_INT = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|[0-9]+)")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)")


def _parse_int(text: str) -> int | None:
    """The integer Go's ``ParseInt(text, 0, 64)`` reads, else None."""
    if not _INT.fullmatch(text):
        return None
    try:
        number = int(text, 0)
    except ValueError:  # a leading zero ("010"): Go reads octal, we refuse
        return None
    return number if -(2**63) <= number < 2**63 else None


def _parse_float(text: str) -> float | None:
    """The float Go's ``ParseFloat`` reads for ordinary decimal text, else None."""
    if _FLOAT.fullmatch(text):
        return float(text)
    return None


# ---------------------------------------------------------------------------
# Regular expressions: Python's re, refused where it could backtrack badly.

_REPEAT_BRACES = re.compile(r"\{([0-9]*)(,?)([0-9]*)\}")


def _compile_pattern(pattern: str, position: int) -> re.Pattern[str]:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise FilterError(
            f"regular expression longer than {MAX_PATTERN_LENGTH} characters", position
        )
    try:
        compiled = re.compile(pattern, re.ASCII)
    except re.error as err:
        raise FilterError(f"invalid regular expression ({err.msg})", position) from None
    problem = _pattern_risk(pattern)
    if problem:
        raise FilterError(f"regular expression with {problem}", position)
    return compiled


def _pattern_risk(pattern: str) -> str | None:
    """Why ``pattern`` (already valid for ``re``) may backtrack badly, or None.

    Walks the text keeping, per open group, whether it holds a quantifier or
    an alternation; a quantifier that may repeat (maximum above one) applied
    to such a group is the nested-quantifier shape behind exponential
    backtracking (``(a+)+``, ``(a|aa)*``).
    """
    # Each frame: [holds a quantifier, holds an alternation, its "|" count].
    frames: list[list[int]] = [[0, 0, 0]]
    last_group: list[int] | None = None  # the group just closed, if the last atom was one
    repeats = 0
    alternatives = 1  # ways through the pattern's alternations, multiplied out
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt.isdigit() and nxt != "0":
                return "a backreference"
            i += 2
            last_group = None
        elif ch == "[":
            i = _skip_class(pattern, i)
            last_group = None
        elif ch == "(":
            if pattern.startswith(("(?=", "(?!", "(?<=", "(?<!"), i):
                return "a lookaround"
            if pattern.startswith("(?(", i):
                return "a conditional group"
            if pattern.startswith("(?P=", i):
                return "a backreference"
            if pattern.startswith("(?#", i):
                i = pattern.index(")", i) + 1
                continue
            frames.append([0, 0, 0])
            i += 1
            last_group = None
        elif ch == ")":
            closed = frames.pop()
            frames[-1][0] |= closed[0]
            frames[-1][1] |= closed[1]
            alternatives *= closed[2] + 1
            last_group = closed
            i += 1
        elif ch == "|":
            frames[-1][1] = 1
            frames[-1][2] += 1
            i += 1
            last_group = None
        elif ch in "*+?" or (ch == "{" and _REPEAT_BRACES.match(pattern, i)):
            if ch == "{":
                m = _REPEAT_BRACES.match(pattern, i)
                assert m is not None
                low, comma, high = m.groups()
                many = bool(comma and high == "") or max(int(low or 0), int(high or 0)) > 1
                # {0} and {1} fix a count: nothing to backtrack over.
                counted = many or bool(comma) or low not in ("0", "1")
                i = m.end()
            else:
                many = ch != "?"
                counted = True
                i += 1
            # A lazy or possessive marker belongs to this quantifier.
            if i < n and pattern[i] in "?+":
                i += 1
            if many and last_group is not None and (last_group[0] or last_group[1]):
                return "a nested quantifier"
            repeats += counted
            frames[-1][0] = 1
            last_group = None
        else:
            i += 1
            last_group = None
    alternatives *= frames[0][2] + 1
    if alternatives > MAX_PATTERN_ALTERNATIVES:
        return f"more than {MAX_PATTERN_ALTERNATIVES} alternative paths"
    # A search not pinned by a leading "^" tries every start: one more degree.
    anchored = pattern.startswith("^") and frames[0][2] == 0
    allowed = MAX_PATTERN_REPEATS - (0 if anchored else 1)
    if repeats > allowed:
        where = "" if anchored else " without a leading ^"
        return f"more than {allowed} repetition{'s' if allowed != 1 else ''}{where}"
    return None


def _skip_class(pattern: str, start: int) -> int:
    """The index just past the character class opening at ``start``."""
    i = start + 1
    if pattern.startswith("^", i):
        i += 1
    if pattern.startswith("]", i):  # a leading "]" is a member, not the end
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


# ---------------------------------------------------------------------------
# Evaluation: pure functions of a term and a JSON value.

_MISSING: Final = object()


def _evaluate(node: _Node, obj: Mapping[str, Any]) -> bool:
    if isinstance(node, _Match):
        return any(_test(node, leaf) != node.negated for leaf in _reach(obj, node.path))
    if isinstance(node, _Not):
        return not _evaluate(node.operand, obj)
    if isinstance(node, _And):
        return all(_evaluate(operand, obj) for operand in node.operands)
    return any(_evaluate(operand, obj) for operand in node.operands)


def _reach(obj: Any, path: tuple[str, ...]) -> Iterator[Any]:
    """Every value ``path`` reaches in ``obj``: lists on the way fan out (bexpr's ANY)."""
    # Iterative, so that data nested deeper than the recursion limit is no threat.
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if depth == len(path):
            yield value
        elif isinstance(value, Mapping):
            if path[depth] in value:
                stack.append((value[path[depth]], depth + 1))
            else:
                yield _MISSING
        elif isinstance(value, list | tuple):
            stack.extend((item, depth) for item in reversed(value))
        else:
            yield _MISSING


def _test(term: _Match, leaf: Any) -> bool:
    """The un-negated operator on one reached value."""
    if leaf is _MISSING or leaf is None:
        return term.op is _Op.EMPTY
    if term.op is _Op.EQUAL:
        return _equal(term, leaf)
    if term.op is _Op.IN:
        if isinstance(leaf, str):
            return term.value in leaf
        if isinstance(leaf, Mapping):
            return term.value in leaf
        if isinstance(leaf, list | tuple):
            return any(_equal(term, item) for item in leaf)
        return False
    if term.op is _Op.EMPTY:
        return isinstance(leaf, str | list | tuple | Mapping) and len(leaf) == 0
    assert term.pattern is not None
    return isinstance(leaf, str) and term.pattern.search(leaf) is not None


def _equal(term: _Match, leaf: Any) -> bool:
    """The value text read as ``leaf``'s kind, compared with it (bexpr's coercion)."""
    if isinstance(leaf, str):
        return leaf == term.value
    if isinstance(leaf, bool):  # before int: a bool is an int to Python
        return term.as_bool is not None and leaf == term.as_bool
    if isinstance(leaf, int):
        number = term.as_int if term.as_int is not None else term.as_float
        return number is not None and leaf == number
    if isinstance(leaf, float):
        return term.as_float is not None and leaf == term.as_float
    return False
