"""Discovery endpoints (RFC 7643 §5-7, RFC 7644 §4; R43): shape, and that what they say is true."""

import json

import pytest

import scim_appliance
from conftest import PUBLIC_URL, stored_document, stored_members
from scim_appliance import (MAX_PAGE_SIZE, URN_ENTERPRISE, URN_ERROR, URN_GROUP, URN_LIST,
                            URN_RESOURCE_TYPE, URN_SCHEMA, URN_SPC, URN_USER)

BASE = PUBLIC_URL + "/scim"
SCHEMA_URNS = (URN_USER, URN_ENTERPRISE, URN_GROUP)
CHARACTERISTICS = {
    "type": {"string", "boolean", "decimal", "integer", "dateTime", "reference", "complex", "binary"},
    "mutability": {"readOnly", "readWrite", "immutable", "writeOnly"},
    "returned": {"always", "never", "default", "request"},
    "uniqueness": {"none", "server", "global"},
}


def walk(value, where="$"):
    """Every (json-path, value) in a JSON document."""
    yield where, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, "%s.%s" % (where, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, "%s[%d]" % (where, index))


def scim_json(response):
    assert response.headers["Content-Type"].split(";")[0] == "application/scim+json"
    return response.json


def schema_attributes(anonymous, urn):
    return {a["name"]: a for a in anonymous.get("/Schemas/" + urn).json["attributes"]}


def attribute_paths(schema):
    """(name or name.sub, definition) for every attribute and sub-attribute of a schema."""
    for attribute in schema["attributes"]:
        yield attribute["name"], attribute, None
        for sub in attribute.get("subAttributes", []):
            yield "%s.%s" % (attribute["name"], sub["name"]), sub, attribute


# -- /ServiceProviderConfig ------------------------------------------------------

def test_service_provider_config(anonymous):
    """RFC 7643 §5; [REF] Postman checks patch.supported == true."""
    config = scim_json(anonymous.get("/ServiceProviderConfig"))
    assert config["schemas"] == [URN_SPC]
    assert config["patch"]["supported"] is True
    assert config["bulk"]["supported"] is False
    assert isinstance(config["bulk"]["maxOperations"], int) and isinstance(config["bulk"]["maxPayloadSize"], int)
    assert config["filter"] == {"supported": True, "maxResults": MAX_PAGE_SIZE}
    assert config["sort"]["supported"] is True
    assert config["etag"]["supported"] is True
    assert isinstance(config["changePassword"]["supported"], bool)
    schemes = config["authenticationSchemes"]
    assert [s["type"] for s in schemes] == ["oauthbearertoken"]
    assert schemes[0]["name"] and schemes[0]["description"]
    assert config["meta"]["location"] == BASE + "/ServiceProviderConfig"
    assert config["meta"]["resourceType"] == "ServiceProviderConfig"
    assert "id" not in config   # RFC 7643 §5: "no "id" attribute"


def test_discovery_needs_no_token_and_accepts_one(anonymous, client):
    """RFC 7644 §4: discovery is available without authentication; Entra sends its token anyway."""
    for path in ("/ServiceProviderConfig", "/ResourceTypes", "/Schemas"):
        assert anonymous.get(path).json == client.get(path).json


# -- /ResourceTypes ---------------------------------------------------------------

def test_resource_types_list(anonymous):
    """RFC 7643 §6; [REF] Postman: Resources[0].endpoint == "/Users"."""
    listing = scim_json(anonymous.get("/ResourceTypes"))
    assert listing["schemas"] == [URN_LIST]
    assert listing["totalResults"] == 2 and listing["itemsPerPage"] == 2 and listing["startIndex"] == 1
    assert listing["Resources"][0]["endpoint"] == "/Users"
    by_id = {r["id"]: r for r in listing["Resources"]}
    assert set(by_id) == {"User", "Group"}
    user, group = by_id["User"], by_id["Group"]
    assert user["name"] == "User" and user["endpoint"] == "/Users" and user["schema"] == URN_USER
    assert user["schemaExtensions"] == [{"schema": URN_ENTERPRISE, "required": False}]
    assert group["name"] == "Group" and group["endpoint"] == "/Groups" and group["schema"] == URN_GROUP
    assert group.get("schemaExtensions", []) == []
    for resource_type in listing["Resources"]:
        assert resource_type["schemas"] == [URN_RESOURCE_TYPE]
        assert resource_type["meta"] == {"resourceType": "ResourceType",
                                         "location": BASE + "/ResourceTypes/" + resource_type["id"]}


