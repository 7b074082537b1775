"""The filter language (RFC 7644 §3.4.2.2): parse_filter, filter_to_sql,
filter_matches, sort_to_sql, and filtering through HTTP as Entra does it
(GET /Users?filter=..., GET /Groups?filter=..., POST /Users/.search,
POST /.search)."""

import datetime
import urllib.parse

import pytest

import scim_appliance
from scim_appliance import (GROUP, MAX_FILTER_DEPTH, MAX_FILTER_LENGTH, MAX_FILTER_TERMS, USER,
                            ScimError, filter_matches, filter_to_sql, parse_filter)
from conftest import assert_scim_error, snapshot, stored_document, stored_members

URN_ENT = scim_appliance.URN_ENTERPRISE
URN_SEARCH = scim_appliance.URN_SEARCH
URN_LIST = scim_appliance.URN_LIST
URN_ERROR = scim_appliance.URN_ERROR


# -- helpers ---------------------------------------------------------------------

def query_string(**params):
    """A query string with spaces as %20 (what a browser or curl sends)."""
    return urllib.parse.urlencode(params, quote_via=urllib.parse.quote)


def search(client, filter_text, path="/Users", **params):
    """GET <path>?filter=... and return the ListResponse, checking its shape."""
    params = dict(params, filter=filter_text)
    body = client.get(path + "?" + query_string(**params)).json
    assert body["schemas"] == [URN_LIST]
    assert body["itemsPerPage"] == len(body["Resources"])
    return body


def found(client, filter_text, path="/Users", **params):
    """The set of ids a GET filter returns (every match on one page)."""
    body = search(client, filter_text, path, **params)
    assert body["totalResults"] == len(body["Resources"])
    return {resource["id"] for resource in body["Resources"]}


def ids(*resources):
    return {resource["id"] for resource in resources}


def assert_invalid_filter_response(response):
    """RFC 7644 §3.4.2.2 / §3.12: 400 with scimType invalidFilter, as a SCIM error."""
    body = assert_scim_error(response, 400, "invalidFilter")
    assert "Resources" not in body


def assert_invalid_filter(text, resource_type=USER):
    """parse_filter + filter_to_sql refuse `text` with 400 invalidFilter."""
    with pytest.raises(ScimError) as info:
        filter_to_sql(parse_filter(text), resource_type)
    assert info.value.status == 400
    assert info.value.scim_type == "invalidFilter"
    assert info.value.detail


def created_user(client, db, user_name, **attributes):
    """Create a user over HTTP and check it was stored."""
    user = client.create_user(user_name, **attributes)
    stored = stored_document(db, "users", user["id"])
    assert stored is not None and stored["userName"] == user_name
    return user


def created_group(client, db, display_name, members=(), **attributes):
    body = dict(attributes)
    if members:
        body["members"] = [{"value": member["id"]} for member in members]
    group = client.create_group(display_name, **body)
    assert stored_document(db, "groups", group["id"])["displayName"] == display_name
    assert stored_members(db, group["id"]) == ids(*members)
    return group


@pytest.fixture
def directory(client, db):
    """A populated directory: users with and without the attributes filters look at."""
    people = {}
    people["alice"] = created_user(
        client, db, "alice@example.com", displayName="Alice Smith", externalId="EXT-Alice",
        title="Engineer", active=True, name={"givenName": "Alice", "familyName": "Smith"},
        emails=[{"value": "alice@example.com", "type": "work", "primary": True},
                {"value": "alice@home.org", "type": "home"}],
        **{URN_ENT: {"employeeNumber": "1001", "department": "R&D"}})
    people["bob"] = created_user(
        client, db, "Bob@Example.com", displayName="Bob Jones", externalId="ext-bob",
        title="Manager", active=False, name={"givenName": "Bob", "familyName": "Jones"},
        emails=[{"value": "bob@example.org", "type": "work"}],
        **{URN_ENT: {"employeeNumber": "1002", "department": "Sales",
                     "manager": people["alice"]["id"]}})
    people["anne"] = created_user(client, db, "änne@x.com", displayName="Änne Müller")
    people["empty_title"] = created_user(client, db, "blank@example.com", title="",
                                         displayName="Blank Title")
    people["a_b"] = created_user(client, db, "a_b", displayName="a_b")
    people["axb"] = created_user(client, db, "axb", displayName="axb")
    people["percent"] = created_user(client, db, "100%", displayName="100%")
    people["thousand"] = created_user(client, db, "1000", displayName="1000")
    people["backslash"] = created_user(client, db, "back\\slash", displayName="back\\slash")
    people["backxslash"] = created_user(client, db, "backxslash", displayName="backxslash")
    people["groups"] = {}
    people["groups"]["sales"] = created_group(client, db, "Sales", externalId="G-Sales",
                                              members=[people["alice"], people["bob"]])
    people["groups"]["eng"] = created_group(client, db, "Engineering", externalId="g-eng",
                                            members=[people["alice"]])
    people["groups"]["empty"] = created_group(client, db, "Empty Group")
    return people


def all_users(directory):
    return {value["id"] for key, value in directory.items() if key != "groups"}


# ==============================================================================
# Parser units
# ==============================================================================

@pytest.mark.parametrize("operator", ["eq", "ne", "co", "sw", "ew", "gt", "ge", "lt", "le"])
def test_every_comparison_operator_parses(operator):
    """RFC 7644 §3.4.2.2: compareOp = eq / ne / co / sw / ew / gt / lt / ge / le."""
    assert parse_filter('title %s "x"' % operator) == ("cmp", "title", operator, "x")


def test_present_operator_parses():
    """RFC 7644 §3.4.2.2: attrPath SP "pr"."""
    assert parse_filter("title pr") == ("pr", "title")


def test_and_binds_tighter_than_or():
    """RFC 7644 §3.4.2.2: "listed in order of precedence: not, and, or"."""
    assert parse_filter("a pr or b pr and c pr") == (
        "or", [("pr", "a"), ("and", [("pr", "b"), ("pr", "c")])])
    assert parse_filter("a pr and b pr or c pr") == (
        "or", [("and", [("pr", "a"), ("pr", "b")]), ("pr", "c")])


def test_not_binds_tighter_than_and():
    assert parse_filter("not (a pr) and b pr") == ("and", [("not", ("pr", "a")), ("pr", "b")])
    assert parse_filter("b pr or not (a pr)") == ("or", [("pr", "b"), ("not", ("pr", "a"))])


