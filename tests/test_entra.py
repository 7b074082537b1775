"""Microsoft Entra ID's documented requests, sent verbatim (docs/entra-requirements.md).

Each test replays one request Microsoft documents (or that was observed from
Entra, as the requirements file cites), through HTTP exactly as Entra sends it
(`Content-Type: application/scim+json; charset=utf-8`, no Accept header), then
checks the documented answer and what ended up in the database.

The request bodies below are copied from entra-requirements.md. Only the ids
our server assigns are substituted (Entra uses the ids we return), with
`fill(TEXT, {documented_id: our_id})`.
"""

import json
import urllib.parse
import uuid

import pytest

import scim_appliance
from conftest import assert_scim_error, fill, PUBLIC_URL, snapshot, stored_document, stored_members
from scim_appliance import URN_ENTERPRISE, URN_GROUP, URN_LIST, URN_USER

SCIM_CT = "application/scim+json"
LIST_KEYS = {"schemas", "totalResults", "Resources", "startIndex", "itemsPerPage"}


# -- Microsoft's request bodies, verbatim ------------------------------------------

R7_CREATE_USER = """{
    "schemas": [
        "urn:ietf:params:scim:schemas:core:2.0:User",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
    "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
    "userName": "Test_User_00aa00aa-bb11-cc22-dd33-44ee44ee44ee",
    "active": true,
    "emails": [{
        "primary": true,
        "type": "work",
        "value": "Test_User_11bb11bb-cc22-dd33-ee44-55ff55ff55ff@testuser.com"
    }],
    "meta": {
        "resourceType": "User"
    },
    "name": {
        "formatted": "givenName familyName",
        "familyName": "familyName",
        "givenName": "givenName"
    },
    "roles": []
}"""
R7_USER_NAME = "Test_User_00aa00aa-bb11-cc22-dd33-44ee44ee44ee"
R7_EXTERNAL_ID = "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef"
R7_EMAIL = "Test_User_11bb11bb-cc22-dd33-ee44-55ff55ff55ff@testuser.com"
R7_NAME = {"formatted": "givenName familyName", "familyName": "familyName", "givenName": "givenName"}

R16_UPDATE_MULTI_VALUED = """{
    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
    "Operations": [
            {
            "op": "Replace",
            "path": "emails[type eq \\"work\\"].value",
            "value": "updatedEmail@microsoft.com"
            },
            {
            "op": "Replace",
            "path": "name.familyName",
            "value": "updatedFamilyName"
            }
    ]
}"""

R17_UPDATE_SINGLE_VALUED = """{
    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
    "Operations": [{
        "op": "Replace",
        "path": "userName",
        "value": "5b50642d-79fc-4410-9e90-4c077cdd1a59@testuser.com"
    }]
}"""

R18_DISABLE_NO_FLAG = """{
    "schemas": [
        "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    ],
    "Operations": [
        {
            "op": "Replace",
            "path": "active",
            "value": "False"
        }
    ]
}"""

R18_DISABLE_FLAG = """{
    "schemas": [
        "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    ],
    "Operations": [
        {
            "op": "replace",
            "path": "active",
            "value": false
        }
    ]
}"""

R18_DISABLE_TUTORIAL = """{
    "Operations": [
        {
            "op": "Replace",
            "path": "active",
            "value": false
        }
    ],
    "schemas": [
        "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    ]
}"""

R21_ADD_NICKNAME = """{
    "schemas": [
        "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    ],
    "Operations": [
      {
        "op": "Add",
        "path": "nickName",
        "value": "Babs"
      }
    ]
}"""

R22_MULTIPLE_REPLACE = """{
    "schemas": [
        "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    ],
    "Operations": [
        {
            "op": "Replace",
            "path": "displayName",
            "value": "Pvlo"
        },
        {
            "op": "Replace",
            "path": "emails[type eq \\"work\\"].value",
            "value": "TestBcwqnm@test.microsoft.com"
        },
        {
            "op": "Replace",
            "path": "name.givenName",
            "value": "Gtfd"
        },
        {
            "op": "Replace",
            "path": "name.familyName",
            "value": "Pkqf"
        },
        {
            "op": "Replace",
            "path": "externalId",
            "value": "Eqpj"
        },
        {
            "op": "Replace",
            "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber",
            "value": "Eqpj"
        }
    ]
}"""

R23_PATHLESS_REPLACE = """{
    "schemas": [
        "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    ],
    "Operations": [
        {
            "op": "replace",
            "path": "emails[type eq \\"work\\"].value",
            "value": "TestMhvaes@test.microsoft.com"
        },
        {
            "op": "replace",
            "value": {
                "displayName": "Bjfe",
                "name.givenName": "Kkom",
                "name.familyName": "Unua",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber": "Aklq"
            }
        }
    ]
}"""

R25_MANAGER_ADD = """{
    "Operations": [
        {
            "op": "Add",
            "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
            "value": "271"
        }
    ],
    "schemas": [
        "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    ]
}"""

R27_EXAMPLE_5_MANAGER = """{
    "schemas":
    [
      "urn:ietf:params:scim:api:messages:2.0:PatchOp"],
    "Operations":
    [
      {
        "op":"Add",
        "path":"manager",
        "value":
          [
            {
              "$ref":"http://.../scim/Users/00aa00aa-bb11-cc22-dd33-44ee44ee44ee",
              "value":"00aa00aa-bb11-cc22-dd33-44ee44ee44ee"}]}]}"""

R34_CREATE_WITH_NULLS = """{
   "schemas":
   [
     "urn:ietf:params:scim:schemas:core:2.0:User",
     "urn:ietf:params:scim:schemas:extension:enterprise:2.0User"],
   "externalId":"jyoung",
   "userName":"jyoung@testuser.com",
   "active":true,
   "addresses":null,
   "displayName":"Joy Young",
   "emails": [
     {
       "type":"work",
       "value":"jyoung@Contoso.com",
       "primary":true}],
   "meta": {
     "resourceType":"User"},
    "name":{
     "familyName":"Young",
     "givenName":"Joy"},
   "phoneNumbers":null,
   "preferredLanguage":null,
   "title":null,
   "department":null,
   "manager":null}"""

R36_CREATE_GROUP = """{
    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group", "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"],
    "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
    "displayName": "displayName",
    "meta": {
        "resourceType": "Group"
    }
}"""

R37_RENAME_GROUP = """{
    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
    "Operations": [{
        "op": "Replace",
        "path": "displayName",
        "value": "1879db59-3bdf-4490-ad68-ab880a269474updatedDisplayName"
    }]
}"""

R38_ADD_MEMBER = """{
    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
    "Operations": [{
        "op": "Add",
        "path": "members",
        "value": [{
            "$ref": null,
            "value": "f648f8d5ea4e4cd38e9c"
        }]
    }]
}"""

