"""The User lifecycle over HTTP: RFC 7644 §3.3-3.6 (create, read, replace,
patch, delete), §3.4.2.4-3.4.2.5 (paging, sorting, attribute projection),
§3.14 (versions), and what Entra sends (entra-requirements.md R7-R35)."""

import base64
import glob
import hashlib
import json
import re
import time
import uuid

import pytest

import scim_appliance
from conftest import assert_scim_error, PUBLIC_URL, stored_document, stored_members
from scim_appliance import URN_ENTERPRISE, URN_LIST, URN_SEARCH, URN_USER

USERS_URL = PUBLIC_URL + "/scim/Users/"
GROUPS_URL = PUBLIC_URL + "/scim/Groups/"
CUSTOM_URN = "urn:ietf:params:scim:schemas:extension:CustomExtension:2.0:User"
DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
LIST_KEYS = {"schemas", "totalResults", "itemsPerPage", "startIndex", "Resources"}


# -- helpers --------------------------------------------------------------------

def user_row(db, user_id):
    row = db.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()
    return None if row is None else dict(row)


def user_count(db):
    return db.execute("SELECT count(*) FROM users").fetchone()[0]


def snapshot(db, user_id):
    """Everything stored for a user, to prove a failed request changed nothing."""
    row = user_row(db, user_id)
    memberships = sorted(tuple(r) for r in db.execute(
        "SELECT group_id, member_id, member_type FROM members WHERE member_id = ?", (user_id,)))
    return row, memberships





def list_users(client, query=""):
    body = client.get("/Users" + query).json
    assert LIST_KEYS <= set(body)
    assert body["schemas"] == [URN_LIST]
    assert body["itemsPerPage"] == len(body["Resources"])
    return body


def user_names(body):
    return [resource["userName"] for resource in body["Resources"]]


# -- sample values generated from the published schema ----------------------------

def published_attributes(schema):
    """The attribute definitions as /Schemas publishes them (RFC 7643 §7)."""
    return [attribute.to_json() for attribute in schema.attributes]


def writable(definition):
    return definition["mutability"] not in ("readOnly", "writeOnly")


def sample_value(definition, tag, index=0):
    """A valid value for an attribute definition, distinct per `tag`."""
    if definition.get("multiValued"):
        return [sample_item(definition, tag, i) for i in range(2)]
    return sample_item(definition, tag, index)


def sample_item(definition, tag, index):
    kind = definition["type"]
    name = definition["name"]
    if kind == "complex":
        return {sub["name"]: sample_item(sub, tag, index)
                for sub in definition["subAttributes"] if writable(sub)}
    seed = sum(map(ord, tag))      # different tags give different values
    if definition.get("canonicalValues"):
        values = definition["canonicalValues"]
        return values[(index + seed) % len(values)]
    if kind == "boolean":
        if name == "primary":
            return index == 0          # exactly one primary per multi-valued attribute
        return seed % 2 == 0
    if kind == "integer":
        return 40 + index
    if kind == "decimal":
        return 4.5 + index
    if kind == "dateTime":
        return "2024-02-29T13:14:%02dZ" % index
    if kind == "binary":
        return base64.b64encode(("%s-%s-%d" % (name, tag, index)).encode()).decode()
    if kind == "reference":
        return "https://example.org/%s/%s/%d" % (name.strip("$"), tag, index)
    return "%s %s %d" % (name, tag, index)


CORE_WRITABLE = [d for d in published_attributes(scim_appliance.USER_SCHEMA) if writable(d)]
ENTERPRISE_WRITABLE = [d for d in published_attributes(scim_appliance.ENTERPRISE_USER_SCHEMA)
                       if writable(d)]


def full_user(tag, manager_id):
    """Every writable User and Enterprise User attribute, plus externalId."""
    body = {"schemas": [URN_USER, URN_ENTERPRISE], "externalId": "ext-%s" % tag}
    for definition in CORE_WRITABLE:
        body[definition["name"]] = sample_value(definition, tag)
    body["userName"] = "user-%s@example.com" % tag
    enterprise = {d["name"]: sample_value(d, tag) for d in ENTERPRISE_WRITABLE}
    enterprise["manager"] = {"value": manager_id, "$ref": USERS_URL + manager_id}
    body[URN_ENTERPRISE] = enterprise
    return body


def assert_has_all(resource, body):
    """Every attribute of `body` (but schemas) comes back exactly as sent."""
    for key, value in body.items():
        if key != "schemas":
            assert resource[key] == value, key
    assert URN_ENTERPRISE in resource["schemas"]


# -- create (RFC 7644 §3.3, R7, R8) ------------------------------------------------

def test_schemas_endpoint_publishes_the_attributes_the_round_trip_tests_use(client):
    """The generated full user covers every attribute /Schemas publishes."""
    published = {s["id"]: s["attributes"] for s in client.get("/Schemas").json["Resources"]}
    assert published[URN_USER] == published_attributes(scim_appliance.USER_SCHEMA)
    assert published[URN_ENTERPRISE] == published_attributes(scim_appliance.ENTERPRISE_USER_SCHEMA)


def test_post_user_returns_201_with_location_etag_and_meta(client, db):
    """RFC 7644 §3.3: 201, Location == meta.location, ETag == meta.version (R7, R8)."""
    response = client.post("/Users", {
        "schemas": [URN_USER], "userName": "bjensen@example.com", "externalId": "ext-1",
        "displayName": "Babs Jensen", "active": True})
    body = response.json
    assert response.status_int == 201
    assert response.content_type == "application/scim+json"
    user_id = body["id"]
    location = USERS_URL + user_id
    assert response.headers["Location"] == location
    assert response.headers["ETag"] == body["meta"]["version"] == 'W/"1"'
    assert body["schemas"] == [URN_USER]
    assert body["userName"] == "bjensen@example.com"
    assert body["externalId"] == "ext-1"
    assert body["meta"]["resourceType"] == "User"
    assert body["meta"]["location"] == location
    assert DATE_TIME.match(body["meta"]["created"])
    assert body["meta"]["lastModified"] == body["meta"]["created"]
    row = user_row(db, user_id)
    assert row["user_name"] == "bjensen@example.com"
    assert row["user_name_key"] == scim_appliance.fold("bjensen@example.com")
    assert row["external_id"] == "ext-1"
    assert row["display_name"] == "Babs Jensen"
    assert row["active"] == 1
    assert row["version"] == 1
    assert row["created"] == body["meta"]["created"]
    assert row["password_digest"] is None
    assert json.loads(row["document"]) == {
        "userName": "bjensen@example.com", "externalId": "ext-1",
        "displayName": "Babs Jensen", "active": True}


