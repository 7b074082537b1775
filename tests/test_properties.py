"""Property-based and stateful tests (issue 3, item 12).

1. Any filter string, random or grammar-shaped, yields a result or a
   ScimError through parse_filter, filter_to_sql (User and Group), the SQL it
   produces run against a populated database, and filter_matches; over HTTP
   GET /Users and /Groups?filter= answer 200 or a SCIM 4xx, never 5xx, and
   agree with the functions. parse_filter's shortcut for one comparison
   agrees with the full grammar, and read_query with urllib's parse_qsl.
2. Any PATCH document yields a result or a ScimError through
   read_patch_request + apply_patch, and every document the engine returns is
   one the model accepts (canonical_document round-trips it) and serialises
   as strict JSON; over HTTP a PATCH answers 2xx or a SCIM 4xx, a 4xx leaves
   the stored row byte-identical and a 2xx stores what the engine computed.
3. A RuleBasedStateMachine drives users, groups and memberships through the
   API next to an in-memory model; after every step the API and the members
   table agree with the model.
4. The same machine reads the change feed (GET /events) after every step:
   the whole feed, replayed from cursor "0" into an empty model, gives
   exactly the database's users, groups and memberships, and each
   resource's last event carries its stored version; the step's own events
   are one request's (one txn) and follow on from the previous cursor.

Examples are derandomized (a fixed sequence per test) so CI never turns red
by chance; hypothesis' example database is off so nothing is written to the
working tree.
"""

import copy
import json
import os
import shutil
import tempfile
import unicodedata
import urllib.parse

import hypothesis
import pytest
import webtest
from hypothesis import HealthCheck, given, strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant,
                                 multiple, precondition, rule)

import scim_appliance
from scim_appliance import (COMMON_ATTRIBUTES, ENTERPRISE_USER_SCHEMA, GROUP, GROUP_SCHEMA,
                            URN_ENTERPRISE, URN_GROUP, URN_LIST, URN_PATCH, URN_USER, USER,
                            USER_SCHEMA, ScimError)
from conftest import PUBLIC_URL, ScimClient, assert_scim_error

CUSTOM = "urn:ietf:params:scim:schemas:extension:CustomExtension:2.0:User"
GHOST_ID = "00000000-0000-4000-8000-000000000000"   # a well-formed id nothing has

HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]


def property_settings(examples):
    return hypothesis.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                               suppress_health_check=HEALTH, print_blob=False)


# ---------------------------------------------------------------------------
# a small populated database, shared by the stateless properties
# ---------------------------------------------------------------------------

class World:
    """The store, an authenticated client and the ids of the seeded resources."""

    def __init__(self, store, client):
        self.store = store
        self.client = client
        self.ids = {}
        self.samples = []     # (Attribute, element) pairs for filter_matches

    def bind(self, value):
        """Replace @NAME@ placeholders (ids of seeded resources) anywhere in `value`."""
        if isinstance(value, str):
            for name, resource_id in self.ids.items():
                value = value.replace("@%s@" % name, resource_id)
            return value
        if isinstance(value, list):
            return [self.bind(item) for item in value]
        if isinstance(value, dict):
            return {self.bind(key): self.bind(item) for key, item in value.items()}
        return value

    def row(self, table, resource_id):
        """The stored row as raw text and numbers, plus a group's member set."""
        with self.store.read() as tx:
            row = tx.get_resource(table, resource_id)
            if row is not None and table == "groups":
                row["members"] = {r[0] for r in tx.conn.execute(
                    "SELECT member_id FROM members WHERE group_id = ?", (resource_id,))}
        return row

    def snapshot(self):
        """Every row of users, groups and members."""
        with self.store.read() as tx:
            return {table: tx.conn.execute("SELECT * FROM %s ORDER BY 1, 2" % table).fetchall()
                    for table in ("users", "groups", "members")}

    def kinds(self):
        """{id: 'User' | 'Group'} of everything stored."""
        with self.store.read() as tx:
            found = {r[0]: "User" for r in tx.conn.execute("SELECT id FROM users")}
            found.update({r[0]: "Group" for r in tx.conn.execute("SELECT id FROM groups")})
        return found


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Users with every kind of attribute, and groups with user and group members."""
    directory = tmp_path_factory.mktemp("properties")
    settings = scim_appliance.Settings(db=str(directory / "scim.db"), public_url=PUBLIC_URL)
    store = scim_appliance.Store(settings.db)
    token = scim_appliance.create_token(store, "entra")
    client = ScimClient(webtest.TestApp(scim_appliance.make_scim_app(store, settings)), token)
    world = World(store, client)
    bob = client.create_user("bob@example.com", displayName="Bob", active=False)
    alice = client.create_user(
        "alice@example.com", displayName="Alice Ng", active=True, externalId="ext-alice",
        title="50%_off", nickName="'; DROP TABLE users; --",
        name={"givenName": "Alice", "familyName": "Ng", "formatted": "Alice Ng"},
        emails=[{"value": "alice@work.example", "type": "work", "primary": True},
                {"value": "alice@home.example", "type": "home"}],
        phoneNumbers=[{"value": "+1 555 0100", "type": "mobile"}],
        addresses=[{"type": "work", "locality": "Zürich", "country": "CH"}],
        x509Certificates=[{"value": "QUJD"}],
        **{URN_ENTERPRISE: {"employeeNumber": "100", "department": "R&D", "manager": bob["id"]},
           CUSTOM: {"costCode": "CC-1", "level": 3, "tags": ["a", "b"], "nested": {"k": "v"}}})
    anne = client.create_user("ÄNNE@example.com", displayName="Änne", active="True",
                              emails=[{"value": "anne@work.example", "type": "work"}])
    sales = client.create_group("Sales", members=[{"value": alice["id"]}, {"value": bob["id"]}])
    empty = client.create_group("Empty", externalId="ext-empty")
    nested = client.create_group("Nested", members=[{"value": sales["id"], "type": "Group"},
                                                    {"value": anne["id"]}])
    world.ids = {"ALICE": alice["id"], "BOB": bob["id"], "ANNE": anne["id"],
                 "SALES": sales["id"], "EMPTY": empty["id"], "NESTED": nested["id"]}
    assert len(world.kinds()) == 6
    meta = next(a for a in COMMON_ATTRIBUTES if a.name == "meta")
    world.samples = [
        (USER_SCHEMA.attribute("emails"), element) for element in alice["emails"] + [{}]
    ] + [
        (USER_SCHEMA.attribute("name"), alice["name"]),
        (USER_SCHEMA.attribute("phoneNumbers"), alice["phoneNumbers"][0]),
        (USER_SCHEMA.attribute("addresses"), alice["addresses"][0]),
        (USER_SCHEMA.attribute("groups"), {"value": sales["id"], "display": "Sales", "type": "direct"}),
        (ENTERPRISE_USER_SCHEMA.attribute("manager"), {"value": bob["id"]}),
        (GROUP_SCHEMA.attribute("members"), {"value": alice["id"], "type": "User", "display": "Alice Ng"}),
        (meta, alice["meta"]),
    ]
    yield world
    store.close()


# ---------------------------------------------------------------------------
# strategies: filters
# ---------------------------------------------------------------------------

CASES = (str, str.lower, str.upper, str.swapcase, str.capitalize)


def any_case(words):
    """One of `words`, as written or in another letter case (ABNF literals and
    attribute names are case-insensitive)."""
    return st.tuples(st.sampled_from(words), st.sampled_from(CASES)).map(lambda pair: pair[1](pair[0]))


def mostly(good, bad):
    """`good` nine times in ten, else `bad`; shrinks towards `good`."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 9 else good)


FILTER_ATTRIBUTES = [
    "userName", "name.familyName", "name.givenName", "name", "displayName", "nickName", "title",
    "emails", "emails.value", "emails.type", "emails.primary", "emails.display",
    "phoneNumbers.value", "addresses.locality", "x509Certificates.value",
    "meta.created", "meta.lastModified", "meta.resourceType", "meta.version", "meta.location", "meta",
    "id", "externalId", "active", "password", "groups", "groups.value", "groups.display", "groups.type",
    "members", "members.value", "members.display", "members.type", "members.$ref",
    URN_ENTERPRISE + ":employeeNumber", URN_ENTERPRISE + ":manager", URN_ENTERPRISE + ":manager.value",
    URN_ENTERPRISE + ":manager.displayName", "manager", "employeeNumber", URN_ENTERPRISE,
    CUSTOM + ":costCode", CUSTOM + ":level", CUSTOM + ":nested", CUSTOM + ":costCode.sub",
    "urn:example:params:custom:attr", URN_USER + ":userName", URN_USER + ":name.givenName",
    URN_GROUP + ":displayName", "schemas", "unknownAttr", "name.unknown", "emails.value.extra",
    "$ref", "1abc", ".value", "urn:", ":x",
]
COMPLEX_BASES = ["emails", "phoneNumbers", "addresses", "x509Certificates", "groups", "members", "name",
                 URN_ENTERPRISE + ":manager", "manager", "meta", "userName", CUSTOM + ":costCode",
                 "unknownAttr", "emails.value"]