@pytest.mark.parametrize("name", ["User", "Group"])
def test_resource_type_by_name(anonymous, name):
    listed = {r["id"]: r for r in anonymous.get("/ResourceTypes").json["Resources"]}
    assert scim_json(anonymous.get("/ResourceTypes/" + name)) == listed[name]


@pytest.mark.parametrize("name", ["Users", "Nope", "Device", URN_USER])
def test_unknown_resource_type_is_scim_404(anonymous, name):
    body = scim_json(anonymous.get("/ResourceTypes/" + name, status=404))
    assert body["schemas"] == [URN_ERROR] and body["status"] == "404" and body["detail"]


def test_every_advertised_endpoint_and_schema_exists(anonymous, client):
    """Each ResourceType's endpoint answers, and its schemas are published under /Schemas."""
    published = {s["id"] for s in anonymous.get("/Schemas").json["Resources"]}
    for resource_type in anonymous.get("/ResourceTypes").json["Resources"]:
        assert client.get(resource_type["endpoint"]).json["schemas"] == [URN_LIST]
        assert resource_type["schema"] in published
        assert {e["schema"] for e in resource_type.get("schemaExtensions", [])} <= published


# -- /Schemas -------------------------------------------------------------------------

def test_schemas_list(anonymous):
    """R43: "Must return a list response"; [REF] Postman: the body contains "User Account"."""
    response = anonymous.get("/Schemas")
    listing = scim_json(response)
    assert "User Account" in response.text
    assert listing["schemas"] == [URN_LIST]
    assert listing["totalResults"] == 3 and listing["itemsPerPage"] == 3 and listing["startIndex"] == 1
    assert [s["id"] for s in listing["Resources"]] == list(SCHEMA_URNS)
    names = {s["id"]: (s["name"], s["description"]) for s in listing["Resources"]}
    assert names[URN_USER] == ("User", "User Account")
    assert names[URN_GROUP][0] == "Group"
    assert names[URN_ENTERPRISE][0] == "EnterpriseUser"
    for schema in listing["Resources"]:
        assert schema["schemas"] == [URN_SCHEMA]
        assert schema["meta"] == {"resourceType": "Schema", "location": BASE + "/Schemas/" + schema["id"]}
        assert schema["attributes"]


@pytest.mark.parametrize("urn", SCHEMA_URNS)
def test_schema_by_urn(anonymous, urn):
    listed = {s["id"]: s for s in anonymous.get("/Schemas").json["Resources"]}
    assert scim_json(anonymous.get("/Schemas/" + urn)) == listed[urn]


@pytest.mark.parametrize("urn", [
    "urn:ietf:params:scim:schemas:core:2.0:Device",
    "urn:ietf:params:scim:schemas:extension:CustomExtension:2.0:User",
    "User",
    URN_USER + "x",
])
def test_unknown_schema_is_scim_404(anonymous, urn):
    body = scim_json(anonymous.get("/Schemas/" + urn, status=404))
    assert body["schemas"] == [URN_ERROR] and body["status"] == "404" and body["detail"]


def test_user_schema_characteristics(anonymous):
    """RFC 7643 §4.1 / §8.7.1 and R43's example: userName, password, groups."""
    user = schema_attributes(anonymous, URN_USER)
    user_name = user["userName"]
    assert (user_name["type"], user_name["caseExact"], user_name["uniqueness"], user_name["required"],
            user_name["mutability"], user_name["multiValued"]) == ("string", False, "server", True,
                                                                  "readWrite", False)
    password = user["password"]
    assert password["returned"] == "never" and password["mutability"] == "writeOnly"
    groups = user["groups"]
    assert groups["mutability"] == "readOnly" and groups["multiValued"] is True
    assert all(sub["mutability"] == "readOnly" for sub in groups["subAttributes"])
    assert user["active"]["type"] == "boolean"
    assert user["emails"]["multiValued"] is True
    assert {s["name"] for s in user["emails"]["subAttributes"]} >= {"value", "type", "primary"}
    assert {s["name"] for s in user["name"]["subAttributes"]} >= {"givenName", "familyName", "formatted"}


