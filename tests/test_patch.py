"""PATCH: RFC 7644 §3.5.2 and every form Microsoft Entra ID sends
(entra-requirements.md R6, R16-R18, R21-R23, R25-R27, R29, R37-R40).

The pure engine (`parse_path`, `read_patch_request`, `apply_patch`) is tested
on plain dict documents; PATCH /scim/Users/{id} and /scim/Groups/{id} are
tested through HTTP with Microsoft's request bodies, checking the response
and what was stored.
"""

import copy
import json

import pytest

import scim_appliance
from scim_appliance import GROUP, URN_ENTERPRISE, URN_GROUP, URN_PATCH, URN_USER, USER, ScimError
from conftest import assert_scim_error, stored_document, stored_members

CUSTOM = "urn:ietf:params:scim:schemas:extension:CustomExtension:2.0:User"
LOCATION = "https://scim.example.com/scim"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def patch_body(*operations):
    return {"schemas": [URN_PATCH], "Operations": list(operations)}


def patched(document, *operations, resource_type=USER):
    """The document after `operations`, through read_patch_request + apply_patch."""
    new, _ = scim_appliance.apply_patch(resource_type, document,
                                        scim_appliance.read_patch_request(patch_body(*operations)))
    return new


def patch_error(document, *operations, resource_type=USER):
    with pytest.raises(ScimError) as info:
        scim_appliance.apply_patch(resource_type, document,
                                   scim_appliance.read_patch_request(patch_body(*operations)))
    return info.value


def user_state(db, user_id):
    """Everything PATCH may change on a user row, as stored (document as raw text)."""
    row = db.execute("SELECT document, version, last_modified, user_name, external_id, display_name, "
                     "active, password_digest FROM users WHERE id = ?", (user_id,)).fetchone()
    return None if row is None else dict(row)


def group_state(db, group_id):
    row = db.execute("SELECT document, version, last_modified, display_name, external_id "
                     "FROM groups WHERE id = ?", (group_id,)).fetchone()
    state = dict(row)
    state["members"] = stored_members(db, group_id)
    return state


def stored_version(db, table, resource_id):
    return db.execute("SELECT version FROM %s WHERE id = ?" % table, (resource_id,)).fetchone()[0]





def raw_patch(client, path, body, status=None, **kw):
    """PATCH with `body` sent exactly as given (key order kept)."""
    return client.request("PATCH", path, body, status=status, **kw)


def document_user():
    return {
        "userName": "ada@example.com",
        "displayName": "Ada Lovelace",
        "name": {"givenName": "Ada", "familyName": "Lovelace", "formatted": "Ada Lovelace"},
        "emails": [{"value": "ada@work.example", "type": "work", "primary": True},
                   {"value": "ada@home.example", "type": "home"}],
        "addresses": [{"type": "work", "postalCode": "10115", "locality": "Berlin"},
                      {"type": "home", "postalCode": "80331", "locality": "Munich"}],
        "active": True,
        URN_ENTERPRISE: {"employeeNumber": "701", "department": "R&D"},
    }


@pytest.fixture
def user(client):
    """A user as Entra creates it (R7 shape), with a work and a home e-mail."""
    return client.create_user(
        "Test_User_00aa00aa@testuser.com",
        externalId="0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
        active=True,
        displayName="Ada Lovelace",
        name={"formatted": "givenName familyName", "familyName": "familyName", "givenName": "givenName"},
        emails=[{"primary": True, "type": "work", "value": "ada@work.example"},
                {"type": "home", "value": "ada@home.example"}],
        roles=[],
    )


@pytest.fixture
def manager(client):
    return client.create_user("boss@testuser.com", displayName="The Boss")


@pytest.fixture
def users(client):
    """Three users to use as group members."""
    return [client.create_user("member%d@testuser.com" % n, displayName="Member %d" % n)["id"]
            for n in range(3)]


@pytest.fixture
def group(client):
    return client.create_group("Engineering", externalId="8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159")


# ===========================================================================
# 1. parse_path and read_patch_request
# ===========================================================================

@pytest.mark.parametrize("text, attribute, sub, urn, filtered, filter_sub", [
    ("displayName", "displayName", None, URN_USER, False, None),
    ("DISPLAYNAME", "displayName", None, URN_USER, False, None),
    ("name.givenName", "name", "givenName", URN_USER, False, None),
    ("urn:ietf:params:scim:schemas:core:2.0:User:name.familyName", "name", "familyName", URN_USER, False, None),
    ('emails[type eq "work"]', "emails", None, URN_USER, True, None),
    ('emails[type eq "work"].value', "emails", None, URN_USER, True, "value"),
    ('emails[Type eq "work"].Value', "emails", None, URN_USER, True, "value"),
    ('addresses[type eq "other"].Formatted', "addresses", None, URN_USER, True, "formatted"),
    ("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber", "employeeNumber", None,
     URN_ENTERPRISE, False, None),
    ("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager", "manager", None,
     URN_ENTERPRISE, False, None),
    ("manager", "manager", None, URN_ENTERPRISE, False, None),
    ('manager[value eq "abc"]', "manager", None, URN_ENTERPRISE, True, None),
    (CUSTOM + ":costCode", "costCode", None, CUSTOM, False, None),
])
def test_parse_path_resolves_attribute_filter_and_sub_attribute(text, attribute, sub, urn, filtered, filter_sub):
    """RFC 7644 §3.5.2: PATH = attrPath / valuePath [subAttr]; names are case-insensitive."""
    parsed = scim_appliance.parse_path(USER, text)
    assert parsed.path.attribute.name == attribute
    assert (parsed.path.sub_attribute.name if parsed.path.sub_attribute else None) == sub
    assert parsed.path.urn.lower() == urn.lower()
    assert (parsed.value_filter is not None) == filtered
    assert (parsed.filter_sub.name if parsed.filter_sub else None) == filter_sub


@pytest.mark.parametrize("text", [
    "nonexistentAttribute",
    "name.nickName",
    "displayName.value",
    'displayName[value eq "x"]',
    'emails[type eq "work"',
    'emails[type eq]',
    'emails[type eq "work"].nope',
    'emails[type eq "work"]value',
    "urn:ietf:params:scim:schemas:core:2.0:User:nope",
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:nope",
    "1abc",
    "",
])
def test_parse_path_rejects_paths_that_name_nothing_with_invalid_path(text):
    """RFC 7644 §3.5.2: an unresolvable path → 400 invalidPath."""
    with pytest.raises(ScimError) as info:
        scim_appliance.parse_path(USER, text)
    assert info.value.status == 400
    assert info.value.scim_type == "invalidPath"


def test_parse_path_on_group_members_filter():
    """R40 flag form: members[value eq "id"] is a value path on Group.members."""
    parsed = scim_appliance.parse_path(GROUP, 'members[value eq "7f4bc1a3"]')
    assert parsed.path.attribute.name == "members"
    assert parsed.value_filter is not None


@pytest.mark.parametrize("op", ["Add", "Replace", "Remove", "add", "REPLACE", "rEmOvE"])
def test_read_patch_request_accepts_op_in_any_case(op):
    """R6: op values are case-insensitive; Entra sends Add/Replace/Remove."""
    operations = scim_appliance.read_patch_request(patch_body({"op": op, "path": "displayName", "value": "x"}))
    assert operations == [(op.lower(), "displayName", "x", True)]


def test_read_patch_request_accepts_operations_before_schemas_and_keeps_order():
    """R18 tutorial body has Operations before schemas; operations apply in order."""
    body = {"Operations": [{"op": "Replace", "path": "active", "value": False},
                           {"op": "Remove", "path": "title"}],
            "schemas": [URN_PATCH]}
    assert scim_appliance.read_patch_request(body) == [("replace", "active", False, True),
                                                       ("remove", "title", None, False)]


@pytest.mark.parametrize("body, scim_type", [
    ({"schemas": [URN_PATCH]}, "invalidSyntax"),
    ({"schemas": [URN_PATCH], "Operations": []}, "invalidSyntax"),
    ({"schemas": [URN_PATCH], "Operations": {"op": "add"}}, "invalidSyntax"),
    ({"schemas": [URN_PATCH], "Operations": ["add"]}, "invalidSyntax"),
    ({"schemas": [URN_PATCH], "Operations": [{"path": "displayName", "value": "x"}]}, "invalidSyntax"),
    ({"schemas": [URN_PATCH], "Operations": [{"op": "merge", "path": "displayName", "value": "x"}]},
     "invalidSyntax"),
    ({"schemas": [URN_PATCH], "Operations": [{"op": 1, "path": "displayName", "value": "x"}]},
     "invalidSyntax"),
    ({"schemas": [URN_PATCH], "Operations": [{"op": "add", "path": 5, "value": "x"}]}, "invalidPath"),
    ([{"op": "add", "path": "displayName", "value": "x"}], "invalidSyntax"),
])
def test_read_patch_request_rejects_malformed_bodies(body, scim_type):
    """RFC 7644 §3.5.2: "Operations" is a non-empty array of {op, path, value}."""
    with pytest.raises(ScimError) as info:
        scim_appliance.read_patch_request(body)
    assert info.value.status == 400
    assert info.value.scim_type == scim_type