SUB_ATTRIBUTES = ["value", "type", "primary", "display", "givenName", "familyName", "locality", "$ref",
                  "created", "lastModified", "resourceType", "unknown", "emails.value",
                  URN_USER + ":emails.type", "urn:x:type"]
OPERATORS = list(scim_appliance.COMPARE_OPERATORS)

SAMPLE_TEXTS = ["", "work", "WORK", "alice", "Alice@Work.Example", "ä", "Ä", "ß", "SS", "Zürich",
                "50%", "%", "_", "%_%", "'; DROP TABLE users; --", "' OR '1'='1", "\\", "\"", "@",
                "@ALICE@", "@BOB@", "@SALES@", "User", "Group", "QUJD", "١٢٣", "\U0001F600", "\x00",
                "2011-05-13T04:42:34Z", "2011-05-13T04:42:34.123+02:00", "2020-13-45T00:00:00Z",
                "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "2011-05-13", "True", "null"]
RAW_STRINGS = ['"\\ud800"', '"\\udc00x"', '"a\\ud83d\\ude00b"', '"\\ud83d"', '"\\u0000"', '"\\x41"',
               '"\\"', '"abc', '"\\u12"', '"tab\there"', "'single'", '""', '"\\/"', '"\\uDBFF\\uDFFF"']
RAW_NUMBERS = ["1e999", "-1e999", "-0", "0", "1.5e-10", "01", "0x10", "١٢", "1_000", "+1", ".5", "1.",
               "99999999999999999999999999999999", "-9223372036854775809", "NaN", "Infinity"]

filter_strings = st.one_of(
    st.sampled_from(SAMPLE_TEXTS),
    st.text(max_size=12),
).map(json.dumps)
filter_values = st.one_of(
    filter_strings,
    st.sampled_from(RAW_STRINGS),
    st.integers(min_value=-2 ** 70, max_value=2 ** 70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(RAW_NUMBERS),
    any_case(["true", "false", "null"]),
)
operators = mostly(any_case(OPERATORS), st.sampled_from(["eqq", "like", "=", "==", "in", "pr", "not"]))


def comparison(attributes):
    return st.one_of(
        st.builds(lambda a, o, v: "%s %s %s" % (a, o, v), attributes, operators, filter_values),
        st.builds(lambda a, o: "%s %s" % (a, o), attributes, any_case(["pr"])),
    )


def combined(children):
    """and / or / not / parentheses over smaller filters."""
    return st.one_of(
        st.builds(lambda a, w, b: "%s %s %s" % (a, w, b), children, any_case(["and", "or"]), children),
        st.builds(lambda n, a, space: "%s%s(%s)" % (n, space, a), any_case(["not"]), children,
                  st.sampled_from(["", " "])),
        children.map(lambda a: "(%s)" % a),
    )


value_filters = st.recursive(comparison(any_case(SUB_ATTRIBUTES)), combined, max_leaves=4)
value_paths = st.one_of(
    st.builds(lambda base, inner: "%s[%s]" % (base, inner), any_case(COMPLEX_BASES), value_filters),
    st.builds(lambda base, inner, sub, rest: "%s[%s].%s %s" % (base, inner, sub, rest),
              any_case(COMPLEX_BASES), value_filters, any_case(SUB_ATTRIBUTES),
              st.one_of(st.builds(lambda o, v: "%s %s" % (o, v), operators, filter_values),
                        st.just("pr"))),
    st.builds(lambda base, outer: "%s[%s]" % (base, outer), any_case(COMPLEX_BASES),
              st.sampled_from(['emails[type eq "work"]', 'value eq "x"]', "", "value eq"])),
)
# Complex attributes with the sub-attributes they do have: value paths that resolve.
VALUE_PATH_SUBS = {
    "emails": ["value", "type", "primary", "display"], "phoneNumbers": ["value", "type"],
    "addresses": ["locality", "type", "primary", "country"], "groups": ["value", "display", "type"],
    "members": ["value", "type", "display"], "name": ["givenName", "familyName"],
    URN_ENTERPRISE + ":manager": ["value", "displayName"], "meta": ["created", "lastModified"],
    "x509Certificates": ["value"], "roles": ["value", "primary"],
}


def resolving_value_path(base):
    subs = any_case(VALUE_PATH_SUBS[base])
    inner = st.recursive(comparison(subs), combined, max_leaves=3)
    rest = st.one_of(st.just(""), st.builds(lambda sub, o, v: ".%s %s %s" % (sub, o, v), subs, operators,
                                            filter_values), subs.map(lambda sub: ".%s pr" % sub))
    return st.builds(lambda b, i, r: "%s[%s]%s" % (b, i, r), any_case([base]), inner, rest)


resolving_value_paths = st.sampled_from(sorted(VALUE_PATH_SUBS)).flatmap(resolving_value_path)
GROUP_FILTER_ATTRIBUTES = ["displayName", "members", "members.value", "members.display", "members.type",
                           "externalId", "id", "meta.created", "meta.lastModified", "meta.resourceType",
                           URN_GROUP + ":displayName", "members.$ref", "userName"]
GROUP_COMPLEX_BASES = ["members", "meta", "displayName"]
group_value_paths = st.builds(lambda base, inner, rest: "%s[%s]%s" % (base, inner, rest),
                              any_case(GROUP_COMPLEX_BASES), value_filters,
                              st.sampled_from(["", ".value eq \"@ALICE@\"", ".display pr", ".type ne null"]))
grammar_filters = st.one_of(
    st.recursive(st.one_of(comparison(any_case(FILTER_ATTRIBUTES)), value_paths, resolving_value_paths),
                 combined, max_leaves=6),
    st.recursive(st.one_of(comparison(any_case(GROUP_FILTER_ATTRIBUTES)), group_value_paths,
                           resolving_value_path("members")), combined, max_leaves=6),
)
structural_filters = st.one_of(
    st.integers(0, 40).map(lambda n: "(" * n + 'userName eq "a"' + ")" * n),
    st.integers(0, 30).map(lambda n: "not (" * n + 'active eq true' + ")" * n),
    st.integers(90, 110).map(lambda n: " or ".join(['userName eq "u%d"' % i for i in range(n)])),
    # Exactly n characters, around MAX_FILTER_LENGTH (4096).
    st.integers(4090, 4100).map(lambda n: 'userName eq "%s"' % ("x" * (n - len('userName eq ""')))),
    st.integers(0, 20).map(lambda n: 'emails[' * n + 'value eq "a"' + ']' * n),
)
FILTER_CHARS = list('()[]"\\ .:$-_%*\'=<>!,;/@#+&?\t\n\r') + list("aeqnotrswdpUN") + \
    list("0123456789") + ["١", "٣", "²", "５", "é", "ß", "\u212a", "\u0308", "\x00", "\x1f", "\u2028",
                          "\U0001F600", "\ud800", "\udfff"]
FILTER_TOKENS = ["(", ")", "[", "]", '"', "\\", "and", "or", "not", "AND", "Or", "eq", "co", "pr", "gt",
                 "userName", "emails", "emails[", ".value", "members", "meta.created", "true", "null",
                 '"x"', '"\\ud800"', '"\\udc00"', "١٢٣", "1e999", "5", '"work"', "type", URN_ENTERPRISE,
                 CUSTOM + ":costCode", ":", "."]
random_filters = st.one_of(
    st.text(st.one_of(st.sampled_from(FILTER_CHARS), st.characters()), max_size=40),
    st.builds(lambda tokens, glue: glue.join(tokens), st.lists(st.sampled_from(FILTER_TOKENS), max_size=10),
              st.sampled_from([" ", ""])),
)


# ---------------------------------------------------------------------------
# property 1: filters
# ---------------------------------------------------------------------------

def value_path_nodes(node):
    """Every ("has", ...) node in a filter tree."""
    if node[0] in ("and", "or"):
        return [found for child in node[1] for found in value_path_nodes(child)]
    if node[0] == "not":
        return value_path_nodes(node[1])
    return [node] if node[0] == "has" else []


def outcome(function, *args):
    """('ok', result) or ('error', ScimError); any other exception propagates."""
    try:
        return "ok", function(*args)
    except ScimError as error:
        assert 400 <= error.status < 500, error.status
        assert isinstance(error.to_json()["detail"], str)
        json.dumps(error.to_json(), ensure_ascii=False).encode("utf-8")   # encodable as a response
        return "error", error


def check_filter_matches(world, tree):
    """filter_matches on sample elements: a bool or a ScimError, for the whole
    tree and for the inside of every value path it holds."""
    for attribute, element in world.samples:
        kind, result = outcome(scim_appliance.filter_matches, tree, element, attribute)
        assert kind == "error" or isinstance(result, bool)
    for node in value_path_nodes(tree):
        for resource_type in (USER, GROUP):
            path = scim_appliance.resolve_path(resource_type, node[1])
            if path is None or path.attribute.type != "complex" or path.sub_attribute is not None:
                continue
            for attribute, element in world.samples:
                if attribute is not path.attribute:
                    continue
                checks = [node[2]]
                if node[3] is not None:
                    checks.append(scim_appliance._sub_comparison(node))
                for check in checks:
                    kind, result = outcome(scim_appliance.filter_matches, check, element, attribute)
                    assert kind == "error" or isinstance(result, bool)


def run_filter(world, text):
    """The functions' verdict on `text`: {"Users": ("ok", count) | ("error", ScimError), "Groups": ...}."""
    kind, tree = outcome(scim_appliance.parse_filter, text)
    if kind == "error":
        assert tree.scim_type == "invalidFilter", tree.to_json()
        return {"Users": (kind, tree), "Groups": (kind, tree)}
    assert isinstance(tree, tuple) and tree[0] in ("or", "and", "not", "cmp", "pr", "has")
    check_filter_matches(world, tree)
    verdict = {}
    for resource_type in (USER, GROUP):
        kind, sql = outcome(scim_appliance.filter_to_sql, tree, resource_type)
        if kind == "error":
            verdict[resource_type.endpoint[1:]] = (kind, sql)
            continue
        where, params = sql
        assert isinstance(where, str) and all(
            p is None or isinstance(p, (str, int, float)) for p in params), (where, params)
        with world.store.read() as tx:
            count = tx.count(resource_type.table, where, params)
            rows = tx.select(resource_type.table, where, params, "%s.rowid" % resource_type.table, 1000, 0)
        assert len(rows) == count
        verdict[resource_type.endpoint[1:]] = ("ok", count)
    return verdict


def check_filter_over_http(world, text, verdict):
    """GET /Users and /Groups?filter=...: 200 with the count the SQL gave, or
    the SCIM 4xx the functions raised; never a 5xx."""
    if scim_appliance.LONE_SURROGATE.search(text):
        # Not Unicode text: sent as the bytes Python would make of it, which
        # are not UTF-8 either.
        quoted = urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")
    else:
        quoted = urllib.parse.quote(text, safe="")
    for endpoint in ("Users", "Groups"):
        response = world.client.get("/%s?count=1000&filter=%s" % (endpoint, quoted), status="*")
        assert response.status_int < 500, (response.status, response.body)
        if scim_appliance.LONE_SURROGATE.search(text):
            assert_scim_error(response, 400, "invalidFilter")
            continue
        kind, result = verdict[endpoint]
        if kind == "ok":
            assert response.status_int == 200, response.body
            body = response.json
            assert body["schemas"] == [URN_LIST]
            assert body["totalResults"] == result == len(body["Resources"])
        else:
            error = assert_scim_error(response, result.status, "*")
            assert error["scimType"] == result.scim_type


@property_settings(400)
@given(text=st.one_of(random_filters, grammar_filters, structural_filters))
def test_any_filter_text_gives_a_result_or_a_scim_error_in_every_layer(world, text):
    """Item 12: a filter never raises anything but ScimError, in the parser, the SQL
    translator, the database, filter_matches or over HTTP (never a 5xx)."""
    text = world.bind(text)
    before = world.snapshot()
    verdict = run_filter(world, text)
    check_filter_over_http(world, text, verdict)
    assert world.snapshot() == before   # a filter changes nothing


@property_settings(400)
@given(text=grammar_filters)
def test_grammar_shaped_filters_give_a_result_or_a_scim_error_in_every_layer(world, text):
    """Item 12: filters built from real attribute names, every operator, and/or/not,
    parentheses, value paths and values of every JSON type."""
    text = world.bind(text)
    verdict = run_filter(world, text)
    check_filter_over_http(world, text, verdict)


def test_grammar_strategy_reaches_the_database():
    """The grammar strategy is worth its time: a good share of what it draws
    parses and translates to SQL (guards the strategy against drifting into
    nothing but parse errors)."""
    accepted = []

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None,
                         suppress_health_check=HEALTH)
    @given(text=grammar_filters)
    def sample(text):
        try:
            scim_appliance.filter_to_sql(scim_appliance.parse_filter(text), USER)
            accepted.append(text)
        except ScimError:
            pass

    sample()
    assert len(accepted) >= 30, len(accepted)
    assert any("[" in text for text in accepted)


# One comparison with a string, in spellings parse_filter's shortcut takes
# (Entra's lookups) and spellings it must leave to the grammar.
one_comparisons = st.builds(
    lambda lead, path, gap, operator, gap2, value, trail: "%s%s%s%s%s\"%s\"%s" % (
        lead, path, gap, operator, gap2, value, trail),
    st.sampled_from(["", " ", "\t", "\u00a0"]),
    st.one_of(st.sampled_from(["userName", "externalId", "displayName", "emails.value", "meta.created",
                               URN_ENTERPRISE + ":employeeNumber", CUSTOM + ":costCode", "and", "OR",
                               "Not", "_x", "a-1e5", "1x", "userName[type", ".value"]),
              st.text(st.sampled_from(FILTER_CHARS), min_size=1, max_size=8)),
    st.sampled_from([" ", "  ", "", "\n", "\u2028"]),
    st.sampled_from(["eq", "EQ", "Ne", "co", "sw", "ew", "gt", "lt", "ge", "le", "pr", "and", "eq$", "5", "eqx"]),
    st.sampled_from([" ", "", "\t"]),
    st.text(st.one_of(st.sampled_from(FILTER_CHARS), st.characters()), max_size=12),
    st.sampled_from(["", " ", " and", ")", " \r\n", "\u00a0"]))


@property_settings(600)
@given(text=st.one_of(one_comparisons, random_filters, grammar_filters))
@hypothesis.example(text='userName eq "%s"' % ("x" * scim_appliance.MAX_FILTER_LENGTH))
@hypothesis.example(text='not eq "x"')
@hypothesis.example(text=' And ne "x" ')
@hypothesis.example(text='OR eq "x"')
@hypothesis.example(text='userName eq "\ud800"')
def test_the_one_comparison_shortcut_parses_as_the_grammar_does(text):
    """parse_filter's shortcut gives exactly the tree, or the error, that
    the full grammar gives."""
    def verdict(parse):
        kind, result = outcome(parse, text)
        return kind, (result.to_json() if kind == "error" else result)
    assert verdict(scim_appliance.parse_filter) == verdict(lambda text: scim_appliance._FilterParser(text).parse())


def test_entra_lookups_take_the_shortcut(monkeypatch):
    """The filters Entra sends on every lookup never reach the grammar."""
    monkeypatch.setattr(scim_appliance, "_FilterParser", None)   # any use of the grammar fails
    for text, tree in [('userName eq "Bench.User.7@contoso.example"',
                        ("cmp", "userName", "eq", "Bench.User.7@contoso.example")),
                       ('externalId eq "0000-7"', ("cmp", "externalId", "eq", "0000-7")),
                       ('displayName EQ "Group é 1"', ("cmp", "displayName", "eq", "Group é 1"))]:
        assert scim_appliance.parse_filter(text) == tree


QUERY_PIECES = ["&", "=", "+", "%", "%2", "%FF", "%C3%A9", "%e9", "%41", "%2B", "%26", "%3D", "%00", "%ED%A0%80",
                "filter", "Count", "é", " ", ";"]


@property_settings(400)
@given(query=st.lists(st.one_of(st.sampled_from(QUERY_PIECES), st.characters()), max_size=20).map("".join))
def test_query_parameters_are_read_as_parse_qsl_reads_them(query):
    """read_query splits and decodes as urllib.parse.parse_qsl does (blank
    values kept, strict UTF-8), with names lower-cased; what is not UTF-8 is
    a SCIM invalidFilter error."""
    try:
        expected = "ok", {name.lower(): value for name, value in urllib.parse.parse_qsl(
            query, keep_blank_values=True, encoding="utf-8", errors="strict")}
    except UnicodeDecodeError:
        expected = "error", "invalidFilter"
    kind, result = outcome(scim_appliance.read_query, {"QUERY_STRING": query})
    assert (kind, result if kind == "ok" else result.scim_type) == expected


# ---------------------------------------------------------------------------
# strategies: PATCH documents
# ---------------------------------------------------------------------------

USER_PATHS = [
    "userName", "displayName", "active", "nickName", "title", "externalId", "password", "name",
    "name.givenName", "name.familyName", "emails", "emails.value", 'emails[type eq "work"]',
    'emails[type eq "work"].value', 'emails[type eq "work" and primary eq true].value',
    'emails[type eq "home"].primary', 'emails[value co "@"]', 'emails[not (type eq "work")]',
    'emails[type eq "work"].display', 'emails[type eq "other"].value', 'emails[value eq "\\ud800"].value',
    "phoneNumbers", 'phoneNumbers[type eq "mobile"].value', 'addresses[type eq "work"].locality',
    "addresses", "x509Certificates", "roles", 'roles[primary eq "True"].value',
    "id", "meta", "meta.version", "groups", 'groups[value eq "@SALES@"]', "schemas",
    URN_ENTERPRISE, URN_ENTERPRISE + ":employeeNumber", URN_ENTERPRISE + ":department",
    URN_ENTERPRISE + ":manager", URN_ENTERPRISE + ":manager.value", URN_ENTERPRISE + ':manager[value eq "@BOB@"]',
    URN_ENTERPRISE + ":manager.displayName", "manager", "employeeNumber",
    CUSTOM, CUSTOM + ":costCode", CUSTOM + ":nested", "urn:example:custom", "urn:example:custom:attr",
    URN_USER + ":userName", URN_USER + ":name.givenName", URN_USER,
    "unknownAttr", "name.unknown", 'emails[type eq "work"', "emails]", 'emails[type eq "work"]x',
    "emails[]", 'emails[type eq "work"].value.extra', "", " ", "members", 'members[value eq "@ALICE@"]',
    "displayName.x", "name[givenName eq \"Alice\"]", "emails[emails[type eq \"work\"]]",
]
GROUP_PATHS = [
    "displayName", "externalId", "members", 'members[value eq "@ALICE@"]', 'members[value eq "@BOB@"]',
    'members[value eq "@ANNE@"]', 'members[value eq "%s"]' % GHOST_ID, 'members[type eq "User"]',
    'members[display co "a"]', 'members[value eq "@ALICE@" or value eq "@BOB@"]', "members.value",
    'members[value eq "@ALICE@"].display', 'members[value eq "@ALICE@"].value', "members[unknown eq 1]",
    "id", "meta", "meta.lastModified", "schemas", URN_GROUP + ":displayName", URN_ENTERPRISE,
    CUSTOM + ":costCode", "unknownAttr", "emails", "",
]
PATHLESS_KEYS = ["userName", "displayName", "active", "name.givenName", "name", "emails", "externalId",
                 "id", "meta", "schemas", "members", URN_ENTERPRISE, URN_ENTERPRISE + ":employeeNumber",
                 URN_ENTERPRISE + ":manager", CUSTOM, CUSTOM + ":costCode", "urn:example:custom",
                 'emails[type eq "work"].value', "unknownAttr", "groups"]
SUB_KEYS = ["value", "type", "primary", "display", "givenName", "familyName", "formatted", "locality",
            "employeeNumber", "manager", "costCode", "$ref", "schemas", "Value", "PRIMARY", "x"]

json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from(["True", "False", "true", " FALSE ", "yes", "", "work", "home", "mobile", "User",
                     "Group", "x@example.com", "QUJD", "not base64!", "2011-05-13T04:42:34Z",
                     "@ALICE@", "@BOB@", "@SALES@", "@ANNE@", GHOST_ID, "alice@example.com",
                     "ALICE@EXAMPLE.COM", "Sales", "Änne", "\ud800", "a\x00b"]),
    st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.sampled_from([10 ** 30, -2 ** 64, 2 ** 63, 0, 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
realistic_values = st.sampled_from([
    {"value": "new@example.com", "type": "work", "primary": True}, [{"value": "a@x", "type": "home"}],
    [{"value": "a@x", "primary": True}, {"value": "b@x", "primary": True}], {"givenName": "G"},
    {"employeeNumber": 5}, {"employeeNumber": "7", "manager": "@BOB@"}, {"costCode": "x"},
    [{"value": "@ALICE@"}], [{"value": "@BOB@", "type": "User"}], [{"value": "@SALES@", "type": "Group"}],
    [{"value": "@ALICE@", "type": "Group"}], [{"value": GHOST_ID}], [{"value": ""}], [{"$ref": None,
                                                                                         "value": "@ANNE@"}],
    ["@ALICE@"], {"value": "@BOB@"}, [{"value": "@BOB@"}], {"active": "False"}, {"displayName": "D"},
])
json_values = st.recursive(
    st.one_of(json_scalars, realistic_values),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(SUB_KEYS), st.text(max_size=4)), children, max_size=3),
    ),
    max_leaves=6,
)
pathless_values = st.dictionaries(any_case(PATHLESS_KEYS), json_values, max_size=3)
op_names = mostly(any_case(["add", "replace", "remove"]),
                  st.sampled_from(["delete", "", "move", "test", " add", None, 1, ["add"]]))