def test_parentheses_override_precedence():
    """RFC 7644 §3.4.2.2: grouping operators come first."""
    assert parse_filter("(a pr or b pr) and c pr") == (
        "and", [("or", [("pr", "a"), ("pr", "b")]), ("pr", "c")])
    assert parse_filter("a pr and (b pr or c pr)") == (
        "and", [("pr", "a"), ("or", [("pr", "b"), ("pr", "c")])])
    assert parse_filter("not (a pr or b pr)") == ("not", ("or", [("pr", "a"), ("pr", "b")]))


def test_chained_and_or_are_flat_lists():
    assert parse_filter("a pr and b pr and c pr") == ("and", [("pr", "a"), ("pr", "b"), ("pr", "c")])
    assert parse_filter("a pr or b pr or c pr") == ("or", [("pr", "a"), ("pr", "b"), ("pr", "c")])


@pytest.mark.parametrize("text, tree", [
    ('title EQ "x"', ("cmp", "title", "eq", "x")),
    ('title Eq "x"', ("cmp", "title", "eq", "x")),
    ('title sW "x"', ("cmp", "title", "sw", "x")),
    ("title PR", ("pr", "title")),
    ("a pr AND b pr", ("and", [("pr", "a"), ("pr", "b")])),
    ("a pr And b pr", ("and", [("pr", "a"), ("pr", "b")])),
    ("a pr OR b pr", ("or", [("pr", "a"), ("pr", "b")])),
    ("NOT (a pr)", ("not", ("pr", "a"))),
    ("Not (a pr)", ("not", ("pr", "a"))),
    ("active eq TRUE", ("cmp", "active", "eq", True)),
    ("active eq True", ("cmp", "active", "eq", True)),
    ("active eq FALSE", ("cmp", "active", "eq", False)),
    ("title eq NULL", ("cmp", "title", "eq", None)),
    ("title ne Null", ("cmp", "title", "ne", None)),
])
def test_keywords_are_case_insensitive(text, tree):
    """RFC 7644 §3.4.2.2 ABNF literals (operators, and/or/not, true/false/null) ignore case."""
    assert parse_filter(text) == tree


def test_value_path_with_logical_filter():
    """RFC 7644 §3.4.2.2: valuePath = attrPath "[" valFilter "]"."""
    assert parse_filter('emails[type eq "work" and value co "@x"]') == (
        "has", "emails", ("and", [("cmp", "type", "eq", "work"), ("cmp", "value", "co", "@x")]),
        None, None, None)


def test_entra_value_path_with_sub_attribute_comparison():
    """R12: emails[type eq "work"].value eq "user@contoso.com"."""
    assert parse_filter('emails[type eq "work"].value eq "user@contoso.com"') == (
        "has", "emails", ("cmp", "type", "eq", "work"), "value", "eq", "user@contoso.com")


@pytest.mark.parametrize("name, value, param", [
    ("urn:ietf:params:scim:schemas:core:2.0:User:userName", "x", "x"),
    ("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber", "x", "x"),
    ("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value", "x", "x"),
    ("name.familyName", "x", "x"),
    # dateTime operands are bound as UTC for a chronological comparison
    ("meta.lastModified", "2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00.000000"),
])
def test_qualified_and_dotted_names_parse_and_translate(name, value, param):
    """RFC 7644 §3.10: attrPath = [URI ":"] ATTRNAME *1subAttr."""
    tree = parse_filter('%s eq "%s"' % (name, value))
    assert tree == ("cmp", name, "eq", value)
    sql, params = filter_to_sql(tree, USER)
    assert params == [param] and "?" in sql


@pytest.mark.parametrize("literal, value", [
    (r'"a\"b"', 'a"b'),
    (r'"a\\b"', "a\\b"),
    (r'"\u00e9t\u00E9"', "été"),
    (r'"\ud83d\ude00"', "\U0001F600"),
    (r'"tab\there"', "tab\there"),
    (r'"line\nbreak"', "line\nbreak"),
    (r'"\/slash"', "/slash"),
    ('"ÄNNE"', "ÄNNE"),
    ('""', ""),
    ('"and or not ( ) [ ]"', "and or not ( ) [ ]"),
])
def test_string_values_use_json_escapes(literal, value):
    """RFC 7644 §3.4.2.2: compValue string is a JSON string (RFC 7159 escapes)."""
    assert parse_filter("title eq " + literal) == ("cmp", "title", "eq", value)


@pytest.mark.parametrize("literal, value", [
    ("42", 42), ("0", 0), ("-7", -7), ("3.5", 3.5), ("1e3", 1000.0), ("-2.5E-1", -0.25),
])
def test_numbers_parse_as_json_numbers(literal, value):
    tree = parse_filter("x eq " + literal)
    assert tree == ("cmp", "x", "eq", value)
    assert type(tree[3]) is type(value)


# ==============================================================================
# Invalid filters
# ==============================================================================

SYNTAX_ERRORS = [
    "",
    "   ",
    '(userName eq "x"',
    'userName eq "x")',
    '((userName eq "x")',
    'emails[type eq "work"',
    'emails[type eq "work"]]',
    'userName eq "x" ]',
    'userName like "x"',
    'userName == "x"',
    'userName eq "unterminated',
    'userName eq "x" and',
    'userName eq "x" or',
    'and userName eq "x"',
    'userName eq "x" and or title pr',
    "userName eq",
    "userName",
    "userName eq jyoung",
    "userName eq 'single quoted'",
    'emails[type eq "work" and phoneNumbers[type eq "x"]]',
    'emails[phoneNumbers[type eq "x"]]',
    'not userName eq "x"',
    "not ()",
    "()",
    "emails[]",
    '"x" eq userName',
    'userName eq "x" userName eq "y"',
    r'userName eq "bad \q escape"',
    'userName eq "raw \x01 control"',
    'userName eq "x" ; DROP TABLE users',
]


@pytest.mark.parametrize("text", SYNTAX_ERRORS)
def test_malformed_filter_is_invalid_filter(text):
    """RFC 7644 §3.4.2.2: "invalidFilter: The specified filter syntax was invalid"."""
    with pytest.raises(ScimError) as info:
        parse_filter(text)
    assert info.value.status == 400
    assert info.value.scim_type == "invalidFilter"
    assert info.value.detail