# ===========================================================================
# 2. apply_patch on documents
# ===========================================================================

def test_apply_patch_leaves_the_input_document_untouched():
    """apply_patch is pure: a new document out, the original unchanged."""
    original = document_user()
    before = copy.deepcopy(original)
    new = patched(original, {"op": "replace", "path": "name.givenName", "value": "Augusta"},
                  {"op": "add", "path": "emails", "value": [{"value": "a@b.c", "type": "other"}]},
                  {"op": "remove", "path": URN_ENTERPRISE + ":department"})
    assert original == before
    assert new["name"]["givenName"] == "Augusta"


@pytest.mark.parametrize("operation, expected", [
    ({"op": "replace", "path": "displayName", "value": "Countess"}, "Countess"),
    ({"op": "add", "path": "displayName", "value": "Countess"}, "Countess"),
    ({"op": "remove", "path": "displayName"}, None),
    ({"op": "replace", "path": "displayName", "value": None}, None),
])
def test_simple_attribute_add_replace_remove(operation, expected):
    """RFC 7644 §3.5.2.1-3 on a single-valued simple attribute; null = unassigned."""
    new = patched(document_user(), operation)
    assert new.get("displayName") == expected
    assert new["userName"] == "ada@example.com"


def test_add_on_single_valued_attribute_without_value_sets_it():
    """R21 / RFC 7644 §3.5.2.1: add on a single-valued attribute replaces/sets it."""
    new = patched(document_user(), {"op": "Add", "path": "nickName", "value": "Babs"})
    assert new["nickName"] == "Babs"


@pytest.mark.parametrize("op", ["add", "replace"])
def test_sub_attribute_path_sets_only_that_sub_attribute(op):
    """name.givenName sets one sub-attribute; the others stay."""
    new = patched(document_user(), {"op": op, "path": "name.givenName", "value": "Augusta"})
    assert new["name"] == {"givenName": "Augusta", "familyName": "Lovelace", "formatted": "Ada Lovelace"}


def test_sub_attribute_path_creates_the_complex_attribute_when_absent():
    document = document_user()
    del document["name"]
    new = patched(document, {"op": "add", "path": "name.familyName", "value": "Byron"})
    assert new["name"] == {"familyName": "Byron"}


def test_remove_sub_attribute_keeps_siblings_and_drops_an_emptied_parent():
    new = patched(document_user(), {"op": "remove", "path": "name.formatted"})
    assert new["name"] == {"givenName": "Ada", "familyName": "Lovelace"}
    new = patched({"userName": "x", "name": {"givenName": "Ada"}},
                  {"op": "remove", "path": "name.givenName"})
    assert "name" not in new


@pytest.mark.parametrize("op", ["replace", "add"])
def test_complex_attribute_with_object_value_merges_sub_attributes(op):
    """RFC 7644 §3.5.2.3: "Sub-attributes that are not specified in the value
    parameter are left unchanged"."""
    new = patched(document_user(), {"op": op, "path": "name", "value": {"givenName": "Augusta", "middleName": "A."}})
    assert new["name"] == {"givenName": "Augusta", "middleName": "A.", "familyName": "Lovelace",
                           "formatted": "Ada Lovelace"}


def test_remove_complex_attribute_removes_it_whole():
    new = patched(document_user(), {"op": "remove", "path": "name"})
    assert "name" not in new


def test_multi_valued_add_appends_new_values():
    """RFC 7644 §3.5.2.1: add on a multi-valued attribute adds the new values."""
    new = patched(document_user(), {"op": "add", "path": "emails",
                                    "value": [{"value": "ada@other.example", "type": "other"}]})
    assert new["emails"] == document_user()["emails"] + [{"value": "ada@other.example", "type": "other"}]


def test_multi_valued_add_does_not_duplicate_an_identical_value():
    """RFC 7644 §3.5.2.1: an identical value already present is not added twice."""
    new = patched(document_user(), {"op": "add", "path": "emails",
                                    "value": [{"value": "ada@home.example", "type": "home"}]})
    assert new["emails"] == document_user()["emails"]


def test_multi_valued_add_of_identical_primary_value_keeps_it_primary():
    """Re-adding the current primary e-mail verbatim changes nothing (§3.5.2.1
    "no change"); it must not clear its own primary flag."""
    new = patched(document_user(), {"op": "add", "path": "emails",
                                    "value": [{"value": "ada@work.example", "type": "work", "primary": True}]})
    assert new["emails"] == document_user()["emails"]


def test_multi_valued_replace_replaces_all_values():
    """RFC 7644 §3.5.2.3: replace without a filter replaces the whole list."""
    new = patched(document_user(), {"op": "replace", "path": "emails",
                                    "value": [{"value": "only@example.com", "type": "work"}]})
    assert new["emails"] == [{"value": "only@example.com", "type": "work"}]


def test_multi_valued_remove_without_filter_removes_all_values():
    """RFC 7644 §3.5.2.2: remove of a multi-valued attribute without filter removes all."""
    new = patched(document_user(), {"op": "remove", "path": "emails"})
    assert "emails" not in new


def test_multi_valued_remove_with_value_list_removes_only_those():
    new = patched(document_user(), {"op": "remove", "path": "emails",
                                    "value": [{"value": "ada@home.example"}]})
    assert new["emails"] == [{"value": "ada@work.example", "type": "work", "primary": True}]


def test_value_filter_replace_replaces_only_matching_values():
    """RFC 7644 §3.5.2.3: with a valuePath, all matching records are replaced."""
    new = patched(document_user(), {"op": "replace", "path": 'emails[type eq "work"]',
                                    "value": {"value": "new@work.example", "type": "work"}})
    assert new["emails"] == [{"value": "new@work.example", "type": "work"},
                             {"value": "ada@home.example", "type": "home"}]


def test_value_filter_remove_removes_only_matching_values():
    """RFC 7644 §3.5.2.2: remove with a valuePath removes the matching values."""
    new = patched(document_user(), {"op": "remove", "path": 'emails[type eq "work"]'})
    assert new["emails"] == [{"value": "ada@home.example", "type": "home"}]


@pytest.mark.parametrize("path", ['emails[type eq "work"].value', 'emails[Type eq "WORK"].Value'])
def test_value_filter_sub_attribute_replace_changes_only_the_matching_value(path):
    """R16/R29: Replace on emails[type eq "work"].value leaves other e-mails alone."""
    new = patched(document_user(), {"op": "Replace", "path": path, "value": "updatedEmail@microsoft.com"})
    assert new["emails"] == [{"value": "updatedEmail@microsoft.com", "type": "work", "primary": True},
                             {"value": "ada@home.example", "type": "home"}]


def test_value_filter_sub_attribute_on_addresses():
    """Default mapping addresses[type eq "work"].postalCode (R29)."""
    new = patched(document_user(), {"op": "replace", "path": 'addresses[type eq "work"].postalCode',
                                    "value": "98052"})
    assert new["addresses"] == [{"type": "work", "postalCode": "98052", "locality": "Berlin"},
                                {"type": "home", "postalCode": "80331", "locality": "Munich"}]


def test_value_filter_sub_attribute_add_creates_the_entry_when_absent():
    """R29: Add on emails[type eq "work"].value without a work e-mail creates it."""
    document = {"userName": "x", "emails": [{"value": "h@home.example", "type": "home"}]}
    new = patched(document, {"op": "Add", "path": 'emails[type eq "work"].value', "value": "w@work.example"})
    assert new["emails"] == [{"value": "h@home.example", "type": "home"},
                             {"type": "work", "value": "w@work.example"}]


def test_several_adds_on_work_address_sub_attributes_build_one_address():
    """R29: Adds on addresses[type eq "work"].formatted/.locality/.region build ONE address."""
    new = patched({"userName": "x"},
                  {"op": "Add", "path": 'addresses[type eq "work"].formatted', "value": "1 Main St, Redmond"},
                  {"op": "Add", "path": 'addresses[type eq "work"].locality', "value": "Redmond"},
                  {"op": "Add", "path": 'addresses[type eq "work"].region', "value": "WA"})
    assert new["addresses"] == [{"type": "work", "formatted": "1 Main St, Redmond",
                                 "locality": "Redmond", "region": "WA"}]


def test_remove_of_filtered_value_carrying_that_value_removes_the_entry():
    """R29: {"op":"Remove","path":"emails[type eq \\"work\\"].value","value":"…"}."""
    new = patched(document_user(), {"op": "Remove", "path": 'emails[type eq "work"].value',
                                    "value": "ada@work.example"})
    assert new["emails"] == [{"value": "ada@home.example", "type": "home"}]


def test_value_filter_without_match_and_without_eq_seed_is_no_target():
    """RFC 7644 §3.5.2.3: no record matched by a valuePath → 400 noTarget."""
    error = patch_error(document_user(), {"op": "replace", "path": 'emails[value co "nobody"].display',
                                          "value": "x"})
    assert (error.status, error.scim_type) == (400, "noTarget")