short_text = st.one_of(st.sampled_from(["x", "Alice", "Änne", "50%_off", "", " ", "alice@example.com",
                                        "ALICE@EXAMPLE.COM", "Sales", "EMPTY", "\ud800"]),
                       st.text(max_size=8))
booleans_as_entra_sends = st.sampled_from([True, False, "True", "False", "true", " FALSE ", "yes", 1, None])
email = st.fixed_dictionaries({"value": short_text}, optional={
    "type": st.sampled_from(["work", "home", "other", "WORK", 5]), "primary": booleans_as_entra_sends,
    "display": short_text})
member_id = st.sampled_from(["@ALICE@", "@BOB@", "@ANNE@", "@SALES@", "@EMPTY@", "@NESTED@", GHOST_ID, ""])
member = st.one_of(member_id, st.fixed_dictionaries({"value": member_id}, optional={
    "type": st.sampled_from(["User", "Group", "user", None]), "$ref": st.none(), "display": short_text}))
members = st.one_of(st.lists(member, max_size=4), member)
manager = st.one_of(member_id, st.lists(st.fixed_dictionaries({"value": member_id}), max_size=2),
                    st.fixed_dictionaries({"value": member_id}, optional={"displayName": short_text}))

# Each path with values of the kind it takes (and, below, any JSON at all).
TYPED_USER_VALUES = {
    "userName": short_text, "displayName": short_text, "title": short_text, "externalId": short_text,
    "active": booleans_as_entra_sends, "password": short_text,
    "name": st.fixed_dictionaries({}, optional={"givenName": short_text, "familyName": short_text,
                                                "formatted": short_text}),
    "name.givenName": short_text, "name.familyName": short_text,
    "emails": st.one_of(st.lists(email, max_size=3), email), 'emails[type eq "work"]': email,
    'emails[type eq "work"].value': short_text, 'emails[type eq "work"].primary': booleans_as_entra_sends,
    'emails[type eq "home" and primary eq false].display': short_text, 'emails[value co "@"]': email,
    'phoneNumbers[type eq "mobile"].value': short_text, "phoneNumbers": st.lists(email, max_size=2),
    'addresses[type eq "work"].locality': short_text, "roles": st.lists(email, max_size=2),
    "x509Certificates": st.lists(st.fixed_dictionaries({"value": st.sampled_from(["QUJD", "!!", ""])}),
                                 max_size=2),
    URN_ENTERPRISE + ":employeeNumber": short_text, URN_ENTERPRISE + ":department": short_text,
    URN_ENTERPRISE + ":manager": manager, "manager": manager, URN_ENTERPRISE + ":manager.value": member_id,
    URN_ENTERPRISE: st.fixed_dictionaries({}, optional={"employeeNumber": short_text, "manager": manager,
                                                        "costCenter": short_text}),
    CUSTOM + ":costCode": json_values, CUSTOM: st.dictionaries(st.sampled_from(["costCode", "Level", "x"]),
                                                               json_values, max_size=2),
    "urn:example:custom:attr": json_values,
}
TYPED_GROUP_VALUES = {
    "displayName": short_text, "externalId": short_text, "members": members,
    'members[value eq "@ALICE@"]': members, 'members[type eq "User"]': st.none(),
}