R40_REMOVE_TUTORIAL = """{
    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
    "Operations": [{
        "op": "Remove",
        "path": "members",
        "value": [{
            "$ref": null,
            "value": "f648f8d5ea4e4cd38e9c"
        }]
    }]
}"""

R40_REMOVE_NO_FLAG = """{
    "schemas": [
        "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    ],
    "Operations": [
        {
            "op": "Remove",
            "path": "members",
            "value": [
                {
                    "value": "u1091"
                }
            ]
        }
    ]
}"""

R40_REMOVE_FLAG = """{
    "schemas": [
        "urn:ietf:params:scim:api:messages:2.0:PatchOp"
    ],
    "Operations": [
        {
            "op": "remove",
            "path": "members[value eq \\"7f4bc1a3-285e-48ae-8202-5accb43efb0e\\"]"
        }
    ]
}"""


# -- helpers -----------------------------------------------------------------------

def send(client, method, path, text, status, replacements=None):
    """Send a documented body exactly as Entra does (scim+json with charset, no Accept)."""
    return client.request(method, path, raw=fill(text, replacements), status=status)


def create_r7_user(client):
    response = send(client, "POST", "/Users", R7_CREATE_USER, 201)
    return response.json


def create_r36_group(client):
    return send(client, "POST", "/Groups", R36_CREATE_GROUP, 201).json


def query(**params):
    """A query string form-encoded as Entra sends it ('+' for spaces, %22 for quotes)."""
    return "?" + urllib.parse.urlencode(params)


def user_row(db, user_id):
    return db.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()


def group_row(db, group_id):
    return db.execute("SELECT * FROM groups WHERE id = ?", (group_id,)).fetchone()


def count(db, table):
    return db.execute("SELECT count(*) FROM %s" % table).fetchone()[0]


def assert_list(body, total, ids=None):
    assert set(body) == LIST_KEYS
    assert body["schemas"] == [URN_LIST]
    assert body["totalResults"] == total
    assert body["startIndex"] == 1
    assert body["itemsPerPage"] == len(body["Resources"])
    if ids is not None:
        assert [r["id"] for r in body["Resources"]] == ids


# -- R5 Test Connection ------------------------------------------------------------

def test_r05_test_connection_random_guid_is_200_empty_list(client, db):
    """R5 [TUT "Test Connection"]: a random-GUID userName query answers 200 + empty ListResponse."""
    guid = str(uuid.uuid4())
    # Exactly the observed form: '+' for spaces, %22 for quotes (R3, azure-docs#94189).
    response = client.get("/Users?filter=userName+eq+%22" + guid + "%22")
    assert response.content_type == SCIM_CT
    assert response.json == {"schemas": [URN_LIST], "totalResults": 0, "Resources": [],
                             "startIndex": 1, "itemsPerPage": 0}
    # "fetch a random user and group" [TUT General]
    response = client.get("/Groups?filter=displayName+eq+%22" + str(uuid.uuid4()) + "%22")
    assert_list(response.json, 0, [])
    assert count(db, "users") == 0 and count(db, "groups") == 0


def test_r05_test_connection_with_a_user_present_still_finds_nothing(client, db):
    """R5 [TUT, QUAR]: the random GUID matches nobody, never 404, even when users exist."""
    created = create_r7_user(client)
    response = client.get("/Users?filter=userName+eq+%227d420df3-9995-4831-a406-ecf8166f5f6a%22")
    assert_list(response.json, 0, [])
    assert count(db, "users") == 1
    assert stored_document(db, "users", created["id"])["userName"] == R7_USER_NAME


# -- R7 / R9 create and read a user ------------------------------------------------

def test_r07_create_user_tutorial_body(client, db):
    """R7 [TUT "Create User"]: the documented body → 201 with the documented fields."""
    response = send(client, "POST", "/Users", R7_CREATE_USER, 201)
    assert response.content_type == SCIM_CT
    user = response.json
    user_id = user["id"]
    assert isinstance(user_id, str) and user_id
    assert user["schemas"] == [URN_USER]
    assert user["externalId"] == R7_EXTERNAL_ID
    assert user["userName"] == R7_USER_NAME
    assert user["name"] == R7_NAME
    assert user["active"] is True
    assert user["emails"] == [{"value": R7_EMAIL, "type": "work", "primary": True}]
    assert user.get("roles", []) == []
    assert user["meta"]["resourceType"] == "User"
    assert user["meta"]["created"] and user["meta"]["lastModified"]
    # R8: Location and meta.location built from the public URL.
    location = "%s/scim/Users/%s" % (PUBLIC_URL, user_id)
    assert user["meta"]["location"] == location
    assert response.headers["Location"] == location

    document = stored_document(db, "users", user_id)
    assert document["userName"] == R7_USER_NAME
    assert document["externalId"] == R7_EXTERNAL_ID
    assert document["name"] == R7_NAME
    assert document["active"] is True
    assert document["emails"] == [{"value": R7_EMAIL, "type": "work", "primary": True}]
    # The client's meta and schemas are not stored; an empty roles list is no roles.
    assert not {"meta", "schemas", "id", "roles"} & set(document)
    row = user_row(db, user_id)
    assert row["user_name"] == R7_USER_NAME
    assert row["user_name_key"] == scim_appliance.fold(R7_USER_NAME)
    assert row["external_id"] == R7_EXTERNAL_ID
    assert row["active"] == 1
    assert row["version"] == 1
    assert row["created"] == user["meta"]["created"]


def test_r09_get_user_returns_the_full_user(client, db):
    """R9 [TUT "Get User"]: GET /Users/{id} → 200 with the user as created."""
    created = create_r7_user(client)
    response = client.get("/Users/" + created["id"])
    assert response.content_type == SCIM_CT
    user = response.json
    assert user == created
    assert {"schemas", "id", "externalId", "meta", "userName", "name", "active", "emails"} <= set(user)
    assert stored_document(db, "users", created["id"])["emails"][0]["value"] == R7_EMAIL


# -- R10 / R11 / R12 / R13 queries -------------------------------------------------

def test_r10_get_user_by_query_is_a_list_response(client, db):
    """R10 [TUT "Get User by query"]: filter=userName eq "..." → ListResponse with one user."""
    created = create_r7_user(client)
    other = client.create_user("someone.else@testuser.com")
    response = client.get("/Users" + query(filter='userName eq "%s"' % R7_USER_NAME))
    assert response.content_type == SCIM_CT
    body = response.json
    assert_list(body, 1, [created["id"]])
    found = body["Resources"][0]
    assert found["userName"] == R7_USER_NAME
    assert found["externalId"] == R7_EXTERNAL_ID
    assert found["name"]["familyName"] == "familyName"
    assert found["active"] is True
    assert found["emails"] == [{"value": R7_EMAIL, "type": "work", "primary": True}]
    assert found["meta"]["resourceType"] == "User"
    assert count(db, "users") == 2 and user_row(db, other["id"]) is not None