@pytest.mark.parametrize("op", ["add", "replace"])
def test_enterprise_extension_path_sets_attribute_under_its_urn(op):
    """R22/R24: URN-qualified enterprise paths live under the extension object."""
    new = patched(document_user(), {"op": op, "path": URN_ENTERPRISE + ":employeeNumber", "value": "Eqpj"})
    assert new[URN_ENTERPRISE] == {"employeeNumber": "Eqpj", "department": "R&D"}


def test_extension_urn_and_attribute_names_are_case_insensitive():
    """RFC 7643 §2.1: names are case-insensitive; the stored key stays canonical."""
    new = patched(document_user(), {"op": "replace", "path": URN_ENTERPRISE.lower() + ":EMPLOYEENUMBER",
                                    "value": "9"})
    assert new[URN_ENTERPRISE] == {"employeeNumber": "9", "department": "R&D"}
    assert set(new) == set(document_user())


def test_enterprise_extension_path_creates_and_removal_drops_empty_extension():
    new = patched({"userName": "x"}, {"op": "add", "path": URN_ENTERPRISE + ":employeeNumber", "value": "7"})
    assert new == {"userName": "x", URN_ENTERPRISE: {"employeeNumber": "7"}}
    new = patched(new, {"op": "remove", "path": URN_ENTERPRISE + ":employeeNumber"})
    assert new == {"userName": "x"}


def test_custom_extension_urn_path_add_replace_remove():
    """Entra custom mappings: urn:…:CustomExtension:2.0:User:costCode is kept under its URN."""
    new = patched({"userName": "x"}, {"op": "add", "path": CUSTOM + ":costCode", "value": "CC-1"})
    assert new == {"userName": "x", CUSTOM: {"costCode": "CC-1"}}
    new = patched(new, {"op": "replace", "path": CUSTOM + ":costCode", "value": "CC-2"},
                  {"op": "add", "path": CUSTOM + ":region", "value": "EMEA"})
    assert new[CUSTOM] == {"costCode": "CC-2", "region": "EMEA"}
    new = patched(new, {"op": "remove", "path": CUSTOM + ":costCode"},
                  {"op": "remove", "path": CUSTOM + ":region"})
    assert new == {"userName": "x"}


def test_pathless_add_with_object_value_adds_each_attribute():
    """RFC 7644 §3.5.2.1: without path, value is a set of attributes to add."""
    new = patched(document_user(), {"op": "add", "value": {
        "nickName": "Babs",
        "emails": [{"value": "ada@other.example", "type": "other"}],
        "name": {"middleName": "King"},
        URN_ENTERPRISE: {"costCenter": "4711"},
    }})
    assert new["nickName"] == "Babs"
    assert new["emails"] == document_user()["emails"] + [{"value": "ada@other.example", "type": "other"}]
    assert new["name"] == {"givenName": "Ada", "familyName": "Lovelace", "formatted": "Ada Lovelace",
                           "middleName": "King"}
    assert new[URN_ENTERPRISE] == {"employeeNumber": "701", "department": "R&D", "costCenter": "4711"}


def test_pathless_replace_with_object_value_replaces_each_attribute():
    """RFC 7644 §3.5.2.3: without path, each attribute in value is replaced."""
    new = patched(document_user(), {"op": "replace", "value": {
        "displayName": "Countess",
        "emails": [{"value": "only@example.com", "type": "work"}],
        CUSTOM: {"costCode": "CC-9"},
    }})
    assert new["displayName"] == "Countess"
    assert new["emails"] == [{"value": "only@example.com", "type": "work"}]
    assert new[CUSTOM] == {"costCode": "CC-9"}
    assert new["name"] == document_user()["name"]


def test_pathless_replace_with_dotted_and_urn_keys_sets_those_paths():
    """R23: keys of a path-less value are attribute paths."""
    new = patched(document_user(), {"op": "replace", "value": {
        "displayName": "Bjfe", "name.givenName": "Kkom", "name.familyName": "Unua",
        URN_ENTERPRISE + ":employeeNumber": "Aklq"}})
    assert new["displayName"] == "Bjfe"
    assert new["name"] == {"givenName": "Kkom", "familyName": "Unua", "formatted": "Ada Lovelace"}
    assert new[URN_ENTERPRISE] == {"employeeNumber": "Aklq", "department": "R&D"}
    assert "name.givenName" not in new and URN_ENTERPRISE + ":employeeNumber" not in new


def test_pathless_replace_with_urn_qualified_manager_object_sets_the_manager():
    """R23 (SHOULD): a URN-qualified manager key inside a path-less value sets
    the enterprise manager, not a new extension named after the key."""
    new = patched(document_user(), {"op": "replace", "value": {
        URN_ENTERPRISE + ":manager": {"value": "boss-id"}}})
    assert new[URN_ENTERPRISE]["manager"] == {"value": "boss-id"}
    assert set(new) == set(document_user())


def test_adding_a_primary_email_clears_primary_on_the_others():
    """RFC 7644 §3.5.2: primary=true on one value sets primary=false on the others."""
    new = patched(document_user(), {"op": "add", "path": "emails",
                                    "value": [{"value": "new@example.com", "type": "other", "primary": True}]})
    primaries = [e["value"] for e in new["emails"] if e.get("primary") is True]
    assert primaries == ["new@example.com"]
    assert new["emails"][0] == {"value": "ada@work.example", "type": "work", "primary": False}


def test_setting_primary_through_value_filter_clears_primary_on_the_others():
    new = patched(document_user(), {"op": "replace", "path": 'emails[type eq "home"].primary', "value": True})
    assert new["emails"] == [{"value": "ada@work.example", "type": "work", "primary": False},
                             {"value": "ada@home.example", "type": "home", "primary": True}]


def test_value_filter_seed_with_primary_true_clears_primary_on_the_others():
    """RFC 7643 §2.4: primary=true appears no more than once, also when an
    `and` filter seeds a new entry with primary true (R29 creation form)."""
    document = {"userName": "x", "emails": [{"value": "h@home.example", "type": "home", "primary": True}]}
    new = patched(document, {"op": "add", "path": 'emails[type eq "work" and primary eq true].value',
                             "value": "w@work.example"})
    assert {"type": "work", "primary": True, "value": "w@work.example"} in new["emails"]
    assert [e["value"] for e in new["emails"] if e.get("primary") is True] == ["w@work.example"]


def test_replacing_with_two_primaries_is_invalid():
    """RFC 7643 §2.4: primary=true appears no more than once."""
    error = patch_error(document_user(), {"op": "replace", "path": "emails", "value": [
        {"value": "a@example.com", "primary": True}, {"value": "b@example.com", "primary": True}]})
    assert (error.status, error.scim_type) == (400, "invalidValue")


@pytest.mark.parametrize("value", [False, "False", "false", "FALSE"])
def test_active_accepts_boolean_and_entra_strings(value):
    """R18: "False"/"True" strings and JSON booleans are stored as booleans."""
    assert patched(document_user(), {"op": "Replace", "path": "active", "value": value})["active"] is False


@pytest.mark.parametrize("value", [True, "True", "true"])
def test_active_true_forms(value):
    document = dict(document_user(), active=False)
    assert patched(document, {"op": "Replace", "path": "active", "value": value})["active"] is True


@pytest.mark.parametrize("operation", [
    {"op": "Add", "path": URN_ENTERPRISE + ":manager", "value": "271"},
    {"op": "add", "path": URN_ENTERPRISE + ":manager", "value": "271"},
    {"op": "Replace", "path": URN_ENTERPRISE + ":manager", "value": {"value": "271"}},
    {"op": "Add", "path": "manager", "value": [{"$ref": "http://x/scim/Users/271", "value": "271"}]},
])
def test_manager_forms_store_a_complex_value(operation):
    """R25, R27: manager as a plain id, an object or a one-element array."""
    new = patched(document_user(), operation)
    assert new[URN_ENTERPRISE]["manager"]["value"] == "271"
    assert new[URN_ENTERPRISE]["employeeNumber"] == "701"


@pytest.mark.parametrize("operation, kept", [
    ({"op": "Remove", "path": URN_ENTERPRISE + ":manager"}, False),
    ({"op": "remove", "path": 'manager[value eq "271"]'}, False),
    ({"op": "Remove", "path": URN_ENTERPRISE + ":manager", "value": "271"}, False),
    ({"op": "Remove", "path": URN_ENTERPRISE + ":manager", "value": {"value": "271"}}, False),
    ({"op": "Remove", "path": URN_ENTERPRISE + ":manager", "value": "999"}, True),
    ({"op": "remove", "path": 'manager[value eq "999"]'}, True),
])
def test_manager_removal_forms(operation, kept):
    """R25, [REF]: a Remove naming another manager leaves the current one."""
    document = document_user()
    document[URN_ENTERPRISE]["manager"] = {"value": "271"}
    new = patched(document, operation)
    assert ("manager" in new[URN_ENTERPRISE]) is kept
    assert new[URN_ENTERPRISE]["employeeNumber"] == "701"


