"""meshd/api/filter.py: Consul's filter language, its parse errors, caps and bexpr's list rules."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.api.filter import (
    MAX_DEPTH,
    MAX_EXPRESSION_LENGTH,
    MAX_PATTERN_LENGTH,
    MAX_SELECTOR_PARTS,
    MAX_TERMS,
    MAX_VALUE_LENGTH,
    FilterError,
    compile_filter,
)

# A /v1/health/service entry as Consul shapes it.
HEALTH: dict[str, Any] = {
    "Node": {
        "Node": "n1",
        "Address": "10.0.0.1",
        "Datacenter": "east",
        "Meta": {"zone": "a", "dotted.key": "yes"},
    },
    "Service": {
        "ID": "web-1",
        "Service": "web",
        "Tags": ["prod", "v2"],
        "Address": "10.0.0.7",
        "Port": 8080,
        "Meta": {"version": "1.4.2", "DAPR_PORT": "50002"},
        "EnableTagOverride": False,
        "Weights": {"Passing": 1, "Warning": 1},
        "Proxy": None,
    },
    "Checks": [
        {"CheckID": "serfHealth", "Status": "passing", "ServiceName": "", "Output": ""},
        {"CheckID": "service:web-1", "Status": "critical", "ServiceName": "web", "Output": "boom"},
    ],
}
# A /v1/catalog/service entry: flat.
CATALOG: dict[str, Any] = {
    "Node": "n1",
    "Address": "10.0.0.1",
    "ServiceName": "web",
    "ServiceID": "web-1",
    "ServiceTags": ["prod"],
    "ServicePort": 8080,
    "ServiceMeta": {},
    "NodeMeta": {"zone": "a"},
}


def holds(text: str, obj: dict[str, Any] = HEALTH) -> bool:
    return compile_filter(text).matches(obj)


def refused(text: str) -> FilterError:
    with pytest.raises(FilterError) as info:
        compile_filter(text)
    return info.value


# --- each operator ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Service.Service == "web"', True),
        ('Service.Service == "api"', False),
        ('Service.Service != "api"', True),
        ('Service.Service != "web"', False),
        ('"prod" in Service.Tags', True),
        ('"dev" in Service.Tags', False),
        ('"dev" not in Service.Tags', True),
        ('"prod" not in Service.Tags', False),
        ('Service.Tags contains "v2"', True),
        ('Service.Tags contains "v"', False),  # an element, not a substring of one
        ('Service.Tags not contains "v"', True),
        ('Service.ID contains "eb-"', True),  # substring of a string
        ('"eb-" in Service.ID', True),
        ('Service.ID not contains "eb-"', False),
        ('"version" in Service.Meta', True),  # a key of an object
        ('"nope" in Service.Meta', False),
        ('Service.Meta contains "DAPR_PORT"', True),
        ('Service.Service matches "^w.b$"', True),
        ('Service.Service matches "e"', True),  # unanchored, as Go's regexp.Match
        ('Service.Service matches "^e"', False),
        ('Service.Service not matches "^e"', True),
        ('Service.Service not matches "^w"', False),
        ("Service.Tags is empty", False),
        ("Service.Tags is not empty", True),
        ("Service.Meta is not empty", True),
        ("Service.Address is empty", False),
        ("Checks is not empty", True),
        ("Service.Proxy is empty", True),  # null is empty
    ],
)
def test_each_operator(text: str, expected: bool) -> None:
    assert holds(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # bexpr keeps every value as text and reads it as the field's type.
        ("Service.Port == 8080", True),
        ('Service.Port == "8080"', True),
        ("Service.Port == `8080`", True),
        ("Service.Port == 8081", False),
        ("Service.Port != 8081", True),
        ('Service.Port == "0x1f90"', True),  # Go's ParseInt(s, 0, 64) reads prefixes
        ("Service.Port == 8080.0", True),
        ('Service.Port == "eighty"', False),
        ("Service.Weights.Passing == 1", True),
        ("Service.EnableTagOverride == false", True),
        ("Service.EnableTagOverride == False", True),
        ('Service.EnableTagOverride == "0"', True),
        ("Service.EnableTagOverride == true", False),
        ("Service.EnableTagOverride != true", True),
        # A bare word is its own text; so is a dotted one.
        ("Service.Service == web", True),
        ("Node.Datacenter == east", True),
        ("web in Service.Service", True),
        # A kind that cannot be equal: a list or an object.
        ('Service.Tags == "prod"', False),
        ('Service.Tags != "prod"', True),
    ],
)
def test_values_read_as_the_field_type(text: str, expected: bool) -> None:
    assert holds(text) is expected


def test_floats_and_negative_numbers() -> None:
    row = {"Score": -1.5, "Count": -3}
    assert holds("Score == -1.5", row)
    assert holds('Score == "-1.50"', row)
    assert not holds("Score == 1.5", row)
    assert holds("Count == -3", row)
    assert not holds("Count == 3", row)


def test_strings_escapes_and_raw() -> None:
    row = {"S": 'a"b\\c\n\t\u00e9\U0001f600', "R": "x\\ny"}
    assert holds(r'S == "a\"b\\c\n\t\u00e9\U0001F600"', row)
    assert holds(r'S == "a\x22b\134c\n\t\xe9\U0001f600"', row)  # hex and octal escapes
    assert holds(r"R == `x\ny`", row)  # backticks: no escapes
    assert not holds(r'R == "x\ny"', row)


def test_bracket_selectors_reach_keys_that_are_not_names() -> None:
    assert holds('Node.Meta["dotted.key"] == "yes"')
    assert holds("Node.Meta[`dotted.key`] == yes")
    assert holds('Node["Meta"]["zone"] == a')
    assert not holds('Node.Meta["dotted"] == "yes"')


# --- precedence and grouping ------------------------------------------------------

T = 'Service.Service == "web"'  # true
F = 'Service.Service == "api"'  # false


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # or binds loosest: T or (F and F), not (T or F) and F
        (f"{T} or {F} and {F}", True),
        (f"({T} or {F}) and {F}", False),
        # not binds tightest: (not F) and F, not (F and F)
        (f"not {F} and {F}", False),
        (f"not ({F} and {F})", True),
        # (not T) or T, not (T or T)
        (f"not {T} or {T}", True),
        (f"not ({T} or {T})", False),
        (f"not not {T}", True),
        (f"(({T}))", True),
        (f"{F} or {F} or {T}", True),
        (f"{T} and {T} and {F}", False),
        (f"not({F})", True),  # bexpr wants a space after not; we do not
    ],
)
def test_precedence_and_parentheses(text: str, expected: bool) -> None:
    assert holds(text) is expected


# --- bexpr's list rules -------------------------------------------------------------


def test_a_list_inside_a_selector_means_any_element() -> None:
    assert holds('Checks.Status == "passing"')
    assert holds('Checks.Status == "critical"')
    assert not holds('Checks.Status == "warning"')
    # Negation applies per element: "some check is not passing".
    assert holds('Checks.Status != "passing"')
    assert not holds('Checks.Status != "passing"', {"Checks": [{"Status": "passing"}]})
    assert not holds('not Checks.Status != "passing"')
    assert holds('Checks.Output contains "oo"')
    assert holds('Checks.CheckID matches "^service:"')


def test_an_empty_list_inside_a_selector_matches_nothing() -> None:
    row: dict[str, Any] = {"Checks": []}
    for text in (
        'Checks.Status == "passing"',
        'Checks.Status != "passing"',
        'Checks.Status not contains "x"',
        "Checks.Status is empty",
    ):
        assert not holds(text, row), text
    assert holds("Checks is empty", row)


def test_lists_of_lists_fan_out_too() -> None:
    row = {"Groups": [[{"Name": "a"}], [{"Name": "b"}, {"Name": "c"}]]}
    assert holds("Groups.Name == c", row)
    assert not holds("Groups.Name == d", row)


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ('== "x"', False),
        ('!= "x"', True),
        ('contains "x"', False),
        ('not contains "x"', True),
        ('matches "x"', False),
        ('not matches "x"', True),
        ("is empty", True),
        ("is not empty", False),
    ],
)
def test_a_missing_key_below_the_top_follows_bexprs_rule(op: str, expected: bool) -> None:
    assert holds(f"Service.Meta.absent {op}") is expected
    assert holds(f"Service.Proxy.Mode {op}") is expected  # through null
    assert holds(f"Service.Port.Deeper {op}") is expected  # through a number
    in_op = "not in" if op.startswith("not") else "in"
    if "contains" in op:
        assert holds(f'"x" {in_op} Service.Meta.absent') is expected


def test_an_unknown_top_level_field_is_an_error_naming_it() -> None:
    f = compile_filter('Service.Service == "web" or Servce.Tags contains "x"')
    with pytest.raises(FilterError) as info:
        f.matches(HEALTH)  # even though the first term already decides
    assert info.value.position == 28
    assert str(info.value) == 'filter: unknown field "Servce" at position 28'
    assert f.apply([]) == []  # nothing to check against, nothing to refuse


# --- Dapr's forms and apply -------------------------------------------------------


def test_daprs_filters() -> None:
    other = dict(CATALOG, ServiceName="orders", ServiceID="orders-1")
    rows = [CATALOG, other, dict(CATALOG, ServiceID="web-2")]
    assert compile_filter('ServiceName == "web"').apply(rows) == [rows[0], rows[2]]
    watch = compile_filter('ServiceName == "orders" or ServiceName == "web"')
    assert watch.apply(rows) == rows
    assert compile_filter('(ServiceName == "orders") or (ServiceName == "x")').apply(rows) == [
        other
    ]
    health = [HEALTH, dict(HEALTH, Service=dict(HEALTH["Service"], Service="api"))]
    assert compile_filter('Service.Service == "web"').apply(health) == [HEALTH]


def test_node_meta_and_catalog_fields() -> None:
    assert holds("NodeMeta.zone == a and ServicePort == 8080", CATALOG)
    assert holds('ServiceTags contains "prod" and ServiceMeta is empty', CATALOG)
    assert holds('Node.Meta.zone == "a" and Node.Address matches "^10\\\\."')


# --- errors and their positions -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "filter: unexpected end of expression at position 0"),
        ("   ", "filter: unexpected end of expression at position 3"),
        ("ServiceName ==", "filter: unexpected end of expression at position 14"),
        ('ServiceName == "web" ==', 'filter: unexpected "==" at position 21'),
        ('ServiceName = "web"', 'filter: unexpected "=" at position 12'),
        ('ServiceName ! "web"', 'filter: unexpected "!" at position 12'),
        ('"web" == ServiceName', 'filter: unexpected "==" at position 6'),
        ("80 == Port", 'filter: unexpected "==" at position 3'),
        ('ServiceName == "web', "filter: unterminated string at position 15"),
        ("ServiceName == `web", "filter: unterminated string at position 15"),
        ('ServiceName == "a\nb"', "filter: line break inside a string at position 17"),
        (r'ServiceName == "a\qb"', 'filter: invalid escape "\\q" at position 17'),
        (r'ServiceName == "\u12"', 'filter: invalid escape "\\u" at position 16'),
        (r'ServiceName == "\ud800"', 'filter: invalid escape "\\ud800" at position 16'),
        (r'ServiceName == "\400"', 'filter: invalid escape "\\4" at position 16'),
        ("Port == 1.2.3", 'filter: invalid number "1.2.3" at position 8'),
        ("Port == 80x", 'filter: invalid number "80x" at position 8'),
        ("Port == 007", 'filter: invalid number "007" at position 8'),
        ("Port == -", 'filter: unexpected "-" at position 8'),
        ('(ServiceName == "web"', "filter: unexpected end of expression at position 21"),
        ('ServiceName == "web")', 'filter: unexpected ")" at position 20'),
        ("ServiceName == web and", "filter: unexpected end of expression at position 22"),
        ("and ServiceName == web", 'filter: unexpected "and" at position 0'),
        ("ServiceName == web or or x", 'filter: unexpected "or" at position 22'),
        ("ServiceName web", 'filter: unexpected "web" at position 12'),
        ("ServiceName is full", 'filter: unexpected "full" at position 15'),
        ("ServiceName not == x", 'filter: unexpected "==" at position 16'),
        ('"x" in "y"', "filter: unexpected string at position 7"),
        ("Service. == x", 'filter: unexpected "==" at position 9'),
        ("Service.Meta[x] == y", 'filter: unexpected "x" at position 13'),
        ('Service.Meta["x" == y', 'filter: unexpected "==" at position 17'),
        ("ServiceName == x AND Port == 1", 'filter: unexpected "AND" at position 17'),
        ("ServiceName == x # comment", 'filter: unexpected "#" at position 17'),
        ("ServiceName == x \x00", 'filter: unexpected "\\u0000" at position 17'),
        ("ServiceName == \u00e9", 'filter: unexpected "é" at position 15'),
        (
            'ServiceName matches "("',
            "filter: invalid regular expression "
            "(missing ), unterminated subpattern) at position 20",
        ),
    ],
)
def test_every_error_names_its_position(text: str, message: str) -> None:
    err = refused(text)
    assert str(err) == message
    assert f"at position {err.position}" in message
    assert 0 <= err.position <= len(text)


# --- caps --------------------------------------------------------------------------


def test_expression_length_cap() -> None:
    ok = "ServiceName == " + '"' + "x" * (MAX_EXPRESSION_LENGTH - 17) + '"'
    assert len(ok) == MAX_EXPRESSION_LENGTH
    with pytest.raises(FilterError, match="value longer"):  # the value cap bites first
        compile_filter(ok)
    long = "ServiceName == x" + " " * MAX_EXPRESSION_LENGTH
    err = refused(long)
    assert err.position == MAX_EXPRESSION_LENGTH
    assert "longer than 4096 characters" in str(err)


def test_nesting_cap() -> None:
    term = "ServiceName == web"
    assert holds("(" * MAX_DEPTH + term + ")" * MAX_DEPTH, CATALOG)
    err = refused("(" * (MAX_DEPTH + 1) + term + ")" * (MAX_DEPTH + 1))
    assert err.position == MAX_DEPTH
    assert str(err) == f"filter: nesting deeper than {MAX_DEPTH} at position {MAX_DEPTH}"
    assert holds("not " * MAX_DEPTH + term, CATALOG)  # an even number of nots
    err = refused("not " * (MAX_DEPTH + 1) + term)
    assert err.position == 4 * MAX_DEPTH
    assert refused("not (" * 17 + term + ")" * 17).position == 5 * 16  # the 33rd opener


def test_terms_cap() -> None:
    term = "A == 1"
    assert holds(" or ".join([term] * MAX_TERMS), {"A": 1})
    text = " or ".join([term] * (MAX_TERMS + 1))
    err = refused(text)
    assert err.position == (len(term) + 4) * MAX_TERMS
    assert "more than 256 terms" in str(err)


def test_selector_and_value_caps() -> None:
    path = ".".join(["a"] * MAX_SELECTOR_PARTS)
    compile_filter(f"{path} == x")
    assert "more than 16 parts" in str(refused(f"{path}.a == x"))
    compile_filter('ServiceName == "' + "v" * MAX_VALUE_LENGTH + '"')
    err = refused('ServiceName == "' + "v" * (MAX_VALUE_LENGTH + 1) + '"')
    assert (err.position, "value longer than 512" in str(err)) == (15, True)
    assert refused('"' + "v" * (MAX_VALUE_LENGTH + 1) + '" in Tags').position == 0


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("(a+)+$", "a nested quantifier"),
        ("(a*)*b", "a nested quantifier"),
        ("(a|aa)+$", "a nested quantifier"),
        ("((ab)*c)+", "a nested quantifier"),
        ("(x+x+)+y", "a nested quantifier"),
        ("(a?){2,}", "a nested quantifier"),
        ("(a)\\1", "a backreference"),
        ("(?P<n>a)(?P=n)", "a backreference"),
        ("a(?=b)", "a lookaround"),
        ("(?<!a)b", "a lookaround"),
        ("(a)?(?(1)b|c)", "a conditional group"),
        ("^a*a*a*c", "more than 2 repetitions"),
        ("a*a*c", "more than 1 repetition without a leading ^"),
        ("[a-z]+[0-9]?", "more than 1 repetition without a leading ^"),
        ("^a|b*b*", "more than 1 repetition without a leading ^"),
        ("(?:ab|ab)" * 5 + "c", "more than 16 alternative paths"),
        ("^(a|b|c|d|e|f|g|h|i|j|k|l|m|n|o|p|q)$", "more than 16 alternative paths"),
    ],
)
def test_risky_patterns_are_refused(pattern: str, problem: str) -> None:
    err = refused(f"ServiceName matches `{pattern}`")
    assert str(err) == f"filter: regular expression with {problem} at position 20"


@pytest.mark.parametrize(
    "pattern",
    [
        "^web-[0-9]+$",
        "^v[0-9]+\\.[0-9]+",
        "web-.*",
        "colou?r",
        "(api|web)",
        "^(api|web|db)-(east|west)-[0-9]+$",
        "(ab)+",  # a repeated group without a quantifier or alternation inside
        "^(a+)?",  # an optional group may hold one
        "[(+*]{2}",  # quantifier characters inside a class are members
        "a{1}(b+){1}",  # fixed counts do not branch
        "x{,}",
    ],
)
def test_ordinary_patterns_are_accepted(pattern: str) -> None:
    compile_filter(f"ServiceName matches `{pattern}`")


def test_pattern_length_cap() -> None:
    compile_filter("ServiceName matches `" + "a" * MAX_PATTERN_LENGTH + "`")
    err = refused("ServiceName matches `" + "a" * (MAX_PATTERN_LENGTH + 1) + "`")
    assert str(err) == "filter: regular expression longer than 256 characters at position 20"


@pytest.mark.parametrize(
    "pattern",
    ["^a*a*c", "^(a|a)(a|a)(a|a)(a|a)[a-z]+[a-z]+c", "a*c", "(ab|ab)(ab|ab)(ab|ab)(ab|ab)a*c"],
)
def test_the_worst_accepted_patterns_stay_fast(pattern: str) -> None:
    # Quadratic at worst: over a 4 KiB subject (a long check output) that the
    # pattern almost matches at every start, it still finishes in well under
    # a second on this machine.
    f = compile_filter(f"Output matches `{pattern}`")
    start = time.perf_counter()
    assert not f.matches({"Output": "a" * 4096})
    assert not f.matches({"Output": "ab" * 2048})
    assert time.perf_counter() - start < 2.0


# --- properties ----------------------------------------------------------------------

FIELDS = {"A": "x", "B": 3, "C": ["x", "y"], "D": {"k": "v"}, "E": True, "F": []}
ATOMS = [
    "A == x",
    "A != y",
    "B == 3",
    "B == 4",
    '"x" in C',
    "C contains z",
    "D.k == v",
    "D.missing != v",
    "E == true",
    "F is empty",
    'A matches "^x"',
    "C.nope == 1",
]


def render(tree: Any) -> str:
    if isinstance(tree, str):
        return tree
    op, left, right = tree
    if op == "not":
        return f"not ({render(left)})"
    return f"({render(left)}) {op} ({render(right)})"


def truth(tree: Any) -> bool:
    if isinstance(tree, str):
        return holds(tree, FIELDS)
    op, left, right = tree
    if op == "not":
        return not truth(left)
    if op == "and":
        return truth(left) and truth(right)
    return truth(left) or truth(right)


trees = st.recursive(
    st.sampled_from(ATOMS),
    lambda sub: (
        st.tuples(st.sampled_from(["and", "or"]), sub, sub)
        | st.tuples(st.just("not"), sub, st.none())
    ),
    max_leaves=12,
)


@given(trees)
def test_boolean_structure_is_evaluated_as_written(tree: Any) -> None:
    text = render(tree)
    assert holds(text, FIELDS) is truth(tree)
    assert holds(f"not ({text})", FIELDS) is not truth(tree)


@given(trees, trees)
def test_and_or_combine_their_operands(a: Any, b: Any) -> None:
    ta, tb = render(a), render(b)
    assert holds(f"({ta}) and ({tb})", FIELDS) is (holds(ta, FIELDS) and holds(tb, FIELDS))
    assert holds(f"({ta}) or ({tb})", FIELDS) is (holds(ta, FIELDS) or holds(tb, FIELDS))


PIECES = [
    "A",
    "B",
    "C",
    "D",
    "Zz",
    ".",
    "[",
    "]",
    "(",
    ")",
    "==",
    "!=",
    "=",
    "!",
    "not",
    "and",
    "or",
    "in",
    "is",
    "empty",
    "contains",
    "matches",
    '"x"',
    '"',
    "`",
    "`y`",
    "1",
    "-2.5",
    "0",
    "1.2.3",
    "\\",
    '"\\u00"',
    '"(a+)+"',
    " ",
    "\t",
    "\n",
    "é",
    "\x00",
    "#",
]


@given(st.lists(st.sampled_from(PIECES), max_size=30).map("".join))
@settings(max_examples=400)
def test_token_soup_never_raises_anything_but_filter_error(text: str) -> None:
    try:
        f = compile_filter(text)
    except FilterError as err:
        assert 0 <= err.position <= len(text)
        return
    for row in (FIELDS, HEALTH, CATALOG, {}):
        try:
            assert isinstance(f.matches(row), bool)
        except FilterError as err:
            assert "unknown field" in str(err)


@given(st.text(max_size=200))
@settings(max_examples=300)
def test_random_text_never_raises_anything_but_filter_error(text: str) -> None:
    try:
        compile_filter(text).matches(FIELDS)
    except FilterError as err:
        assert 0 <= err.position <= len(text)


@given(st.text(max_size=MAX_VALUE_LENGTH))
def test_any_string_survives_go_style_quoting(name: str) -> None:
    quoted = json.dumps(name, ensure_ascii=False)  # JSON's escapes are a subset of Go's
    assert holds(f"ServiceName == {quoted}", {"ServiceName": name})
    assert holds(f"{quoted} in ServiceName", {"ServiceName": name})