def test_post_user_ignores_client_supplied_id_and_meta(client, db):
    """RFC 7643 §3.1: id and meta are assigned by the service provider (R7 sends meta)."""
    body = client.post("/Users", {
        "schemas": [URN_USER], "userName": "client-ids", "id": "chosen-by-client",
        "meta": {"resourceType": "Group", "created": "2000-01-01T00:00:00Z",
                 "lastModified": "2000-01-01T00:00:00Z", "version": 'W/"77"',
                 "location": "https://evil.example/x"}}).json
    assert body["id"] != "chosen-by-client"
    assert str(uuid.UUID(body["id"])) == body["id"]
    assert body["meta"]["resourceType"] == "User"
    assert body["meta"]["version"] == 'W/"1"'
    assert body["meta"]["location"] == USERS_URL + body["id"]
    assert body["meta"]["created"] != "2000-01-01T00:00:00Z"
    assert user_row(db, "chosen-by-client") is None
    assert stored_document(db, "users", body["id"]) == {"userName": "client-ids"}


def test_new_ids_are_uuid7_in_creation_order(client, db):
    """Ids are UUIDv7 (RFC 9562 §5.7): 48 bits of Unix milliseconds first, so
    they sort in creation order (index locality, §6.2), then random bits."""
    before_ms = time.time_ns() // 1000000
    ids = []
    for n in range(3):
        ids.append(client.post("/Users", {"schemas": [URN_USER], "userName": "seq%d" % n}).json["id"])
        time.sleep(0.002)
    after_ms = time.time_ns() // 1000000
    for user_id in ids:
        parsed = uuid.UUID(user_id)
        assert str(parsed) == user_id and parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before_ms <= parsed.int >> 80 <= after_ms
        assert user_row(db, user_id)["id"] == user_id
    assert ids == sorted(ids) and len(set(ids)) == 3
    # Ids made in the same millisecond still differ in their 74 random bits.
    same_ms = {scim_appliance.new_resource_id() for _ in range(1000)}
    assert len(same_ms) == 1000


def test_location_comes_from_public_url_not_request_headers(client, db):
    """meta.location/Location are built from public_url, never Host or X-Forwarded-*."""
    response = client.post("/Users", {"userName": "hosted"}, headers={
        "Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"})
    user_id = response.json["id"]
    assert response.headers["Location"] == USERS_URL + user_id
    assert response.json["meta"]["location"] == USERS_URL + user_id
    assert user_row(db, user_id)["user_name"] == "hosted"


@pytest.mark.parametrize("body", [
    {"schemas": [URN_USER]},
    {"schemas": [URN_USER], "userName": ""},
    {"schemas": [URN_USER], "userName": "   "},
    {"schemas": [URN_USER], "userName": None},
    {"schemas": [URN_USER], "displayName": "No Name", "emails": [{"value": "x@example.com"}]},
], ids=["absent", "empty", "blank", "null", "other-attributes-only"])
def test_post_user_without_username_is_400_and_stores_nothing(client, db, body):
    """RFC 7643 §4.1.1: userName is required; RFC 7644 §3.12 invalidValue."""
    assert_scim_error(client.post("/Users", body, status=400), 400, "invalidValue")
    assert user_count(db) == 0


@pytest.mark.parametrize("raw", [b"[]", b'"a user"', b"42", b"null", b'[{"userName": "x"}]'])
def test_post_user_with_non_object_body_is_400(client, db, raw):
    """RFC 7644 §3.3: the body is a resource, a JSON object (invalidSyntax)."""
    assert_scim_error(client.request("POST", "/Users", raw=raw, status=400), 400, "invalidSyntax")
    assert user_count(db) == 0


@pytest.mark.parametrize("body", [
    {"userName": 42},
    {"userName": "typed", "active": "maybe"},
    {"userName": "typed", "emails": [42]},
    {"userName": "typed", "name": "Joy Young"},
    {"userName": "typed", "x509Certificates": [{"value": "not base64!"}]},
    {"userName": "typed", URN_ENTERPRISE: "not an object"},
])
def test_post_user_with_wrongly_typed_value_is_400_and_stores_nothing(client, db, body):
    """R33: invalid values are rejected with a descriptive message (invalidValue)."""
    error = assert_scim_error(client.post("/Users", body, status=400), 400, "invalidValue")
    assert error["detail"]
    assert user_count(db) == 0


# -- every published attribute round-trips -----------------------------------------

def test_every_writable_attribute_round_trips_through_post_and_get(client, db):
    """RFC 7644 §3.3/§3.4.1: what was created is what is returned, for every attribute."""
    manager = client.create_user("manager@example.com")
    body = full_user("post", manager["id"])
    created = client.post("/Users", body).json
    assert_has_all(created, body)
    fetched = client.get("/Users/" + created["id"]).json
    assert_has_all(fetched, body)
    assert fetched == created
    expected = {k: v for k, v in body.items() if k != "schemas"}
    assert stored_document(db, "users", created["id"]) == expected


def test_every_writable_attribute_round_trips_through_put(client, db):
    """RFC 7644 §3.5.1: PUT replaces with the body; every attribute comes back."""
    manager = client.create_user("manager@example.com")
    user = client.post("/Users", full_user("before", manager["id"])).json
    body = full_user("after", manager["id"])
    replaced = client.put("/Users/" + user["id"], body).json
    assert_has_all(replaced, body)
    assert client.get("/Users/" + user["id"]).json == replaced
    assert replaced["meta"]["version"] == 'W/"2"'
    expected = {k: v for k, v in body.items() if k != "schemas"}
    assert stored_document(db, "users", user["id"]) == expected


PATCH_TARGETS = ([(d["name"], d) for d in CORE_WRITABLE]
                 + [(URN_ENTERPRISE + ":" + d["name"], d) for d in ENTERPRISE_WRITABLE]
                 + [("externalId", {"name": "externalId", "type": "string"})])


@pytest.mark.parametrize("path,definition", PATCH_TARGETS, ids=[p for p, _ in PATCH_TARGETS])
def test_patch_replace_of_each_attribute_round_trips(client, db, path, definition):
    """RFC 7644 §3.5.2.3: replace sets the attribute; the others are untouched."""
    manager = client.create_user("manager@example.com")
    before = full_user("old", manager["id"])
    user = client.post("/Users", before).json
    value = sample_value(definition, "new")
    if definition["name"] == "userName":
        value = "renamed@example.com"
    if definition["name"] == "manager":
        other = client.create_user("other-manager@example.com")
        value = {"value": other["id"], "$ref": USERS_URL + other["id"]}
    response = client.patch("/Users/" + user["id"],
                            [{"op": "replace", "path": path, "value": value}], status=200)
    patched = response.json
    assert response.headers["ETag"] == patched["meta"]["version"] == 'W/"2"'
    expected = {k: v for k, v in before.items() if k != "schemas"}
    if path.startswith(URN_ENTERPRISE):
        expected[URN_ENTERPRISE] = dict(expected[URN_ENTERPRISE], **{definition["name"]: value})
        assert patched[URN_ENTERPRISE][definition["name"]] == value
    else:
        expected[definition["name"]] = value
        assert patched[definition["name"]] == value
    assert_has_all(patched, expected)
    assert client.get("/Users/" + user["id"]).json == patched
    assert stored_document(db, "users", user["id"]) == expected


# -- what is ignored, what is kept (R33, R34) ---------------------------------------

