"""go-bexpr filter expressions: grammar, semantics, error reporting and robustness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lictor.bexpr import MAX_DEPTH, compile_filter, evaluate_filter, filter_values
from lictor.errors import BadRequest

# A /v1/health/service entry, PascalCase like the API returns it.
ENTRY = {
    "Node": {"Node": "node-1", "Address": "10.0.0.1", "Meta": {"rack": "r1"}, "Datacenter": "dc1"},
    "Service": {
        "ID": "web-1",
        "Service": "web",
        "Tags": ["primary", "v2"],
        "Meta": {"version": "1.2.3", "team name": "core", "empty": ""},
        "Port": 8080,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "Kind": "",
    },
    "Checks": [
        {"CheckID": "serfHealth", "Status": "passing", "ServiceTags": []},
        {"CheckID": "service:web-1", "Status": "critical", "ServiceTags": ["primary", "v2"]},
    ],
}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        # equality, bare words, quoted and raw strings
        ("Service.Service == web", True),
        ('Service.Service == "web"', True),
        ("Service.Service == `web`", True),
        ("Service.Service != web", False),
        ("Service.Service==web", True),
        ("Node.Node == node-1", True),  # lenient: go-bexpr would need quotes for the hyphen
        ("Service.Meta.version == 1.2.3", True),
        ('Service.Meta.version == "1.2.3"', True),
        # numbers and bools coerce the literal to the field's type
        ("Service.Port == 8080", True),
        ('Service.Port == "8080"', True),
        ("Service.Port == 0x1F90", True),
        ("Service.Port != 80", True),
        ("Service.Port == abc", False),
        ("Service.EnableTagOverride == false", True),
        ("Service.EnableTagOverride == F", True),
        ("Service.EnableTagOverride == true", False),
        ("Service.Weights.Passing == 1", True),
        # contains / in: list element, map key, substring
        ('"primary" in Service.Tags', True),
        ("primary in Service.Tags", True),
        ('"canary" in Service.Tags', False),
        ('"canary" not in Service.Tags', True),
        ("Service.Tags contains v2", True),
        ("Service.Tags not contains v2", False),
        ("Service.Meta contains version", True),
        ('"team name" in Service.Meta', True),
        ("Service.Service contains we", True),
        ("Node.Address contains 10.0", True),
        # empty
        ("Service.Kind is empty", True),
        ("Service.Tags is not empty", True),
        ("Service.Meta.empty is empty", True),
        ("Service.Meta is empty", False),
        # regex
        ('Node.Node matches "^node-[0-9]+$"', True),
        ("Node.Node matches `node-\\d`", True),
        ('Node.Node not matches "^web"', True),
        ('Service.Port matches "80"', False),  # regex only applies to strings
        # quoted map keys
        ('Service.Meta["team name"] == core', True),
        ('Service.Meta."team name" == core', True),
        ('Service.Meta[ "team name" ] == core', True),
        ('"/Service/Meta/version" == "1.2.3"', True),  # JSON-pointer selector form
        # lists: implicit ANY over elements
        ("Checks.Status == passing", True),
        ("Checks.Status == critical", True),
        ("Checks.Status == warning", False),
        ("Checks.Status != passing", True),  # some check is not passing
        ("Checks.CheckID == serfHealth and Checks.Status == critical", True),
        ("Checks.ServiceTags contains primary", True),
        ("Checks.ServiceTags is empty", True),
        ("Checks.0.Status == passing", True),
        ("Checks.1.Status == passing", False),
        # missing selectors: lenient, positive false / negated true
        ("Service.Meta.nope == x", False),
        ("Service.Meta.nope != x", True),
        ("Service.Meta.nope is empty", True),
        ("Service.Meta.nope is not empty", False),
        ("Service.Meta.nope contains x", False),
        ("Service.Meta.nope not contains x", True),
        ("Nope.Deeper == x", False),
        ('Service.Meta.nope matches "."', False),
        # boolean structure
        ("Service.Service == web and Node.Node == node-1", True),
        ("Service.Service == web and Node.Node == other", False),
        ("Service.Service == db or Node.Node == node-1", True),
        ("not Service.Service == db", True),
        ("not not Service.Service == web", True),
        ("not (Service.Service == web)", False),
        ("(Service.Service == db or Service.Port == 8080) and primary in Service.Tags", True),
        ("Service.Service == db or Service.Port == 8080 and canary in Service.Tags", False),
        ("Service.Service == web or Service.Port == 1 and canary in Service.Tags", True),  # and binds tighter
        ("((Service.Service == web))", True),
        ("\n\tService.Service == web\n", True),
        ("Service.Service == web and(Node.Node == node-1)", True),
        # keyword-ish values
        ("Service.Kind == empty", False),
        ("empty in Service.Tags", False),
        ("empty not in Service.Tags", True),
        ('Service.Meta.version == "\\x31.2.3"', True),
    ],
)
def test_semantics(expr: str, expected: bool) -> None:
    assert compile_filter(expr)(ENTRY) is expected


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("", "1:1 (0)"),
        ("   ", "no match found"),
        ("Service.Service ==", "1:19 (18)"),
        ("Service.Service", "expected"),
        ("(Service.Service == web", "Unmatched parentheses"),
        ("Service.Service == web)", "Unmatched parentheses"),
        ("Service.Service === web", "1:19 (18)"),
        ('"web" == Service.Service', "Invalid selector"),
        ('Service.Service == "web', "Unterminated string literal"),
        ("Service.Service == `web", "Unterminated string literal"),
        ('Node.Node matches "("', "Failed to compile regular expression"),
        ("Service.Tags is full", '"empty"'),
        ("Service.Service == web and", "end of input"),
        ("and Service.Service == web", "1:1 (0)"),
        ("Service. == web", "Invalid selector"),
        ("1abc == x", "Invalid selector"),
        ("Service.Meta[version] == x", "Invalid index"),
        ('Service.Meta["a" == x', "Unclosed index"),
        ('Service.Service == "a\\qb"', "unknown escape"),
        ("Service.Service == web\n  or ?", "2:6 (28)"),
        ("Service.Service contains", "end of input"),
        ('"x" in "y"', "Invalid selector"),
    ],
)
def test_syntax_errors(expr: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        compile_filter(expr)
    assert info.value.status == 400
    assert info.value.message.startswith("Failed to create boolean expression evaluator: ")
    assert fragment in info.value.message


def test_deep_nesting_is_rejected_not_crashing() -> None:
    ok = "(" * (MAX_DEPTH - 1) + "a == b" + ")" * (MAX_DEPTH - 1)
    compile_filter(ok)
    for deep in ("(" * 5000 + "a == b" + ")" * 5000, "not " * 5000 + "a == b", "(" * 50000):
        with pytest.raises(BadRequest, match="nested deeper"):
            compile_filter(deep)


def test_long_flat_chains_do_not_recurse() -> None:
    expr = " and ".join(f"Service.Port != {i}" for i in range(7000, 9000))
    assert compile_filter(expr)(ENTRY) is False  # one of them is 8080
    expr = " or ".join(f"Service.Port == {i}" for i in range(7000, 9000))
    assert compile_filter(expr)(ENTRY) is True


def test_regex_compiled_once() -> None:
    pred = compile_filter('Node.Node matches "' + "(node|web)-" * 200 + '"')
    assert pred(ENTRY) is False
    assert pred.ast.regex is not None  # type: ignore[attr-defined]


def test_evaluate_filter_keeps_order_and_empty_filter_keeps_all() -> None:
    items = [{"Service": {"Service": n, "Tags": t}} for n, t in [("a", ["x"]), ("b", []), ("c", ["x"])]]
    assert [i["Service"]["Service"] for i in evaluate_filter("x in Service.Tags", items)] == ["a", "c"]
    assert evaluate_filter("", items) == items
    assert evaluate_filter(None, items) == items
    with pytest.raises(BadRequest):
        evaluate_filter("Service.Service ==", items)


def test_filter_values_for_map_answers() -> None:
    services = {"a": {"Service": "a", "Tags": ["x"]}, "b": {"Service": "b", "Tags": []}}
    assert list(filter_values("Tags contains x", services)) == ["a"]
    assert filter_values("", services) == services


def test_unicode_digit_segments_do_not_crash() -> None:
    assert compile_filter('A["\u00b2"] == 1')({"A": [1, 2]}) is False
    assert compile_filter('"/A/\u00b2" == 1')({"A": [1]}) is False


def test_null_values_and_odd_data() -> None:
    pred = compile_filter("Service.Tags contains x")
    assert pred({"Service": {"Tags": None}}) is False
    assert pred({"Service": None}) is False
    assert pred({}) is False
    assert pred({"Service": "str"}) is False
    assert compile_filter("Service.Tags is empty")({"Service": {"Tags": None}}) is True
    assert compile_filter("A.B == 1")({"A": [{"B": 1.0}, {"B": 2}]}) is True
    assert compile_filter("A == 1.5")({"A": 1.5}) is True
    assert compile_filter("A == 1.5")({"A": 1}) is False


# Anything a user can type must either compile or be a BadRequest, and compiled filters must never
# raise on arbitrary JSON.
_ALPHABET = st.sampled_from(
    list("abcAB01 ._-/\"`()[]=!\\,\n") + ["and", "or", "not", "in", "contains", "is", "empty", "matches",
                                         " == ", " != ", "Service.Tags", "Checks.Status", "\"x\""]
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "Service", "Tags"]), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=20).map("".join), _json)
def test_fuzz_grammar_tokens(expr: str, datum: object) -> None:
    try:
        pred = compile_filter(expr)
    except BadRequest:
        return
    assert pred(datum) in (True, False)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_fuzz_arbitrary_text(expr: str) -> None:
    try:
        compile_filter(expr)
    except BadRequest:
        pass


@pytest.mark.parametrize("pattern", [r"a.*a.*a.*a.*z", r"^(a+)+$", r"^(\w+\s?)*$", r"^(.*)(.*)(.*)z$"])
def test_regexes_that_backtrack_exponentially_run_in_linear_time(pattern: str) -> None:
    """go-bexpr uses RE2; Python's backtracking re took 435 s for the first pattern on this input."""
    import time

    items = [{"ServiceName": "a" * 500 + "!"} for _ in range(20)]
    started = time.perf_counter()
    assert evaluate_filter(f'ServiceName matches "{pattern.replace(chr(92), chr(92) * 2)}"', items) == []
    assert time.perf_counter() - started < 1.0


def test_re2_rejects_what_go_rejects() -> None:
    with pytest.raises(BadRequest, match="regular expression"):
        compile_filter(r'ServiceName matches "(a)\\1"')  # backreferences: not in RE2 (nor Go)