SEMANTIC_ERRORS = [
    'nosuch eq "x"',
    'name.nosuch eq "x"',
    'userName.sub eq "x"',
    'emails.nosuch eq "x"',
    'emails[nosuch eq "x"]',
    'emails[type eq "work"].nosuch eq "x"',
    'urn:ietf:params:scim:schemas:core:2.0:User:nosuch eq "x"',
    'urn:ietf:params:scim:schemas:core:2.0:Group:displayName eq "x"',
    "active gt true",
    "active ge false",
    "active lt true",
    "active le true",
    "active co true",
    "active sw true",
    "active ew true",
    'active eq "maybe"',
    "active eq 1",
    'password eq "secret"',
    "password pr",
    'urn:ietf:params:scim:schemas:core:2.0:User:password eq "secret"',
    'name eq "x"',
    "userName eq true",
    "userName gt null",
    "userName co null",
]


@pytest.mark.parametrize("text", SEMANTIC_ERRORS)
def test_filter_the_schema_rejects_is_invalid_filter(text):
    """Unknown attributes, gt/co on a boolean (RFC 7644 §3.4.2.2 "Boolean ... SHALL
    cause a failed response ... invalidFilter"), the writeOnly password."""
    assert_invalid_filter(text)


@pytest.mark.parametrize("text", ['userName eq "x"', 'members.nosuch eq "x"', "active eq true"])
def test_user_attributes_are_unknown_to_groups(text):
    assert_invalid_filter(text, GROUP)


def test_filter_length_limit():
    """MAX_FILTER_LENGTH characters are accepted, one more is refused."""
    prefix, suffix = 'userName eq "', '"'
    at_limit = prefix + "a" * (MAX_FILTER_LENGTH - len(prefix) - len(suffix)) + suffix
    assert len(at_limit) == MAX_FILTER_LENGTH
    assert parse_filter(at_limit)[0] == "cmp"
    with pytest.raises(ScimError) as info:
        parse_filter(at_limit[:-1] + "a" + suffix)
    assert info.value.status == 400 and info.value.scim_type == "invalidFilter"


def nested(depth, kind):
    inner = 'userName eq "x"'
    opener = "(" if kind == "parentheses" else "not ("
    return opener * depth + inner + ")" * depth


@pytest.mark.parametrize("kind", ["parentheses", "not"])
def test_filter_depth_limit(kind):
    """MAX_FILTER_DEPTH nested levels are accepted; one deeper is refused."""
    assert parse_filter(nested(MAX_FILTER_DEPTH, kind))
    with pytest.raises(ScimError) as info:
        parse_filter(nested(MAX_FILTER_DEPTH + 1, kind))
    assert info.value.status == 400 and info.value.scim_type == "invalidFilter"


def test_value_path_counts_towards_depth():
    deep = "(" * MAX_FILTER_DEPTH + 'emails[type eq "work"]' + ")" * MAX_FILTER_DEPTH
    with pytest.raises(ScimError) as info:
        parse_filter(deep)
    assert info.value.scim_type == "invalidFilter"


def test_filter_terms_limit():
    """MAX_FILTER_TERMS comparisons are accepted, one more is refused."""
    at_limit = " or ".join('userName eq "u%d"' % i for i in range(MAX_FILTER_TERMS))
    tree = parse_filter(at_limit)
    assert tree[0] == "or" and len(tree[1]) == MAX_FILTER_TERMS
    with pytest.raises(ScimError) as info:
        parse_filter(at_limit + ' or userName eq "one-more"')
    assert info.value.status == 400 and info.value.scim_type == "invalidFilter"


