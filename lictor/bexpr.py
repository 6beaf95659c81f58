"""HashiCorp go-bexpr boolean filter expressions, as Consul's `?filter=` query parameter uses them.

`compile_filter(expr)` parses once and returns a predicate over plain JSON-shaped dicts (PascalCase
keys, exactly what the API returns). Semantics follow go-bexpr as Consul vendors it:

* `Sel == v` / `!=` coerce the literal to the type of the value found (bool/int/float/string);
* `v in Sel` and `Sel contains v` are the same operation: key of a map, element of a list,
  substring of a string;
* `Sel is empty` / `is not empty` look at the length of a string, list or map;
* `Sel matches "re"` searches the string with a regular expression (compiled once, at parse time);
* a selector that walks *through* a list (`Checks.Status` on a list of checks) is true when ANY
  element satisfies the whole match — negated operators included (`Checks.Status != passing` means
  "some check is not passing"), exactly like go-bexpr's implicit ANY over slices.

Deliberate leniencies (Consul returns an error for these on typed structs): an unknown/missing
selector is "missing" (positive operators false, negated ones true, `is empty` true), bare values may
contain `-`, `:`, `.`, `@`, `+`, and `and`/`or` may touch a parenthesis without whitespace.
"""

from __future__ import annotations

import re

try:
    import re2 as _re2  # google-re2: the RE2 engine go-bexpr uses
except ImportError:  # pragma: no cover - a dependency; the fallback refuses the risky patterns it can see
    _re2 = None
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lictor.errors import BadRequest

__all__ = ["compile_filter", "evaluate_filter", "filter_values", "parse", "MAX_DEPTH", "MAX_LENGTH"]

# Recursion guard: parentheses and `not` chains nest the recursive-descent parser and evaluator.
MAX_DEPTH = 64
# A filter is a URL query parameter; anything longer is abuse rather than a real expression.
MAX_LENGTH = 64 * 1024

_PREFIX = "Failed to create boolean expression evaluator: "

_MISSING = object()  # a selector that names nothing in the datum


class _SyntaxError(Exception):
    def __init__(self, pos: int, reason: str) -> None:
        super().__init__(reason)
        self.pos = pos
        self.reason = reason


# ----------------------------------------------------------------------------------------- lexer

@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "word" | "string" | "(" | ")" | "[" | "]" | "," | "==" | "!=" | "eof"
    text: str  # word text / decoded string value / punctuation
    start: int
    end: int


_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_/.-:@+")
_GO_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
                      "\\": "\\", '"': '"', "'": "'"}