def test_r11_zero_results_is_200_empty_list_never_404(client, db):
    """R11 [TUT "Get User by query - Zero results"]: 200 + empty ListResponse."""
    create_r7_user(client)
    response = client.get("/Users" + query(filter='userName eq "non-existent user"'))
    assert response.status_int == 200
    assert response.json == {"schemas": [URN_LIST], "totalResults": 0, "Resources": [],
                             "startIndex": 1, "itemsPerPage": 0}
    assert count(db, "users") == 1


@pytest.mark.parametrize("filter_text", [
    'userName eq "%s"' % R7_USER_NAME,
    'userName eq "%s"' % R7_USER_NAME.upper(),                 # R13: caseExact false
    'userName eq "%s"' % R7_USER_NAME.lower(),
    'externalId eq "%s"' % R7_EXTERNAL_ID,
    'emails[type eq "work"].value eq "%s"' % R7_EMAIL,
    'emails[type eq "work"].value eq "%s"' % R7_EMAIL.upper(),  # emails.value is caseExact false
])
def test_r12_r13_matching_filters_find_exactly_one_user(client, db, filter_text):
    """R12 [TUT /Users, MAP], R13 [RFC 7643 §4.1.1, VAL]: Entra's matching filters find the one user."""
    created = create_r7_user(client)
    client.create_user("other@testuser.com", externalId="other-external",
                       emails=[{"type": "work", "value": "other@testuser.com"}])
    body = client.get("/Users" + query(filter=filter_text)).json
    assert_list(body, 1, [created["id"]])
    assert stored_document(db, "users", created["id"])["userName"] == R7_USER_NAME


@pytest.mark.parametrize("filter_text", [
    'displayName eq "displayName"', 'displayName eq "DISPLAYNAME"',
    'externalId eq "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159"'])
def test_r12_group_matching_filters_find_exactly_one_group(client, db, filter_text):
    """R12 [TUT /Groups]: groups are queried by displayName (and externalId)."""
    group = create_r36_group(client)
    client.create_group("another group", externalId="another-external")
    body = client.get("/Groups" + query(excludedAttributes="members", filter=filter_text)).json
    assert_list(body, 1, [group["id"]])
    assert group_row(db, group["id"])["display_name"] == "displayName"


# -- R14 / R15 errors ----------------------------------------------------------------

PATCH_BODY = {"schemas": [scim_appliance.URN_PATCH],
              "Operations": [{"op": "Replace", "path": "displayName", "value": "x"}]}


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/Users/5171a35d82074e068ce2", None),
    ("PATCH", "/Users/5171a35d82074e068ce2", PATCH_BODY),
    ("PUT", "/Users/5171a35d82074e068ce2", {"schemas": [URN_USER], "userName": "x@y"}),
    ("DELETE", "/Users/5171a35d82074e068ce2", None),
    ("GET", "/Groups/40734ae655284ad3abcc", None),
    ("PATCH", "/Groups/40734ae655284ad3abcc", PATCH_BODY),
    ("DELETE", "/Groups/cdb1ce18f65944079d37", None),
])
def test_r14_unknown_id_is_404_scim_error(client, db, method, path, body):
    """R14 [TUT "Get User"; RFC 7644 §3.12]: an unknown id → 404 with the Error schema."""
    create_r7_user(client)
    create_r36_group(client)
    before = snapshot(db)
    response = client.request(method, path, body, status="*")
    error = assert_scim_error(response, 404)
    assert "detail" not in error or isinstance(error["detail"], str)
    assert snapshot(db) == before


@pytest.mark.parametrize("user_name", [R7_USER_NAME, R7_USER_NAME.upper(), R7_USER_NAME.lower()])
def test_r15_duplicate_user_name_is_409_uniqueness(client, db, user_name):
    """R15 [RFC 7644 §3.3; REF Postman], R13: a second POST of the userName (any case) → 409 uniqueness."""
    created = create_r7_user(client)
    before = snapshot(db)
    body = json.loads(R7_CREATE_USER)
    body["userName"] = user_name
    body["externalId"] = "another-external-id"
    error = assert_scim_error(client.post("/Users", body, status="*"), 409, "uniqueness")
    assert error["detail"]
    assert snapshot(db) == before
    assert stored_document(db, "users", created["id"])["externalId"] == R7_EXTERNAL_ID


def test_r15_renaming_onto_a_taken_user_name_is_409_and_changes_nothing(client, db):
    """R15/R13: a PATCH userName that collides case-insensitively → 409 uniqueness, nothing applied."""
    create_r7_user(client)
    other = client.create_user("other@testuser.com")
    before = snapshot(db)
    response = client.patch("/Users/" + other["id"],
                            [{"op": "Replace", "path": "userName", "value": R7_USER_NAME.swapcase()}],
                            status="*")
    assert_scim_error(response, 409, "uniqueness")
    assert snapshot(db) == before


# -- R16 / R17 updates ---------------------------------------------------------------

def test_r16_update_user_multi_valued_properties(client, db):
    """R16 [TUT "Update User [Multi-valued properties]"]: 200 with the updated user."""
    user_id = create_r7_user(client)["id"]
    response = send(client, "PATCH", "/Users/" + user_id, R16_UPDATE_MULTI_VALUED, 200)
    assert response.content_type == SCIM_CT
    user = response.json
    assert user["id"] == user_id
    assert user["emails"] == [{"value": "updatedEmail@microsoft.com", "type": "work", "primary": True}]
    assert user["name"]["familyName"] == "updatedFamilyName"
    assert user["name"]["givenName"] == "givenName"
    # name.formatted is stored as sent (R33); the PATCH did not target it.
    assert user["name"]["formatted"] == "givenName familyName"
    assert user["meta"]["version"] == 'W/"2"'
    document = stored_document(db, "users", user_id)
    assert document["emails"] == [{"value": "updatedEmail@microsoft.com", "type": "work", "primary": True}]
    assert document["name"] == {"formatted": "givenName familyName", "familyName": "updatedFamilyName",
                                "givenName": "givenName"}
    assert user_row(db, user_id)["version"] == 2


def test_r17_update_user_single_valued_user_name(client, db):
    """R17 [TUT "Update User [Single-valued properties]"]: 200 with the new userName."""
    user_id = create_r7_user(client)["id"]
    new_name = "5b50642d-79fc-4410-9e90-4c077cdd1a59@testuser.com"
    user = send(client, "PATCH", "/Users/" + user_id, R17_UPDATE_SINGLE_VALUED, 200).json
    assert user["userName"] == new_name
    assert user["externalId"] == R7_EXTERNAL_ID
    row = user_row(db, user_id)
    assert row["user_name"] == new_name
    assert row["user_name_key"] == scim_appliance.fold(new_name)
    assert stored_document(db, "users", user_id)["userName"] == new_name
    # The matching query now finds the user under the new name only.
    assert_list(client.get("/Users" + query(filter='userName eq "%s"' % new_name)).json, 1, [user_id])
    assert_list(client.get("/Users" + query(filter='userName eq "%s"' % R7_USER_NAME)).json, 0, [])