def test_unknown_core_attributes_and_nulls_are_ignored(client, db):
    """R34: unknown attributes and nulls are ignored rather than rejected."""
    body = client.post("/Users", {
        "schemas": [URN_USER], "userName": "ignore@example.com", "foo": 1, "bar": {"x": [1, 2]},
        "department": None, "manager": None, "title": None, "nickName": "Nick"}).json
    for key in ("foo", "bar", "department", "manager", "title", URN_ENTERPRISE):
        assert key not in body
    assert body["nickName"] == "Nick"
    assert body["schemas"] == [URN_USER]
    assert stored_document(db, "users", body["id"]) == {
        "userName": "ignore@example.com", "nickName": "Nick"}


def test_entra_example_body_with_malformed_urn_and_nulls_is_accepted(client, db):
    """R34: Microsoft's documented create body (malformed URN, nulls, top-level
    department/manager) creates the user."""
    body = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0User"],
        "externalId": "jyoung", "userName": "jyoung@testuser.com", "active": True,
        "addresses": None, "displayName": "Joy Young",
        "emails": [{"type": "work", "value": "jyoung@Contoso.com", "primary": True}],
        "meta": {"resourceType": "User"}, "name": {"familyName": "Young", "givenName": "Joy"},
        "phoneNumbers": None, "preferredLanguage": None, "title": None,
        "department": None, "manager": None}
    created = client.post("/Users", body).json
    assert created["schemas"] == [URN_USER]
    for key in ("addresses", "phoneNumbers", "preferredLanguage", "title", "department", "manager"):
        assert key not in created
    assert created["emails"] == [{"type": "work", "value": "jyoung@Contoso.com", "primary": True}]
    assert created["name"] == {"familyName": "Young", "givenName": "Joy"}
    assert stored_document(db, "users", created["id"]) == {
        "externalId": "jyoung", "userName": "jyoung@testuser.com", "active": True,
        "displayName": "Joy Young",
        "emails": [{"type": "work", "value": "jyoung@Contoso.com", "primary": True}],
        "name": {"familyName": "Young", "givenName": "Joy"}}


def test_entra_create_user_body_with_empty_roles_is_accepted(client, db):
    """R7: Microsoft's create body, with client meta and "roles": []."""
    body = {
        "schemas": [URN_USER, URN_ENTERPRISE],
        "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
        "userName": "Test_User_00aa00aa-bb11-cc22-dd33-44ee44ee44ee", "active": True,
        "emails": [{"primary": True, "type": "work",
                    "value": "Test_User_11bb11bb-cc22-dd33-ee44-55ff55ff55ff@testuser.com"}],
        "meta": {"resourceType": "User"},
        "name": {"formatted": "givenName familyName", "familyName": "familyName",
                 "givenName": "givenName"},
        "roles": []}
    created = client.post("/Users", body).json
    for key in ("externalId", "userName", "active", "emails", "name"):
        assert created[key] == body[key]
    assert "roles" not in created
    document = stored_document(db, "users", created["id"])
    assert document["userName"] == body["userName"]
    assert "roles" not in document and "meta" not in document


def test_unknown_extension_objects_are_kept_and_listed_in_schemas(client, db):
    """Entra custom mappings: an unknown extension URN object round-trips."""
    extension = {"costCode": "C-17", "tags": ["a", "b"], "nested": {"level": 2}, "empty": None}
    created = client.post("/Users", {
        "schemas": [URN_USER, CUSTOM_URN], "userName": "custom@example.com",
        CUSTOM_URN: extension}).json
    kept = {"costCode": "C-17", "tags": ["a", "b"], "nested": {"level": 2}}
    assert created[CUSTOM_URN] == kept
    assert CUSTOM_URN in created["schemas"]
    fetched = client.get("/Users/" + created["id"]).json
    assert fetched[CUSTOM_URN] == kept
    assert CUSTOM_URN in fetched["schemas"]
    listed = list_users(client, '?filter=userName eq "custom@example.com"')["Resources"][0]
    assert listed[CUSTOM_URN] == kept
    assert stored_document(db, "users", created["id"])[CUSTOM_URN] == kept


@pytest.mark.parametrize("phone", ["55555555555", "+1 (555) 555-5555", "555.555.5555 ext. 12"])
def test_phone_numbers_are_stored_and_returned_exactly_as_sent(client, db, phone):
    """R33: "A phone number sent as 55555555555 shouldn't be saved/returned as +5 (555) 555-5555"."""
    numbers = [{"value": phone, "type": "work", "primary": True}]
    created = client.create_user("phone@example.com", phoneNumbers=numbers)
    assert client.get("/Users/" + created["id"]).json["phoneNumbers"] == numbers
    assert stored_document(db, "users", created["id"])["phoneNumbers"] == numbers


@pytest.mark.parametrize("user_name", ["MiXeD.Case@Example.COM", "ÄNNE@x.com", "A\u0308nne", "  padded  "])
def test_username_is_stored_exactly_as_sent(client, db, user_name):
    """R33: never reformat userName (case, composition, spaces)."""
    created = client.create_user(user_name)
    assert created["userName"] == user_name
    assert client.get("/Users/" + created["id"]).json["userName"] == user_name
    row = user_row(db, created["id"])
    assert row["user_name"] == user_name
    assert json.loads(row["document"])["userName"] == user_name
    assert row["user_name_key"] == scim_appliance.fold(user_name)


# -- password (RFC 7643 §4.1.1: writeOnly, returned never) --------------------------

PASSWORD = "Corr3ct-Horse-Battery-Staple!"


def digest_matches(digest, password):
    scheme, n, r, p, salt, key = digest.split("$")
    assert scheme == "scrypt"
    derived = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), maxmem=2 ** 26)
    return derived == base64.b64decode(key)


def assert_password_not_stored_in_clear(db, settings, user_id, password):
    row = user_row(db, user_id)
    assert "password" not in json.loads(row["document"])
    assert row["password_digest"].startswith("scrypt$")
    assert password not in row["password_digest"]
    assert all(password not in str(value) for value in row.values())
    assert digest_matches(row["password_digest"], password)
    for path in glob.glob(settings.db + "*"):
        with open(path, "rb") as handle:
            assert password.encode() not in handle.read()


def test_password_is_accepted_on_post_and_never_returned(client, db, settings):
    """RFC 7643 §4.1.1: password is writeOnly, returned "never"; stored only as a hash."""
    created = client.create_user("secret@example.com", password=PASSWORD)
    assert "password" not in created
    user_id = created["id"]
    responses = [
        client.get("/Users/" + user_id).json,
        client.get("/Users/" + user_id + "?attributes=password").json,
        client.get("/Users/" + user_id + "?attributes=userName,password").json,
        list_users(client)["Resources"][0],
        list_users(client, "?attributes=password")["Resources"][0],
        client.post("/Users/.search", {"schemas": [URN_SEARCH], "attributes": ["password"]},
                    status=200).json["Resources"][0],
    ]
    for response in responses:
        assert "password" not in response
        assert PASSWORD not in json.dumps(response)
    assert set(responses[1]) == {"schemas", "id"}
    assert_password_not_stored_in_clear(db, settings, user_id, PASSWORD)