@pytest.mark.parametrize("operation, scim_type", [
    ({"op": "replace", "path": "nonexistentAttribute", "value": "x"}, "invalidPath"),
    ({"op": "replace", "path": "name.nope", "value": "x"}, "invalidPath"),
    ({"op": "replace", "path": "id", "value": "x"}, "mutability"),
    ({"op": "replace", "path": "meta", "value": {"created": "2020-01-01T00:00:00Z"}}, "mutability"),
    ({"op": "replace", "path": "meta.created", "value": "2020-01-01T00:00:00Z"}, "mutability"),
    ({"op": "add", "path": "groups", "value": [{"value": "g"}]}, "mutability"),
    ({"op": "remove", "path": "groups"}, "mutability"),
    ({"op": "replace", "path": "active", "value": "maybe"}, "invalidValue"),
    ({"op": "replace", "path": "active", "value": 1}, "invalidValue"),
    ({"op": "replace", "path": "emails", "value": 5}, "invalidValue"),
    ({"op": "replace", "path": "name", "value": "x"}, "invalidValue"),
    ({"op": "replace", "path": "displayName", "value": {"a": 1}}, "invalidValue"),
    ({"op": "replace", "path": "userName", "value": 42}, "invalidValue"),
    ({"op": "remove"}, "noTarget"),
    ({"op": "add", "value": "not an object"}, "invalidValue"),
    ({"op": "replace", "path": "displayName"}, "invalidValue"),
])
def test_apply_patch_errors(operation, scim_type):
    """RFC 7644 §3.5.2 / §3.12 error keywords."""
    document = document_user()
    error = patch_error(document, operation)
    assert (error.status, error.scim_type) == (400, scim_type)
    assert document == document_user()


def test_removing_required_username_is_rejected():
    """RFC 7643 §4.1.1: userName is required."""
    error = patch_error(document_user(), {"op": "remove", "path": "userName"})
    assert error.status == 400


def test_group_member_operations_are_returned_as_member_changes_not_in_the_document():
    document = {"displayName": "Eng"}
    operations = scim_appliance.read_patch_request(patch_body(
        {"op": "Add", "path": "members", "value": [{"$ref": None, "value": "u1"}, {"value": "u2"}]},
        {"op": "Remove", "path": "members", "value": [{"value": "u3"}]},
        {"op": "remove", "path": 'members[value eq "u4"]'},
        {"op": "remove", "path": "members"}))
    new, changes = scim_appliance.apply_patch(GROUP, document, operations)
    assert new == {"displayName": "Eng"}
    assert [change[0] for change in changes] == ["add", "remove", "remove_where", "clear"]
    assert changes[0][1] == [("u1", None), ("u2", None)]
    assert changes[1][1] == ["u3"]


@pytest.mark.parametrize("operation, scim_type", [
    ({"op": "replace", "path": "members.display", "value": "x"}, "mutability"),
    ({"op": "add", "path": "members", "value": [{"display": "no value"}]}, "invalidValue"),
    ({"op": "remove", "path": "displayName"}, "invalidValue"),
])
def test_group_apply_patch_errors(operation, scim_type):
    error = patch_error({"displayName": "Eng"}, operation, resource_type=GROUP)
    assert (error.status, error.scim_type) == (400, scim_type)


# ===========================================================================
# 3. Users through HTTP
# ===========================================================================

def test_user_patch_answers_200_with_resource_and_etag(client, db, user, monkeypatch):
    """R16: user PATCH → 200 with the resource; meta.version and lastModified move on."""
    monkeypatch.setattr(scim_appliance, "utc_now", lambda: "2031-01-02T03:04:05.678Z")
    before = user_state(db, user["id"])
    response = client.patch("/Users/" + user["id"],
                            [{"op": "Replace", "path": "displayName", "value": "Countess"}], status=200)
    body = response.json
    assert response.content_type == "application/scim+json"
    assert body["id"] == user["id"]
    assert body["displayName"] == "Countess"
    assert body["meta"]["version"] != user["meta"]["version"]
    assert body["meta"]["version"] == 'W/"%d"' % (before["version"] + 1)
    assert response.headers["ETag"] == body["meta"]["version"]
    assert body["meta"]["lastModified"] == "2031-01-02T03:04:05.678Z"
    assert body["meta"]["created"] == user["meta"]["created"]
    after = user_state(db, user["id"])
    assert after["version"] == before["version"] + 1
    assert after["last_modified"] == "2031-01-02T03:04:05.678Z"
    assert after["display_name"] == "Countess"
    assert stored_document(db, "users", user["id"])["displayName"] == "Countess"
    # GET agrees with the PATCH response
    got = client.get("/Users/" + user["id"])
    assert got.json == body
    assert got.headers["ETag"] == body["meta"]["version"]


def test_patch_that_changes_nothing_keeps_the_version(client, db, user):
    """meta.version is the resource's version: an identical value is no change."""
    before = user_state(db, user["id"])
    response = client.patch("/Users/" + user["id"],
                            [{"op": "Replace", "path": "displayName", "value": "Ada Lovelace"}], status=200)
    assert response.json["meta"]["version"] == user["meta"]["version"]
    assert user_state(db, user["id"]) == before


@pytest.mark.parametrize("op", ["Add", "Replace", "add", "REPLACE", "replace"])
def test_entra_op_names_set_values(client, db, user, op):
    """R6: Add/Replace in any case."""
    response = client.patch("/Users/" + user["id"], [{"op": op, "path": "title", "value": "Engineer"}],
                            status=200)
    assert response.json["title"] == "Engineer"
    assert stored_document(db, "users", user["id"])["title"] == "Engineer"


@pytest.mark.parametrize("op", ["Remove", "remove", "REMOVE"])
def test_entra_op_names_remove(client, db, user, op):
    response = client.patch("/Users/" + user["id"], [{"op": op, "path": "displayName"}], status=200)
    assert "displayName" not in response.json
    assert "displayName" not in stored_document(db, "users", user["id"])
    assert user_state(db, user["id"])["display_name"] is None


@pytest.mark.parametrize("value", ["False", False])
def test_disable_user_with_string_or_boolean(client, db, user, value):
    """R18: Entra disables with "False" (no flag) or false (flag); stored as JSON false."""
    op = "Replace" if isinstance(value, str) else "replace"
    response = client.patch("/Users/" + user["id"], [{"op": op, "path": "active", "value": value}], status=200)
    assert response.json["active"] is False
    assert stored_document(db, "users", user["id"])["active"] is False
    assert user_state(db, user["id"])["active"] == 0


@pytest.mark.parametrize("value", ["True", True])
def test_enable_user_with_string_or_boolean(client, db, user, value):
    """R18: re-enabling with "True"/true; stored as JSON true."""
    client.patch("/Users/" + user["id"], [{"op": "Replace", "path": "active", "value": False}], status=200)
    response = client.patch("/Users/" + user["id"], [{"op": "Replace", "path": "active", "value": value}],
                            status=200)
    assert response.json["active"] is True
    assert stored_document(db, "users", user["id"])["active"] is True
    assert user_state(db, user["id"])["active"] == 1