def test_r17_single_valued_replace_with_plain_string_display_name(client, db):
    """R17 (observed, BYOA-Provisioning-Samples#22): {"op":"Replace","path":"displayName","value":" User X"}."""
    user_id = create_r7_user(client)["id"]
    user = client.patch("/Users/" + user_id,
                        [{"op": "Replace", "path": "displayName", "value": " User X"}], status=200).json
    assert user["displayName"] == " User X"   # stored as sent (R33), spaces included
    assert stored_document(db, "users", user_id)["displayName"] == " User X"
    assert user_row(db, user_id)["display_name"] == " User X"


# -- R18 / R19 disable and re-enable ---------------------------------------------------

@pytest.mark.parametrize("disable", [R18_DISABLE_NO_FLAG, R18_DISABLE_FLAG, R18_DISABLE_TUTORIAL],
                         ids=["no-flag-string-False", "flag-boolean-false", "tutorial-operations-first"])
def test_r18_disable_and_reenable_user(client, db, disable):
    """R18 [KI, TUT "Disable User"]: active as "False"/false (and "True"/true) → stored as a boolean."""
    user_id = create_r7_user(client)["id"]
    response = send(client, "PATCH", "/Users/" + user_id, disable, 200)
    user = response.json
    assert user["active"] is False
    assert user["meta"]["resourceType"] == "User"
    assert stored_document(db, "users", user_id)["active"] is False
    assert user_row(db, user_id)["active"] == 0

    enable = disable.replace('"False"', '"True"').replace("false", "true")
    assert enable != disable
    user = send(client, "PATCH", "/Users/" + user_id, enable, 200).json
    assert user["active"] is True
    assert stored_document(db, "users", user_id)["active"] is True
    row = user_row(db, user_id)
    assert row["active"] == 1
    assert row["version"] == 3


def test_r18_active_string_true_on_post(client, db):
    """R18 [REF Postman]: "active": "True" on POST is returned as true."""
    body = json.loads(R7_CREATE_USER)
    body["active"] = "True"
    user = client.post("/Users", body).json
    assert user["active"] is True
    assert stored_document(db, "users", user["id"])["active"] is True
    assert user_row(db, user["id"])["active"] == 1


def test_r19_disabled_user_stays_visible(client, db):
    """R19 [TUT requirements]: a soft-deleted (active=false) user is still returned by id and by query."""
    user_id = create_r7_user(client)["id"]
    send(client, "PATCH", "/Users/" + user_id, R18_DISABLE_NO_FLAG, 200)
    assert client.get("/Users/" + user_id).json["active"] is False
    body = client.get("/Users" + query(filter='userName eq "%s"' % R7_USER_NAME)).json
    assert_list(body, 1, [user_id])
    assert body["Resources"][0]["active"] is False
    assert user_row(db, user_id)["active"] == 0


# -- R20 group reads -----------------------------------------------------------------

def test_r20_get_group_excluding_members(client, db):
    """R20 [TUT "Get Group"]: GET /Groups/{id}?excludedAttributes=members → no members key."""
    group = create_r36_group(client)
    user = create_r7_user(client)
    send(client, "PATCH", "/Groups/" + group["id"], R38_ADD_MEMBER, 204,
         {"f648f8d5ea4e4cd38e9c": user["id"]})
    response = client.get("/Groups/%s?excludedAttributes=members" % group["id"])
    assert response.content_type == SCIM_CT
    found = response.json
    assert "members" not in found
    assert found["schemas"] == [URN_GROUP]
    assert found["id"] == group["id"]
    assert found["externalId"] == "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159"
    assert found["displayName"] == "displayName"
    assert found["meta"]["resourceType"] == "Group"
    # Reading changed nothing; the member is still there.
    assert stored_members(db, group["id"]) == {user["id"]}
    assert [m["value"] for m in client.get("/Groups/" + group["id"]).json["members"]] == [user["id"]]


def test_r20_get_group_by_display_name_excluding_members(client, db):
    """R20 [TUT "Get Group by displayName"]: the list query with excludedAttributes=members."""
    group = create_r36_group(client)
    user = create_r7_user(client)
    send(client, "PATCH", "/Groups/" + group["id"], R38_ADD_MEMBER, 204,
         {"f648f8d5ea4e4cd38e9c": user["id"]})
    response = client.get('/Groups?excludedAttributes=members&filter=displayName+eq+%22displayName%22')
    body = response.json
    assert_list(body, 1, [group["id"]])
    found = body["Resources"][0]
    assert "members" not in found
    assert found["displayName"] == "displayName"
    assert found["externalId"] == "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159"
    assert stored_members(db, group["id"]) == {user["id"]}


# -- R21 / R22 / R23 more PATCH forms --------------------------------------------------

@pytest.mark.parametrize("op", ["Add", "add"], ids=["no-flag", "flag"])
def test_r21_add_single_valued_nick_name(client, db, op):
    """R21 [KI]: Add on a single-valued string; Add again replaces (RFC 7644 §3.5.2.1)."""
    user_id = create_r7_user(client)["id"]
    text = R21_ADD_NICKNAME.replace('"op": "Add"', '"op": "%s"' % op)
    user = send(client, "PATCH", "/Users/" + user_id, text, 200).json
    assert user["nickName"] == "Babs"
    assert stored_document(db, "users", user_id)["nickName"] == "Babs"
    user = send(client, "PATCH", "/Users/" + user_id, text.replace("Babs", "Barbara"), 200).json
    assert user["nickName"] == "Barbara"
    assert stored_document(db, "users", user_id)["nickName"] == "Barbara"


@pytest.mark.parametrize("replace, remove", [("Replace", "Remove"), ("replace", "remove"),
                                             ("REPLACE", "REMOVE"), ("rePlAcE", "ReMoVe")])
def test_r06_patch_op_is_case_insensitive(client, db, replace, remove):
    """R6 [TUT General, KI]: op values Add/Replace/Remove in any casing."""
    user_id = create_r7_user(client)["id"]
    user = client.patch("/Users/" + user_id, [{"op": replace, "path": "title", "value": "Engineer"}],
                        status=200).json
    assert user["title"] == "Engineer"
    assert stored_document(db, "users", user_id)["title"] == "Engineer"
    user = client.patch("/Users/" + user_id, [{"op": remove, "path": "title"}], status=200).json
    assert "title" not in user
    assert "title" not in stored_document(db, "users", user_id)