@pytest.mark.parametrize("bad_password", [["Hunter2!secret"], {"value": "Hunter2!secret"}, 12345678])
def test_a_mistyped_password_is_never_echoed_in_the_error(client, db, bad_password):
    """Entra copies error details into its provisioning logs: a writeOnly value stays out of them."""
    response = client.post("/Users", {"userName": "echo@example.com", "password": bad_password}, status=400)
    body = assert_scim_error(response, 400, "invalidValue")
    assert "Hunter2" not in response.text and "12345678" not in response.text
    assert "password" in body["detail"]
    assert user_count(db) == 0
    user = client.create_user("echo@example.com")
    response = client.patch("/Users/" + user["id"], [
        {"op": "replace", "path": "password", "value": bad_password}], status=400)
    assert "Hunter2" not in response.text and "12345678" not in response.text
    assert user_row(db, user["id"])["password_digest"] is None


def test_password_set_by_put_replaces_the_digest_and_is_kept_when_omitted(client, db, settings):
    """RFC 7644 §3.5.1 with the project's choice: PUT without password keeps it."""
    user_id = client.create_user("put-secret@example.com", password="first-Passw0rd")["id"]
    first = user_row(db, user_id)["password_digest"]
    replaced = client.put("/Users/" + user_id, {"userName": "put-secret@example.com",
                                                "password": PASSWORD}).json
    assert "password" not in replaced
    assert_password_not_stored_in_clear(db, settings, user_id, PASSWORD)
    second = user_row(db, user_id)["password_digest"]
    assert second != first
    client.put("/Users/" + user_id, {"userName": "put-secret@example.com", "displayName": "D"})
    assert user_row(db, user_id)["password_digest"] == second


@pytest.mark.parametrize("operation", [
    {"op": "replace", "path": "password", "value": PASSWORD},
    {"op": "add", "path": "password", "value": PASSWORD},
    {"op": "Replace", "value": {"password": PASSWORD}},
])
def test_password_set_by_patch_is_hashed_and_not_returned(client, db, settings, operation):
    """RFC 7644 §3.5.2 on a writeOnly attribute: set, never echoed."""
    user_id = client.create_user("patch-secret@example.com")["id"]
    patched = client.patch("/Users/" + user_id, [operation], status=200).json
    assert "password" not in patched and PASSWORD not in json.dumps(patched)
    assert patched["meta"]["version"] == 'W/"2"'
    assert_password_not_stored_in_clear(db, settings, user_id, PASSWORD)


# -- groups is read-only and computed (RFC 7643 §4.1.2) ------------------------------

def test_groups_in_post_and_put_bodies_are_ignored(client, db):
    """RFC 7643 §4.1.2: groups is readOnly; membership changes go through the Group."""
    group = client.create_group("Readers")
    body = {"schemas": [URN_USER], "userName": "joiner@example.com",
            "groups": [{"value": group["id"], "display": "Readers", "type": "direct"}]}
    created = client.post("/Users", body).json
    assert "groups" not in created
    assert stored_members(db, group["id"]) == set()
    assert "groups" not in stored_document(db, "users", created["id"])
    replaced = client.put("/Users/" + created["id"], body).json
    assert "groups" not in replaced
    assert stored_members(db, group["id"]) == set()
    assert "groups" not in stored_document(db, "users", created["id"])


def test_groups_are_computed_from_memberships_and_survive_put(client, db):
    """RFC 7643 §4.1.2: value, $ref, display and type "direct" of each group."""
    user = client.create_user("member@example.com")
    beta = client.create_group("Beta", members=[{"value": user["id"]}])
    alpha = client.create_group("alpha", members=[{"value": user["id"]}])
    client.create_group("Unrelated")
    expected = [
        {"value": alpha["id"], "$ref": GROUPS_URL + alpha["id"], "display": "alpha", "type": "direct"},
        {"value": beta["id"], "$ref": GROUPS_URL + beta["id"], "display": "Beta", "type": "direct"}]
    fetched = client.get("/Users/" + user["id"]).json
    assert sorted(fetched["groups"], key=lambda g: g["display"].lower()) == expected
    listed = list_users(client)["Resources"][0]
    assert sorted(listed["groups"], key=lambda g: g["display"].lower()) == expected
    # PUT with an empty groups list does not touch memberships.
    replaced = client.put("/Users/" + user["id"], {"userName": "member@example.com", "groups": []}).json
    assert sorted(replaced["groups"], key=lambda g: g["display"].lower()) == expected
    assert user["id"] in stored_members(db, alpha["id"]) and user["id"] in stored_members(db, beta["id"])
    # Deleting the group makes it disappear from the user.
    client.delete("/Groups/" + beta["id"])
    assert client.get("/Users/" + user["id"]).json["groups"] == expected[:1]
    client.delete("/Groups/" + alpha["id"])
    assert "groups" not in client.get("/Users/" + user["id"]).json
    assert db.execute("SELECT count(*) FROM members").fetchone()[0] == 0


@pytest.mark.parametrize("operation", [
    {"op": "add", "path": "groups", "value": [{"value": "g"}]},
    {"op": "replace", "path": "groups", "value": []},
    {"op": "remove", "path": "groups"},
])
def test_patch_on_groups_is_refused_as_read_only(client, db, operation):
    """RFC 7644 §3.5.2: modifying a readOnly attribute is 400 mutability."""
    user = client.create_user("ro@example.com")
    group = client.create_group("G", members=[{"value": user["id"]}])
    before = snapshot(db, user["id"])
    assert_scim_error(client.patch("/Users/" + user["id"], [operation], status=400), 400, "mutability")
    assert snapshot(db, user["id"]) == before
    assert stored_members(db, group["id"]) == {user["id"]}


# -- uniqueness (R13, R15) -----------------------------------------------------------

CASE_PAIRS = [
    ("bjensen@example.com", "BJensen@Example.COM"),
    ("ÄNNE@x.com", "änne@x.com"),
    ("STRASSE", "straße"),
    ("A\u0308nne", "änne"),          # decomposed vs composed
    ("\u212aelvin", "kelvin"),         # KELVIN SIGN folds to k
    ("ǅemal", "ǆEMAL"),              # title-case digraph
]


@pytest.mark.parametrize("first,second", CASE_PAIRS)
def test_duplicate_username_on_post_is_409_with_unicode_case_folding(client, db, first, second):
    """R15, RFC 7644 §3.3: 409 uniqueness; userName is caseExact false (full folding)."""
    existing = client.create_user(first)
    error = assert_scim_error(client.post("/Users", {"userName": second}, status=409), 409, "uniqueness")
    assert error["detail"]
    assert user_count(db) == 1
    assert user_row(db, existing["id"])["user_name"] == first


@pytest.mark.parametrize("first,second", CASE_PAIRS)
def test_put_to_another_users_name_in_other_case_is_409_and_changes_nothing(client, db, first, second):
    """R15: uniqueness holds for PUT too; the failed PUT leaves the user as it was."""
    client.create_user(first)
    other = client.create_user("other@example.com", displayName="Other")
    before = snapshot(db, other["id"])
    response = client.put("/Users/" + other["id"], {"userName": second, "displayName": "Changed"},
                          status=409)
    assert_scim_error(response, 409, "uniqueness")
    assert snapshot(db, other["id"]) == before