def test_tutorial_disable_body_with_operations_before_schemas(client, db, user):
    """R18: [TUT] "Disable User" (Operations before schemas) → 200 with active false."""
    body = {"Operations": [{"op": "Replace", "path": "active", "value": False}],
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"]}
    response = raw_patch(client, "/Users/" + user["id"], body, status=200)
    assert response.json["active"] is False
    assert response.json["meta"]["resourceType"] == "User"
    assert stored_document(db, "users", user["id"])["active"] is False
    # a disabled user is still returned (R19)
    assert client.get("/Users/" + user["id"]).json["active"] is False


def test_tutorial_update_user_multi_valued_properties(client, db, user):
    """R16: [TUT] Replace emails[type eq "work"].value and name.familyName."""
    body = {"schemas": [URN_PATCH], "Operations": [
        {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "updatedEmail@microsoft.com"},
        {"op": "Replace", "path": "name.familyName", "value": "updatedFamilyName"}]}
    response = raw_patch(client, "/Users/" + user["id"], body, status=200)
    assert response.json["name"]["familyName"] == "updatedFamilyName"
    assert response.json["name"]["givenName"] == "givenName"
    stored = stored_document(db, "users", user["id"])
    assert stored["emails"] == [{"primary": True, "type": "work", "value": "updatedEmail@microsoft.com"},
                                {"type": "home", "value": "ada@home.example"}]
    assert stored["name"]["familyName"] == "updatedFamilyName"


def test_tutorial_update_user_name(client, db, user):
    """R17: Replace userName with a plain string."""
    new_name = "5b50642d-79fc-4410-9e90-4c077cdd1a59@testuser.com"
    response = client.patch("/Users/" + user["id"], [{"op": "Replace", "path": "userName", "value": new_name}],
                            status=200)
    assert response.json["userName"] == new_name
    assert stored_document(db, "users", user["id"])["userName"] == new_name
    assert user_state(db, user["id"])["user_name"] == new_name
    found = client.get('/Users?filter=userName+eq+%22' + new_name.upper() + '%22').json
    assert [r["id"] for r in found["Resources"]] == [user["id"]]


def test_changing_only_the_case_of_own_username_is_allowed(client, db, user):
    """R13/R33: userName is unique case-insensitively, but a user does not clash with itself."""
    new_name = user["userName"].upper()
    response = client.patch("/Users/" + user["id"], [{"op": "Replace", "path": "userName", "value": new_name}],
                            status=200)
    assert response.json["userName"] == new_name
    assert user_state(db, user["id"])["user_name"] == new_name


def test_add_on_single_valued_nickname(client, db, user):
    """R21: {"op": "Add", "path": "nickName", "value": "Babs"} (and the flag's "add")."""
    body = {"schemas": [URN_PATCH], "Operations": [{"op": "Add", "path": "nickName", "value": "Babs"}]}
    assert raw_patch(client, "/Users/" + user["id"], body, status=200).json["nickName"] == "Babs"
    body["Operations"][0].update(op="add", value="Bibi")
    assert raw_patch(client, "/Users/" + user["id"], body, status=200).json["nickName"] == "Bibi"
    assert stored_document(db, "users", user["id"])["nickName"] == "Bibi"


def test_several_replace_operations_including_urn_and_external_id(client, db, user):
    """R22: [KI] "Requests to replace multiple attributes" without flag."""
    body = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [
            {"op": "Replace", "path": "displayName", "value": "Pvlo"},
            {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "TestBcwqnm@test.microsoft.com"},
            {"op": "Replace", "path": "name.givenName", "value": "Gtfd"},
            {"op": "Replace", "path": "name.familyName", "value": "Pkqf"},
            {"op": "Replace", "path": "externalId", "value": "Eqpj"},
            {"op": "Replace", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber",
             "value": "Eqpj"},
        ]}
    response = raw_patch(client, "/Users/" + user["id"], body, status=200).json
    assert response["displayName"] == "Pvlo"
    assert response["externalId"] == "Eqpj"
    assert response[URN_ENTERPRISE] == {"employeeNumber": "Eqpj"}
    assert URN_ENTERPRISE in response["schemas"]
    stored = stored_document(db, "users", user["id"])
    assert stored["name"] == {"formatted": "givenName familyName", "familyName": "Pkqf", "givenName": "Gtfd"}
    assert stored["emails"][0] == {"primary": True, "type": "work", "value": "TestBcwqnm@test.microsoft.com"}
    assert stored["emails"][1] == {"type": "home", "value": "ada@home.example"}
    assert stored[URN_ENTERPRISE] == {"employeeNumber": "Eqpj"}
    assert user_state(db, user["id"])["external_id"] == "Eqpj"
    found = client.get('/Users?filter=externalId+eq+%22Eqpj%22').json
    assert [r["id"] for r in found["Resources"]] == [user["id"]]


def test_pathless_replace_with_dotted_and_urn_keys_exact_entra_body(client, db, user):
    """R23: [KI] same request with the flag (exact body)."""
    body = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [
            {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "TestMhvaes@test.microsoft.com"},
            {"op": "replace", "value": {
                "displayName": "Bjfe",
                "name.givenName": "Kkom",
                "name.familyName": "Unua",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber": "Aklq"}},
        ]}
    response = raw_patch(client, "/Users/" + user["id"], body, status=200).json
    assert response["displayName"] == "Bjfe"
    assert response["name"]["givenName"] == "Kkom" and response["name"]["familyName"] == "Unua"
    assert response[URN_ENTERPRISE]["employeeNumber"] == "Aklq"
    stored = stored_document(db, "users", user["id"])
    assert stored["name"] == {"formatted": "givenName familyName", "familyName": "Unua", "givenName": "Kkom"}
    assert stored[URN_ENTERPRISE] == {"employeeNumber": "Aklq"}
    assert stored["emails"][0]["value"] == "TestMhvaes@test.microsoft.com"
    assert not any(key.lower().startswith("name.") for key in stored)
    assert set(key for key in stored if key.startswith("urn:")) == {URN_ENTERPRISE}


def test_pathless_replace_scim_validator_variant(client, db, user):
    """R23: the SCIM Validator's larger path-less replace, incl. active true (boolean)."""
    client.patch("/Users/" + user["id"], [{"op": "replace", "path": "active", "value": False}], status=200)
    body = {
        "schemas": [URN_PATCH],
        "Operations": [{"op": "replace", "value": {
            "active": True,
            "displayName": "Validator Name",
            "externalId": "validator-ext",
            "name.givenName": "Vgiven",
            "name.familyName": "Vfamily",
            "title": "Validator Title",
            "preferredLanguage": "de-DE",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber": "E-1",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department": "Dept",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter": "CC",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:organization": "Org",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:division": "Div",
        }}]}
    response = raw_patch(client, "/Users/" + user["id"], body, status=200).json
    assert response["active"] is True
    assert response["externalId"] == "validator-ext"
    stored = stored_document(db, "users", user["id"])
    assert stored["active"] is True
    assert stored["displayName"] == "Validator Name"
    assert stored["externalId"] == "validator-ext"
    assert stored["title"] == "Validator Title"
    assert stored["preferredLanguage"] == "de-DE"
    assert stored["name"] == {"formatted": "givenName familyName", "familyName": "Vfamily", "givenName": "Vgiven"}
    assert stored[URN_ENTERPRISE] == {"employeeNumber": "E-1", "department": "Dept", "costCenter": "CC",
                                      "organization": "Org", "division": "Div"}
    assert set(key for key in stored if key.startswith("urn:")) == {URN_ENTERPRISE}
    state = user_state(db, user["id"])
    assert (state["active"], state["external_id"], state["display_name"]) == (1, "validator-ext", "Validator Name")


def test_pathless_add_of_external_id(client, db, user):
    """R23: {"op": "Add", "value": {"externalId": "…"}} seen from the Validator."""
    response = client.patch("/Users/" + user["id"], [{"op": "Add", "value": {"externalId": "new-ext"}}],
                            status=200)
    assert response.json["externalId"] == "new-ext"
    assert stored_document(db, "users", user["id"])["externalId"] == "new-ext"


def test_add_work_email_value_creates_entry_when_user_has_none(client, db):
    """R29: Add emails[type eq "work"].value on a user without a work e-mail creates it."""
    created = client.create_user("nowork@testuser.com", emails=[{"type": "home", "value": "h@home.example"}])
    response = client.patch("/Users/" + created["id"], [
        {"op": "Add", "path": "emails[type eq \"work\"].value", "value": "w@work.example"}], status=200)
    expected = [{"type": "home", "value": "h@home.example"}, {"type": "work", "value": "w@work.example"}]
    assert response.json["emails"] == expected
    assert stored_document(db, "users", created["id"])["emails"] == expected
    found = client.get('/Users?filter=emails[type+eq+%22work%22].value+eq+%22w@work.example%22').json
    assert [r["id"] for r in found["Resources"]] == [created["id"]]


def test_add_work_email_value_on_user_without_any_email(client, db):
    created = client.create_user("noemail@testuser.com")
    client.patch("/Users/" + created["id"], [
        {"op": "add", "path": "emails[type eq \"work\"].value", "value": "w@work.example"}], status=200)
    assert stored_document(db, "users", created["id"])["emails"] == [{"type": "work", "value": "w@work.example"}]


def test_replace_work_email_value_leaves_other_emails_alone(client, db, user):
    """R29: Replace emails[type eq "work"].value keeps the home e-mail."""
    client.patch("/Users/" + user["id"], [
        {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "w2@work.example"}], status=200)
    assert stored_document(db, "users", user["id"])["emails"] == [
        {"primary": True, "type": "work", "value": "w2@work.example"},
        {"type": "home", "value": "ada@home.example"}]


def test_several_adds_on_work_address_build_one_address_over_http(client, db, user):
    """R29: Adds on addresses[type eq "work"].formatted/.locality/.region → ONE work address."""
    response = client.patch("/Users/" + user["id"], [
        {"op": "Add", "path": "addresses[type eq \"work\"].formatted", "value": "1 Microsoft Way"},
        {"op": "Add", "path": "addresses[type eq \"work\"].locality", "value": "Redmond"},
        {"op": "Add", "path": "addresses[type eq \"work\"].region", "value": "WA"}], status=200)
    expected = [{"type": "work", "formatted": "1 Microsoft Way", "locality": "Redmond", "region": "WA"}]
    assert response.json["addresses"] == expected
    assert stored_document(db, "users", user["id"])["addresses"] == expected


def test_entra_default_mapping_paths_with_capitalised_sub_attributes(client, db, user):
    """R29: emails[type eq "other"].Value and addresses[type eq "other"].Formatted."""
    client.patch("/Users/" + user["id"], [
        {"op": "Add", "path": "emails[type eq \"other\"].Value", "value": "smtp:alias@example.com"},
        {"op": "Add", "path": "addresses[type eq \"other\"].Formatted", "value": "Building 7"},
        {"op": "Add", "path": "phoneNumbers[type eq \"mobile\"].value", "value": "55555555555"}], status=200)
    stored = stored_document(db, "users", user["id"])
    assert {"type": "other", "value": "smtp:alias@example.com"} in stored["emails"]
    assert stored["addresses"] == [{"type": "other", "formatted": "Building 7"}]
    assert stored["phoneNumbers"] == [{"type": "mobile", "value": "55555555555"}]


def test_remove_work_email_value_carrying_a_value(client, db, user):
    """R29: {"op":"Remove","path":"emails[type eq \\"work\\"].value","value":"…"}."""
    response = client.patch("/Users/" + user["id"], [
        {"op": "Remove", "path": "emails[type eq \"work\"].value", "value": "ada@work.example"}], status=200)
    assert response.json["emails"] == [{"type": "home", "value": "ada@home.example"}]
    assert stored_document(db, "users", user["id"])["emails"] == [{"type": "home", "value": "ada@home.example"}]


def test_manager_added_as_plain_string_id_is_returned_as_complex(client, db, user, manager):
    """R25/R26: manager arrives as "id", is returned as {"value": id, ...}."""
    body = {"Operations": [{"op": "Add",
                            "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
                            "value": manager["id"]}],
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"]}
    response = raw_patch(client, "/Users/" + user["id"], body, status=200).json
    assert isinstance(response[URN_ENTERPRISE]["manager"], dict)
    assert response[URN_ENTERPRISE]["manager"]["value"] == manager["id"]
    assert response[URN_ENTERPRISE]["manager"]["$ref"] == LOCATION + "/Users/" + manager["id"]
    assert URN_ENTERPRISE in response["schemas"]
    assert stored_document(db, "users", user["id"])[URN_ENTERPRISE]["manager"] == {"value": manager["id"]}
    # R28: the reference check finds it
    found = client.get('/Users?filter=id+eq+%22{}%22+and+manager+eq+%22{}%22&attributes=id'.format(
        user["id"], manager["id"])).json
    assert [r["id"] for r in found["Resources"]] == [user["id"]]


def test_manager_tutorial_example5_unqualified_path_with_array_value(client, db, user, manager):
    """R27: [TUT] Example 5, "path": "manager" with an array value."""
    body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "Add", "path": "manager", "value": [
                {"$ref": "http://example.com/scim/Users/" + manager["id"], "value": manager["id"]}]}]}
    response = raw_patch(client, "/Users/" + user["id"], body, status=200).json
    assert response[URN_ENTERPRISE]["manager"]["value"] == manager["id"]
    stored = stored_document(db, "users", user["id"])
    assert stored[URN_ENTERPRISE]["manager"]["value"] == manager["id"]
    assert "manager" not in stored