def test_enterprise_schema_characteristics(anonymous):
    enterprise = schema_attributes(anonymous, URN_ENTERPRISE)
    assert {"employeeNumber", "department", "costCenter", "organization", "division", "manager"} <= set(enterprise)
    manager = {s["name"]: s for s in enterprise["manager"]["subAttributes"]}
    assert set(manager) == {"value", "$ref", "displayName"}
    assert manager["displayName"]["mutability"] == "readOnly"


def test_group_schema_characteristics(anonymous):
    """RFC 7643 §4.2: displayName required; members with value/$ref/display/type."""
    group = schema_attributes(anonymous, URN_GROUP)
    display_name = group["displayName"]
    assert display_name["required"] is True and display_name["caseExact"] is False
    assert display_name["uniqueness"] == "server"
    members = group["members"]
    assert members["type"] == "complex" and members["multiValued"] is True
    subs = {s["name"]: s for s in members["subAttributes"]}
    assert set(subs) == {"value", "$ref", "display", "type"}
    assert subs["type"]["canonicalValues"] == ["User", "Group"]
    assert subs["display"]["mutability"] == "readOnly"
    assert subs["$ref"]["type"] == "reference" and set(subs["$ref"]["referenceTypes"]) == {"User", "Group"}


def test_every_attribute_definition_is_complete_and_camel_cased(anonymous):
    """RFC 7643 §7 characteristics on every attribute; R43: camel-cased values such as "readWrite"."""
    seen = set()
    for schema in anonymous.get("/Schemas").json["Resources"]:
        for path, definition, parent in attribute_paths(schema):
            for key in ("name", "type", "multiValued", "description", "required", "caseExact",
                        "mutability", "returned", "uniqueness"):
                assert key in definition, (schema["id"], path, key)
            for key, allowed in CHARACTERISTICS.items():
                assert definition[key] in allowed, (schema["id"], path, key, definition[key])
                seen.add(definition[key])
            for key in ("multiValued", "required", "caseExact"):
                assert isinstance(definition[key], bool), (schema["id"], path, key)
            assert isinstance(definition["description"], str) and definition["description"]
            assert (definition["type"] == "complex") == bool(definition.get("subAttributes")), path
            if parent is not None:
                assert definition["type"] != "complex", path   # RFC 7643 §2.3.8: no nested complex
            if definition["type"] == "reference":
                assert definition.get("referenceTypes"), path
    assert {"readWrite", "readOnly", "writeOnly", "immutable", "never", "server"} <= seen


@pytest.mark.parametrize("path", ["/ServiceProviderConfig", "/ResourceTypes", "/ResourceTypes/User",
                                  "/ResourceTypes/Group", "/Schemas"] + ["/Schemas/" + u for u in SCHEMA_URNS])
def test_discovery_documents_contain_no_nulls(anonymous, path):
    """R43: "If a value isn't present, don't send null values"."""
    document = anonymous.get(path).json
    nulls = [where for where, value in walk(document) if value is None]
    assert nulls == []
    empty_strings = [where for where, value in walk(document) if value == ""]
    assert empty_strings == []


# -- the published metadata is true ------------------------------------------------------

def readonly_paths(anonymous):
    """(schema urn, "attr" or "attr.sub") of every readOnly attribute /Schemas publishes,
    not counting sub-attributes of a readOnly parent (the parent covers them)."""
    found = set()
    for schema in anonymous.get("/Schemas").json["Resources"]:
        for path, definition, parent in attribute_paths(schema):
            if definition["mutability"] == "readOnly" and (parent is None or parent["mutability"] != "readOnly"):
                found.add((schema["id"], path))
    return found