def _unquote_go(body: str, start: int) -> str:
    """Decode the inside of a Go double-quoted literal (strconv.Unquote rules)."""
    if "\\" not in body:
        if "\n" in body:
            raise _SyntaxError(start, "invalid string literal: newline in double-quoted string")
        return body
    out: list[str] = []
    i = 0
    n = len(body)
    while i < n:
        c = body[i]
        if c == "\n":
            raise _SyntaxError(start + 1 + i, "invalid string literal: newline in double-quoted string")
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= n:
            raise _SyntaxError(start + 1 + i, "invalid string literal: trailing backslash")
        e = body[i + 1]
        if e in _GO_SIMPLE_ESCAPES:
            out.append(_GO_SIMPLE_ESCAPES[e])
            i += 2
            continue
        width = {"x": 2, "u": 4, "U": 8}.get(e)
        if width is not None:
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or any(ch not in "0123456789abcdefABCDEF" for ch in digits):
                raise _SyntaxError(start + 1 + i, f"invalid string literal: bad \\{e} escape")
            cp = int(digits, 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                raise _SyntaxError(start + 1 + i, "invalid string literal: escape is not a valid code point")
            out.append(chr(cp))
            i += 2 + width
            continue
        if e in "01234567":
            digits = body[i + 1 : i + 4]
            if len(digits) != 3 or any(ch not in "01234567" for ch in digits) or int(digits, 8) > 255:
                raise _SyntaxError(start + 1 + i, "invalid string literal: bad octal escape")
            out.append(chr(int(digits, 8)))
            i += 4
            continue
        raise _SyntaxError(start + 1 + i, f"invalid string literal: unknown escape \\{e}")
    return "".join(out)


def _lex(src: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i = 0
    n = len(src)
    while i < n:
        c = src[i]
        if c in " \t\r\n":
            i += 1
            continue
        if c in "()[],":
            toks.append(_Tok(c, c, i, i + 1))
            i += 1
            continue
        if c in "=!":
            if src.startswith("==", i) or src.startswith("!=", i):
                toks.append(_Tok(src[i : i + 2], src[i : i + 2], i, i + 2))
                i += 2
                continue
            raise _SyntaxError(i, f"unexpected {c!r}, expected \"==\" or \"!=\"")
        if c == '"':
            j = src.find('"', i + 1)
            # go-bexpr ends a double-quoted string at the first quote, escaped or not.
            if j < 0:
                raise _SyntaxError(i, "Unterminated string literal")
            toks.append(_Tok("string", _unquote_go(src[i + 1 : j], i), i, j + 1))
            i = j + 1
            continue
        if c == "`":
            j = src.find("`", i + 1)
            if j < 0:
                raise _SyntaxError(i, "Unterminated string literal")
            toks.append(_Tok("string", src[i + 1 : j].replace("\r", ""), i, j + 1))
            i = j + 1
            continue
        if c in _WORD_CHARS:
            j = i
            while j < n and src[j] in _WORD_CHARS:
                j += 1
            toks.append(_Tok("word", src[i:j], i, j))
            i = j
            continue
        raise _SyntaxError(i, f"unexpected character {c!r}")
    toks.append(_Tok("eof", "", n, n))
    return toks


# ------------------------------------------------------------------------------------------- AST

@dataclass(frozen=True, slots=True)
class Match:
    selector: tuple[str, ...]
    op: str  # "==", "in", "empty", "matches"
    negate: bool
    value: str | None
    regex: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    # n-ary so that `a and b and ... ` (thousands of terms) needs no deep recursion
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Node, ...]


Node = Match | Not | And | Or

def _compile_regex(pattern: str, at: int) -> Any:
    """RE2 when available, as go-bexpr: linear time whatever the pattern. Python's backtracking `re`
    took 435 s for `a.*a.*a.*a.*z` against a 512-character name, on the server's event loop."""
    if _re2 is not None:
        try:
            return _re2.compile(pattern)
        except Exception as exc:  # noqa: BLE001 - re2.error and friends: a bad pattern is a 400
            raise _SyntaxError(at, f"Failed to compile regular expression {pattern!r}: {exc}") from None
    try:
        rx = re.compile(pattern)
        risky = _backtracking_risk(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise _SyntaxError(at, f"Failed to compile regular expression {pattern!r}: {exc}") from None
    if risky:
        raise _SyntaxError(at, f"Unsupported regular expression {pattern!r}: {risky}")
    return rx


def _backtracking_risk(pattern: str) -> str:
    """Why `pattern` could take exponential time in Python's backtracking `re`, or "".

    go-bexpr runs RE2, which is linear; Python's engine is not, and a filter runs on the server's
    event loop (`^(a+)+$` against a 30-character name stalls it for seconds). So we refuse what
    makes backtracking explode: a repetition inside an unbounded repetition, alternation inside one,
    and backreferences or lookarounds (which RE2 does not support either).
    """
    from re import _constants as c
    from re import _parser as sre

    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT)

    def walk(items: Any, inside_unbounded: bool) -> str:
        for op, arg in items:
            if op in (c.GROUPREF, c.GROUPREF_EXISTS):
                return "backreferences are not supported"
            if op in (c.ASSERT, c.ASSERT_NOT):
                return "lookaround assertions are not supported"
            if op in repeats:
                low, high, body = arg
                if inside_unbounded and high > 1:
                    return "a repetition inside an unbounded repetition can take exponential time"
                found = walk(body, inside_unbounded or high == c.MAXREPEAT)
            elif op == c.BRANCH:
                if inside_unbounded:
                    return "alternation inside an unbounded repetition can take exponential time"
                found = next((r for branch in arg[1] if (r := walk(branch, inside_unbounded))), "")
            elif op == c.SUBPATTERN:
                found = walk(arg[3], inside_unbounded)
            elif op == c.ATOMIC_GROUP:
                found = walk(arg, inside_unbounded)
            else:
                found = ""
            if found:
                return found
        return ""

    return walk(sre.parse(pattern), False)


_KEYWORDS = frozenset({"and", "or", "not", "in", "contains", "is", "empty", "matches"})
_IDENT_RE = re.compile(r"[A-Za-z][A-Za-z0-9_/]*\Z")
_NUMBER_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?\Z")


class _Parser:
    def __init__(self, src: str) -> None:
        self.src = src
        self.toks = _lex(src)
        self.i = 0
        self.depth = 0

    # -- token helpers
    def peek(self, k: int = 0) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        if t.kind != "eof":
            self.i += 1
        return t

    def is_word(self, word: str, k: int = 0) -> bool:
        t = self.peek(k)
        return t.kind == "word" and t.text == word

    def fail(self, tok: _Tok, expected: str) -> _SyntaxError:
        found = "end of input" if tok.kind == "eof" else repr(self.src[tok.start : tok.end])
        return _SyntaxError(tok.start, f"no match found, expected: {expected}, found {found}")

    def enter(self, tok: _Tok) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _SyntaxError(tok.start, f"expression nested deeper than {MAX_DEPTH} levels")

    # -- grammar
    def parse(self) -> Node:
        node = self.or_expr()
        t = self.peek()
        if t.kind != "eof":
            if t.kind == ")":
                raise _SyntaxError(t.start, "Unmatched parentheses")
            raise self.fail(t, '"and", "or" or end of input')
        return node

    def or_expr(self) -> Node:
        # A flat loop (go-bexpr nests right-assoc, same truth table) keeps Python recursion shallow.
        items = [self.and_expr()]
        while self.is_word("or"):
            self.next()
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self) -> Node:
        items = [self.not_expr()]
        while self.is_word("and"):
            self.next()
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else And(tuple(items))

    def not_expr(self) -> Node:
        t = self.peek()
        # `not` is only an operator when something other than a match operator follows it, so a
        # selector literally named "not" (`not == x`) still parses.
        if t.kind == "word" and t.text == "not" and self.peek(1).kind not in ("==", "!=", "eof"):
            self.enter(t)
            self.next()
            operand = self.not_expr()
            self.depth -= 1
            # `not not x` == x, as go-bexpr folds it.
            return operand.operand if isinstance(operand, Not) else Not(operand)
        return self.primary()

    def primary(self) -> Node:
        t = self.peek()
        if t.kind == "(":
            self.enter(t)
            self.next()
            node = self.or_expr()
            close = self.peek()
            if close.kind != ")":
                if close.kind == "eof":
                    raise _SyntaxError(t.start, "Unmatched parentheses")
                raise self.fail(close, '")", "and" or "or"')
            self.next()
            self.depth -= 1
            return node
        return self.match()

    def match(self) -> Node:
        start = self.peek()
        if start.kind == "eof":
            raise self.fail(start, "a selector or value")
        # A bare value may be a keyword (`empty in Service.Tags`) only where `in` makes it unambiguous.
        value_first = self.is_word("in", 1) or (self.is_word("not", 1) and self.is_word("in", 2))
        first = self.operand(allow_keyword=value_first)
        # Value (not) in Selector
        if self.is_word("in") or (self.is_word("not") and self.is_word("in", 1)):
            negate = self.next().text == "not"
            if negate:
                self.next()
            value = self.as_value(first)
            sel_tok = self.peek()
            sel = self.operand()
            return Match(self.as_selector(sel, sel_tok), "in", negate, value)
        selector = self.as_selector(first, start)
        t = self.peek()
        if t.kind in ("==", "!="):
            self.next()
            return Match(selector, "==", t.kind == "!=", self.value())
        if t.kind == "word":
            if t.text == "is":
                self.next()
                negate = False
                if self.is_word("not"):
                    self.next()
                    negate = True
                if not self.is_word("empty"):
                    raise self.fail(self.peek(), '"empty" or "not empty"')
                self.next()
                return Match(selector, "empty", negate, None)
            negate = False
            op_tok = t
            if t.text == "not" and self.peek(1).kind == "word" and self.peek(1).text in ("contains", "matches"):
                self.next()
                negate = True
                op_tok = self.peek()
            if op_tok.kind == "word" and op_tok.text == "contains":
                self.next()
                return Match(selector, "in", negate, self.value())
            if op_tok.kind == "word" and op_tok.text == "matches":
                self.next()
                vtok = self.peek()
                pattern = self.value()
                rx = _compile_regex(pattern, vtok.start)
                return Match(selector, "matches", negate, pattern, rx)
        raise self.fail(t, '"==", "!=", "contains", "not contains", "is empty", "is not empty", '
                           '"matches", "not matches", "in" or "not in"')

    # An operand is either a selector path or a literal; which one it must be depends on the operator.
    def operand(self, allow_keyword: bool = False) -> tuple[str, Any]:
        t = self.peek()
        if t.kind == "string":
            self.next()
            return ("string", t.text)
        if t.kind == "word":
            if t.text in _KEYWORDS and not allow_keyword:
                raise self.fail(t, "a selector or value")
            self.next()
            parts: list[str] = []
            text = t.text
            pos = t.start
            # `Service.Meta["a b"].x` / `Service.Meta."a b"`: indexes must touch the path.
            while True:
                if text:
                    segs = text.split(".")
                    if text.startswith(".") and parts:
                        segs = segs[1:]
                    parts.extend(segs)
                nxt = self.peek()
                if nxt.start != self.toks[self.i - 1].end:
                    break
                if nxt.kind == "[":
                    self.next()
                    key = self.next()
                    if key.kind != "string":
                        raise _SyntaxError(key.start, "Invalid index")
                    close = self.next()
                    if close.kind != "]":
                        raise _SyntaxError(close.start, "Unclosed index expression")
                    if parts and parts[-1] == "":
                        raise _SyntaxError(pos, "Invalid selector")
                    parts.append(key.text)
                    text = ""
                    nxt2 = self.peek()
                    if nxt2.kind == "word" and nxt2.start == close.end and nxt2.text.startswith("."):
                        self.next()
                        text = nxt2.text
                        continue
                    if nxt2.kind == "[" and nxt2.start == close.end:
                        continue
                    break
                if nxt.kind == "string" and parts and parts[-1] == "":
                    self.next()
                    parts[-1] = nxt.text
                    text = ""
                    nxt2 = self.peek()
                    if nxt2.kind == "word" and nxt2.start == nxt.end and nxt2.text.startswith("."):
                        self.next()
                        text = nxt2.text
                        continue
                    break
                break
            return ("word", (t.text, tuple(parts), pos))
        raise self.fail(t, "a selector or value")

    def value(self) -> str:
        t = self.peek()
        return self.as_value(self.operand(allow_keyword=True), t)

    def as_value(self, operand: tuple[str, Any], tok: _Tok | None = None) -> str:
        kind, payload = operand
        if kind == "string":
            return payload
        text, parts, pos = payload
        if any(p == "" for p in parts):
            raise _SyntaxError(pos, f"invalid value {text!r}")
        return ".".join(parts)

    def as_selector(self, operand: tuple[str, Any], tok: _Tok) -> tuple[str, ...]:
        kind, payload = operand
        if kind == "string":
            # go-bexpr's JSON-pointer selector form: "/Service/Meta/version"
            if payload.startswith("/") and len(payload) > 1:
                return tuple(p.replace("~1", "/").replace("~0", "~") for p in payload[1:].split("/"))
            raise _SyntaxError(tok.start, "Invalid selector: a selector cannot be a quoted value")
        text, parts, pos = payload
        if not parts or any(p == "" for p in parts):
            raise _SyntaxError(pos, f"Invalid selector {text!r}")
        if not _IDENT_RE.match(parts[0]):
            raise _SyntaxError(pos, f"Invalid selector {text!r}: must start with a letter")
        return parts