def _set_manager(client, user, manager_id):
    client.patch("/Users/" + user["id"], [
        {"op": "Add", "path": URN_ENTERPRISE + ":manager", "value": manager_id}], status=200)


@pytest.mark.parametrize("operation", [
    {"op": "Remove", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager"},
    {"op": "remove", "path": "manager[value eq \"{id}\"]"},
    {"op": "Remove", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
     "value": "{id}"},
])
def test_manager_removed(client, db, user, manager, operation):
    """R25: manager removal by URN path, by manager[value eq "id"], or by value."""
    _set_manager(client, user, manager["id"])
    operation = json.loads(json.dumps(operation).replace("{id}", manager["id"]))
    response = client.patch("/Users/" + user["id"], [operation], status=200).json
    assert "manager" not in response.get(URN_ENTERPRISE, {})
    assert URN_ENTERPRISE not in stored_document(db, "users", user["id"])


@pytest.mark.parametrize("operation", [
    {"op": "remove", "path": "manager[value eq \"someone-else\"]"},
    {"op": "Remove", "path": URN_ENTERPRISE + ":manager", "value": "someone-else"},
    {"op": "Remove", "path": URN_ENTERPRISE + ":manager", "value": {"value": "someone-else"}},
])
def test_manager_remove_with_non_matching_value_leaves_it(client, db, user, manager, operation):
    """[REF]: "Remove with a value only clears a matching manager"."""
    _set_manager(client, user, manager["id"])
    response = client.patch("/Users/" + user["id"], [operation], status=200).json
    assert response[URN_ENTERPRISE]["manager"]["value"] == manager["id"]
    assert stored_document(db, "users", user["id"])[URN_ENTERPRISE]["manager"] == {"value": manager["id"]}


def test_custom_extension_path_over_http(client, db, user):
    """Custom mapping urn:…:CustomExtension:2.0:User:costCode round-trips and is in schemas."""
    response = client.patch("/Users/" + user["id"], [
        {"op": "Add", "path": CUSTOM + ":costCode", "value": "CC-42"}], status=200).json
    assert response[CUSTOM] == {"costCode": "CC-42"}
    assert CUSTOM in response["schemas"]
    assert stored_document(db, "users", user["id"])[CUSTOM] == {"costCode": "CC-42"}
    response = client.patch("/Users/" + user["id"], [{"op": "Remove", "path": CUSTOM + ":costCode"}],
                            status=200).json
    assert CUSTOM not in response and CUSTOM not in response["schemas"]
    assert CUSTOM not in stored_document(db, "users", user["id"])


def test_patch_password_is_stored_only_as_digest(client, db, user):
    """password is writeOnly: never returned, never in users.document."""
    response = client.patch("/Users/" + user["id"], [
        {"op": "replace", "path": "password", "value": "S3cret!pass"}], status=200).json
    assert "password" not in response
    stored = user_state(db, user["id"])
    assert "S3cret" not in stored["document"]
    assert stored["password_digest"] and "S3cret" not in stored["password_digest"]


# -- errors ------------------------------------------------------------------

@pytest.mark.parametrize("operation, scim_type", [
    ({"op": "Replace", "path": "nonexistentAttribute", "value": "x"}, "invalidPath"),
    ({"op": "Replace", "path": "emails[type eq \"work\"].nope", "value": "x"}, "invalidPath"),
    ({"op": "Replace", "path": "id", "value": "other-id"}, "mutability"),
    ({"op": "Replace", "path": "meta", "value": {"resourceType": "Group"}}, "mutability"),
    ({"op": "Replace", "path": "meta.created", "value": "2000-01-01T00:00:00Z"}, "mutability"),
    ({"op": "Add", "path": "groups", "value": [{"value": "some-group"}]}, "mutability"),
    ({"op": "Replace", "path": "active", "value": "maybe"}, "invalidValue"),
    ({"op": "Replace", "path": "emails", "value": 5}, "invalidValue"),
    ({"op": "Replace", "path": "name", "value": "x"}, "invalidValue"),
    ({"op": "Remove"}, "noTarget"),
    ({"op": "Merge", "path": "displayName", "value": "x"}, "invalidSyntax"),
])
def test_user_patch_errors_leave_the_user_unchanged(client, db, user, operation, scim_type):
    """RFC 7644 §3.5.2/§3.12: 400 with scimType; nothing stored."""
    before = user_state(db, user["id"])
    response = client.patch("/Users/" + user["id"], [operation], status=400)
    assert_scim_error(response, 400, scim_type)
    assert user_state(db, user["id"]) == before
    assert client.get("/Users/" + user["id"]).json == user


@pytest.mark.parametrize("body", [
    {"schemas": [URN_PATCH]},
    {"schemas": [URN_PATCH], "Operations": []},
    {"schemas": [URN_PATCH], "Operations": None},
    {"schemas": [URN_PATCH], "Operations": "replace"},
])
def test_missing_or_empty_operations_is_400(client, db, user, body):
    before = user_state(db, user["id"])
    assert_scim_error(raw_patch(client, "/Users/" + user["id"], body, status=400), 400, "invalidSyntax")
    assert user_state(db, user["id"]) == before


def test_removing_required_username_is_400_and_unchanged(client, db, user):
    """RFC 7643 §4.1.1: userName is required; removing it fails."""
    before = user_state(db, user["id"])
    assert_scim_error(client.patch("/Users/" + user["id"], [{"op": "Remove", "path": "userName"}], status=400),
                      400, "invalidValue")
    assert user_state(db, user["id"]) == before


@pytest.mark.parametrize("value", ["", "   "])
def test_replacing_username_with_blank_is_400(client, db, user, value):
    before = user_state(db, user["id"])
    assert_scim_error(client.patch("/Users/" + user["id"],
                                   [{"op": "Replace", "path": "userName", "value": value}], status=400),
                      400, "invalidValue")
    assert user_state(db, user["id"]) == before


def test_username_clash_through_patch_is_409_and_unchanged(client, db, user):
    """R15: userName stays unique (case-insensitively) when changed by PATCH."""
    other = client.create_user("other@testuser.com")
    before = user_state(db, other["id"])
    response = client.patch("/Users/" + other["id"], [
        {"op": "Replace", "path": "userName", "value": user["userName"].upper()}], status=409)
    assert_scim_error(response, 409, "uniqueness")
    assert user_state(db, other["id"]) == before


def test_failing_third_of_five_operations_leaves_user_byte_identical(client, db, user):
    """RFC 7644 §3.5.2: "If a single operation ... fails, the whole request fails" (all or nothing)."""
    before = user_state(db, user["id"])
    response = client.patch("/Users/" + user["id"], [
        {"op": "Replace", "path": "displayName", "value": "Changed"},
        {"op": "Add", "path": "emails", "value": [{"value": "x@example.com", "type": "other"}]},
        {"op": "Replace", "path": "active", "value": "maybe"},
        {"op": "Replace", "path": "title", "value": "Changed"},
        {"op": "Remove", "path": "name"},
    ], status=400)
    body = assert_scim_error(response, 400, "invalidValue")
    assert "operation 3" in body["detail"]
    after = user_state(db, user["id"])
    assert after == before
    assert after["document"] == before["document"]   # byte-identical
    assert client.get("/Users/" + user["id"]).json["meta"]["version"] == user["meta"]["version"]


@pytest.mark.parametrize("endpoint", ["/Users", "/Groups"])
def test_patch_unknown_id_is_404(client, endpoint):
    """R14: PATCH of an unknown id → 404."""
    response = client.patch(endpoint + "/5171a35d82074e068ce2",
                            [{"op": "Replace", "path": "displayName", "value": "x"}], status=404)
    assert_scim_error(response, 404)


def test_if_match_stale_is_412_and_unchanged(client, db, user):
    """RFC 7644 §3.14: a stale If-Match → 412 Precondition Failed."""
    client.patch("/Users/" + user["id"], [{"op": "Replace", "path": "title", "value": "v2"}], status=200)
    before = user_state(db, user["id"])
    response = client.patch("/Users/" + user["id"], [{"op": "Replace", "path": "title", "value": "v3"}],
                            status=412, headers={"If-Match": user["meta"]["version"]})
    assert_scim_error(response, 412)
    assert user_state(db, user["id"]) == before


def test_if_match_current_is_200(client, db, user):
    current = client.get("/Users/" + user["id"]).headers["ETag"]
    response = client.patch("/Users/" + user["id"], [{"op": "Replace", "path": "title", "value": "v2"}],
                            status=200, headers={"If-Match": current})
    assert response.json["title"] == "v2"
    assert response.headers["ETag"] != current
    assert stored_document(db, "users", user["id"])["title"] == "v2"


# ===========================================================================
# 4. Groups through HTTP
# ===========================================================================

def test_add_members_tutorial_body_with_null_ref(client, db, group, users):
    """R38: [TUT] Add members with "$ref": null → 204."""
    body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "Add", "path": "members", "value": [{"$ref": None, "value": users[0]}]}]}
    response = raw_patch(client, "/Groups/" + group["id"], body, status=204)
    assert response.body == b""
    assert stored_members(db, group["id"]) == {users[0]}
    assert stored_version(db, "groups", group["id"]) == 2
    members = client.get("/Groups/" + group["id"]).json["members"]
    assert [m["value"] for m in members] == [users[0]]
    assert members[0]["$ref"] == LOCATION + "/Users/" + users[0]
    # the user sees the group (read-only groups attribute)
    assert [g["value"] for g in client.get("/Users/" + users[0]).json["groups"]] == [group["id"]]