def test_terms_inside_value_paths_count():
    text = " or ".join('emails[type eq "t%d" and value eq "v"]' % i for i in range(MAX_FILTER_TERMS // 2 + 1))
    with pytest.raises(ScimError) as info:
        parse_filter(text)
    assert info.value.scim_type == "invalidFilter"


HTTP_ERRORS = [
    '(userName eq "x"',
    'emails[type eq "work"',
    'userName like "x"',
    'userName eq "unterminated',
    'userName eq "x" and',
    "userName eq",
    "userName eq jyoung",
    'emails[type eq "w" and phoneNumbers[type eq "x"]]',
    'nosuch eq "x"',
    "active gt true",
    "active co true",
    'password eq "secret"',
    "",
    'userName eq "%s"' % ("a" * MAX_FILTER_LENGTH),
    nested(MAX_FILTER_DEPTH + 1, "parentheses"),
    " or ".join('userName eq "u%d"' % i for i in range(MAX_FILTER_TERMS + 1)),
]


@pytest.mark.parametrize("text", HTTP_ERRORS)
def test_invalid_filter_over_http_is_400_and_changes_nothing(client, db, directory, text):
    """RFC 7644 §3.4.2.2 invalidFilter on GET and on POST .search; nothing is touched."""
    before = snapshot(db)
    assert_invalid_filter_response(client.get("/Users?" + query_string(filter=text), status=400))
    assert_invalid_filter_response(client.post("/Users/.search", {
        "schemas": [URN_SEARCH], "filter": text}, status=400))
    assert_invalid_filter_response(client.post("/.search", {
        "schemas": [URN_SEARCH], "filter": text}, status=400))
    assert snapshot(db) == before


@pytest.mark.parametrize("text", ['displayName eq "x', 'nosuch eq "x"', 'members[value eq "x"',
                                  'userName eq "x"'])
def test_invalid_group_filter_is_400(client, db, directory, text):
    before = snapshot(db)
    assert_invalid_filter_response(client.get("/Groups?" + query_string(filter=text), status=400))
    assert snapshot(db) == before


def test_invalid_utf8_in_filter_is_400_not_every_user(client, db, directory):
    """An undecodable filter must never be read as "no filter" (which lists every user)."""
    before = snapshot(db)
    response = client.get('/Users?filter=userName%20eq%20%22%FF%22', status="*")
    assert_invalid_filter_response(response)
    response = client.get('/Groups?filter=displayName%20eq%20%22%C3%28%22', status="*")
    assert_invalid_filter_response(response)
    assert snapshot(db) == before


def test_filter_that_is_not_a_string_in_search_request_is_400(client, db, directory):
    before = snapshot(db)
    response = client.post("/Users/.search", {"schemas": [URN_SEARCH], "filter": ["userName pr"]},
                           status=400)
    assert_invalid_filter_response(response)
    assert snapshot(db) == before


def test_unquoted_attribute_name_injection_is_refused(client, db, directory):
    before = snapshot(db)
    for text in ["urn:x';DROP TABLE users;--:attr eq \"x\"", 'userName" eq "x"',
                 "userName eq \"x\" or 1=1"]:
        assert_invalid_filter_response(client.get("/Users?" + query_string(filter=text), status=400))
    assert snapshot(db) == before


# ==============================================================================
# Translation to SQL
# ==============================================================================

def test_filter_translates_to_sql_with_values_only_in_parameters(store):
    """Filters are one WHERE clause; values are bound, never interpolated."""
    sql, params = filter_to_sql(parse_filter('userName eq "x"'), USER)
    assert isinstance(sql, str) and "?" in sql
    assert params == ["x"]
    hostile = "zq'; DROP TABLE users; --"
    sql, params = filter_to_sql(parse_filter(
        'userName eq "%s" or displayName co "%s" or emails[value sw "%s"]' % ((hostile,) * 3)), USER)
    assert hostile not in sql and "DROP" not in sql
    assert hostile.casefold() in params
    # The clause is real SQL that SQLite runs against the users table.
    conn = store._connection()
    assert conn.execute("SELECT count(*) FROM users WHERE " + sql, params).fetchone()[0] == 0


def test_case_insensitive_values_are_bound_folded():
    sql, params = filter_to_sql(parse_filter('userName eq "ÄNNE@X.COM"'), USER)
    assert params == ["änne@x.com"]
    sql, params = filter_to_sql(parse_filter('externalId eq "ABC"'), USER)
    assert params == ["ABC"]   # externalId is caseExact (RFC 7643 §3.1)


# ==============================================================================
# Filtering over HTTP
# ==============================================================================

def test_username_eq_is_case_insensitive(client, directory):
    """R13: userName is caseExact false; Entra's validator filters with another case."""
    bob = directory["bob"]
    assert found(client, 'userName eq "bob@example.com"') == ids(bob)
    assert found(client, 'userName eq "BOB@EXAMPLE.COM"') == ids(bob)
    assert found(client, 'userName eq "Bob@Example.com"') == ids(bob)


def test_username_eq_uses_unicode_folding(client, db, directory):
    """R13 with full Unicode folding: ÄNNE@x.com finds änne@x.com."""
    anne = directory["anne"]
    assert found(client, 'userName eq "ÄNNE@x.com"') == ids(anne)
    assert found(client, 'userName eq "ÄNNE@X.COM"') == ids(anne)
    # The decomposed spelling (a + combining diaeresis) is the same name.
    assert found(client, 'userName eq "A\u0308NNE@x.com"') == ids(anne)
    strasse = created_user(client, db, "straße@x.com")
    assert found(client, 'userName eq "STRASSE@X.COM"') == ids(strasse)


def test_entra_form_encoded_filter(client, directory):
    """R3/R5: Entra sends filter=userName+eq+%22...%22 with '+' for spaces."""
    body = client.get("/Users?filter=userName+eq+%22alice%40example.com%22").json
    assert body["totalResults"] == 1
    assert body["Resources"][0]["id"] == directory["alice"]["id"]
    assert body["Resources"][0]["userName"] == "alice@example.com"
    body = client.get("/Users?filter=userName+eq+%227d420df3-9995-4831-a406-ecf8166f5f6a%22").json
    assert body == {"schemas": [URN_LIST], "totalResults": 0, "Resources": [], "startIndex": 1,
                    "itemsPerPage": 0}


def test_filter_parameter_name_is_case_insensitive(client, directory):
    assert {r["id"] for r in client.get("/Users?Filter=" + urllib.parse.quote(
        'userName eq "axb"')).json["Resources"]} == ids(directory["axb"])


def test_external_id_eq_is_case_exact(client, directory):
    """R12: externalId eq; RFC 7643 §3.1 externalId is caseExact."""
    assert found(client, 'externalId eq "EXT-Alice"') == ids(directory["alice"])
    assert found(client, 'externalId eq "ext-alice"') == set()
    assert found(client, 'externalId eq "ext-bob"') == ids(directory["bob"])
    assert found(client, 'externalId eq "EXT-BOB"') == set()


@pytest.mark.parametrize("text, who", [
    ('displayName co "SMITH"', {"alice"}),
    ('displayName co "müller"', {"anne"}),
    ('displayName co "MÜLLER"', {"anne"}),
    ('displayName sw "alice"', {"alice"}),
    ('displayName sw "BOB J"', {"bob"}),
    ('displayName ew "JONES"', {"bob"}),
    ('displayName ew "smith"', {"alice"}),
    ('displayName eq "alice smith"', {"alice"}),
    ('DisplayName eq "alice smith"', {"alice"}),
])
def test_user_display_name_string_operators_ignore_case(client, directory, text, who):
    """RFC 7643 §4.1.1 displayName caseExact false: co/sw/ew/eq ignore case."""
    assert found(client, text) == {directory[name]["id"] for name in who}


@pytest.mark.parametrize("text, who", [
    ('userName co "_"', {"a_b"}),
    ('userName eq "a_b"', {"a_b"}),
    ('userName sw "a_"', {"a_b"}),
    ('userName ew "_b"', {"a_b"}),
    ('userName co "%"', {"percent"}),
    ('userName sw "100%"', {"percent"}),
    ('userName ew "0%"', {"percent"}),
    ('userName sw "10"', {"percent", "thousand"}),
    ('userName co "\\\\"', {"backslash"}),
    ('userName eq "back\\\\slash"', {"backslash"}),
    ('userName sw "back\\\\"', {"backslash"}),
    ('displayName co "_"', {"a_b"}),
    ('displayName ew "%"', {"percent"}),
    ('displayName co "\\\\s"', {"backslash"}),
])
def test_wildcard_characters_are_literal(client, directory, text, who):
    """'%', '_' and '\\' in co/sw/ew values are ordinary characters, not patterns."""
    assert found(client, text) == {directory[name]["id"] for name in who}


@pytest.mark.parametrize("value", [
    'x\\" or \\"1\\"=\\"1',
    "'; DROP TABLE users; --",
    "' OR '1'='1",
    "x\\\") OR 1=1 --",
])
def test_sql_looking_values_match_nothing_and_harm_nothing(client, db, directory, value):
    before = snapshot(db)
    for text in ['userName eq "%s"' % value, 'displayName co "%s"' % value,
                 'externalId eq "%s"' % value, 'emails[value eq "%s"]' % value,
                 '%s:department eq "%s"' % (URN_ENT, value)]:
        assert found(client, text) == set(), text
    assert found(client, 'displayName eq "%s"' % value, "/Groups") == set()
    assert snapshot(db) == before
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"users", "groups", "members", "tokens"} <= tables
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == len(all_users(directory))


def test_ne_matches_users_without_the_attribute(client, directory):
    """RFC 7644 §3.4.2.2 ne: a resource without the attribute is "not equal"."""
    everyone = all_users(directory)
    assert found(client, 'title ne "Engineer"') == everyone - ids(directory["alice"])
    assert found(client, 'externalId ne "EXT-Alice"') == everyone - ids(directory["alice"])
    assert found(client, 'userName ne "ALICE@example.com"') == everyone - ids(directory["alice"])


def test_present_on_strings_ignores_empty_values(client, directory):
    """RFC 7644 §3.4.2.2 pr: "If the attribute has a non-empty value ... there is a match"."""
    assert found(client, "title pr") == ids(directory["alice"], directory["bob"])
    assert found(client, "externalId pr") == ids(directory["alice"], directory["bob"])
    assert found(client, "userName pr") == all_users(directory)


def test_present_on_complex_and_multi_valued(client, directory):
    pair = ids(directory["alice"], directory["bob"])
    assert found(client, "name pr") == pair
    assert found(client, "emails pr") == pair
    assert found(client, "emails.type pr") == pair
    assert found(client, "%s:manager pr" % URN_ENT) == ids(directory["bob"])
    assert found(client, "%s pr" % "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department") == pair


def test_not_matches_users_lacking_the_attribute(client, directory):
    """A comparison on an absent attribute is false, so not(...) of it is true."""
    everyone = all_users(directory)
    pair = ids(directory["alice"], directory["bob"])
    assert found(client, "not (title pr)") == everyone - pair
    assert found(client, "not (emails pr)") == everyone - pair
    assert found(client, "not (name pr)") == everyone - pair
    assert found(client, 'not (title eq "Engineer")') == everyone - ids(directory["alice"])
    assert found(client, 'not (name.familyName eq "smith")') == everyone - ids(directory["alice"])
    assert found(client, 'not (emails[type eq "home"])') == everyone - ids(directory["alice"])
    assert found(client, "not (active eq true)") == everyone - ids(directory["alice"])


def test_and_or_not_precedence_over_http(client, directory):
    alice, bob, anne = directory["alice"], directory["bob"], directory["anne"]
    # or binds loosest: (alice) or (bob and active false)
    assert found(client, 'userName eq "alice@example.com" or userName eq "bob@example.com" '
                         'and active eq false') == ids(alice, bob)
    assert found(client, 'userName eq "alice@example.com" or userName eq "bob@example.com" '
                         'and active eq true') == ids(alice)
    assert found(client, '(userName eq "alice@example.com" or userName eq "bob@example.com") '
                         'and active eq true') == ids(alice)
    assert found(client, 'userName sw "ä" or not (userName sw "a") and title pr') == ids(anne, bob)
    assert found(client, 'USERNAME EQ "axb" OR NOT (TITLE PR) AND ACTIVE EQ TRUE') == ids(directory["axb"])


def test_boolean_active(client, directory):
    assert found(client, "active eq true") == ids(directory["alice"])
    assert found(client, "active eq false") == ids(directory["bob"])
    assert found(client, "active ne true") == all_users(directory) - ids(directory["alice"])
    assert found(client, "active pr") == ids(directory["alice"], directory["bob"])


def _iso(moment):
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_ordering_operators_on_meta_dates(client, directory):
    """RFC 7644 §3.4.2.2 gt/ge/lt/le on meta.created and meta.lastModified."""
    body = client.get("/Users?count=1000").json
    created = {r["id"]: r["meta"]["created"] for r in body["Resources"]}
    modified = {r["id"]: r["meta"]["lastModified"] for r in body["Resources"]}
    pivot = created[directory["anne"]["id"]]
    assert found(client, 'meta.created ge "%s"' % pivot) == {i for i, c in created.items() if c >= pivot}
    assert found(client, 'meta.created gt "%s"' % pivot) == {i for i, c in created.items() if c > pivot}
    assert found(client, 'meta.created le "%s"' % pivot) == {i for i, c in created.items() if c <= pivot}
    assert found(client, 'meta.created lt "%s"' % pivot) == {i for i, c in created.items() if c < pivot}
    assert directory["anne"]["id"] in found(client, 'meta.created eq "%s"' % pivot)
    latest = max(modified.values())
    assert found(client, 'meta.lastModified gt "%s"' % latest) == set()
    assert found(client, 'meta.lastModified le "%s"' % latest) == all_users(directory)
    assert found(client, 'meta.lastModified gt "2000-01-01T00:00:00Z"') == all_users(directory)
    assert found(client, 'meta.lastModified lt "2000-01-01T00:00:00Z"') == set()


def test_date_comparisons_are_chronological_not_textual(client, directory):
    """RFC 7644 §3.4.2.2 gt/ge/lt/le: "for DateTime types, it is a chronological comparison".
    The same instant written without fractions or with an offset must compare equal."""
    alice = directory["alice"]
    stored = client.get("/Users/" + alice["id"]).json["meta"]["created"]
    moment = datetime.datetime.fromisoformat(stored.replace("Z", "+00:00"))
    whole_second = stored[:19] + "Z"                 # same second, earlier or equal instant
    plus_two = _iso(moment.astimezone(datetime.timezone(datetime.timedelta(hours=2))))
    minus_five = _iso(moment.astimezone(datetime.timezone(datetime.timedelta(hours=-5))))
    assert alice["id"] in found(client, 'meta.created ge "%s"' % whole_second)
    assert alice["id"] in found(client, 'meta.created ge "%s"' % plus_two)
    assert alice["id"] in found(client, 'meta.created le "%s"' % plus_two)
    assert alice["id"] in found(client, 'meta.created ge "%s"' % minus_five)
    assert alice["id"] in found(client, 'meta.created le "%s"' % minus_five)


def test_ordering_operators_on_strings_are_lexical_and_case_insensitive(client, directory):
    names = {key: value["userName"] for key, value in directory.items() if key != "groups"}
    folded = {key: scim_appliance.fold(name) for key, name in names.items()}
    assert found(client, 'userName gt "B"') == {
        directory[k]["id"] for k, n in folded.items() if n > "b"}
    assert found(client, 'userName ge "BOB@EXAMPLE.COM"') == {
        directory[k]["id"] for k, n in folded.items() if n >= "bob@example.com"}
    assert found(client, 'userName lt "b"') == {
        directory[k]["id"] for k, n in folded.items() if n < "b"}
    assert found(client, 'userName le "AXB"') == {
        directory[k]["id"] for k, n in folded.items() if n <= "axb"}
    assert found(client, 'title gt "f"') == ids(directory["bob"])
    assert found(client, 'title lt "F"') == ids(directory["alice"], directory["empty_title"])


@pytest.mark.parametrize("text, who", [
    ('%s:employeeNumber eq "1001"' % URN_ENT, {"alice"}),
    ('employeeNumber eq "1002"', {"bob"}),
    ('department eq "r&d"', {"alice"}),
    ('%s:department eq "SALES"' % URN_ENT, {"bob"}),
    ('department co "a"', {"bob"}),
    ('urn:ietf:params:scim:schemas:core:2.0:User:userName eq "ALICE@example.com"', {"alice"}),
    ('urn:ietf:params:scim:schemas:core:2.0:User:name.familyName eq "jones"', {"bob"}),
    ('name.familyName eq "SMITH"', {"alice"}),
    ('name.givenName sw "b"', {"bob"}),
])
def test_enterprise_and_qualified_attributes(client, directory, text, who):
    """RFC 7643 §4.3 enterprise extension; RFC 7644 §3.10 URN-qualified paths."""
    assert found(client, text) == {directory[name]["id"] for name in who}


def test_manager_filters(client, directory):
    """R25/R28: manager compared by its value, qualified or not, dotted or bare."""
    alice, bob = directory["alice"], directory["bob"]
    for text in ['manager eq "%s"', 'manager.value eq "%s"', '%s:manager.value eq "%%s"' % URN_ENT,
                 '%s:manager eq "%%s"' % URN_ENT, 'manager[value eq "%s"]']:
        assert found(client, text % alice["id"]) == ids(bob), text
        assert found(client, text % bob["id"]) == set(), text


def test_entra_reference_check_query(client, directory):
    """R28: GET /Users?filter=id eq X and manager eq Y&attributes=id."""
    alice, bob = directory["alice"], directory["bob"]
    body = search(client, 'id eq "%s" and manager eq "%s"' % (bob["id"], alice["id"]), attributes="id")
    assert body["totalResults"] == 1
    assert [r["id"] for r in body["Resources"]] == [bob["id"]]
    assert set(body["Resources"][0]) == {"schemas", "id"}
    body = search(client, 'id eq "%s" and manager eq "%s"' % (bob["id"], bob["id"]), attributes="id")
    assert body["totalResults"] == 0 and body["Resources"] == []
    body = search(client, 'id eq "%s" and manager eq "%s"' % (alice["id"], alice["id"]), attributes="id")
    assert body["totalResults"] == 0


def test_id_eq_is_case_exact(client, directory):
    alice = directory["alice"]
    assert found(client, 'id eq "%s"' % alice["id"]) == ids(alice)
    assert found(client, 'id eq "%s"' % alice["id"].upper()) == set()


def test_entra_email_value_path_filter(client, directory):
    """R12: emails[type eq "work"].value eq "user@contoso.com"."""
    alice, bob = directory["alice"], directory["bob"]
    assert found(client, 'emails[type eq "work"].value eq "alice@example.com"') == ids(alice)
    assert found(client, 'emails[type eq "work"].value eq "ALICE@EXAMPLE.COM"') == ids(alice)
    assert found(client, 'emails[type eq "work"].value eq "bob@example.org"') == ids(bob)
    # The work condition and the value must hold for the same e-mail.
    assert found(client, 'emails[type eq "work"].value eq "alice@home.org"') == set()
    assert found(client, 'emails[type eq "home"].value eq "alice@home.org"') == ids(alice)
    assert found(client, 'emails[TYPE eq "WORK"].Value eq "bob@example.org"') == ids(bob)


def test_value_path_filters_over_http(client, directory):
    alice, bob = directory["alice"], directory["bob"]
    assert found(client, 'emails[type eq "work" and value co "@example.org"]') == ids(bob)
    assert found(client, 'emails[type eq "home" or value ew ".org"]') == ids(alice, bob)
    assert found(client, 'emails[primary eq true]') == ids(alice)
    assert found(client, 'emails[not (type eq "work")]') == ids(alice)
    assert found(client, 'emails[type eq "home" and value co "example.com"]') == set()


def test_multi_valued_without_sub_attribute_compares_value(client, directory):
    """RFC 7644 §3.4.2.2: emails co "@example.com" compares each e-mail's value."""
    alice, bob = directory["alice"], directory["bob"]
    assert found(client, 'emails co "@example.com"') == ids(alice)
    assert found(client, 'emails co "@EXAMPLE."') == ids(alice, bob)
    assert found(client, 'emails eq "alice@home.org"') == ids(alice)
    assert found(client, 'emails.value eq "bob@example.org"') == ids(bob)
    assert found(client, 'emails.type eq "home"') == ids(alice)


def test_group_filters(client, directory):
    """R12: groups are queried by displayName (case-insensitive) and externalId."""
    groups = directory["groups"]
    alice, bob = directory["alice"], directory["bob"]
    assert found(client, 'displayName eq "sales"', "/Groups") == ids(groups["sales"])
    assert found(client, 'displayName eq "SALES"', "/Groups") == ids(groups["sales"])
    assert found(client, 'displayName sw "eng"', "/Groups") == ids(groups["eng"])
    assert found(client, 'displayName co "GROUP"', "/Groups") == ids(groups["empty"])
    assert found(client, 'externalId eq "G-Sales"', "/Groups") == ids(groups["sales"])
    assert found(client, 'externalId eq "g-sales"', "/Groups") == set()
    assert found(client, 'members[value eq "%s"]' % alice["id"], "/Groups") == ids(groups["sales"], groups["eng"])
    assert found(client, 'members[value eq "%s"]' % bob["id"], "/Groups") == ids(groups["sales"])
    assert found(client, 'members.value eq "%s"' % bob["id"], "/Groups") == ids(groups["sales"])
    assert found(client, 'members eq "%s"' % bob["id"], "/Groups") == ids(groups["sales"])
    assert found(client, "members pr", "/Groups") == ids(groups["sales"], groups["eng"])
    assert found(client, "not (members pr)", "/Groups") == ids(groups["empty"])
    assert found(client, 'displayName eq "Sales" and members[value eq "%s"]' % bob["id"],
                 "/Groups") == ids(groups["sales"])
    assert found(client, 'meta.resourceType eq "Group"', "/Groups") == ids(*groups.values())


def test_entra_group_query_without_members(client, directory):
    """R20: GET /Groups?excludedAttributes=members&filter=displayName eq "..."."""
    body = search(client, 'displayName eq "sales"', "/Groups", excludedAttributes="members")
    assert body["totalResults"] == 1
    assert body["Resources"][0]["id"] == directory["groups"]["sales"]["id"]
    assert "members" not in body["Resources"][0]


def test_user_groups_value_filter(client, directory):
    """RFC 7643 §4.1.2 groups (computed from memberships) can be filtered."""
    groups = directory["groups"]
    alice, bob = directory["alice"], directory["bob"]
    assert found(client, 'groups.value eq "%s"' % groups["sales"]["id"]) == ids(alice, bob)
    assert found(client, 'groups.value eq "%s"' % groups["eng"]["id"]) == ids(alice)
    assert found(client, 'groups.value eq "%s"' % groups["empty"]["id"]) == set()
    assert found(client, 'groups[display eq "engineering"]') == ids(alice)
    assert found(client, "groups pr") == ids(alice, bob)


def test_meta_resource_type_filter(client, directory):
    assert found(client, 'meta.resourceType eq "User"') == all_users(directory)
    assert found(client, 'meta.resourceType eq "Group"') == set()


# -- sorting and paging ------------------------------------------------------------

def test_filter_with_sort_ascending_and_descending(client, directory):
    """RFC 7644 §3.4.2.3: sortBy is case-insensitive for caseExact false strings."""
    wanted = ["a_b", "alice@example.com", "axb", "Bob@Example.com"]
    text = 'userName sw "a" or userName sw "b" and not (userName sw "back") and not (userName sw "bl")'
    body = search(client, text, sortBy="userName")
    assert [r["userName"] for r in body["Resources"]] == wanted
    body = search(client, text, sortBy="userName", sortOrder="descending")
    assert [r["userName"] for r in body["Resources"]] == wanted[::-1]
    body = search(client, text, sortBy="displayName", sortOrder="DESCENDING")
    assert [r["userName"] for r in body["Resources"]] == ["Bob@Example.com", "axb", "alice@example.com", "a_b"]


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_sort_places_missing_values_by_sort_order(client, directory, order):
    """RFC 7644 §3.4.2.3: resources with no data for sortBy "are ordered last if
    ascending and first if descending"."""
    body = search(client, 'userName sw "a" or userName sw "b" or userName sw "ä"',
                  sortBy="title", sortOrder=order)
    titles = [r.get("title") for r in body["Resources"]]
    assert len(titles) == 8
    present = [t for t in titles if t is not None]
    assert present == sorted(["Engineer", "Manager", ""], reverse=order == "descending")
    if order == "ascending":
        assert titles == present + [None] * 5
    else:
        assert titles == [None] * 5 + present


def test_filter_sort_and_pagination(client, directory):
    """RFC 7644 §3.4.2.4: totalResults counts every match; a page holds at most count."""
    text = "not (title pr)"
    everything = search(client, text, sortBy="userName")["Resources"]
    assert len(everything) == 8
    body = search(client, text, sortBy="userName", startIndex=3, count=2)
    assert body["totalResults"] == 8
    assert body["startIndex"] == 3
    assert body["itemsPerPage"] == 2
    assert [r["id"] for r in body["Resources"]] == [r["id"] for r in everything[2:4]]
    body = search(client, text, sortBy="userName", startIndex=8, count=5)
    assert [r["id"] for r in body["Resources"]] == [everything[7]["id"]]
    body = search(client, text, sortBy="userName", startIndex=9)
    assert body["totalResults"] == 8 and body["Resources"] == []


@pytest.mark.parametrize("sort_by", ["password", "nosuch", "name", "members"])
def test_sort_by_unusable_attribute_is_400(client, directory, sort_by):
    response = client.get("/Users?" + query_string(sortBy=sort_by), status=400)
    assert response.json["scimType"] == "invalidValue"


def test_sort_to_sql_orders_by_indexed_or_folded_values():
    assert scim_appliance.sort_to_sql(USER, None, False) == "users.rowid"
    assert scim_appliance.sort_to_sql(USER, "userName", False) == (
        "(users.user_name_key IS NULL) ASC, users.user_name_key ASC, users.rowid")
    assert "scim_fold" in scim_appliance.sort_to_sql(USER, "displayName", True)
    assert "scim_fold" not in scim_appliance.sort_to_sql(USER, "externalId", False)
    with pytest.raises(ScimError) as info:
        scim_appliance.sort_to_sql(USER, "password", False)
    assert info.value.status == 400


# -- POST .search ------------------------------------------------------------------

def test_post_users_search(client, directory):
    """RFC 7644 §3.4.3: POST /Users/.search with a SearchRequest."""
    response = client.post("/Users/.search", {
        "schemas": [URN_SEARCH], "filter": 'emails co "@example." or title pr',
        "attributes": ["userName"], "sortBy": "userName", "sortOrder": "descending",
        "startIndex": 2, "count": 1}, status=200)
    assert response.content_type == "application/scim+json"
    body = response.json
    assert body["schemas"] == [URN_LIST]
    assert body["totalResults"] == 2   # blank@example.com has title "" (not present)
    assert body["itemsPerPage"] == 1 and body["startIndex"] == 2
    # Descending by userName: Bob@Example.com, then alice@example.com (page 2 of size 1).
    assert [r["userName"] for r in body["Resources"]] == ["alice@example.com"]
    assert all(set(r) == {"schemas", "id", "userName"} for r in body["Resources"])


def test_post_groups_search(client, directory):
    body = client.post("/Groups/.search", {"schemas": [URN_SEARCH],
                                           "filter": 'displayName eq "ENGINEERING"'}, status=200).json
    assert [r["id"] for r in body["Resources"]] == [directory["groups"]["eng"]["id"]]


def test_root_search_returns_users_and_groups(client, db):
    """RFC 7644 §3.4.3: POST /.search at the root spans every resource type."""
    users = [created_user(client, db, "root%d@example.com" % i, displayName="Root %d" % i)
             for i in range(3)]
    groups = [created_group(client, db, "Root group %d" % i) for i in range(2)]
    search_all = {"schemas": [URN_SEARCH], "filter": 'displayName sw "root"'}
    body = client.post("/.search", search_all, status=200).json
    assert body["totalResults"] == 5
    assert [r["id"] for r in body["Resources"]] == [r["id"] for r in users + groups]
    assert [r["meta"]["resourceType"] for r in body["Resources"]] == ["User"] * 3 + ["Group"] * 2
    page = client.post("/.search", dict(search_all, startIndex=3, count=2), status=200).json
    assert page["totalResults"] == 5 and page["itemsPerPage"] == 2 and page["startIndex"] == 3
    assert [r["id"] for r in page["Resources"]] == [users[2]["id"], groups[0]["id"]]
    page = client.post("/.search", dict(search_all, startIndex=5, count=10), status=200).json
    assert [r["id"] for r in page["Resources"]] == [groups[1]["id"]]
    page = client.post("/.search", dict(search_all, startIndex=2, count=0), status=200).json
    assert page["totalResults"] == 5 and page["Resources"] == []


def test_root_search_filters_by_resource_type(client, db):
    user = created_user(client, db, "solo@example.com", displayName="Solo")
    group = created_group(client, db, "Solo group")
    body = client.post("/.search", {"schemas": [URN_SEARCH],
                                    "filter": 'meta.resourceType eq "Group"'}, status=200).json
    assert [r["id"] for r in body["Resources"]] == [group["id"]]
    # An attribute only users have selects only users.
    body = client.post("/.search", {"schemas": [URN_SEARCH],
                                    "filter": 'userName eq "SOLO@example.com"'}, status=200).json
    assert [r["id"] for r in body["Resources"]] == [user["id"]]
    body = client.get("?" + query_string(filter='displayName co "solo"')).json
    assert {r["id"] for r in body["Resources"]} == {user["id"], group["id"]}


# ==============================================================================
# filter_matches (the in-memory evaluator used by PATCH value paths)
# ==============================================================================

EMAILS = scim_appliance.USER_SCHEMA.attribute("emails")

ITEMS = {
    "A": {"value": "Alice@Example.com", "type": "work", "primary": True},
    "B": {"value": "alice@home.org", "type": "home"},
    "C": {"value": "100%_x@example.com"},
    "D": {"value": "z@EXAMPLE.COM", "type": "WORK", "primary": False},
}

ITEM_FILTERS = [
    ('type eq "work"', "AD"),
    ('TYPE eq "Work"', "AD"),
    ('type ne "work"', "BC"),
    ('not (type eq "work")', "BC"),
    ("type pr", "ABD"),
    ("not (type pr)", "C"),
    ("type eq null", "C"),
    ("type ne null", "ABD"),
    ('value co "example.com"', "ACD"),
    ('value sw "ALICE"', "AB"),
    ('value ew ".COM"', "ACD"),
    ('value co "%_"', "C"),
    ('value co "_"', "C"),
    ('value gt "b"', "D"),
    ('value le "alice@home.org"', "ABC"),
    ("primary eq true", "A"),
    ("primary eq false", "D"),
    ("primary ne true", "BCD"),
    ('type eq "work" and primary eq true', "A"),
    ('type eq "home" or value sw "z"', "BD"),
    ('not (type eq "home" or value sw "z")', "AC"),
]


@pytest.mark.parametrize("text, expected", ITEM_FILTERS)
def test_filter_matches_items(text, expected):
    tree = parse_filter(text)
    assert {key for key, item in ITEMS.items() if filter_matches(tree, item, EMAILS)} == set(expected)


def test_filter_matches_agrees_with_sql(client, db):
    """The evaluator PATCH uses and the SQL translation pick the same items."""
    owners = {key: created_user(client, db, "owner-%s" % key, emails=[item])
              for key, item in ITEMS.items()}
    for text, expected in ITEM_FILTERS:
        via_sql = found(client, "emails[%s]" % text)
        via_sql_keys = {key for key, user in owners.items() if user["id"] in via_sql}
        in_memory = {key for key, item in ITEMS.items()
                     if filter_matches(parse_filter(text), item, EMAILS)}
        assert via_sql_keys == in_memory == set(expected), text


def test_filter_matches_rejects_what_sql_rejects():
    with pytest.raises(ScimError) as info:
        filter_matches(parse_filter("primary gt true"), ITEMS["A"], EMAILS)
    assert info.value.status == 400 and info.value.scim_type == "invalidFilter"
    with pytest.raises(ScimError) as info:
        filter_matches(parse_filter('nosuch eq "x"'), ITEMS["A"], EMAILS)
    assert info.value.status == 400
    with pytest.raises(ScimError) as info:
        filter_matches(parse_filter('value co null'), ITEMS["A"], EMAILS)
    assert info.value.scim_type == "invalidFilter"


def test_filter_matches_members_attribute():
    members = scim_appliance.GROUP_SCHEMA.attribute("members")
    tree = parse_filter('value eq "abc"')
    assert filter_matches(tree, {"value": "abc"}, members) is True
    assert filter_matches(tree, {"value": "ABC"}, members) is False   # members.value is caseExact
    assert filter_matches(parse_filter('type eq "user"'), {"value": "x", "type": "User"}, members) is True


@pytest.mark.parametrize("text", [
    'userName eq 01',                                   # JSON numbers have no leading zero
    'userName eq "\\ud800"',                          # a lone surrogate
    'meta.lastModified gt "2020-13-45T00:00:00Z"',      # shaped like a date, but no date
    'meta.created eq "2021-02-30T00:00:00Z"',
    'meta.created lt "yesterday"',
    'userName eq 1\u0661',                             # a digit to \\d, not to JSON (fuzzing)
    'userName eq 1e\u0661',
    'meta.created gt "9999-12-31T23:59:59-01:00"',      # past the last representable instant
    'meta.created lt "0001-01-01T00:00:00+01:00"',
    'meta.created eq "\u0662\u0660\u0662\u0660-01-01T00:00:00Z"',
])
def test_filters_that_once_crashed_are_invalid_filter(client, text):
    """Found by review and fuzzing: each of these was a 500."""
    response = client.get("/Users?filter=" + urllib.parse.quote(text), status="*")
    assert_invalid_filter_response(response)