def test_r22_several_replace_operations_with_urn_path(client, db):
    """R22 [KI "Requests to replace multiple attributes", no flag]."""
    user_id = create_r7_user(client)["id"]
    user = send(client, "PATCH", "/Users/" + user_id, R22_MULTIPLE_REPLACE, 200).json
    assert user["displayName"] == "Pvlo"
    assert user["emails"] == [{"value": "TestBcwqnm@test.microsoft.com", "type": "work", "primary": True}]
    assert user["name"] == {"formatted": "givenName familyName", "familyName": "Pkqf", "givenName": "Gtfd"}
    assert user["externalId"] == "Eqpj"
    assert user[URN_ENTERPRISE] == {"employeeNumber": "Eqpj"}
    assert URN_ENTERPRISE in user["schemas"]
    document = stored_document(db, "users", user_id)
    assert document["displayName"] == "Pvlo"
    assert document["externalId"] == "Eqpj"
    assert document["name"]["givenName"] == "Gtfd" and document["name"]["familyName"] == "Pkqf"
    assert document[URN_ENTERPRISE] == {"employeeNumber": "Eqpj"}
    row = user_row(db, user_id)
    assert row["external_id"] == "Eqpj" and row["display_name"] == "Pvlo" and row["version"] == 2
    # externalId is a mapped attribute, not a key: the new value is what matches now.
    assert_list(client.get("/Users" + query(filter='externalId eq "Eqpj"')).json, 1, [user_id])


def test_r23_pathless_replace_with_dotted_and_urn_keys(client, db):
    """R23 [KI, with flag]: keys of a path-less value object are attribute paths."""
    user_id = create_r7_user(client)["id"]
    user = send(client, "PATCH", "/Users/" + user_id, R23_PATHLESS_REPLACE, 200).json
    assert user["emails"] == [{"value": "TestMhvaes@test.microsoft.com", "type": "work", "primary": True}]
    assert user["displayName"] == "Bjfe"
    assert user["name"] == {"formatted": "givenName familyName", "familyName": "Unua", "givenName": "Kkom"}
    assert user[URN_ENTERPRISE] == {"employeeNumber": "Aklq"}
    assert "name.givenName" not in user
    document = stored_document(db, "users", user_id)
    assert document["name"] == {"formatted": "givenName familyName", "familyName": "Unua", "givenName": "Kkom"}
    assert document[URN_ENTERPRISE] == {"employeeNumber": "Aklq"}
    assert document["displayName"] == "Bjfe"
    # Nothing was stored under the literal key text.
    assert set(document) == {"externalId", "userName", "active", "emails", "name", "displayName",
                             URN_ENTERPRISE}


def test_r23_validator_pathless_replace_with_more_keys(client, db):
    """R23 (observed SCIM Validator shape): active boolean, title, and URN-qualified enterprise keys."""
    user_id = create_r7_user(client)["id"]
    value = {
        "active": True, "displayName": "Validator", "externalId": "ext-validator",
        "title": "Tester", "preferredLanguage": "en-US",
        "name.givenName": "Val", "name.familyName": "Idator",
        URN_ENTERPRISE + ":department": "QA", URN_ENTERPRISE + ":costCenter": "CC1",
        URN_ENTERPRISE + ":organization": "Org", URN_ENTERPRISE + ":division": "Div",
        URN_ENTERPRISE + ":employeeNumber": "42",
    }
    user = client.patch("/Users/" + user_id, [{"op": "replace", "value": value}], status=200).json
    expected_enterprise = {"department": "QA", "costCenter": "CC1", "organization": "Org",
                           "division": "Div", "employeeNumber": "42"}
    assert user[URN_ENTERPRISE] == expected_enterprise
    assert (user["title"], user["preferredLanguage"], user["externalId"]) == ("Tester", "en-US", "ext-validator")
    assert user["name"]["givenName"] == "Val" and user["name"]["familyName"] == "Idator"
    document = stored_document(db, "users", user_id)
    assert document[URN_ENTERPRISE] == expected_enterprise
    assert document["active"] is True and document["title"] == "Tester"
    assert user_row(db, user_id)["external_id"] == "ext-validator"


def test_r23_pathless_add_of_external_id(client, db):
    """R23 (observed): {"op": "Add", "value": {"externalId": "..."}}."""
    user_id = create_r7_user(client)["id"]
    user = client.patch("/Users/" + user_id, [{"op": "Add", "value": {"externalId": "added-ext"}}],
                        status=200).json
    assert user["externalId"] == "added-ext"
    assert stored_document(db, "users", user_id)["externalId"] == "added-ext"
    assert user_row(db, user_id)["external_id"] == "added-ext"


# -- R25 / R26 / R27 / R28 manager -----------------------------------------------------

def make_manager_pair(client):
    employee = create_r7_user(client)
    manager = client.create_user("manager@testuser.com", displayName="The Manager")
    return employee["id"], manager["id"]


@pytest.mark.parametrize("op", ["Add", "add", "Replace"], ids=["observed", "flag", "replace"])
def test_r25_r26_manager_set_as_plain_string_returned_as_object(client, db, op):
    """R25 (SCIM-SDK#541, #686): manager PATCHed as a plain id string; R26: returned as {"value": id}."""
    user_id, manager_id = make_manager_pair(client)
    text = R25_MANAGER_ADD.replace('"op": "Add"', '"op": "%s"' % op)
    user = send(client, "PATCH", "/Users/" + user_id, text, 200, {'"271"': json.dumps(manager_id)}).json
    manager = user[URN_ENTERPRISE]["manager"]
    assert isinstance(manager, dict)
    assert manager["value"] == manager_id
    assert manager.get("$ref", "").endswith("/Users/" + manager_id)
    assert URN_ENTERPRISE in user["schemas"]
    assert stored_document(db, "users", user_id)[URN_ENTERPRISE]["manager"] == {"value": manager_id}
    # R26: a GET returns the same RFC complex object.
    assert client.get("/Users/" + user_id).json[URN_ENTERPRISE]["manager"]["value"] == manager_id


@pytest.mark.parametrize("remove", [
    {"op": "Remove", "path": URN_ENTERPRISE + ":manager"},
    {"op": "remove", "path": 'manager[value eq "{manager}"]'},
], ids=["rfc-form", "value-filter-form"])
def test_r25_manager_removed(client, db, remove):
    """R25: manager removal, RFC form (MUST) and manager[value eq "id"] (SHOULD, scim-patch#453)."""
    user_id, manager_id = make_manager_pair(client)
    send(client, "PATCH", "/Users/" + user_id, R25_MANAGER_ADD, 200, {'"271"': json.dumps(manager_id)})
    operation = dict(remove, path=remove["path"].replace("{manager}", manager_id))
    user = client.patch("/Users/" + user_id, [operation], status=200).json
    assert "manager" not in user.get(URN_ENTERPRISE, {})
    assert "manager" not in stored_document(db, "users", user_id).get(URN_ENTERPRISE, {})


def test_r25_manager_value_filter_remove_of_another_manager_keeps_it(client, db):
    """R25/[REF]: a remove that names a different manager leaves the current one alone."""
    user_id, manager_id = make_manager_pair(client)
    send(client, "PATCH", "/Users/" + user_id, R25_MANAGER_ADD, 200, {'"271"': json.dumps(manager_id)})
    user = client.patch("/Users/" + user_id,
                        [{"op": "remove", "path": 'manager[value eq "someone-else"]'}], status=200).json
    assert user[URN_ENTERPRISE]["manager"]["value"] == manager_id
    assert stored_document(db, "users", user_id)[URN_ENTERPRISE]["manager"] == {"value": manager_id}