def typed_operation(values):
    """A well-formed operation: a real path with a value of its kind, or no
    path and an object of such paths (Entra's path-less form, R23)."""
    with_path = st.sampled_from(sorted(values)).flatmap(
        lambda path: st.builds(lambda op, path_text, value: {"op": op, "path": path_text, "value": value},
                               op_names, any_case([path]), values[path]))
    removal = st.builds(lambda op, path: {"op": op, "path": path}, any_case(["remove"]),
                        st.sampled_from(sorted(values)))
    pathless = st.builds(lambda op, value: {"op": op, "value": value}, any_case(["add", "replace"]),
                         st.lists(st.sampled_from(sorted(values)), min_size=1, max_size=3, unique=True).flatmap(
                             lambda keys: st.fixed_dictionaries({k: values[k] for k in keys})))
    return st.one_of(with_path, with_path, removal, pathless)


def random_operation(paths):
    """An operation of any shape: real, mangled or random paths; any JSON value."""
    path_strategy = st.one_of(any_case(paths), st.text(max_size=10), st.just(None), st.integers(0, 3))
    value_strategy = st.one_of(json_values, pathless_values)

    def build(op_key, op, path_key, path, value_key, value, shape):
        operation = {op_key: op}
        if shape in ("path", "both"):
            operation[path_key] = path
        if shape in ("value", "both"):
            operation[value_key] = value
        return operation

    return st.builds(build, st.sampled_from(["op", "Op", "OP"]), op_names,
                     st.sampled_from(["path", "Path"]), path_strategy, st.sampled_from(["value", "Value"]),
                     value_strategy, st.sampled_from(["path", "value", "both", "both", "both", "neither"]))