@pytest.mark.parametrize("first,second", CASE_PAIRS)
@pytest.mark.parametrize("style", ["path", "pathless"])
def test_patch_to_another_users_name_in_other_case_is_409_and_changes_nothing(
        client, db, first, second, style):
    """R15: uniqueness holds for PATCH replace of userName."""
    client.create_user(first)
    other = client.create_user("other@example.com", displayName="Other")
    before = snapshot(db, other["id"])
    operation = ({"op": "replace", "path": "userName", "value": second} if style == "path"
                 else {"op": "replace", "value": {"userName": second, "displayName": "Changed"}})
    assert_scim_error(client.patch("/Users/" + other["id"], [operation], status=409), 409, "uniqueness")
    assert snapshot(db, other["id"]) == before


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_user_may_change_the_case_of_its_own_username(client, db, method):
    """R13: a user renamed to its own name in another case is no conflict."""
    user = client.create_user("case@example.com")
    if method == "PUT":
        result = client.put("/Users/" + user["id"], {"userName": "CASE@Example.com"}).json
    else:
        result = client.patch("/Users/" + user["id"], [
            {"op": "replace", "path": "userName", "value": "CASE@Example.com"}], status=200).json
    assert result["userName"] == "CASE@Example.com"
    row = user_row(db, user["id"])
    assert row["user_name"] == "CASE@Example.com"
    assert row["user_name_key"] == scim_appliance.fold("case@example.com")
    assert row["version"] == 2


def test_deleted_username_can_be_reused(client, db):
    """RFC 7644 §3.6: after DELETE the name is free again."""
    first = client.create_user("reuse@example.com")
    client.delete("/Users/" + first["id"])
    second = client.create_user("REUSE@example.com")
    assert second["id"] != first["id"]
    assert user_row(db, second["id"])["user_name"] == "REUSE@example.com"
    assert user_count(db) == 1


# -- read and delete (R9, R14, R35) -------------------------------------------------

@pytest.mark.parametrize("method,body", [("GET", None), ("PUT", {"userName": "x"}),
                                         ("PATCH", None), ("DELETE", None)])
def test_unknown_user_id_is_404_with_a_scim_error(client, db, method, body):
    """R14, RFC 7644 §3.12: 404 with the Error schema for an unknown id."""
    client.create_user("exists@example.com")
    if method == "PATCH":
        response = client.patch("/Users/5171a35d82074e068ce2",
                                [{"op": "replace", "path": "displayName", "value": "x"}], status=404)
    else:
        response = client.request(method, "/Users/5171a35d82074e068ce2", body, status=404)
    assert_scim_error(response, 404)
    assert user_count(db) == 1
    assert user_row(db, "5171a35d82074e068ce2") is None


def test_get_user_by_id_returns_the_stored_user(client, db):
    """R9: GET /Users/<id> → 200 with the full user and its ETag."""
    created = client.create_user("get@example.com", externalId="e1", active=True,
                                 name={"givenName": "G", "familyName": "F"})
    response = client.get("/Users/" + created["id"])
    assert response.json == created
    assert response.headers["ETag"] == created["meta"]["version"]
    assert stored_document(db, "users", created["id"])["name"] == {"givenName": "G", "familyName": "F"}


def test_delete_user_removes_it_everywhere(client, db):
    """R35, RFC 7644 §3.6: 204, then 404, absent from lists and from every group."""
    user = client.create_user("gone@example.com")
    keep = client.create_user("stays@example.com")
    groups = [client.create_group(name, members=[{"value": user["id"]}, {"value": keep["id"]}])
              for name in ("One", "Two")]
    response = client.delete("/Users/" + user["id"])
    assert response.status_int == 204
    assert response.body == b""
    assert_scim_error(client.get("/Users/" + user["id"], status=404), 404)
    assert user_names(list_users(client)) == ["stays@example.com"]
    assert list_users(client, '?filter=userName eq "gone@example.com"')["totalResults"] == 0
    for group in groups:
        assert stored_members(db, group["id"]) == {keep["id"]}
        members = client.get("/Groups/" + group["id"]).json["members"]
        assert [m["value"] for m in members] == [keep["id"]]
    assert user_row(db, user["id"]) is None
    assert_scim_error(client.delete("/Users/" + user["id"], status=404), 404)
    assert user_row(db, keep["id"]) is not None


# -- PUT replaces (RFC 7644 §3.5.1) and versions (§3.14) -----------------------------

def test_put_clears_attributes_the_body_omits(client, db):
    """RFC 7644 §3.5.1: PUT replaces all writable attributes; omitted ones are cleared."""
    manager = client.create_user("manager@example.com")
    user = client.post("/Users", full_user("full", manager["id"])).json
    replaced = client.put("/Users/" + user["id"], {"schemas": [URN_USER],
                                                   "userName": "user-full@example.com",
                                                   "displayName": "Only this"}).json
    assert {k for k in replaced if k not in ("schemas", "id", "meta")} == {"userName", "displayName"}
    assert replaced["schemas"] == [URN_USER]
    assert stored_document(db, "users", user["id"]) == {"userName": "user-full@example.com",
                                                        "displayName": "Only this"}
    row = user_row(db, user["id"])
    assert row["external_id"] is None and row["active"] is None


def test_put_ignores_read_only_attributes_in_the_body(client, db):
    """RFC 7644 §3.5.1: readOnly values in a PUT body are ignored; the id
    may be sent back, and only unchanged (check_own_id, test_okta.py)."""
    user = client.create_user("ro-put@example.com")
    before = snapshot(db, user["id"])
    refused = client.put("/Users/" + user["id"], {"schemas": [URN_USER], "id": "another-id",
                                                  "userName": "ro-put@example.com"}, status=400)
    assert_scim_error(refused, 400, "mutability")
    assert snapshot(db, user["id"]) == before
    replaced = client.put("/Users/" + user["id"], {
        "schemas": [URN_USER], "id": user["id"], "userName": "ro-put@example.com",
        "meta": {"created": "2000-01-01T00:00:00Z", "version": 'W/"99"', "resourceType": "Group"},
        "groups": [{"value": "x"}], "displayName": "D"}).json
    assert replaced["id"] == user["id"]
    assert replaced["meta"]["created"] == user["meta"]["created"]
    assert replaced["meta"]["version"] == 'W/"2"'
    assert replaced["meta"]["resourceType"] == "User"
    assert "groups" not in replaced
    assert user_row(db, "another-id") is None
    assert stored_document(db, "users", user["id"]) == {"userName": "ro-put@example.com",
                                                        "displayName": "D"}


def test_put_without_username_is_400_and_changes_nothing(client, db):
    """RFC 7643 §4.1.1: the replacement must still have a userName."""
    user = client.create_user("keep@example.com", displayName="K")
    before = snapshot(db, user["id"])
    assert_scim_error(client.put("/Users/" + user["id"], {"displayName": "X"}, status=400), 400,
                 "invalidValue")
    assert snapshot(db, user["id"]) == before