def test_r26_manager_string_in_post_body_returned_as_object(client, db):
    """R26 (SHOULD): a string manager in a POST body is accepted and returned as {"value": id}."""
    manager = client.create_user("boss@testuser.com")
    body = json.loads(R7_CREATE_USER)
    body[URN_ENTERPRISE] = {"manager": manager["id"], "department": "Sales"}
    user = client.post("/Users", body).json
    assert user[URN_ENTERPRISE]["manager"]["value"] == manager["id"]
    assert user[URN_ENTERPRISE]["department"] == "Sales"
    assert URN_ENTERPRISE in user["schemas"]
    assert stored_document(db, "users", user["id"])[URN_ENTERPRISE] == {
        "manager": {"value": manager["id"]}, "department": "Sales"}


def test_r27_tutorial_example_5_manager_form(client, db):
    """R27 [TUT Example 5]: unqualified path "manager" with an array value."""
    user_id, manager_id = make_manager_pair(client)
    user = send(client, "PATCH", "/Users/" + user_id, R27_EXAMPLE_5_MANAGER, 200,
                {"00aa00aa-bb11-cc22-dd33-44ee44ee44ee": manager_id}).json
    assert user[URN_ENTERPRISE]["manager"]["value"] == manager_id
    assert "manager" not in user   # it lives in the enterprise extension, not the core
    document = stored_document(db, "users", user_id)
    assert document[URN_ENTERPRISE]["manager"]["value"] == manager_id
    assert "manager" not in document


def test_r28_reference_check_query(client, db):
    """R28 [TUT Example 4, OLD]: filter=id eq X and manager eq Y&attributes=id."""
    user_id, manager_id = make_manager_pair(client)
    send(client, "PATCH", "/Users/" + user_id, R25_MANAGER_ADD, 200, {'"271"': json.dumps(manager_id)})
    body = client.get("/Users" + query(filter='id eq "%s" and manager eq "%s"' % (user_id, manager_id),
                                       attributes="id")).json
    assert_list(body, 1, [user_id])
    assert set(body["Resources"][0]) == {"schemas", "id"}
    # Another manager: no match, still a 200 list.
    body = client.get("/Users" + query(filter='id eq "%s" and manager eq "%s"' % (user_id, user_id),
                                       attributes="id")).json
    assert_list(body, 0, [])
    # The manager itself has no manager.
    body = client.get("/Users" + query(filter='id eq "%s" and manager eq "%s"' % (manager_id, user_id),
                                       attributes="id")).json
    assert_list(body, 0, [])
    assert stored_document(db, "users", user_id)[URN_ENTERPRISE]["manager"] == {"value": manager_id}


def test_r23_urn_qualified_manager_key_in_pathless_replace(client, db):
    """R23 (SHOULD): a URN-qualified manager key inside a path-less value object."""
    user_id, manager_id = make_manager_pair(client)
    user = client.patch("/Users/" + user_id,
                        [{"op": "replace", "value": {URN_ENTERPRISE + ":manager": manager_id}}],
                        status=200).json
    assert user[URN_ENTERPRISE]["manager"]["value"] == manager_id
    assert stored_document(db, "users", user_id)[URN_ENTERPRISE]["manager"] == {"value": manager_id}


# -- R29 value paths on multi-valued attributes ----------------------------------------

R29_CASES = {
    "add-work-email-creates-it": (
        {"emails": [{"type": "home", "value": "home@x.com"}]},
        [{"op": "Add", "path": 'emails[type eq "work"].value', "value": "work@x.com"}],
        {"emails": [{"type": "home", "value": "home@x.com"}, {"type": "work", "value": "work@x.com"}]}),
    "replace-work-email-without-one-creates-it": (
        {},
        [{"op": "Replace", "path": 'emails[type eq "work"].value', "value": "work@x.com"}],
        {"emails": [{"type": "work", "value": "work@x.com"}]}),
    "several-adds-build-one-work-address": (
        {},
        [{"op": "Add", "path": 'addresses[type eq "work"].formatted', "value": "1 Main St, Town"},
         {"op": "Add", "path": 'addresses[type eq "work"].locality', "value": "Town"},
         {"op": "Add", "path": 'addresses[type eq "work"].region', "value": "Region"}],
        {"addresses": [{"type": "work", "formatted": "1 Main St, Town", "locality": "Town",
                        "region": "Region"}]}),
    "replace-work-leaves-other-emails": (
        {"emails": [{"type": "work", "value": "w@x.com", "primary": True},
                    {"type": "other", "value": "o@x.com"}]},
        [{"op": "Replace", "path": 'emails[type eq "work"].value', "value": "new@x.com"}],
        {"emails": [{"type": "work", "value": "new@x.com", "primary": True},
                    {"type": "other", "value": "o@x.com"}]}),
    "remove-with-value-removes-that-email": (
        {"emails": [{"type": "work", "value": "w@x.com"}, {"type": "other", "value": "o@x.com"}]},
        [{"op": "Remove", "path": 'emails[type eq "work"].value', "value": "w@x.com"}],
        {"emails": [{"type": "other", "value": "o@x.com"}]}),
    "remove-with-another-value-keeps-the-email": (
        {"emails": [{"type": "work", "value": "w@x.com"}, {"type": "other", "value": "o@x.com"}]},
        [{"op": "Remove", "path": 'emails[type eq "work"].value', "value": "not-this@x.com"}],
        {"emails": [{"type": "work", "value": "w@x.com"}, {"type": "other", "value": "o@x.com"}]}),
    "capitalised-sub-attribute-names": (
        {},
        [{"op": "Add", "path": 'emails[type eq "other"].Value', "value": "proxy@x.com"},
         {"op": "Add", "path": 'addresses[type eq "other"].Formatted', "value": "Office 12"}],
        {"emails": [{"type": "other", "value": "proxy@x.com"}],
         "addresses": [{"type": "other", "formatted": "Office 12"}]}),
    "phone-numbers-by-type": (
        {"phoneNumbers": [{"type": "work", "value": "55555555555"}]},
        [{"op": "Add", "path": 'phoneNumbers[type eq "mobile"].value', "value": "+1 (555) 123"},
         {"op": "Replace", "path": 'phoneNumbers[type eq "work"].value', "value": "55555555556"}],
        {"phoneNumbers": [{"type": "work", "value": "55555555556"},
                          {"type": "mobile", "value": "+1 (555) 123"}]}),
}


@pytest.mark.parametrize("initial, operations, expected", list(R29_CASES.values()), ids=list(R29_CASES))
def test_r29_filtered_value_paths(client, db, initial, operations, expected):
    """R29 (observed Entra/Validator traffic; SCIM-SDK#416/#668/#680, SCIMReferenceCode#87)."""
    user = client.create_user("r29@testuser.com", **initial)
    result = client.patch("/Users/" + user["id"], operations, status=200).json
    document = stored_document(db, "users", user["id"])
    for name, value in expected.items():
        assert result[name] == value
        assert document[name] == value