def patch_bodies(paths, values):
    operation = st.one_of(typed_operation(values), typed_operation(values), random_operation(paths))
    well_formed = st.builds(lambda key, ops: {"schemas": [URN_PATCH], key: ops},
                            st.sampled_from(["Operations", "Operations", "operations"]),
                            st.lists(operation, min_size=1, max_size=4))
    malformed = st.one_of(
        json_values,
        st.builds(lambda ops: {"schemas": [URN_PATCH], "Operations": ops}, json_values),
        st.builds(lambda ops: {"Operations": ops}, st.lists(st.one_of(operation, json_values), max_size=3)),
    )
    return mostly(well_formed, malformed)


user_patch_bodies = patch_bodies(USER_PATHS, TYPED_USER_VALUES)
group_patch_bodies = patch_bodies(GROUP_PATHS, TYPED_GROUP_VALUES)

USER_DOCUMENTS = [
    {"userName": "bob@example.com"},
    {"userName": "alice@example.com", "displayName": "Alice Ng", "active": True, "externalId": "ext-alice",
     "title": "50%_off", "name": {"givenName": "Alice", "familyName": "Ng"},
     "emails": [{"value": "alice@work.example", "type": "work", "primary": True},
                {"value": "alice@home.example", "type": "home"}],
     "phoneNumbers": [{"value": "+1 555 0100", "type": "mobile"}],
     "addresses": [{"type": "work", "locality": "Zürich"}], "roles": [{"value": "admin", "primary": True}],
     URN_ENTERPRISE: {"employeeNumber": "100", "manager": {"value": "@BOB@"}},
     CUSTOM: {"costCode": "CC-1", "level": 3, "tags": ["a", "b"], "nested": {"k": "v"}}},
    {"userName": "ÄNNE@example.com", "active": False, "emails": [{"value": "anne@work.example",
                                                                   "type": "work"}]},
]
GROUP_DOCUMENTS = [{"displayName": "Sales"}, {"displayName": "Empty", "externalId": "ext-empty"}]


# ---------------------------------------------------------------------------
# property 2: PATCH
# ---------------------------------------------------------------------------

def http_view(body):
    """What the HTTP layer would hand the engine for `body`: the parsed JSON,
    or the ScimError it answers instead (lone surrogates, keys equal but for
    case, numbers out of range)."""
    raw = json.dumps(body).encode("utf-8")
    return outcome(scim_appliance.parse_json_body, raw)


def run_patch(resource_type, document, body):
    """read_patch_request + apply_patch: ('ok', (document, changes)) or ('error', ScimError)."""
    kind, operations = outcome(scim_appliance.read_patch_request, body)
    if kind == "error":
        return kind, operations
    assert all(op.op in ("add", "replace", "remove") for op in operations)
    before = json.dumps(document, sort_keys=True)
    result = outcome(scim_appliance.apply_patch, resource_type, document, operations)
    assert json.dumps(document, sort_keys=True) == before   # the engine is pure
    return result


def check_engine_result(resource_type, new, changes, from_http=True):
    """A document the engine returns is one the model accepts as it is and,
    for a body the HTTP layer lets through, strict UTF-8 JSON; member changes
    are well-formed."""
    if from_http:
        text = json.dumps(new, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
        assert json.loads(text) == new
    assert scim_appliance.canonical_document(resource_type, copy.deepcopy(new)) == new
    scim_appliance.check_required(resource_type, new)
    if resource_type is USER:
        assert changes == []
        return
    for change in changes:
        assert change[0] in ("add", "remove", "remove_where", "clear"), change
        if change[0] == "add":
            assert all(isinstance(i, str) and i and t in (None, "User", "Group") for i, t in change[1])
        elif change[0] == "remove":
            assert all(isinstance(i, str) and i for i in change[1])
        elif change[0] == "remove_where":
            outcome(scim_appliance.member_filter_to_sql, change[1])


PATCH_CASES = {"User": (USER, USER_DOCUMENTS, user_patch_bodies, group_patch_bodies),
               "Group": (GROUP, GROUP_DOCUMENTS, group_patch_bodies, user_patch_bodies)}


@pytest.mark.parametrize("name", sorted(PATCH_CASES))
@property_settings(500)
@given(data=st.data())
def test_any_patch_document_gives_a_result_or_a_scim_error_and_a_valid_document(world, name, data):
    """Item 12: read_patch_request + apply_patch raise nothing but ScimError, and
    what they return passes canonical_document unchanged and is strict JSON."""
    resource_type, documents, own_bodies, other_bodies = PATCH_CASES[name]
    document = world.bind(data.draw(st.sampled_from(documents), label="document"))
    body = world.bind(data.draw(mostly(own_bodies, other_bodies), label="body"))
    kind, parsed = http_view(body)
    from_http = kind == "ok"
    if not from_http:
        # A lone surrogate, keys equal but for case, an out-of-range number:
        # the HTTP layer answers 400, but the engine must cope all the same.
        assert parsed.status == 400 and parsed.scim_type == "invalidSyntax"
        parsed = body
    kind, result = run_patch(resource_type, document, parsed)
    if kind == "ok":
        check_engine_result(resource_type, *result, from_http=from_http)


def _simulate_members(world, group_id, before, changes):
    """The member set after `changes`, or None if an add must be refused (400)."""
    kinds = world.kinds()
    members = set(before)
    for change in changes:
        if change[0] == "add":
            for member_id, member_type in change[1]:
                if member_id not in kinds or member_id == group_id or \
                        member_type not in (None, kinds[member_id]):
                    return None
            members |= {member_id for member_id, _ in change[1]}
        elif change[0] == "remove":
            members -= set(change[1])
        elif change[0] == "clear":
            members = set()
    return members


_serial = iter(range(10 ** 9))


def patch_over_http(world, resource_type, resource_id, body):
    """PATCH through HTTP and work out what the engine says should happen.

    Returns (response, row before, row after, (document, member changes)),
    or with None for the last when the engine refuses the body: then the
    response is asserted to be the engine's SCIM error and the row unchanged.
    """
    body = world.bind(body)
    before_row = world.row(resource_type.table, resource_id)
    response = world.client.request("PATCH", "%s/%s" % (resource_type.endpoint, resource_id), body, status="*")
    assert response.status_int < 500, (response.status, response.body)
    after_row = world.row(resource_type.table, resource_id)
    kind, parsed = http_view(body)
    if kind == "ok":
        kind, parsed = run_patch(resource_type, json.loads(before_row["document"]), parsed)
    if kind == "error":
        error = assert_scim_error(response, parsed.status, "*" if parsed.scim_type else None)
        assert error.get("scimType") == parsed.scim_type
        assert after_row == before_row
        return response, before_row, after_row, None
    return response, before_row, after_row, parsed


@property_settings(300)
@given(body=user_patch_bodies, start=st.sampled_from(USER_DOCUMENTS[1:]))
def test_patch_user_over_http_answers_2xx_or_scim_4xx_and_is_all_or_nothing(world, body, start):
    """Item 12 over HTTP: PATCH /Users/{id} answers 200 with what the engine
    computed, or the engine's 4xx (409 for a taken userName) with the stored
    row byte-identical; never a 5xx."""
    client = world.client
    initial = world.bind(dict(start, userName="patch-%d@example.com" % next(_serial)))
    user_id = client.post("/Users", dict(initial, schemas=[URN_USER])).json["id"]
    try:
        response, before_row, after_row, expected = patch_over_http(world, USER, user_id, body)
        if expected is None:
            return
        new, _ = expected
        sets_password = new.pop("password", None) is not None   # stored as a digest, not in the document
        taken = any(row["user_name_key"] == scim_appliance.fold(new["userName"])
                    for row in _all_rows(world, "users") if row["id"] != user_id)
        if taken:
            assert_scim_error(response, 409, "uniqueness")
            assert after_row == before_row
            return
        assert response.status_int == 200, response.body
        assert json.loads(after_row["document"]) == new
        assert response.json["id"] == user_id and response.json["userName"] == new["userName"]
        unchanged = new == json.loads(before_row["document"]) and not sets_password
        assert after_row["version"] == before_row["version"] + (0 if unchanged else 1)
    finally:
        client.delete("/Users/" + user_id)


def _all_rows(world, table):
    with world.store.read() as tx:
        return tx.select(table, "1", [], "rowid", 10 ** 6, 0)


@property_settings(250)
@given(body=group_patch_bodies)
def test_patch_group_over_http_answers_2xx_or_scim_4xx_and_is_all_or_nothing(world, body):
    """Item 12 over HTTP: PATCH /Groups/{id} answers 204 with the engine's
    document and the member changes applied, or a SCIM 4xx with the row and
    its members untouched; never a 5xx."""
    client = world.client
    group = client.create_group("patch-group-%d" % next(_serial),
                                members=[{"value": world.ids["ALICE"]}, {"value": world.ids["BOB"]}])
    group_id = group["id"]
    try:
        response, before_row, after_row, expected = patch_over_http(world, GROUP, group_id, body)
        if expected is None:
            return
        new, changes = expected
        if response.status_int >= 400:
            # What only the database can refuse: a taken displayName, a
            # member that does not exist, a member filter SQL cannot express.
            error = assert_scim_error(response, response.status_int, "*")
            assert (response.status_int, error["scimType"]) in ((409, "uniqueness"), (400, "invalidValue"),
                                                                 (400, "invalidFilter"), (400, "invalidPath"))
            assert after_row == before_row
            if response.status_int == 409:
                assert any(row["display_name_key"] == scim_appliance.fold(new["displayName"])
                           for row in _all_rows(world, "groups") if row["id"] != group_id)
            elif not any(change[0] == "remove_where" for change in changes):
                assert _simulate_members(world, group_id, before_row["members"], changes) is None
            return
        assert response.status_int == 204, response.body
        assert json.loads(after_row["document"]) == new
        changed = new != json.loads(before_row["document"]) or after_row["members"] != before_row["members"]
        assert after_row["version"] in ((before_row["version"] + 1,) if changed else
                                        (before_row["version"], before_row["version"] + 1))
        if not any(change[0] == "remove_where" for change in changes):
            assert after_row["members"] == _simulate_members(world, group_id, before_row["members"], changes)
        else:
            assert after_row["members"] <= before_row["members"] | set(world.kinds())
    finally:
        client.delete("/Groups/" + group_id)


# ---------------------------------------------------------------------------
# property 3: the API and an in-memory model, side by side
# ---------------------------------------------------------------------------

# userNames in classes the server must treat as one name (caseExact false,
# full Unicode case folding, NFC): the model keys users by class label.
USER_NAME_CLASSES = {
    "alice": ("alice@example.com", "ALICE@example.com", "Alice@EXAMPLE.com"),
    "anne": ("änne@example.com", "ÄNNE@example.com", "a\u0308nne@example.com", "A\u0308NNE@example.com"),
    "strasse": ("straße@example.com", "STRASSE@example.com", "Strasse@example.com"),
    "kim": ("kim@example.com", "\u212aIM@example.com"),
    "dzemal": ("\u01c6emal@example.com", "\u01c5emal@example.com", "\u01c4EMAL@example.com"),
    "bob": ("bob@example.com",),
}
USER_NAMES = [(label, name) for label, names in USER_NAME_CLASSES.items() for name in names]
GROUP_NAME_CLASSES = {
    "sales": ("Sales", "SALES", "sales"),
    "strasse": ("Straße Team", "STRASSE TEAM"),
    "anne": ("Änne's", "A\u0308NNE'S"),
    "ops": ("Ops",),
}
GROUP_NAMES = [(label, name) for label, names in GROUP_NAME_CLASSES.items() for name in names]
DISPLAY_NAMES = [None, "Alice", "Änne Müller", "x" * 3, "50%_off"]
ACTIVE_VALUES = [None, True, False, "True", "False", "true", "FALSE"]


def as_bool(value):
    return value if isinstance(value, bool) or value is None else value.lower() == "true"


def test_user_name_classes_are_what_the_model_says():
    """The model's classes are case-insensitive equivalents by Unicode full
    case folding and NFC, and different classes never fold together."""
    def key(name):
        return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())

    for classes in (USER_NAME_CLASSES, GROUP_NAME_CLASSES):
        keys = {label: {key(name) for name in names} for label, names in classes.items()}
        assert all(len(k) == 1 for k in keys.values()), keys
        assert len({next(iter(k)) for k in keys.values()}) == len(classes)