@pytest.mark.parametrize("stale", ['W/"7"', '"7"', 'W/"0", W/"3"'])
def test_put_with_stale_if_match_is_412_and_changes_nothing(client, db, stale):
    """RFC 7644 §3.14: a stale If-Match gets 412 Precondition Failed."""
    user = client.create_user("etag@example.com")
    client.patch("/Users/" + user["id"], [{"op": "replace", "path": "title", "value": "T"}], status=200)
    before = snapshot(db, user["id"])
    response = client.put("/Users/" + user["id"], {"userName": "etag@example.com", "title": "New"},
                          headers={"If-Match": stale}, status=412)
    assert_scim_error(response, 412)
    assert snapshot(db, user["id"]) == before


@pytest.mark.parametrize("header", ["*", 'W/"1"', '"1"', 'W/"5", W/"1"'])
def test_put_with_matching_if_match_succeeds(client, db, header):
    """RFC 7644 §3.14 / RFC 7232 §3.1: a current version or "*" lets the PUT through."""
    user = client.create_user("etag@example.com")
    response = client.put("/Users/" + user["id"], {"userName": "etag@example.com", "title": "New"},
                          headers={"If-Match": header})
    assert response.json["title"] == "New"
    assert response.headers["ETag"] == response.json["meta"]["version"] == 'W/"2"'
    assert user_row(db, user["id"])["version"] == 2


def test_delete_with_stale_if_match_is_412_and_keeps_the_user(client, db):
    """RFC 7644 §3.14 applies to DELETE as well."""
    user = client.create_user("etag-del@example.com")
    assert_scim_error(client.delete("/Users/" + user["id"], headers={"If-Match": 'W/"9"'}, status=412), 412)
    assert user_row(db, user["id"]) is not None
    client.delete("/Users/" + user["id"], headers={"If-Match": 'W/"1"'})
    assert user_row(db, user["id"]) is None


@pytest.mark.parametrize("header", ['W/"1"', '"1"', 'W/"4", W/"1"', 'W/"4",W/"1"', "*"])
def test_get_with_if_none_match_of_the_current_version_is_304(client, db, header):
    """RFC 7644 §3.14, RFC 7232 §3.2: If-None-Match matching the current ETag → 304."""
    user = client.create_user("cache@example.com")
    response = client.get("/Users/" + user["id"], headers={"If-None-Match": header}, status=304)
    assert response.body == b""
    assert response.headers["ETag"] == 'W/"1"'
    assert user_row(db, user["id"])["version"] == 1


def test_get_with_if_none_match_of_an_old_version_returns_the_user(client, db):
    """RFC 7644 §3.14: once the resource changes, the old ETag no longer matches."""
    user = client.create_user("cache@example.com")
    client.patch("/Users/" + user["id"], [{"op": "replace", "path": "title", "value": "T"}], status=200)
    response = client.get("/Users/" + user["id"], headers={"If-None-Match": 'W/"1"'}, status=200)
    assert response.json["title"] == "T"
    assert response.headers["ETag"] == 'W/"2"'
    assert user_row(db, user["id"])["version"] == 2


# -- listing and paging (R10, R11, R32; RFC 7644 §3.4.2.4) ---------------------------

@pytest.fixture
def seven_users(client):
    names = ["u%d@example.com" % i for i in (4, 1, 7, 3, 6, 2, 5)]
    for name in names:
        client.create_user(name)
    return sorted(names)


@pytest.mark.parametrize("query", ['?filter=userName eq "nobody"', "", "?startIndex=1&count=10"])
def test_empty_result_is_200_with_every_list_field(client, db, query):
    """R11: zero results → 200 and a complete, empty ListResponse, never 404."""
    body = list_users(client, query)
    assert body == {"schemas": [URN_LIST], "totalResults": 0, "Resources": [],
                    "startIndex": 1, "itemsPerPage": 0}
    assert user_count(db) == 0


@pytest.mark.parametrize("start,count,expected", [
    (1, 3, slice(0, 3)), (4, 3, slice(3, 6)), (7, 3, slice(6, 7)), (8, 3, slice(7, 7)),
    (3, 2, slice(2, 4)), (1, 100, slice(0, 7)), (100, 5, slice(7, 7)),
])
def test_paging_with_start_index_and_count(client, seven_users, start, count, expected):
    """R32, RFC 7644 §3.4.2.4: 1-based startIndex, at most count resources."""
    body = list_users(client, "?sortBy=userName&startIndex=%d&count=%d" % (start, count))
    assert body["totalResults"] == 7
    assert body["startIndex"] == start
    assert user_names(body) == seven_users[expected]
    assert body["itemsPerPage"] == len(seven_users[expected])


def test_pages_cover_every_user_exactly_once(client, seven_users):
    """R32: walking the pages yields each user once (Entra's paginated listing)."""
    seen = []
    start = 1
    while True:
        body = list_users(client, "?startIndex=%d&count=2" % start)
        if not body["Resources"]:
            break
        seen.extend(user_names(body))
        start += body["itemsPerPage"]
    assert sorted(seen) == seven_users


def test_default_page_without_parameters(client, seven_users):
    """RFC 7644 §3.4.2.4: without startIndex and count, the first page of DEFAULT_PAGE_SIZE."""
    body = list_users(client)
    assert body["startIndex"] == 1
    assert body["totalResults"] == 7 and body["itemsPerPage"] == 7
    assert sorted(user_names(body)) == seven_users
    assert scim_appliance.DEFAULT_PAGE_SIZE == 100


@pytest.mark.parametrize("query", ["?count=0", "?count=0&startIndex=3", "?count=-1", "?count=-100"])
def test_count_zero_or_negative_returns_only_total_results(client, seven_users, query):
    """RFC 7644 §3.4.2.4: count 0 returns no resources but totalResults; negative means 0."""
    body = list_users(client, query)
    assert body["totalResults"] == 7
    assert body["Resources"] == []
    assert body["itemsPerPage"] == 0


@pytest.mark.parametrize("start", ["0", "-1", "-50"])
def test_start_index_below_one_means_one(client, seven_users, start):
    """RFC 7644 §3.4.2.4: "A value less than 1 SHALL be interpreted as 1"."""
    body = list_users(client, "?sortBy=userName&count=2&startIndex=" + start)
    assert body["startIndex"] == 1
    assert user_names(body) == seven_users[:2]
    assert body["totalResults"] == 7


def test_count_above_the_maximum_is_capped(client, db, monkeypatch):
    """RFC 7644 §3.4.2.4: the server may return fewer than count; count is capped at MAX_PAGE_SIZE."""
    assert scim_appliance.MAX_PAGE_SIZE == 1000
    for i in range(5):
        client.create_user("cap%d@example.com" % i)
    body = list_users(client, "?count=5000")
    assert body["itemsPerPage"] == 5 <= scim_appliance.MAX_PAGE_SIZE
    assert scim_appliance.make_list_query({"count": "5000"}).count == 1000
    assert scim_appliance.make_list_query({"count": "1000"}).count == 1000
    monkeypatch.setattr(scim_appliance, "MAX_PAGE_SIZE", 3)
    body = list_users(client, "?count=1000")
    assert body["itemsPerPage"] == 3 and body["totalResults"] == 5
    assert user_count(db) == 5