def test_several_members_per_operation_and_several_operations(client, db, group, users):
    """R39: several entries in one value array and several operations in one request."""
    client.patch("/Groups/" + group["id"], [
        {"op": "Add", "path": "members", "value": [{"value": users[0]}, {"value": users[1]}]},
        {"op": "Add", "path": "members", "value": [{"$ref": None, "value": users[2]}]},
    ], status=204)
    assert stored_members(db, group["id"]) == set(users)


def test_re_adding_an_existing_member_is_not_an_error_nor_a_duplicate(client, db, group, users):
    """R39 / RFC 7644 §3.5.2.1: re-adding a member neither fails nor duplicates."""
    client.patch("/Groups/" + group["id"], [{"op": "Add", "path": "members", "value": [{"value": users[0]}]}],
                 status=204)
    client.patch("/Groups/" + group["id"], [
        {"op": "Add", "path": "members", "value": [{"value": users[0]}, {"value": users[0]}]}], status=204)
    assert stored_members(db, group["id"]) == {users[0]}
    count = db.execute("SELECT count(*) FROM members WHERE group_id = ?", (group["id"],)).fetchone()[0]
    assert count == 1
    assert len(client.get("/Groups/" + group["id"]).json["members"]) == 1


def _with_members(client, group_id, member_ids):
    client.patch("/Groups/" + group_id, [
        {"op": "Add", "path": "members", "value": [{"value": m} for m in member_ids]}], status=204)


@pytest.mark.parametrize("form", ["tutorial", "no-flag", "flag", "flag-capitalised"])
def test_remove_members_removes_only_the_listed_ones(client, db, group, users, form):
    """R40: all three Remove shapes remove ONLY the listed member, never all."""
    _with_members(client, group["id"], users)
    target = users[1]
    operation = {
        "tutorial": {"op": "Remove", "path": "members", "value": [{"$ref": None, "value": target}]},
        "no-flag": {"op": "Remove", "path": "members", "value": [{"value": target}]},
        "flag": {"op": "remove", "path": "members[value eq \"%s\"]" % target},
        "flag-capitalised": {"op": "Remove", "path": "members[value eq \"%s\"]" % target},
    }[form]
    response = raw_patch(client, "/Groups/" + group["id"],
                         {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [operation]},
                         status=204)
    assert response.body == b""
    assert stored_members(db, group["id"]) == {users[0], users[2]}


def test_remove_several_listed_members_in_one_operation(client, db, group, users):
    _with_members(client, group["id"], users)
    client.patch("/Groups/" + group["id"], [
        {"op": "Remove", "path": "members", "value": [{"value": users[0]}, {"value": users[2]}]}], status=204)
    assert stored_members(db, group["id"]) == {users[1]}


def test_remove_listed_member_that_is_not_a_member_changes_nothing(client, db, group, users):
    _with_members(client, group["id"], users[:2])
    before = group_state(db, group["id"])
    client.patch("/Groups/" + group["id"], [
        {"op": "Remove", "path": "members", "value": [{"value": users[2]}]}], status=204)
    assert group_state(db, group["id"]) == before


def test_remove_members_without_value_removes_all(client, db, group, users):
    """RFC 7644 §3.5.2.2 / [REF]: {"op":"remove","path":"members"} removes every member."""
    _with_members(client, group["id"], users)
    client.patch("/Groups/" + group["id"], [{"op": "remove", "path": "members"}], status=204)
    assert stored_members(db, group["id"]) == set()
    assert client.get("/Groups/" + group["id"]).json.get("members", []) == []


def test_replace_members_sets_exactly_the_given_members(client, db, group, users):
    """RFC 7644 §3.5.2.3: replace of a multi-valued attribute replaces all values."""
    _with_members(client, group["id"], users[:2])
    client.patch("/Groups/" + group["id"], [
        {"op": "Replace", "path": "members", "value": [{"value": users[2]}]}], status=204)
    assert stored_members(db, group["id"]) == {users[2]}


def test_replace_group_display_name_is_204(client, db, group):
    """R37: [TUT] Update Group [Non-member attributes] → 204 No Content."""
    new_name = "1879db59-3bdf-4490-ad68-ab880a269474updatedDisplayName"
    body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "Replace", "path": "displayName", "value": new_name}]}
    response = raw_patch(client, "/Groups/" + group["id"], body, status=204)
    assert response.body == b""
    assert stored_document(db, "groups", group["id"])["displayName"] == new_name
    assert group_state(db, group["id"])["display_name"] == new_name
    assert stored_version(db, "groups", group["id"]) == 2
    found = client.get('/Groups?excludedAttributes=members&filter=displayName+eq+%22' + new_name + '%22').json
    assert [r["id"] for r in found["Resources"]] == [group["id"]]


def test_group_display_name_clash_through_patch_is_409(client, db, group):
    """R41: group displayName stays unique when changed by PATCH."""
    other = client.create_group("Sales")
    before = group_state(db, other["id"])
    response = client.patch("/Groups/" + other["id"], [
        {"op": "Replace", "path": "displayName", "value": "ENGINEERING"}], status=409)
    assert_scim_error(response, 409, "uniqueness")
    assert group_state(db, other["id"]) == before


@pytest.mark.parametrize("values", [["missing"], ["user0", "missing"]])
def test_adding_a_member_that_does_not_exist_is_400_and_applies_nothing(client, db, group, users, values):
    """Choice: a non-existent member → 400 invalidValue; no member of the request is added."""
    _with_members(client, group["id"], [users[2]])
    before = group_state(db, group["id"])
    ids = [users[0] if v == "user0" else "00000000-0000-0000-0000-000000000000" for v in values]
    response = client.patch("/Groups/" + group["id"], [
        {"op": "Replace", "path": "displayName", "value": "Renamed"},
        {"op": "Add", "path": "members", "value": [{"value": users[1]}]},
        {"op": "Add", "path": "members", "value": [{"value": i} for i in ids]},
    ], status=400)
    assert_scim_error(response, 400, "invalidValue")
    assert group_state(db, group["id"]) == before
    assert stored_members(db, group["id"]) == {users[2]}


def test_replace_members_with_a_missing_member_keeps_the_old_members(client, db, group, users):
    _with_members(client, group["id"], users[:2])
    before = group_state(db, group["id"])
    response = client.patch("/Groups/" + group["id"], [
        {"op": "Replace", "path": "members", "value": [{"value": users[2]}, {"value": "no-such-user"}]}],
        status=400)
    assert_scim_error(response, 400, "invalidValue")
    assert group_state(db, group["id"]) == before