# -- R34 / R35 create with nulls, delete --------------------------------------------

def test_r34_create_body_with_nulls_and_malformed_urn(client, db):
    """R34 [TUT Example 2]: nulls, a malformed enterprise URN, top-level department/manager → 201."""
    response = send(client, "POST", "/Users", R34_CREATE_WITH_NULLS, 201)
    user = response.json
    assert user["userName"] == "jyoung@testuser.com"
    assert user["externalId"] == "jyoung"
    assert user["displayName"] == "Joy Young"
    assert user["emails"] == [{"type": "work", "value": "jyoung@Contoso.com", "primary": True}]
    assert user["name"] == {"familyName": "Young", "givenName": "Joy"}
    assert user["schemas"] == [URN_USER]
    for absent in ("addresses", "phoneNumbers", "preferredLanguage", "title", "department", "manager",
                   URN_ENTERPRISE):
        assert absent not in user
    document = stored_document(db, "users", user["id"])
    assert document == {"externalId": "jyoung", "userName": "jyoung@testuser.com", "active": True,
                        "displayName": "Joy Young",
                        "emails": [{"type": "work", "value": "jyoung@Contoso.com", "primary": True}],
                        "name": {"familyName": "Young", "givenName": "Joy"}}
    assert user_row(db, user["id"])["display_name"] == "Joy Young"


def test_r35_delete_user(client, db):
    """R35 [TUT "Delete User"]: 204, then GET 404 and the query finds nothing (RFC 7644 §3.6)."""
    user_id = create_r7_user(client)["id"]
    group = create_r36_group(client)
    send(client, "PATCH", "/Groups/" + group["id"], R38_ADD_MEMBER, 204, {"f648f8d5ea4e4cd38e9c": user_id})
    response = client.delete("/Users/" + user_id)
    assert response.body == b""
    assert_scim_error(client.get("/Users/" + user_id, status="*"), 404)
    assert_list(client.get("/Users" + query(filter='userName eq "%s"' % R7_USER_NAME)).json, 0, [])
    assert user_row(db, user_id) is None
    assert stored_members(db, group["id"]) == set()
    assert client.get("/Groups/" + group["id"]).json["members"] == []


# -- R36 - R42 groups -------------------------------------------------------------

def test_r36_create_group_with_adscim_schema_uri(client, db):
    """R36 [TUT "Create Group"]: the ADSCIM schema URI is accepted; 201 with members []."""
    response = send(client, "POST", "/Groups", R36_CREATE_GROUP, 201)
    assert response.content_type == SCIM_CT
    group = response.json
    assert group["schemas"] == [URN_GROUP]
    assert group["id"]
    assert group["externalId"] == "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159"
    assert group["displayName"] == "displayName"
    assert group["members"] == []
    assert group["meta"]["resourceType"] == "Group"
    assert group["meta"]["created"] and group["meta"]["lastModified"]
    assert response.headers["Location"] == "%s/scim/Groups/%s" % (PUBLIC_URL, group["id"])
    assert stored_document(db, "groups", group["id"]) == {
        "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159", "displayName": "displayName"}
    row = group_row(db, group["id"])
    assert row["display_name"] == "displayName"
    assert row["display_name_key"] == scim_appliance.fold("displayName")
    assert row["external_id"] == "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159"
    assert stored_members(db, group["id"]) == set()


def test_r37_rename_group(client, db):
    """R37 [TUT "Update Group [Non-member attributes]"]: 204 No Content."""
    group_id = create_r36_group(client)["id"]
    response = send(client, "PATCH", "/Groups/" + group_id, R37_RENAME_GROUP, 204)
    assert response.body == b""
    new_name = "1879db59-3bdf-4490-ad68-ab880a269474updatedDisplayName"
    row = group_row(db, group_id)
    assert row["display_name"] == new_name
    assert row["display_name_key"] == scim_appliance.fold(new_name)
    assert row["version"] == 2
    assert stored_document(db, "groups", group_id)["displayName"] == new_name
    assert client.get("/Groups/%s?excludedAttributes=members" % group_id).json["displayName"] == new_name
    body = client.get("/Groups" + query(excludedAttributes="members",
                                        filter='displayName eq "%s"' % new_name)).json
    assert_list(body, 1, [group_id])


def test_r38_add_member_with_null_ref(client, db):
    """R38 [TUT "Update Group [Add Members]"]: "$ref": null is accepted; 204."""
    group_id = create_r36_group(client)["id"]
    user_id = create_r7_user(client)["id"]
    response = send(client, "PATCH", "/Groups/" + group_id, R38_ADD_MEMBER, 204,
                    {"f648f8d5ea4e4cd38e9c": user_id})
    assert response.body == b""
    assert stored_members(db, group_id) == {user_id}
    assert group_row(db, group_id)["version"] == 2
    assert "members" not in stored_document(db, "groups", group_id)
    members = client.get("/Groups/" + group_id).json["members"]
    assert [(m["value"], m.get("type")) for m in members] == [(user_id, "User")]
    groups = client.get("/Users/" + user_id).json["groups"]
    assert [g["value"] for g in groups] == [group_id]


def test_r39_several_members_in_one_patch(client, db):
    """R39 [TUT gallery checklist]: several members and operations in one PATCH; re-adds are harmless."""
    group_id = create_r36_group(client)["id"]
    ids = [client.create_user("member%d@testuser.com" % n)["id"] for n in range(4)]
    body = {"schemas": [scim_appliance.URN_PATCH], "Operations": [
        {"op": "Add", "path": "members", "value": [{"$ref": None, "value": ids[0]},
                                                   {"$ref": None, "value": ids[1]}]},
        {"op": "Add", "path": "members", "value": [{"$ref": None, "value": ids[2]}]},
    ]}
    client.request("PATCH", "/Groups/" + group_id, body, status=204)
    assert stored_members(db, group_id) == set(ids[:3])
    # Re-adding present members (with a new one) neither fails nor duplicates.
    body["Operations"] = [{"op": "Add", "path": "members", "value": [
        {"$ref": None, "value": ids[0]}, {"$ref": None, "value": ids[3]}]}]
    client.request("PATCH", "/Groups/" + group_id, body, status=204)
    assert stored_members(db, group_id) == set(ids)
    rows = db.execute("SELECT count(*) FROM members WHERE group_id = ?", (group_id,)).fetchone()[0]
    assert rows == 4
    assert sorted(m["value"] for m in client.get("/Groups/" + group_id).json["members"]) == sorted(ids)