@pytest.mark.parametrize("query, total_on_page", [
    ("?startIndex=" + "9" * 30, 0),                       # past any page: empty, not an error
    ("?startIndex=" + "9" * 19 + "&count=" + "9" * 19, 0),  # beyond SQLite's 64-bit integers
    ("?count=" + "9" * 30, 7),                            # capped at MAX_PAGE_SIZE
    ("?count=-" + "9" * 30, 0),                           # negative means 0
    ("?startIndex=-" + "9" * 30 + "&count=3", 3),         # below 1 means 1
])
def test_huge_paging_values_follow_the_rfc_never_500(client, seven_users, query, total_on_page):
    """Issue 3 item 11: huge startIndex/count follow RFC 7644 §3.4.2.4."""
    body = list_users(client, query)
    assert body["totalResults"] == 7 and body["itemsPerPage"] == total_on_page
    assert 1 <= body["startIndex"] <= 2 ** 62


def test_huge_paging_values_in_a_search_request(client, seven_users):
    body = client.post("/Users/.search", {"schemas": [URN_SEARCH], "startIndex": 10 ** 30,
                                          "count": 10 ** 30}, status=200).json
    assert body["totalResults"] == 7 and body["Resources"] == []


@pytest.mark.parametrize("query", ["?count=abc", "?count=1.5", "?startIndex=x", "?startIndex=1e3",
                                   "?count=0x10", "?startIndex=2&count=ten"])
def test_non_integer_paging_parameters_are_400(client, seven_users, query):
    """RFC 7644 §3.4.2.4: startIndex and count are integers (invalidValue)."""
    assert_scim_error(client.get("/Users" + query, status=400), 400, "invalidValue")


@pytest.mark.parametrize("body", [
    {"startIndex": "x"}, {"count": "many"}, {"count": 2.5}, {"count": True}, {"startIndex": [1]},
])
def test_non_integer_paging_in_search_request_is_400(client, seven_users, body):
    """RFC 7644 §3.4.3: a SearchRequest's startIndex and count are integers."""
    request = dict(body, schemas=[URN_SEARCH])
    assert_scim_error(client.post("/Users/.search", request, status=400), 400, "invalidValue")


def test_search_request_pages_like_get(client, seven_users):
    """RFC 7644 §3.4.3: POST .search takes the same paging and sorting."""
    body = client.post("/Users/.search", {"schemas": [URN_SEARCH], "startIndex": 2, "count": 3,
                                          "sortBy": "userName", "sortOrder": "descending"},
                       status=200).json
    assert body["totalResults"] == 7 and body["startIndex"] == 2 and body["itemsPerPage"] == 3
    assert user_names(body) == list(reversed(seven_users))[1:4]


# -- sorting (RFC 7644 §3.4.2.3) ---------------------------------------------------

def test_sort_by_username_ascending_and_descending_ignores_case(client, db):
    """RFC 7644 §3.4.2.3: sortBy userName (caseExact false) in both orders."""
    for name in ["bravo", "Delta", "alpha", "Charlie", "echo"]:
        client.create_user(name)
    ascending = ["alpha", "bravo", "Charlie", "Delta", "echo"]
    assert user_names(list_users(client, "?sortBy=userName")) == ascending
    assert user_names(list_users(client, "?sortBy=userName&sortOrder=ascending")) == ascending
    assert user_names(list_users(client, "?sortBy=username&sortOrder=descending")) == ascending[::-1]
    assert user_count(db) == 5


def test_sort_by_family_name(client, db):
    """RFC 7644 §3.4.2.3: sortBy a sub-attribute; resources without a value are
    "ordered last if ascending and first if descending"."""
    for user_name, family in [("a", "Zeta"), ("b", "alpha"), ("c", None), ("d", "Mu")]:
        client.create_user(user_name, **({"name": {"familyName": family}} if family else {}))
    assert user_names(list_users(client, "?sortBy=name.familyName")) == ["b", "d", "a", "c"]
    assert user_names(list_users(client, "?sortBy=name.familyName&sortOrder=descending")) == [
        "c", "a", "d", "b"]
    assert user_count(db) == 4


def test_sort_by_emails_uses_the_primary_value(client, db):
    """RFC 7644 §3.4.2.3: a multi-valued attribute sorts by its primary value, else the first."""
    client.create_user("first", emails=[{"value": "z@x.com"}, {"value": "b@x.com", "primary": True}])
    client.create_user("second", emails=[{"value": "m@x.com"}, {"value": "a@x.com"}])
    client.create_user("third", emails=[{"value": "c@x.com", "primary": True}])
    assert user_names(list_users(client, "?sortBy=emails")) == ["first", "third", "second"]
    assert user_names(list_users(client, "?sortBy=emails.value&sortOrder=descending")) == [
        "second", "third", "first"]
    assert user_count(db) == 3


@pytest.mark.parametrize("query", ["?sortBy=userName&sortOrder=up", "?sortOrder=sideways",
                                   "?sortBy=userName&sortOrder=asc"])
def test_invalid_sort_order_is_400(client, seven_users, query):
    """RFC 7644 §3.4.2.3: sortOrder is "ascending" or "descending"."""
    assert_scim_error(client.get("/Users" + query, status=400), 400, "invalidValue")


# -- attributes / excludedAttributes (RFC 7644 §3.4.2.5, R31) ------------------------

@pytest.fixture
def projected_user(client):
    return client.create_user(
        "proj@example.com", externalId="ext-proj", displayName="Pro Jected",
        name={"givenName": "Pro", "familyName": "Jected"},
        emails=[{"value": "p@example.com", "type": "work", "primary": True},
                {"value": "q@example.com", "type": "home"}],
        **{URN_ENTERPRISE: {"employeeNumber": "701984", "department": "Tour Operations"}})


# `schemas` names the core schema and the extensions the projected resource still holds.
CORE_ONLY = [URN_USER]

PROJECTIONS = [
    ("attributes=userName", lambda user: {"schemas": CORE_ONLY, "id": user["id"],
                                          "userName": "proj@example.com"}),
    ("attributes=name.givenName", lambda user: {"schemas": CORE_ONLY, "id": user["id"],
                                                "name": {"givenName": "Pro"}}),
    ("attributes=emails.value", lambda user: {
        "schemas": CORE_ONLY, "id": user["id"],
        "emails": [{"value": "p@example.com"}, {"value": "q@example.com"}]}),
    ("attributes=" + URN_ENTERPRISE + ":employeeNumber", lambda user: {
        "schemas": user["schemas"], "id": user["id"], URN_ENTERPRISE: {"employeeNumber": "701984"}}),
    ("attributes=id", lambda user: {"schemas": CORE_ONLY, "id": user["id"]}),
    ("attributes=USERNAME,displayName", lambda user: {
        "schemas": CORE_ONLY, "id": user["id"], "userName": "proj@example.com",
        "displayName": "Pro Jected"}),
    ("excludedAttributes=emails,meta", lambda user: {
        k: v for k, v in user.items() if k not in ("emails", "meta")}),
    ("excludedAttributes=id", lambda user: user),
    ("excludedAttributes=schemas,id", lambda user: user),
    ("excludedAttributes=name.givenName", lambda user: dict(user, name={"familyName": "Jected"})),
    ("excludedAttributes=" + URN_ENTERPRISE + ":department", lambda user: dict(
        user, **{URN_ENTERPRISE: {"employeeNumber": "701984"}})),
    ("excludedAttributes=" + URN_ENTERPRISE, lambda user: dict(
        {k: v for k, v in user.items() if k != URN_ENTERPRISE}, schemas=CORE_ONLY)),
]