def user_body(name, display, active):
    """(label, POST/PUT body) for the state machine's user rules; None leaves an attribute out."""
    label, user_name = name
    body = {"schemas": [URN_USER], "userName": user_name}
    if display is not None:
        body["displayName"] = display
    if active is not None:
        body["active"] = active
    return label, body


# ---------------------------------------------------------------------------
# the change feed, replayed (item 4)
# ---------------------------------------------------------------------------

EVENT_KINDS = {   # event type -> (resource type, the event URIs it may carry, after the prefix)
    "user.created": ("User", {"create:full"}), "group.created": ("Group", {"create:full"}),
    "user.updated": ("User", {"patch:full", "put:full"}), "group.updated": ("Group", {"patch:full", "put:full"}),
    "user.deactivated": ("User", {"deactivate"}), "user.reactivated": ("User", {"activate"}),
    "user.deleted": ("User", {"delete"}), "group.deleted": ("Group", {"delete"}),
    "group.member_added": ("Group", {"create:full", "patch:full", "put:full"}),
    "group.member_removed": ("Group", {"create:full", "patch:full", "put:full"}),
}
EVENT_URI_PREFIX = "urn:ietf:params:scim:event:prov:"


def without(representation, *keys):
    return {key: value for key, value in representation.items() if key not in keys}


def is_active(representation):
    """A user without `active` is active (README: the scim_users view)."""
    return representation.get("active") is not False


def top_level(path):
    """The attribute an event's `attributes` path belongs to: name.givenName -> name."""
    return path.rsplit(":", 1)[0] if path.lower().startswith("urn:") else path.split(".")[0]


class FeedReplay:
    """An empty model that events are applied to, strictly: every event must
    be a real change of the state the events before it built (no create of
    an id that exists, no member added twice, no update of a deleted
    resource), so that a missing, repeated or spurious event fails here."""

    def __init__(self):
        self.users = {}          # id -> representation
        self.groups = {}         # id -> representation (meta as of its last user/group event)
        self.memberships = {}    # (group id, member id) -> member type
        self.versions = {}       # resource id -> (version of its last event, that event's txn)
        self.deleted = set()
        self._txn_start = {}     # (txn, resource id) -> the representation before that txn
        self._txn_pairs = set()  # (txn, (group id, member id)) of every membership event

    def apply(self, event):
        kind = event["type"]
        assert kind in EVENT_KINDS, event
        resource_type, uris = EVENT_KINDS[kind]
        resource = event["resource"]
        resource_id, version, txn = resource["id"], resource["version"], event["txn"]
        assert resource["type"] == resource_type, event
        assert event["event_uri"][len(EVENT_URI_PREFIX):] in uris and event["event_uri"].startswith(
            EVENT_URI_PREFIX), event
        assert event["token_name"] == "entra", event
        assert resource_id not in self.deleted, ("an event after the resource's delete", event)
        assert set(resource) == {"type", "id", "externalId", "version"}, event
        # Versions: one per request, and every other request that makes an
        # event moves it on; a delete carries the last one (README).
        number = int(version[3:-1])
        assert version == 'W/"%d"' % number, event
        if resource_id in self.versions:
            last, last_txn = self.versions[resource_id]
            same = txn == last_txn or kind.endswith(".deleted")
            assert number == last if same else number > last, (last, last_txn, event)
        self.versions[resource_id] = (number, txn)
        store = self.users if resource_type == "User" else self.groups
        data = event["data"]
        if kind.startswith("group.member_"):
            self._membership(kind, event, data, resource_id)
            return
        assert data["id"] == resource_id and data["meta"]["version"] == version, event
        assert data["meta"]["resourceType"] == resource_type, event
        assert "groups" not in data and "members" not in data, ("a representation with memberships", event)
        if kind.endswith(".created"):
            assert resource_id not in self.users and resource_id not in self.groups, event
            assert "attributes" not in event, event
            store[resource_id] = data
            return
        assert resource_id in store, ("an event for a resource never created", event)
        before = self._txn_start.setdefault((txn, resource_id), store[resource_id])
        if kind.endswith(".deleted"):
            # The tombstone is the last representation (a group's meta moves on with member events).
            assert without(data, "meta") == without(store[resource_id], "meta"), (store[resource_id], event)
            if resource_type == "User":
                assert data == store[resource_id], (store[resource_id], event)
            left = [pair for pair in self.memberships if resource_id in pair
                    and (resource_type == "User" or pair[1] == resource_id)]
            assert not left, ("deleted, but no group.member_removed for", left, event)
            # A deleted group's own members go with it, without events (README).
            for pair in [pair for pair in self.memberships if pair[0] == resource_id]:
                del self.memberships[pair]
            del store[resource_id]
            self.deleted.add(resource_id)
            return
        attributes = event.get("attributes")
        assert isinstance(attributes, list) and attributes, event
        changed = {key for key in set(before) | set(data)
                   if key != "meta" and before.get(key) != data.get(key)}
        flipped = resource_type == "User" and is_active(before) != is_active(data)
        # One event per resource and request; `attributes` names every change.
        named = {top_level(path) for path in attributes}
        assert named == changed and named, (before, event)
        if kind.endswith(".updated"):
            assert not flipped, ("active changed, but no user.deactivated/reactivated", before, event)
        else:   # user.deactivated / user.reactivated
            assert flipped and "active" in attributes, (before, event)
            assert is_active(data) == (kind == "user.reactivated"), event
        store[resource_id] = data

    def _membership(self, kind, event, data, group_id):
        assert set(data) == {"group", "member"}, event
        assert data["group"] == {"value": group_id, "display": self.groups[group_id]["displayName"]}, event
        member_id, member_type = data["member"]["value"], data["member"]["type"]
        assert set(data["member"]) == {"value", "type"}, event
        assert member_id in (self.users if member_type == "User" else self.groups), ("an unknown member", event)
        pair = (group_id, member_id)
        # Netted (README): a member removed and added back in one request made no change, and no event.
        assert (event["txn"], pair) not in self._txn_pairs, ("one member twice in one request", event)
        self._txn_pairs.add((event["txn"], pair))
        if kind == "group.member_added":
            assert pair not in self.memberships, ("added twice", event)
            self.memberships[pair] = member_type
        else:
            assert self.memberships.get(pair) == member_type, ("removed, but not a member", event)
            del self.memberships[pair]