def probe_user_groups(client, db):
    group = client.create_group("Target")
    response = client.post("/Users", {"schemas": [URN_USER], "userName": "joiner@example.com",
                                      "groups": [{"value": group["id"], "display": "Target",
                                                  "type": "direct"}]})
    user_id = response.json["id"]
    assert "groups" not in stored_document(db, "users", user_id)
    assert stored_members(db, group["id"]) == set()
    assert "groups" not in response.json
    assert "groups" not in client.get("/Users/" + user_id).json


def probe_manager_display_name(client, db):
    boss = client.create_user("boss@example.com", displayName="Real Boss")
    response = client.post("/Users", {"schemas": [URN_USER, URN_ENTERPRISE], "userName": "report@example.com",
                                      URN_ENTERPRISE: {"manager": {"value": boss["id"],
                                                                   "displayName": "Forged Boss"}}})
    stored = stored_document(db, "users", response.json["id"])
    assert stored[URN_ENTERPRISE]["manager"] == {"value": boss["id"]}
    assert "Forged Boss" not in response.text
    assert "Forged Boss" not in client.get("/Users/" + response.json["id"]).text


def probe_member_display(client, db):
    member = client.create_user("member@example.com", displayName="Real Name")
    response = client.post("/Groups", {"schemas": [URN_GROUP], "displayName": "Team",
                                       "members": [{"value": member["id"], "display": "Forged Name"}]})
    group_id = response.json["id"]
    assert stored_members(db, group_id) == {member["id"]}
    assert "members" not in stored_document(db, "groups", group_id)
    assert "Forged Name" not in json.dumps(stored_document(db, "groups", group_id))
    for body in (response.json, client.get("/Groups/" + group_id).json):
        assert [m.get("display") for m in body["members"]] == ["Real Name"]


READ_ONLY_PROBES = {
    (URN_USER, "groups"): probe_user_groups,
    (URN_ENTERPRISE, "manager.displayName"): probe_manager_display_name,
    (URN_GROUP, "members.display"): probe_member_display,
}


def test_every_published_read_only_attribute_has_a_probe(anonymous):
    """If /Schemas grows a readOnly attribute, this file must learn to check it."""
    assert readonly_paths(anonymous) == set(READ_ONLY_PROBES)


@pytest.mark.parametrize("key", sorted(READ_ONLY_PROBES), ids=lambda k: k[1])
def test_published_read_only_attribute_is_not_stored_from_post(client, db, key):
    """RFC 7643 §2.2 readOnly: "The attribute SHALL NOT be modified" by the client."""
    READ_ONLY_PROBES[key](client, db)


def test_server_assigned_id_and_meta_ignore_client_values(client, db):
    """RFC 7643 §3.1: id and meta are the service provider's; a POST cannot choose them."""
    response = client.post("/Users", {"schemas": [URN_USER], "userName": "forger@example.com",
                                      "id": "forged-id", "meta": {"created": "2001-01-01T00:00:00Z",
                                                                   "version": 'W/"99"',
                                                                   "location": "https://evil/x"}})
    user_id = response.json["id"]
    assert user_id != "forged-id"
    assert db.execute("SELECT count(*) FROM users WHERE id = 'forged-id'").fetchone()[0] == 0
    assert response.json["meta"]["version"] == 'W/"1"'
    assert response.json["meta"]["location"] == BASE + "/Users/" + user_id
    assert not response.json["meta"]["created"].startswith("2001")
    stored = stored_document(db, "users", user_id)
    assert "id" not in stored and "meta" not in stored


def test_published_returned_never_attributes_are_never_returned(anonymous, client, db):
    """returned "never" (RFC 7643 §2.2) holds for POST, GET, list, PUT and PATCH responses."""
    never = [(schema["id"], path) for schema in anonymous.get("/Schemas").json["Resources"]
             for path, definition, _ in attribute_paths(schema) if definition["returned"] == "never"]
    assert never == [(URN_USER, "password")]
    created = client.post("/Users", {"schemas": [URN_USER], "userName": "pw@example.com",
                                     "password": "Sup3r-secret!"})
    user_id = created.json["id"]
    responses = [
        created,
        client.get("/Users/" + user_id),
        client.get("/Users?filter=userName+eq+%22pw%40example.com%22"),
        client.get("/Users?filter=userName+eq+%22pw%40example.com%22&attributes=password"),
        client.put("/Users/" + user_id, {"schemas": [URN_USER], "userName": "pw@example.com",
                                         "password": "0ther-secret!"}),
        client.patch("/Users/" + user_id, [{"op": "replace", "path": "password", "value": "Th1rd!"}],
                     status=200),
    ]
    for response in responses:
        assert "password" not in response.text.lower()
        assert "secret" not in response.text and "Th1rd" not in response.text
    row = db.execute("SELECT password_digest, document FROM users WHERE id = ?", (user_id,)).fetchone()
    assert row["password_digest"].startswith("scrypt$")
    assert "password" not in json.loads(row["document"])