@pytest.mark.parametrize("text, documented_id", [
    (R40_REMOVE_TUTORIAL, "f648f8d5ea4e4cd38e9c"),
    (R40_REMOVE_NO_FLAG, "u1091"),
    (R40_REMOVE_FLAG, "7f4bc1a3-285e-48ae-8202-5accb43efb0e"),
], ids=["tutorial-ref-null", "no-flag-value", "flag-value-filter"])
def test_r40_remove_member_removes_only_that_member(client, db, text, documented_id):
    """R40 [TUT, KI]: all three Remove shapes remove only the listed member (never all)."""
    group_id = create_r36_group(client)["id"]
    ids = [client.create_user("member%d@testuser.com" % n)["id"] for n in range(3)]
    client.patch("/Groups/" + group_id, [{"op": "Add", "path": "members",
                                          "value": [{"value": i} for i in ids]}], status=204)
    assert stored_members(db, group_id) == set(ids)
    response = send(client, "PATCH", "/Groups/" + group_id, text, 204, {documented_id: ids[1]})
    assert response.body == b""
    assert stored_members(db, group_id) == {ids[0], ids[2]}
    assert sorted(m["value"] for m in client.get("/Groups/" + group_id).json["members"]) == \
        sorted([ids[0], ids[2]])
    # The removed user still exists; only the membership went.
    assert user_row(db, ids[1]) is not None


def test_r40_remove_all_members_without_value(client, db):
    """R40/[REF Postman]: {"op":"remove","path":"members"} with no value removes every member."""
    group_id = create_r36_group(client)["id"]
    ids = [client.create_user("member%d@testuser.com" % n)["id"] for n in range(2)]
    client.patch("/Groups/" + group_id, [{"op": "Add", "path": "members",
                                          "value": [{"value": i} for i in ids]}], status=204)
    client.patch("/Groups/" + group_id, [{"op": "remove", "path": "members"}], status=204)
    assert stored_members(db, group_id) == set()
    assert client.get("/Groups/" + group_id).json["members"] == []


@pytest.mark.parametrize("display_name", ["displayName", "DISPLAYNAME", "displayname"])
def test_r41_duplicate_group_display_name_is_409(client, db, display_name):
    """R41 [TUT /Groups]: a second group with the same displayName (any case) → 409 uniqueness."""
    group = create_r36_group(client)
    before = snapshot(db)
    body = json.loads(R36_CREATE_GROUP)
    body["displayName"] = display_name
    body["externalId"] = "another-object-id"
    error = assert_scim_error(client.post("/Groups", body, status="*"), 409, "uniqueness")
    assert error["detail"]
    assert snapshot(db) == before
    assert count(db, "groups") == 1
    assert group_row(db, group["id"])["display_name"] == "displayName"


def test_r41_renaming_onto_a_taken_group_name_is_409(client, db):
    """R41: renaming a group onto another's displayName (other case) → 409, nothing applied."""
    create_r36_group(client)
    other = client.create_group("other group")
    before = snapshot(db)
    response = client.patch("/Groups/" + other["id"],
                            [{"op": "Replace", "path": "displayName", "value": "DisplayName"}], status="*")
    assert_scim_error(response, 409, "uniqueness")
    assert snapshot(db) == before


def test_r42_delete_group(client, db):
    """R42 [TUT "Delete Group"]: 204, then GET 404; members rows go, users stay."""
    group_id = create_r36_group(client)["id"]
    user_id = create_r7_user(client)["id"]
    send(client, "PATCH", "/Groups/" + group_id, R38_ADD_MEMBER, 204, {"f648f8d5ea4e4cd38e9c": user_id})
    response = client.delete("/Groups/" + group_id)
    assert response.body == b""
    assert_scim_error(client.get("/Groups/" + group_id, status="*"), 404)
    assert group_row(db, group_id) is None
    assert stored_members(db, group_id) == set()
    assert user_row(db, user_id) is not None
    assert "groups" not in client.get("/Users/" + user_id).json or \
        client.get("/Users/" + user_id).json["groups"] == []
    assert_list(client.get("/Groups" + query(filter='displayName eq "displayName"')).json, 0, [])


# -- R3 / R4 transport -------------------------------------------------------------

def test_r03_plain_application_json_is_accepted_too(client, db):
    """R3 (SHOULD): application/json bodies are accepted (REF Postman sends them)."""
    response = client.request("POST", "/Users", raw=fill(R7_CREATE_USER), status=201,
                              content_type="application/json")
    assert response.content_type == SCIM_CT
    assert user_row(db, response.json["id"])["user_name"] == R7_USER_NAME


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-the-token"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}],
                         ids=["missing", "wrong-token", "not-bearer"])
def test_r04_refused_credentials_are_401(anonymous, db, headers):
    """R4 [TUT, RFC 7644 §3.12]: a missing or wrong token → 401 with WWW-Authenticate: Bearer."""
    response = anonymous.request("POST", "/Users", raw=fill(R7_CREATE_USER), status="*", headers=headers)
    assert_scim_error(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert count(db, "users") == 0


def test_r46_flag_in_the_tenant_url_query_does_not_break_requests(client, db):
    """R46 [KI]: the aadOptscim062020 flag in the Tenant URL's query string is ignored, not an error."""
    body = client.get("/Users?aadOptscim062020&filter=userName+eq+%22" + str(uuid.uuid4()) + "%22").json
    assert_list(body, 0, [])
    user = client.request("POST", "/Users?aadOptscim062020", raw=fill(R7_CREATE_USER), status=201).json
    group = client.request("POST", "/Groups?aadOptscim062020", raw=fill(R36_CREATE_GROUP), status=201).json
    response = client.patch("/Groups/%s?aadOptscim062020" % group["id"],
                            [{"op": "add", "path": "members", "value": [{"value": user["id"]}]}], status=204)
    assert response.body == b""
    assert stored_members(db, group["id"]) == {user["id"]}
    assert user_row(db, user["id"])["user_name"] == R7_USER_NAME


# -- RFC 7644 §3.4.2: list responses carry all five keys -----------------------------

@pytest.mark.parametrize("path", [
    "/Users", "/Groups", "/Users?count=0", "/Users?startIndex=50", "/Users?count=1",
    '/Users?filter=userName+eq+%22nobody%22', "/Groups?excludedAttributes=members",
    "/Users?attributes=id", "/Schemas", "/ResourceTypes",
])
def test_list_responses_always_carry_all_five_keys(client, db, path):
    """R10 note / RFC 7644 §3.4.2: schemas, totalResults, Resources, startIndex, itemsPerPage, always."""
    create_r7_user(client)
    client.create_user("second@testuser.com")
    create_r36_group(client)
    body = client.get(path).json
    assert set(body) == LIST_KEYS
    assert body["schemas"] == [URN_LIST]
    assert isinstance(body["Resources"], list)
    assert body["itemsPerPage"] == len(body["Resources"])
    assert body["totalResults"] >= len(body["Resources"])
    assert isinstance(body["startIndex"], int) and body["startIndex"] >= 1
    assert count(db, "users") == 2 and count(db, "groups") == 1