def _position(src: str, offset: int) -> str:
    line = src.count("\n", 0, offset) + 1
    col = offset - (src.rfind("\n", 0, offset) + 1) + 1
    return f"{line}:{col} ({offset})"


def parse(expr: str) -> Node:
    """Parse a filter into an AST; BadRequest on any syntax problem."""
    if not isinstance(expr, str):
        raise BadRequest(_PREFIX + "filter expression must be a string")
    if len(expr) > MAX_LENGTH:
        raise BadRequest(_PREFIX + f"filter expression longer than {MAX_LENGTH} characters")
    if not expr.strip():
        raise BadRequest(_PREFIX + "1:1 (0): no match found, expected: a selector or value, found end of input")
    try:
        return _Parser(expr).parse()
    except _SyntaxError as exc:
        raise BadRequest(_PREFIX + f"{_position(expr, exc.pos)}: {exc.reason}") from None
    except RecursionError:
        raise BadRequest(_PREFIX + "expression too deeply nested") from None


# ------------------------------------------------------------------------------------ evaluation

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _coerce(raw: str, like: Any) -> Any:
    """The literal as the type of `like` (Go CoerceBool/Int64/Float64); _MISSING if it cannot be."""
    if isinstance(like, bool):
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        return _MISSING
    if isinstance(like, int):
        try:
            return int(raw, 0)  # strconv.ParseInt(raw, 0, 64): 0x.., 0o.., 0b.. prefixes allowed
        except ValueError:
            return _MISSING
    if isinstance(like, float):
        try:
            return float(raw)
        except ValueError:
            return _MISSING
    return raw