def read_feed(app, token, cursor="0", limit=1000):
    """Every event after `cursor` through webtest, page by page: (events, next cursor)."""
    events = []
    while True:
        response = app.get("/events?after=%s&limit=%d" % (cursor, limit),
                           headers={"Authorization": "Bearer " + token})
        page = response.json
        assert len(page["events"]) <= limit, page
        events += page["events"]
        if page["events"]:
            assert page["next_cursor"] == page["events"][-1]["cursor"], page
        else:
            assert page["next_cursor"] == cursor and not page["has_more"], page
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return events, cursor


class ApiMachine(RuleBasedStateMachine):
    """Users, groups and memberships through webtest, next to plain dicts."""

    users = Bundle("users")       # created; deleting one moves it to `deleted`
    groups = Bundle("groups")
    deleted = Bundle("deleted")   # users and groups this run deleted

    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="scim-stateful-")
        settings = scim_appliance.Settings(db=os.path.join(self.directory, "scim.db"), public_url=PUBLIC_URL)
        self.store = scim_appliance.Store(settings.db)
        token = scim_appliance.create_token(self.store, "entra")
        self.client = ScimClient(webtest.TestApp(scim_appliance.make_scim_app(self.store, settings)), token)
        self.model_users = {}    # id -> {"class", "userName", "displayName", "active"}
        self.model_groups = {}   # id -> {"class", "displayName", "members": set of ids}
        self.created = []        # every id this run created, in order
        self.gone = {}           # deleted id -> its endpoint
        self.read_token = scim_appliance.create_token(self.store, "app", scope="read")
        self.feed_seen = []      # every event the feed has shown, in order
        self.feed_txns = set()   # the txn of every request that made events
        self.feed_checked = False

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @initialize(target=users, name=st.sampled_from(USER_NAMES))
    def first_user(self, name):
        return self.create_user(name, None, None)

    @initialize(target=groups, name=st.sampled_from(GROUP_NAMES))
    def first_group(self, name):
        return self.create_group(name)

    # -- users --

    def _user_name_taken(self, label, except_id=None):
        return any(user["class"] == label for uid, user in self.model_users.items() if uid != except_id)

    @rule(target=users, name=st.sampled_from(USER_NAMES), display=st.sampled_from(DISPLAY_NAMES),
          active=st.sampled_from(ACTIVE_VALUES))
    def create_user(self, name, display, active):
        label, body = user_body(name, display, active)
        response = self.client.post("/Users", body, status="*")
        hypothesis.event("create_user: %d" % response.status_int)
        if self._user_name_taken(label):
            assert_scim_error(response, 409, "uniqueness")
            return multiple()
        assert response.status_int == 201, response.body
        user_id = response.json["id"]
        self.model_users[user_id] = {"class": label, "userName": body["userName"], "displayName": display,
                                     "active": as_bool(active)}
        self._check_user_body(response.json, user_id)
        self.created.append(user_id)
        return user_id

    @rule(user=users, field=st.sampled_from(["displayName", "active", "userName", "pathless-active"]),
          op=any_case(["replace"]), display=st.sampled_from(DISPLAY_NAMES[1:]),
          active=st.sampled_from(ACTIVE_VALUES[1:]), name=st.sampled_from(USER_NAMES))
    def patch_user(self, user, field, op, display, active, name):
        if field == "displayName":
            operation, change = {"op": op, "path": "displayName", "value": display}, {"displayName": display}
        elif field == "active":
            operation, change = {"op": op, "path": "active", "value": active}, {"active": as_bool(active)}
        elif field == "pathless-active":
            operation, change = {"op": op, "value": {"active": active}}, {"active": as_bool(active)}
        else:
            operation = {"op": op, "path": "userName", "value": name[1]}
            change = {"userName": name[1], "class": name[0]}
        response = self.client.patch("/Users/" + user, [operation], status="*")
        hypothesis.event("patch_user: %d" % response.status_int)
        if user not in self.model_users:
            assert_scim_error(response, 404)
            return
        if "class" in change and self._user_name_taken(change["class"], except_id=user):
            assert_scim_error(response, 409, "uniqueness")
            return
        assert response.status_int == 200, response.body
        self.model_users[user].update(change)
        self._check_user_body(response.json, user)

    @rule(user=users, name=st.sampled_from(USER_NAMES), display=st.sampled_from(DISPLAY_NAMES),
          active=st.sampled_from(ACTIVE_VALUES))
    def put_user(self, user, name, display, active):
        label, body = user_body(name, display, active)
        response = self.client.put("/Users/" + user, body, status="*")
        hypothesis.event("put_user: %d" % response.status_int)
        if user not in self.model_users:
            assert_scim_error(response, 404)
            return
        if self._user_name_taken(label, except_id=user):
            assert_scim_error(response, 409, "uniqueness")
            return
        assert response.status_int == 200, response.body
        self.model_users[user] = {"class": label, "userName": body["userName"], "displayName": display,
                                  "active": as_bool(active)}
        self._check_user_body(response.json, user)

    @rule(target=deleted, user=consumes(users))
    def delete_user(self, user):
        return self._delete("/Users/", user, self.model_users)

    def _delete(self, endpoint, resource_id, model):
        """DELETE a user or group: 204, gone from the model and from every group's members."""
        response = self.client.delete(endpoint + resource_id, status="*")
        hypothesis.event("delete %s: %d" % (endpoint, response.status_int))
        assert response.status_int == 204, response.body
        del model[resource_id]
        for group in self.model_groups.values():
            group["members"].discard(resource_id)
        self.gone[resource_id] = endpoint
        return resource_id

    def _check_user_body(self, body, user_id):
        expected = self.model_users[user_id]
        assert body["id"] == user_id
        assert body["userName"] == expected["userName"]
        assert body.get("displayName") == expected["displayName"]
        assert body.get("active") == expected["active"]

    # -- groups --

    @rule(target=groups, name=st.sampled_from(GROUP_NAMES))
    def create_group(self, name):
        label, display = name
        response = self.client.post("/Groups", {"schemas": [URN_GROUP], "displayName": display}, status="*")
        hypothesis.event("create_group: %d" % response.status_int)
        if any(group["class"] == label for group in self.model_groups.values()):
            assert_scim_error(response, 409, "uniqueness")
            return multiple()
        assert response.status_int == 201, response.body
        group_id = response.json["id"]
        assert response.json["displayName"] == display and response.json.get("members", []) == []
        self.model_groups[group_id] = {"class": label, "displayName": display, "members": set()}
        self.created.append(group_id)
        return group_id

    def _draw_ids(self, data, max_size, preferred):
        """Ids to name as members: mostly from `preferred`, else anything this
        run created (deleted users and groups, groups themselves), in creation
        order: server ids are random, so they are never sorted or sampled."""
        pool = [i for i in self.created if i in preferred] if data.draw(mostly(st.just(True), st.just(False))) \
            else []
        pool = pool or self.created
        positions = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=max_size,
                                       unique=True))
        return [pool[i] for i in positions]

    @precondition(lambda self: self.created)
    @rule(group=groups, data=st.data(), ghost=mostly(st.none(), st.sampled_from([GHOST_ID, "nope"])),
          op=any_case(["add"]))
    def add_members(self, group, data, ghost, op):
        chosen = self._draw_ids(data, 4, self.model_users) + ([ghost] if ghost else [])
        response = self.client.patch("/Groups/" + group, [
            {"op": op, "path": "members", "value": [{"value": member} for member in chosen]}], status="*")
        hypothesis.event("add_members: %d" % response.status_int)
        if group not in self.model_groups:
            assert_scim_error(response, 404)
            return
        known = set(self.model_users) | set(self.model_groups)
        if any(member not in known or member == group for member in chosen):
            # One bad member (gone, never existed, the group itself) and nothing is applied.
            assert_scim_error(response, 400, "invalidValue")
            return
        assert response.status_int == 204, response.body
        self.model_groups[group]["members"] |= set(chosen)

    @precondition(lambda self: self.created)
    @rule(group=groups, data=st.data(), form=st.sampled_from(["value-list", "value-filter"]),
          ghost=mostly(st.just(False), st.just(True)), op=any_case(["remove"]))
    def remove_members(self, group, data, form, ghost, op):
        chosen = self._draw_ids(data, 3, self.model_groups.get(group, {}).get("members", ())) + (
            [GHOST_ID] if ghost else [])
        if form == "value-list":
            # Entra without the flag: path "members" and the members to remove (R40).
            operations = [{"op": op, "path": "members", "value": [{"$ref": None, "value": m} for m in chosen]}]
        else:
            # Entra with the flag: one filtered path per member (R40).
            operations = [{"op": op, "path": 'members[value eq "%s"]' % m} for m in chosen]
        response = self.client.patch("/Groups/" + group, operations, status="*")
        hypothesis.event("remove_members: %d" % response.status_int)
        if group not in self.model_groups:
            assert_scim_error(response, 404)
            return
        assert response.status_int == 204, response.body
        self.model_groups[group]["members"] -= set(chosen)

    @rule(target=deleted, group=consumes(groups))
    def delete_group(self, group):
        return self._delete("/Groups/", group, self.model_groups)

    @rule(resource_id=deleted, method=st.sampled_from(["GET", "PATCH", "PUT", "DELETE"]),
          name=st.sampled_from(USER_NAMES + GROUP_NAMES))
    def use_deleted_resource(self, resource_id, method, name):
        """A deleted user or group is gone for every method (404), and nothing changes."""
        path = self.gone[resource_id] + resource_id
        if method == "GET":
            response = self.client.get(path, status="*")
        elif method == "PATCH":
            response = self.client.patch(path, [{"op": "replace", "path": "displayName", "value": name[1]}],
                                         status="*")
        elif method == "PUT":
            urn, key = (URN_USER, "userName") if path.startswith("/Users/") else (URN_GROUP, "displayName")
            response = self.client.put(path, {"schemas": [urn], key: name[1]}, status="*")
        else:
            response = self.client.delete(path, status="*")
        hypothesis.event("use_deleted_resource: %d" % response.status_int)
        assert_scim_error(response, 404)

    # -- invariants --

    @invariant()
    def api_matches_model(self):
        users = self.client.get("/Users?count=1000").json
        assert users["totalResults"] == len(users["Resources"]) == len(self.model_users)
        assert {u["id"]: (u["userName"], u.get("displayName"), u.get("active")) for u in users["Resources"]} == {
            uid: (u["userName"], u["displayName"], u["active"]) for uid, u in self.model_users.items()}
        groups = self.client.get("/Groups?count=1000").json
        assert groups["totalResults"] == len(groups["Resources"]) == len(self.model_groups)
        assert {g["id"]: (g["displayName"], {m["value"] for m in g.get("members", [])})
                for g in groups["Resources"]} == {
            gid: (g["displayName"], g["members"]) for gid, g in self.model_groups.items()}

    @invariant()
    def members_table_has_no_dangling_ids(self):
        with self.store.read() as tx:
            rows = tx.conn.execute("SELECT group_id, member_id, member_type FROM members").fetchall()
            users = {r[0] for r in tx.conn.execute("SELECT id FROM users")}
            groups = {r[0] for r in tx.conn.execute("SELECT id FROM groups")}
        for group_id, member_id, member_type in rows:
            assert group_id in groups
            assert member_id in (users if member_type == "User" else groups), (member_id, member_type)
        assert {(g, m) for g, m, _ in rows} == {
            (gid, member) for gid, group in self.model_groups.items() for member in group["members"]}

    @invariant()
    def feed_replays_to_database(self):
        """Item 4: the step's events follow on from the last cursor and are one
        request's; the whole feed from "0", replayed into an empty model, is
        the database: users and groups as GET shows them (without groups and
        members), the members table, and each resource's stored version in
        its last event."""
        app, token = self.client.app, self.read_token
        last_cursor = self.feed_seen[-1]["cursor"] if self.feed_seen else "0"
        new, _ = read_feed(app, token, last_cursor)
        txns = {event["txn"] for event in new}
        # One step is one request (the first check follows both initialize rules).
        assert len(txns) <= (1 if self.feed_checked else 2), ("one request, one txn", new)
        assert not txns & self.feed_txns, ("a txn seen in an earlier request", new)
        self.feed_txns |= txns
        self.feed_checked = True
        whole, cursor = read_feed(app, token, "0", limit=50)
        assert whole == self.feed_seen + new, "the feed changed what it had shown, or skipped"
        self.feed_seen = whole
        head = app.get("/events/head", headers={"Authorization": "Bearer " + token}).json
        assert head == {"cursor": cursor}
        replay = FeedReplay()
        for number, event in enumerate(whole, 1):
            assert event["cursor"] == "%d.%s" % (number, event["id"].replace("-", "")[:12]), event
            replay.apply(event)

        users = {u["id"]: u for u in self.client.get("/Users?count=1000").json["Resources"]}
        assert {uid: without(user, "groups") for uid, user in users.items()} == replay.users
        groups = {g["id"]: g for g in self.client.get(
            "/Groups?count=1000&excludedAttributes=members").json["Resources"]}
        assert {gid: without(group, "meta") for gid, group in groups.items()} == {
            gid: without(group, "meta") for gid, group in replay.groups.items()}
        with self.store.read() as tx:
            rows = {table: {r[0]: (r[1], r[2]) for r in tx.conn.execute(
                "SELECT id, version, %s FROM %s" % (column, table))}
                for table, column in (("users", "user_name"), ("groups", "display_name"))}
            members = {(r[0], r[1]): r[2] for r in tx.conn.execute(
                "SELECT group_id, member_id, member_type FROM members")}
        assert {uid: (replay.versions[uid][0], user["userName"]) for uid, user in replay.users.items()} \
            == rows["users"]
        assert {gid: (replay.versions[gid][0], group["displayName"]) for gid, group in replay.groups.items()} \
            == rows["groups"]
        for resource_id, resource in list(users.items()) + list(groups.items()):
            assert resource["meta"]["version"] == 'W/"%d"' % replay.versions[resource_id][0], resource
        assert members == replay.memberships
        assert set(members) == {(gid, member) for gid, group in self.model_groups.items()
                                for member in group["members"]}