def test_failing_operation_after_member_changes_leaves_group_unchanged(client, db, group, users):
    """All or nothing for groups: members, document and version."""
    _with_members(client, group["id"], users[:2])
    before = group_state(db, group["id"])
    response = client.patch("/Groups/" + group["id"], [
        {"op": "Remove", "path": "members", "value": [{"value": users[0]}]},
        {"op": "Add", "path": "members", "value": [{"value": users[2]}]},
        {"op": "Replace", "path": "nonexistentAttribute", "value": "x"},
        {"op": "Replace", "path": "displayName", "value": "Renamed"},
        {"op": "remove", "path": "members"},
    ], status=400)
    assert_scim_error(response, 400, "invalidPath")
    assert group_state(db, group["id"]) == before


@pytest.mark.parametrize("operation, scim_type", [
    ({"op": "Replace", "path": "members.display", "value": "x"}, "mutability"),
    ({"op": "Replace", "path": "id", "value": "x"}, "mutability"),
    ({"op": "Remove", "path": "displayName"}, "invalidValue"),
    ({"op": "Add", "path": "members", "value": [{"display": "no id"}]}, "invalidValue"),
    ({"op": "Add", "path": "members[value eq \"x\"]", "value": [{"value": "x"}]}, "invalidPath"),
    ({"op": "Remove"}, "noTarget"),
])
def test_group_patch_errors_leave_the_group_unchanged(client, db, group, users, operation, scim_type):
    _with_members(client, group["id"], users[:1])
    before = group_state(db, group["id"])
    response = client.patch("/Groups/" + group["id"], [operation], status=400)
    assert_scim_error(response, 400, scim_type)
    assert group_state(db, group["id"]) == before


def test_group_pathless_replace_with_display_name_and_members(client, db, group, users):
    """RFC 7644 §3.5.2.3: a path-less replace may carry members too."""
    _with_members(client, group["id"], users[:2])
    client.patch("/Groups/" + group["id"], [{"op": "replace", "value": {
        "displayName": "Renamed", "members": [{"value": users[2]}]}}], status=204)
    assert stored_document(db, "groups", group["id"])["displayName"] == "Renamed"
    assert "members" not in stored_document(db, "groups", group["id"])
    assert stored_members(db, group["id"]) == {users[2]}


def test_group_patch_with_excluded_members_answers_200_without_members(client, db, group, users):
    """R20: ?excludedAttributes=members → 200 with the group but no members."""
    response = client.patch("/Groups/" + group["id"] + "?excludedAttributes=members", [
        {"op": "Add", "path": "members", "value": [{"value": users[0]}]}], status=200)
    body = response.json
    assert "members" not in body
    assert body["id"] == group["id"] and body["displayName"] == "Engineering"
    assert body["schemas"] == [URN_GROUP]
    assert response.headers["ETag"] == body["meta"]["version"] == 'W/"2"'
    assert stored_members(db, group["id"]) == {users[0]}


def test_group_patch_with_attributes_answers_200_with_those(client, db, group, users):
    response = client.patch("/Groups/" + group["id"] + "?attributes=displayName", [
        {"op": "Replace", "path": "displayName", "value": "Platform"},
        {"op": "Add", "path": "members", "value": [{"value": users[0]}]}], status=200)
    body = response.json
    assert body["displayName"] == "Platform"
    assert body["id"] == group["id"]
    assert "members" not in body and "externalId" not in body
    assert stored_document(db, "groups", group["id"])["displayName"] == "Platform"
    assert stored_members(db, group["id"]) == {users[0]}


def test_group_member_change_moves_version_and_last_modified(client, db, group, users, monkeypatch):
    monkeypatch.setattr(scim_appliance, "utc_now", lambda: "2031-05-06T07:08:09.010Z")
    client.patch("/Groups/" + group["id"], [{"op": "Add", "path": "members", "value": [{"value": users[0]}]}],
                 status=204)
    state = group_state(db, group["id"])
    assert state["version"] == 2
    assert state["last_modified"] == "2031-05-06T07:08:09.010Z"
    got = client.get("/Groups/" + group["id"])
    assert got.json["meta"]["version"] == 'W/"2"' == got.headers["ETag"]
    assert got.json["meta"]["lastModified"] == "2031-05-06T07:08:09.010Z"


def test_group_if_match_stale_is_412_and_members_unchanged(client, db, group, users):
    _with_members(client, group["id"], users[:1])
    before = group_state(db, group["id"])
    response = client.patch("/Groups/" + group["id"], [
        {"op": "Add", "path": "members", "value": [{"value": users[1]}]}],
        status=412, headers={"If-Match": group["meta"]["version"]})
    assert_scim_error(response, 412)
    assert group_state(db, group["id"]) == before


def test_group_can_have_a_group_member_and_rejects_itself(client, db, group):
    other = client.create_group("Subgroup")
    client.patch("/Groups/" + group["id"], [{"op": "Add", "path": "members", "value": [
        {"value": other["id"], "type": "Group"}]}], status=204)
    assert stored_members(db, group["id"]) == {other["id"]}
    before = group_state(db, group["id"])
    assert_scim_error(client.patch("/Groups/" + group["id"], [{"op": "Add", "path": "members", "value": [
        {"value": group["id"]}]}], status=400), 400, "invalidValue")
    assert group_state(db, group["id"]) == before


# ---------------------------------------------------------------------------
# A path that names a whole extension (found by scim2-tester against a live
# server: such a path was once stored as a bogus custom extension)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["add", "replace"])
def test_path_naming_the_enterprise_extension_sets_its_attributes(client, db, user, manager, op):
    """RFC 7644 §3.5.2: the target may be an extension schema URN; its value is an object."""
    value = {"employeeNumber": "E1", "department": "Sales", "manager": {"value": manager["id"]}}
    response = client.patch("/Users/" + user["id"], [{"op": op, "path": URN_ENTERPRISE, "value": value}],
                            status=200)
    extension = response.json[URN_ENTERPRISE]
    assert extension["employeeNumber"] == "E1" and extension["department"] == "Sales"
    assert extension["manager"]["value"] == manager["id"]
    stored = stored_document(db, "users", user["id"])
    assert [k for k in stored if k.startswith("urn:")] == [URN_ENTERPRISE]
    assert stored[URN_ENTERPRISE]["employeeNumber"] == "E1"


def test_remove_of_the_enterprise_extension_path_removes_the_whole_extension(client, db, user):
    client.patch("/Users/" + user["id"], [
        {"op": "add", "path": URN_ENTERPRISE + ":employeeNumber", "value": "E1"}], status=200)
    response = client.patch("/Users/" + user["id"], [{"op": "remove", "path": URN_ENTERPRISE}], status=200)
    assert URN_ENTERPRISE not in response.json
    assert URN_ENTERPRISE not in response.json["schemas"]
    assert URN_ENTERPRISE not in stored_document(db, "users", user["id"])


def test_urn_qualified_manager_with_an_object_value_is_the_enterprise_manager(client, db, user, manager):
    """An object value under ...:User:manager is the manager, not a custom extension."""
    response = client.patch("/Users/" + user["id"], [
        {"op": "replace", "path": URN_ENTERPRISE + ":manager", "value": {"value": manager["id"]}}],
        status=200)
    assert response.json[URN_ENTERPRISE]["manager"]["value"] == manager["id"]
    stored = stored_document(db, "users", user["id"])
    assert [k for k in stored if k.startswith("urn:")] == [URN_ENTERPRISE]
    assert stored[URN_ENTERPRISE]["manager"] == {"value": manager["id"]}


def test_custom_extension_object_as_a_path_less_value_is_kept_whole():
    document = patched({"userName": "a"}, {"op": "add", "value": {CUSTOM: {"costCode": "C1"}}})
    assert document[CUSTOM] == {"costCode": "C1"}
    assert patched(document, {"op": "remove", "path": CUSTOM}) == {"userName": "a"}



# ---------------------------------------------------------------------------
# Found by review
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["emails.value", "x509Certificates.value", "phoneNumbers.value"])
def test_sub_attribute_of_an_empty_multi_valued_attribute_creates_one_value(client, db, user, path):
    """Once a 500: a sub-attribute path without a filter on a user with no such values."""
    attribute = path.split(".")[0]
    value = "TUlJQw==" if attribute == "x509Certificates" else "v@example.com"
    client.patch("/Users/" + user["id"], [{"op": "remove", "path": attribute}], status=200)
    response = client.patch("/Users/" + user["id"], [{"op": "replace", "path": path, "value": value}],
                            status=200)
    assert response.json[attribute] == [{"value": value}]
    assert stored_document(db, "users", user["id"])[attribute] == [{"value": value}]


def test_removing_a_sub_attribute_leaves_the_other_values_alone():
    """Removing emails[type eq "work"].display must not drop the home entry (which has no value)."""
    document = {"userName": "a", "emails": [{"type": "home", "display": "Home"},
                                            {"type": "work", "value": "w@x", "display": "Work"}]}
    result = patched(document, {"op": "remove", "path": 'emails[type eq "work"].display'})
    assert result["emails"] == [{"type": "home", "display": "Home"}, {"type": "work", "value": "w@x"}]