def _equal(raw: str, value: Any) -> bool:
    if value is _MISSING or value is None or isinstance(value, dict | list):
        return False
    if not isinstance(value, bool | int | float | str):
        value = str(value)
    lit = _coerce(raw, value)
    if lit is _MISSING:
        return False
    return type(lit) is type(value) and lit == value


def _positive(m: Match, value: Any) -> bool:
    if m.op == "==":
        return _equal(m.value or "", value)
    if m.op == "in":
        if isinstance(value, dict):
            return m.value in value
        if isinstance(value, list):
            return any(_equal(m.value or "", item) for item in value)
        if isinstance(value, str):
            return (m.value or "") in value
        return False
    if m.op == "empty":
        if value is _MISSING or value is None:
            return True
        if isinstance(value, str | list | dict):
            return len(value) == 0
        return False
    if m.op == "matches":
        return isinstance(value, str) and m.regex is not None and m.regex.search(value) is not None
    raise AssertionError(m.op)  # pragma: no cover


def _match(m: Match, datum: Any, path: tuple[str, ...]) -> bool:
    cur = datum
    for idx, seg in enumerate(path):
        if isinstance(cur, list):
            if seg.isascii() and seg.isdigit():  # "²".isdigit() is True but int() rejects it
                n = int(seg)
                cur = cur[n] if n < len(cur) else _MISSING
                continue
            # Implicit ANY over slice elements for the rest of the selector.
            rest = path[idx:]
            return any(_match(m, item, rest) for item in cur)
        if isinstance(cur, dict):
            cur = cur.get(seg, _MISSING)
            if cur is _MISSING:
                break
        else:
            cur = _MISSING
            break
    result = _positive(m, cur)
    return not result if m.negate else result