TestApiMatchesModel = ApiMachine.TestCase
TestApiMatchesModel.settings = hypothesis.settings(
    max_examples=100, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=HEALTH, print_blob=False)
TestApiMatchesModel.__doc__ = ("Item 12: a stateful run of creates, PATCHes, PUTs, deletes and membership "
                               "changes leaves the API equal to an in-memory model.")


class FeedMachine(ApiMachine):
    """ApiMachine (and its feed replay) with the writes whose membership
    events are computed by difference: a group PUT (a rename and the whole
    member list, Okta's push), a PATCH replace of "members", and adds and
    removes of the same members in one PATCH (netted: no event for a member
    removed and added back)."""

    def _live_ids(self, data, group, max_size):
        """Users and groups that exist, never `group` itself, in creation order."""
        pool = [i for i in self.created if (i in self.model_users or i in self.model_groups) and i != group]
        if not pool:
            return []
        return [pool[i] for i in data.draw(st.lists(st.integers(0, len(pool) - 1), max_size=max_size,
                                                     unique=True))]

    @rule(group=ApiMachine.groups, name=st.sampled_from(GROUP_NAMES), data=st.data())
    def put_group(self, group, name, data):
        label, display = name
        chosen = self._live_ids(data, group, 4)
        response = self.client.put("/Groups/" + group, {"schemas": [URN_GROUP], "displayName": display,
                                                        "members": [{"value": m} for m in chosen]}, status="*")
        hypothesis.event("put_group: %d" % response.status_int)
        if group not in self.model_groups:
            assert_scim_error(response, 404)
            return
        if any(g["class"] == label for gid, g in self.model_groups.items() if gid != group):
            assert_scim_error(response, 409, "uniqueness")
            return
        assert response.status_int == 200, response.body
        self.model_groups[group].update({"class": label, "displayName": display, "members": set(chosen)})

    @rule(group=ApiMachine.groups, data=st.data(), form=st.sampled_from(["replace", "add-remove", "remove-add"]))
    def change_members(self, group, data, form):
        current = sorted(self.model_groups.get(group, {}).get("members", ()), key=self.created.index)
        added = self._live_ids(data, group, 3)
        pool = added + [m for m in current if m not in added]
        removed = [pool[i] for i in data.draw(st.lists(st.integers(0, len(pool) - 1), max_size=3, unique=True))] \
            if pool else []
        add = {"op": "add", "path": "members", "value": [{"value": m} for m in added]}
        remove = {"op": "remove", "path": "members", "value": [{"value": m} for m in removed]}
        if form == "replace":   # Okta: the whole list
            operations = [{"op": "replace", "path": "members", "value": [{"value": m} for m in added]}]
        else:
            operations = [add, remove] if form == "add-remove" else [remove, add]
        response = self.client.patch("/Groups/" + group, operations, status="*")
        hypothesis.event("change_members %s: %d" % (form, response.status_int))
        if group not in self.model_groups:
            assert_scim_error(response, 404)
            return
        assert response.status_int == 204, response.body
        members = self.model_groups[group]["members"]
        if form == "replace":
            members.clear()
            members.update(added)
        elif form == "add-remove":
            members.update(added)
            members.difference_update(removed)
        else:
            members.difference_update(removed)
            members.update(added)


TestFeedReplaysToDatabase = FeedMachine.TestCase
TestFeedReplaysToDatabase.settings = hypothesis.settings(
    max_examples=60, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=HEALTH, print_blob=False)
TestFeedReplaysToDatabase.__doc__ = (
    "Item 4: with group PUTs, PATCH replace of members and netted add/remove PATCHes too, the change feed "
    "replayed from \"0\" is the database after every step.")