def _split(parameter):
    name, _, value = parameter.partition("=")
    return name, value


@pytest.mark.parametrize("parameter,expected", PROJECTIONS, ids=[p for p, _ in PROJECTIONS])
def test_projection_on_get_by_id(client, projected_user, parameter, expected):
    """RFC 7644 §3.4.2.5: attributes / excludedAttributes; id and schemas are always returned."""
    body = client.get("/Users/%s?%s" % (projected_user["id"], parameter)).json
    assert body == expected(projected_user)


@pytest.mark.parametrize("parameter,expected", PROJECTIONS, ids=[p for p, _ in PROJECTIONS])
def test_projection_on_list(client, projected_user, parameter, expected):
    """RFC 7644 §3.4.2.5 applies to every resource of a ListResponse."""
    body = list_users(client, '?filter=userName eq "proj@example.com"&' + parameter)
    assert body["Resources"] == [expected(projected_user)]
    assert body["totalResults"] == 1


@pytest.mark.parametrize("parameter,expected", PROJECTIONS, ids=[p for p, _ in PROJECTIONS])
def test_projection_on_search_request(client, projected_user, parameter, expected):
    """RFC 7644 §3.4.3: attributes / excludedAttributes in a SearchRequest body."""
    name, value = _split(parameter)
    body = client.post("/Users/.search", {
        "schemas": [URN_SEARCH], "filter": 'id eq "%s"' % projected_user["id"],
        name: value.split(",")}, status=200).json
    assert body["Resources"] == [expected(projected_user)]


# -- soft delete (R19) ---------------------------------------------------------------

@pytest.mark.parametrize("how", ["post", "patch-bool", "patch-string", "put"])
def test_inactive_user_is_still_returned(client, db, how):
    """R19: "The user object should be returned in a request whether or not the user is active"."""
    if how == "post":
        user = client.create_user("soft@example.com", active=False)
    else:
        user = client.create_user("soft@example.com", active=True)
        if how == "put":
            client.put("/Users/" + user["id"], {"userName": "soft@example.com", "active": False})
        else:
            value = False if how == "patch-bool" else "False"
            client.patch("/Users/" + user["id"], [{"op": "Replace", "path": "active", "value": value}],
                         status=200)
    assert client.get("/Users/" + user["id"]).json["active"] is False
    by_name = list_users(client, '?filter=userName eq "soft@example.com"')
    assert [r["id"] for r in by_name["Resources"]] == [user["id"]]
    assert by_name["Resources"][0]["active"] is False
    assert [r["id"] for r in list_users(client, "?filter=active eq false")["Resources"]] == [user["id"]]
    assert [r["id"] for r in list_users(client)["Resources"]] == [user["id"]]
    row = user_row(db, user["id"])
    assert row["active"] == 0
    assert json.loads(row["document"])["active"] is False


def test_extension_keys_are_returned_whatever_the_case_of_urn(client, db):
    """A custom extension stored under "Urn:..." must come back, not be kept silently."""
    created = client.create_user("case@example.com", **{"Urn:example:custom:2.0:User": {"costCode": "42"}})
    assert created["Urn:example:custom:2.0:User"] == {"costCode": "42"}
    assert "Urn:example:custom:2.0:User" in created["schemas"]
    assert client.get("/Users/" + created["id"]).json["Urn:example:custom:2.0:User"] == {"costCode": "42"}


def test_custom_extension_attribute_keys_take_any_json_as_patch_does(client, db):
    """A URN-qualified custom attribute at the top of a POST body is kept like the nested form."""
    created = client.create_user("level@example.com", **{CUSTOM_URN + ":level": 5,
                                                         CUSTOM_URN + ":tags": ["a", "b"]})
    assert created[CUSTOM_URN] == {"level": 5, "tags": ["a", "b"]}
    assert stored_document(db, "users", created["id"])[CUSTOM_URN] == {"level": 5, "tags": ["a", "b"]}


@pytest.mark.parametrize("urn", ["urn:ex'ample:2.0:User", 'urn:ex"ample:2.0:User', "urn:ex ample:User"])
def test_extension_urns_with_quotes_or_spaces_are_not_kept(client, db, urn):
    """Custom URNs become JSON paths in SQL text: only letters, digits, '.', '-', '_' are allowed."""
    created = client.create_user("quote@example.com", **{urn: {"a": "b"}})
    assert urn not in created
    assert urn not in stored_document(db, "users", created["id"])


def test_a_resource_sent_back_as_returned_is_unchanged(client, db):
    """PUT of exactly what GET returned changes nothing; empty objects inside a
    custom extension list are dropped on the way in, never stored as null."""
    created = client.create_user("same@example.com", **{CUSTOM_URN: {"items": [{}, {"a": 1}], "n": None}})
    assert created[CUSTOM_URN] == {"items": [{"a": 1}]}
    fetched = client.get("/Users/" + created["id"]).json
    replaced = client.put("/Users/" + created["id"], fetched).json
    assert {k: v for k, v in replaced.items() if k != "meta"} == {k: v for k, v in fetched.items() if k != "meta"}
    assert stored_document(db, "users", created["id"])[CUSTOM_URN] == {"items": [{"a": 1}]}


@pytest.mark.parametrize("parameter, keys", [
    ("attributes=userName", {"schemas", "id", "userName"}),
    ("excludedAttributes=meta,emails", {"schemas", "id", "userName", "displayName"}),
])
def test_post_and_put_honour_attributes_and_excluded_attributes(client, db, parameter, keys):
    """RFC 7644 §3.9: attributes/excludedAttributes on "any operation that returns a resource"."""
    body = {"schemas": [URN_USER], "userName": "shape@example.com", "displayName": "Shape",
            "emails": [{"value": "shape@example.com", "type": "work"}]}
    response = client.post("/Users?" + parameter, body)
    assert set(response.json) == keys
    user_id = response.json["id"]
    assert response.headers["Location"] == USERS_URL + user_id
    assert stored_document(db, "users", user_id)["emails"] == body["emails"]
    response = client.put("/Users/%s?%s" % (user_id, parameter), dict(body, displayName="Shape 2"))
    assert set(response.json) == keys
    assert stored_document(db, "users", user_id)["displayName"] == "Shape 2"