def _eval(node: Node, datum: Any) -> bool:
    # and/or are n-ary, so recursion depth is bounded by `not`/parentheses nesting (MAX_DEPTH).
    if isinstance(node, Match):
        return _match(node, datum, node.selector)
    if isinstance(node, Not):
        return not _eval(node.operand, datum)
    if isinstance(node, And):
        return all(_eval(child, datum) for child in node.items)
    return any(_eval(child, datum) for child in node.items)


def compile_filter(expr: str) -> Callable[[Any], bool]:
    """Parse `expr` once; return a predicate over one JSON-shaped item."""
    ast = parse(expr)

    def predicate(item: Any) -> bool:
        return _eval(ast, item)

    predicate.ast = ast  # type: ignore[attr-defined]  # handy for debugging / tests
    return predicate


def evaluate_filter(expr: str | None, items: Iterable[Any]) -> list[Any]:
    """The items the filter keeps, in order. An empty/None filter keeps everything."""
    items = list(items)
    if expr is None or expr == "":
        return items
    pred = compile_filter(expr)
    return [it for it in items if pred(it)]


def filter_values(expr: str | None, mapping: dict[str, Any]) -> dict[str, Any]:
    """For map-shaped answers (/v1/agent/services, /v1/agent/checks): keep entries whose value matches."""
    if expr is None or expr == "":
        return dict(mapping)
    pred = compile_filter(expr)
    return {k: v for k, v in mapping.items() if pred(v)}