def test_published_change_password_support_is_true(anonymous, client, db):
    """changePassword.supported: a PATCH of password really changes the stored digest."""
    assert anonymous.get("/ServiceProviderConfig").json["changePassword"]["supported"] is True
    user = client.create_user("change@example.com", password="Initial-1")
    digest = db.execute("SELECT password_digest FROM users WHERE id = ?", (user["id"],)).fetchone()[0]
    client.patch("/Users/" + user["id"], [{"op": "replace", "path": "password", "value": "Changed-2"}],
                 status=200)
    changed = db.execute("SELECT password_digest FROM users WHERE id = ?", (user["id"],)).fetchone()[0]
    assert digest and changed and changed != digest


def test_published_etag_and_sort_support_are_true(anonymous, client):
    """etag.supported → ETag headers and meta.version; sort.supported → sortBy orders results."""
    config = anonymous.get("/ServiceProviderConfig").json
    assert config["etag"]["supported"] and config["sort"]["supported"]
    for name in ("b@example.com", "c@example.com", "a@example.com"):
        client.create_user(name)
    listing = client.get("/Users?sortBy=userName&sortOrder=descending").json
    assert [r["userName"] for r in listing["Resources"]] == ["c@example.com", "b@example.com", "a@example.com"]
    resource = client.get("/Users/" + listing["Resources"][0]["id"])
    assert resource.headers["ETag"] == resource.json["meta"]["version"] == 'W/"1"'


def test_published_bulk_unsupported_matches_bulk_endpoint(anonymous, client):
    assert anonymous.get("/ServiceProviderConfig").json["bulk"]["supported"] is False
    assert client.post("/Bulk", {"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
                                 "Operations": []}, status=501).json["status"] == "501"


@pytest.fixture
def many_users(settings, store, db):
    """MAX_PAGE_SIZE + 5 users, made through the operations layer on a second
    connection without fsync (only to keep the setup fast)."""
    seeder = scim_appliance.Store(settings.db, synchronous="OFF")
    try:
        for number in range(MAX_PAGE_SIZE + 5):
            scim_appliance.create_resource(seeder, scim_appliance.USER,
                                           {"schemas": [URN_USER], "userName": "bulk%05d@example.com" % number},
                                           BASE)
    finally:
        seeder.close()
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == MAX_PAGE_SIZE + 5
    return MAX_PAGE_SIZE + 5


def test_published_max_results_is_the_cap_applied_to_count(anonymous, client, many_users):
    """filter.maxResults (RFC 7643 §5) is exactly what a larger count gets (RFC 7644 §3.4.2.4)."""
    max_results = anonymous.get("/ServiceProviderConfig").json["filter"]["maxResults"]
    for count in (max_results + 1, 10 ** 6):
        page = client.get("/Users?count=%d" % count).json
        assert page["totalResults"] == many_users
        assert page["itemsPerPage"] == len(page["Resources"]) == max_results
        found = client.post("/Users/.search", {"count": count}, status=200).json
        assert found["itemsPerPage"] == len(found["Resources"]) == max_results
    page = client.get("/Users?count=%d" % max_results).json
    assert len(page["Resources"]) == max_results
    rest = client.get("/Users?startIndex=%d&count=%d" % (max_results + 1, max_results)).json
    assert len(rest["Resources"]) == many_users - max_results
    assert not {r["id"] for r in page["Resources"]} & {r["id"] for r in rest["Resources"]}
