"""Okta's SCIM 2.0 conversation, sent as Okta documents it (issue 16).

The spec is Okta's own public documentation, in the okta/okta-developer-docs
repository (paths below are under packages/@okta/vuepress-site/):

- REF: docs/reference/scim/scim-20/index.md, "SCIM 2.0 Protocol Reference",
  the page Okta now publishes on its API reference portal. Its examples show
  no Content-Type; REF_2019 shows the headers Okta sends.
- REF_2019: docs/reference/scim/index.md at commit 1b0539a347 (2019-11-11),
  the "SCIM Protocol" reference, with Okta's full request headers.
- SPEC_TEST: .vuepress/public/standards/SCIM/SCIMFiles/Okta-SCIM-20-SPEC-Test.json,
  the Runscope collection of the OIN guide "Test your SCIM API"
  (docs/guides/scim-provisioning-integration-prepare/main/index.md).
- CONCEPTS: docs/concepts/scim/index.md ("Handle SCIM server rate limiting")
  and FAQ: docs/concepts/scim/faqs/index.md.

Each test names the page and section its request comes from. Request bodies
are copied from those pages; only the example ids are replaced by the ids
our server assigned (`fill`), since Okta sends the ids we return.
"""

import json
import re
import socket
import time
import urllib.parse

import pytest
import webtest

import scim_appliance
from conftest import (assert_scim_error, fill, query, receive_until_closed, snapshot, start_live_server,
                      stored_document, stored_members)
from scim_appliance import GROUP, URN_ERROR, URN_GROUP, URN_LIST, URN_USER, USER

REF = "docs/reference/scim/scim-20/index.md"
REF_2019 = "docs/reference/scim/index.md@1b0539a347"
SPEC_TEST = "Okta-SCIM-20-SPEC-Test.json"

# REF_2019: the headers of every Okta request (Content-Type on requests with
# a body, and on DELETE; Authorization is the client's bearer token).
OKTA_HEADERS = {"Accept": "application/scim+json", "Accept-Charset": "utf-8",
                "User-Agent": "Okta SCIM Client 1.0.0", "Accept-Encoding": "gzip,deflate"}
OKTA_BODY_TYPE = "application/scim+json; charset=utf-8"

# Okta's example ids (REF), replaced by ours in every body.
OKTA_USER_ID = "23a35c27-23d3-4c03-b4c5-6443c09e7173"
OKTA_OTHER_USER_ID = "89bb1940-b905-4575-9e7f-6f887cfb368e"
OKTA_GROUP_ID = "abf4dd94-a4c0-4f67-89c9-76b03340cb9b"


# -- Okta's request bodies, verbatim ----------------------------------------------------

# REF, "Create Users > Create the User".
CREATE_USER = """{
    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
    "userName": "test.user@okta.local",
    "name": {
        "givenName": "Test",
        "familyName": "User"
    },
    "emails": [{
        "primary": true,
        "value": "test.user@okta.local",
        "type": "work"
    }],
    "displayName": "Test User",
    "locale": "en-US",
    "externalId": "00ujl29u0le5T6Aj10h7",
    "groups": [],
    "password": "1mz050nq",
    "active": true
}"""

# REF, "Create Users > Create the User", the second example (no externalId).
CREATE_USER_CUSTOM = """{
    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
    "userName": "test.user@okta.local",
    "name": {
        "givenName": "Test",
        "familyName": "User"
    },
    "emails": [{
        "primary": true,
        "value": "test.user@okta.local",
        "type": "work"
    }],
    "displayName": "Test User",
    "locale": "en-US",
    "groups": [],
    "password": "1mz050nq",
    "active": true
}"""

# REF, "Update a specific User (PUT) > Update the User".
PUT_USER = """{
    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
    "id": "23a35c27-23d3-4c03-b4c5-6443c09e7173",
    "userName": "test.user@okta.local",
    "name": {
        "givenName": "Another",
        "middleName": "Excited",
        "familyName": "User"
    },
    "emails": [{
        "primary": true,
        "value": "test.user@okta.local",
        "type": "work",
        "display": "test.user@okta.local"
    }],
    "active": true,
    "groups": [],
    "meta": {
        "resourceType": "User"
    }
}"""

# REF, "Update a specific User (PATCH)"; REF_2019, "Deactivate account".
DEACTIVATE_USER = """{
    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
    "Operations": [{
        "op": "replace",
        "value": {
            "active": false
        }
    }]
}"""

# REF_2019, "Create account > SCIM 2.0".
CREATE_USER_2019 = """{
\t"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
\t"userName": "jane.doe@example.com",
\t"name": {
\t\t"givenName": "Jane",
\t\t"familyName": "Doe"
\t},
\t"emails": [{
\t\t"primary": true,
\t\t"value": "jane.doe@example.com",
\t\t"type": "work"
\t}],
\t"displayName": "Jane Doe",
\t"locale": "en_US",
\t"externalId": "00uv931EiyRsnwOGa0g3",
\t"groups": [],
\t"password": "4a9XuKkx",
\t"active": true
}"""

# REF_2019, "Update account details > SCIM 2.0".
PUT_USER_2019 = """{
\t"id": "{id}",
\t"externalId": "00uq2kqg7YTkFo3cY0g3",
\t"meta": {
\t\t"resourceType": "User",
\t\t"created": "04-12-2018 00:00:00",
\t\t"lastModified": "04-12-2018 00:00:00",
\t\t"version": "v1.0"
\t},
\t"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
\t"userName": "jane.doe@example.com",
\t"displayName": "Jane Doe",
\t"locale": "en_US",
\t"active": true,
\t"password": "TkdFNVdIVkxhM2c9",
\t"emails": [{
\t\t"value": "jane.doe@example.com",
\t\t"type": "work",
\t\t"primary": true
\t}],
\t"name": {
\t\t"familyName": "Doe",
\t\t"givenName": "Jane"
\t},
\t"groups": []
}"""

# REF, "SCIM Group operations > Create Groups".
CREATE_GROUP = """{
    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
    "displayName": "Test SCIMv2",
    "members": []
}"""

# REF_2019, "Create group > SCIM 2.0" ("the users must already be provisioned").
CREATE_GROUP_WITH_MEMBERS_2019 = """{
\t"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
\t"displayName": "Example Group",
\t"members": [{
\t\t"value": "85467bb36e1c4f8991750501bf491962",
\t\t"display": "steve@ad.oktatest.com"
\t}, {
\t\t"value": "2fabb15c24a2440c93a0214599603bcb",
\t\t"display": "bob@ad.oktatest.com"
\t}]
}"""

# REF, "Update a specific Group name": "triggered each time there's a group
# membership update operation".
RENAME_GROUP = """{
    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
    "Operations": [{
        "op": "replace",
        "value": {
            "id": "abf4dd94-a4c0-4f67-89c9-76b03340cb9b",
            "displayName": "Test SCIMv2"
        }
    }]
}"""

# REF_2019, "Update group details" (PATCH).
RENAME_GROUP_2019 = """{
\t"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
\t"Operations": [{
\t\t"op": "replace",
\t\t"value": {
\t\t\t"id": "619435534e58458c8c92e86d1e07d2f8",
\t\t\t"displayName": "New Group Name"
\t\t}
\t}]
}"""

# REF, "Update specific Group membership" (OIN integrations: PATCH).
UPDATE_MEMBERSHIP = """{
    "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
    "Operations": [{
        "op": "remove",
        "path": "members[value eq \\"89bb1940-b905-4575-9e7f-6f887cfb368e\\"]"
        },
        {
        "op": "add",
        "path": "members",
        "value": [{
            "value": "23a35c27-23d3-4c03-b4c5-6443c09e7173",
            "display": "test.user@okta.local"
        }]
    }]
}"""

# REF_2019, "Update group details": "remove and add group members".
REMOVES_AND_ADD_2019 = """{
  "schemas": [
    "urn:ietf:params:scim:api:messages:2.0:PatchOp"
  ],
  "Operations": [
    {
      "op": "remove",
      "path": "members[value eq \\"removeUser1\\"]"
    },
    {
      "op": "remove",
      "path": "members[value eq \\"removeUser2\\"]"
    },
    {
      "op": "add",
      "path": "members",
      "value": [
        {
          "value": "addUser1",
          "display": "addUser1@example.com"
        },
        {
          "value": "addUser2",
          "display": "addUser2@example.com"
        }
      ]
    }
  ]
}"""

# REF, "Update specific Group membership" (App Integration Wizard: PUT).
PUT_GROUP = """{
    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
    "displayName": "Test SCIMv2",
    "members": [
            {
            "value": "23a35c27-23d3-4c03-b4c5-6443c09e7173",
            "display": "test.user@okta.local"
            }
    ]
}"""

# REF_2019, "Update group details" (PUT).
PUT_GROUP_2019 = """{
\t"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
\t"id": "{id}",
\t"displayName": "SCIM_test1",
\t"members": [{
\t\t"value": "978dc5c3d4aa4014a3678e9d30ef093a",
\t\t"display": "bob@ad.oktatest.com"
\t}, {
\t\t"value": "54c76a50f48c42e38c10f350f8e6055e",
\t\t"display": "pete@ad.oktatest.com"
\t}]
}"""

# REF, "Update specific Group membership": "a full push of the membership".
REPLACE_MEMBERS = """{
  "schemas": [
    "urn:ietf:params:scim:api:messages:2.0:PatchOp"
  ],
  "Operations": [
    {
      "op": "replace",
      "path": "members",
      "value": [
        {
          "value": "23a35c27-23d3-4c03-b4c5-6443c09e7173",
          "display": "test.user@okta.local"
        },
        {
          "value": "89bb1940-b905-4575-9e7f-6f887cfb368e",
          "display": "test.user@okta.local"
        }
      ]
    }
  ]
}"""


# -- helpers ------------------------------------------------------------------------------

def okta(client, method, path, text=None, status=None, replacements=None, content_type=OKTA_BODY_TYPE):
    """One request as Okta sends it: its headers, the documented body (with
    our ids), Content-Type on requests with a body and on DELETE."""
    headers = dict(OKTA_HEADERS)
    if text is not None or method == "DELETE":
        headers["Content-Type"] = content_type
    raw = fill(text, replacements) if text is not None else b""
    return client.app.request("/scim" + path, method=method, body=raw, status=status,
                              headers=dict(headers, Authorization="Bearer " + client.token),
                              expect_errors=status is not None)


def okta_create_user(client, text=CREATE_USER):
    return okta(client, "POST", "/Users", text, 201).json


def user_lookup_path(user_name):
    """REF's lookup: the filter as Okta encodes it, with startIndex and count."""
    return "/Users?filter=%s&startIndex=1&count=100" % urllib.parse.quote('userName eq "%s"' % user_name, safe="")


def user_row(db, user_id):
    return db.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()


def group_version(db, group_id):
    return db.execute("SELECT version FROM groups WHERE id = ?", (group_id,)).fetchone()[0]


def make_users(store, count, prefix="user"):
    """`count` users written straight to the store in one transaction (fast
    set-up for paging and big groups); their ids in creation order."""
    now = scim_appliance.utc_now()
    ids = []
    with store.write() as tx:
        for number in range(count):
            user_id = scim_appliance.new_resource_id()
            document = {"userName": "%s-%06d@okta.local" % (prefix, number), "active": True,
                        "name": {"givenName": "Given", "familyName": "Family %d" % number},
                        "emails": [{"primary": True, "value": "%s-%06d@okta.local" % (prefix, number),
                                    "type": "work"}]}
            tx.insert_resource("users", scim_appliance._row_for(USER, user_id, document, now, 1, created=now))
            ids.append(user_id)
    return ids


def walk_pages(client, endpoint, count):
    """Every page Okta reads: startIndex 1, then +count, until totalResults
    (REF, "Retrieve Users"). Returns (ids in order, the pages' figures)."""
    ids, figures, start = [], [], 1
    while True:
        page = okta(client, "GET", "%s?startIndex=%d&count=%d" % (endpoint, start, count), status=200).json
        assert page["schemas"] == [URN_LIST]
        figures.append((page["startIndex"], page["itemsPerPage"], page["totalResults"]))
        assert all(isinstance(value, int) for value in figures[-1])   # "integers, not as strings"
        ids += [resource["id"] for resource in page["Resources"]]
        start += count
        if start > page["totalResults"]:
            return ids, figures


# -- users ----------------------------------------------------------------------------------

def test_determine_if_the_user_exists_then_create_it(client, db):
    """REF, "Create Users > Determine if the User already exists" and
    "Create the User": the lookup finds nobody (200 with an empty list,
    integers), the POST with Okta's password, locale and groups: [] is a
    201 with the full user, and the same lookup then finds it."""
    empty = okta(client, "GET", user_lookup_path("test.user@okta.local"), status=200).json
    assert empty == {"schemas": [URN_LIST], "totalResults": 0, "startIndex": 1, "itemsPerPage": 0,
                     "Resources": []}
    user = okta_create_user(client)
    body = json.loads(CREATE_USER)
    for key in ("schemas", "userName", "name", "emails", "displayName", "locale", "externalId", "active"):
        assert user[key] == body[key], key
    assert user["id"] and user["meta"]["resourceType"] == "User"
    assert "password" not in user   # returned "never" (RFC 7643 §4.1.1)
    found = okta(client, "GET", user_lookup_path("test.user@okta.local"), status=200).json
    assert found["totalResults"] == 1 and found["Resources"][0]["id"] == user["id"]
    row = user_row(db, user["id"])
    assert row["password_digest"] and "1mz050nq" not in row["password_digest"]
    assert row["active"] == 1 and row["external_id"] == "00ujl29u0le5T6Aj10h7"
    assert "groups" not in stored_document(db, "users", user["id"])   # readOnly: never stored
    assert db.execute("SELECT count(*) FROM members").fetchone()[0] == 0


def test_create_the_user_without_an_external_id(client, db):
    """REF, "Create the User", the second example."""
    user = okta_create_user(client, CREATE_USER_CUSTOM)
    assert "externalId" not in user and user["locale"] == "en-US"
    assert user_row(db, user["id"])["external_id"] is None


def test_create_the_user_as_the_2019_reference_sends_it(client, db):
    """REF_2019, "Create account > SCIM 2.0": tabs, locale en_US."""
    user = okta_create_user(client, CREATE_USER_2019)
    assert (user["userName"], user["locale"], user["externalId"]) == (
        "jane.doe@example.com", "en_US", "00uv931EiyRsnwOGa0g3")


@pytest.mark.parametrize("user_name", ["test.user@okta.local", "TEST.USER@OKTA.LOCAL"])
def test_a_user_that_exists_is_a_409_that_stops_the_job(client, db, user_name):
    """REF, "Create the User": "If the User object that Okta tries to create
    exists in the Service Provider application, then the Service Provider
    needs to respond with an error schema to stop the provisioning job"
    (409). userName compares case-insensitively (RFC 7643 §4.1.1)."""
    okta_create_user(client)
    before = snapshot(db)
    response = okta(client, "POST", "/Users", CREATE_USER.replace("test.user@okta.local", user_name), status=409)
    assert_scim_error(response, 409, "uniqueness")
    assert snapshot(db) == before


def test_retrieve_users_page_by_page_in_a_stable_order(client, store):
    """REF, "Retrieve Users": count=100, startIndex growing by 100 until
    totalResults; "The SCIM server must consistently return the same
    ordering of results for the requests, regardless of which values are
    provided for the count and startIndex"."""
    ids = make_users(store, 250)
    walked, figures = walk_pages(client, "/Users", 100)
    assert walked == ids
    assert figures == [(1, 100, 250), (101, 100, 250), (201, 50, 250)]
    assert walk_pages(client, "/Users", 37)[0] == ids


def test_retrieve_a_specific_user(client, db):
    """REF, "Retrieve a specific User"."""
    user = okta_create_user(client)
    assert okta(client, "GET", "/Users/" + user["id"], status=200).json == user


def test_update_a_user_with_put_after_get_keeps_memberships_and_password(client, db):
    """REF, "Update a specific User (PUT)": Okta GETs the user, changes what
    changed and PUTs the whole object back, with id, meta and groups: [].
    groups is readOnly (RFC 7643 §4.1.2): the user stays in its groups; the
    PUT has no password, so the password is kept."""
    user = okta_create_user(client)
    group = okta(client, "POST", "/Groups", CREATE_GROUP, 201).json
    client.patch("/Groups/" + group["id"], [{"op": "add", "path": "members", "value": [{"value": user["id"]}]}])
    digest = user_row(db, user["id"])["password_digest"]
    assert okta(client, "GET", "/Users/" + user["id"], status=200).json["groups"][0]["value"] == group["id"]
    updated = okta(client, "PUT", "/Users/" + user["id"], PUT_USER, 200, {OKTA_USER_ID: user["id"]}).json
    assert updated["name"] == {"givenName": "Another", "middleName": "Excited", "familyName": "User"}
    assert updated["meta"]["version"] == 'W/"2"' and updated["meta"]["created"] == user["meta"]["created"]
    assert [g["value"] for g in updated["groups"]] == [group["id"]]
    assert stored_members(db, group["id"]) == {user["id"]}
    assert user_row(db, user["id"])["password_digest"] == digest
    assert stored_document(db, "users", user["id"])["emails"] == [
        {"primary": True, "value": "test.user@okta.local", "type": "work", "display": "test.user@okta.local"}]


def test_update_a_user_with_the_2019_put_body(client, db):
    """REF_2019, "Update account details > SCIM 2.0": meta carries dates in
    no RFC format and a version of its own (ignored: meta is the
    server's), and a password (stored as a new digest)."""
    user = okta_create_user(client, CREATE_USER_2019)
    digest = user_row(db, user["id"])["password_digest"]
    updated = okta(client, "PUT", "/Users/" + user["id"], PUT_USER_2019, 200, {"{id}": user["id"]}).json
    assert updated["externalId"] == "00uq2kqg7YTkFo3cY0g3"
    assert updated["meta"]["created"] == user["meta"]["created"] and updated["meta"]["version"] == 'W/"2"'
    assert user_row(db, user["id"])["password_digest"] not in (None, digest)


def test_deactivate_and_reactivate_with_a_pathless_patch_and_the_user_stays(client, db):
    """REF, "Update a specific User (PATCH)" and "Delete Users": Okta never
    deletes a user, it sets active to false, and can set it back ("Okta can
    also reactivate the user account", docs/guides/scim-provisioning-
    integration-connect; REF names the PATCH but shows no body for it: it is
    the deactivation's with true). A deactivated user is still read, found
    and listed."""
    user = okta_create_user(client)
    deactivated = okta(client, "PATCH", "/Users/" + user["id"], DEACTIVATE_USER, 200).json
    assert deactivated["active"] is False and user_row(db, user["id"])["active"] == 0
    assert okta(client, "GET", "/Users/" + user["id"], status=200).json["active"] is False
    found = okta(client, "GET", user_lookup_path("test.user@okta.local"), status=200).json
    assert [(u["id"], u["active"]) for u in found["Resources"]] == [(user["id"], False)]
    assert [u["id"] for u in okta(client, "GET", "/Users?startIndex=1&count=100", status=200).json[
        "Resources"]] == [user["id"]]
    reactivated = okta(client, "PATCH", "/Users/" + user["id"], DEACTIVATE_USER.replace("false", "true"), 200).json
    assert reactivated["active"] is True and user_row(db, user["id"])["active"] == 1


# -- groups ---------------------------------------------------------------------------------

def test_create_a_group_without_and_with_members(client, db):
    """REF, "Create Groups" (members: []) and REF_2019, "Create group"
    (members given; "the users must already be provisioned")."""
    empty = okta(client, "POST", "/Groups", CREATE_GROUP, 201).json
    assert (empty["displayName"], empty["members"]) == ("Test SCIMv2", [])
    steve, bob = okta_create_user(client), okta_create_user(client, CREATE_USER_2019)
    group = okta(client, "POST", "/Groups", CREATE_GROUP_WITH_MEMBERS_2019, 201, {
        "85467bb36e1c4f8991750501bf491962": steve["id"], "2fabb15c24a2440c93a0214599603bcb": bob["id"]}).json
    assert sorted(m["value"] for m in group["members"]) == sorted([steve["id"], bob["id"]])
    assert stored_members(db, group["id"]) == {steve["id"], bob["id"]}


def test_retrieve_groups_page_by_page_and_a_specific_group(client, db):
    """REF, "Retrieve Groups" (pages of count=100) and "Retrieve specific
    Groups" (the group with its members)."""
    ids = [okta(client, "POST", "/Groups", CREATE_GROUP.replace("Test SCIMv2", "Group %03d" % n), 201).json["id"]
           for n in range(120)]
    walked, figures = walk_pages(client, "/Groups", 100)
    assert walked == ids and figures == [(1, 100, 120), (101, 20, 120)]
    user = okta_create_user(client)
    client.patch("/Groups/" + ids[0], [{"op": "add", "path": "members", "value": [{"value": user["id"]}]}])
    group = okta(client, "GET", "/Groups/" + ids[0], status=200).json
    assert [(m["value"], m["display"]) for m in group["members"]] == [(user["id"], "Test User")]


def test_group_lookup_by_display_name(client, db):
    """REF, "Retrieve Groups": Okta checks a group exists with
    filter=displayName eq "${groupName}" when it does not know its id."""
    group = okta(client, "POST", "/Groups", CREATE_GROUP, 201).json
    path = "/Groups?filter=%s&startIndex=1&count=100" % urllib.parse.quote('displayName eq "Test SCIMv2"', safe="")
    found = okta(client, "GET", path, status=200).json
    assert found["totalResults"] == 1 and found["Resources"][0]["id"] == group["id"]
    missing = okta(client, "GET", path.replace("SCIMv2", "SCIMv3"), status=200).json
    assert (missing["totalResults"], missing["Resources"]) == (0, [])


def test_a_group_rename_that_sends_the_group_s_own_id_succeeds(client, db):
    """REF, "Update a specific Group name": a replace without path whose
    value carries the group's own id. It is sent on every membership update,
    so mostly the name is unchanged: then nothing changes, not even the
    version. REF_2019 sends the same form with a new name."""
    user = okta_create_user(client)
    group = okta(client, "POST", "/Groups", CREATE_GROUP.replace("Test SCIMv2", "Old name"), 201).json
    client.patch("/Groups/" + group["id"], [{"op": "add", "path": "members", "value": [{"value": user["id"]}]}])
    version = group_version(db, group["id"])
    response = okta(client, "PATCH", "/Groups/" + group["id"], RENAME_GROUP, None, {OKTA_GROUP_ID: group["id"]})
    assert response.status_int == 204
    assert stored_document(db, "groups", group["id"]) == {"displayName": "Test SCIMv2"}
    assert group_version(db, group["id"]) == version + 1
    okta(client, "PATCH", "/Groups/" + group["id"], RENAME_GROUP, 204, {OKTA_GROUP_ID: group["id"]})
    assert group_version(db, group["id"]) == version + 1   # the same name again: nothing changed
    okta(client, "PATCH", "/Groups/" + group["id"], RENAME_GROUP_2019, 204,
         {"619435534e58458c8c92e86d1e07d2f8": group["id"]})
    assert stored_document(db, "groups", group["id"]) == {"displayName": "New Group Name"}
    assert stored_members(db, group["id"]) == {user["id"]}
    named = client.patch("/Groups/%s?attributes=displayName" % group["id"], json.loads(
        fill(RENAME_GROUP, {OKTA_GROUP_ID: group["id"]}))["Operations"], status=200).json
    assert named["displayName"] == "Test SCIMv2"


@pytest.mark.parametrize("resource", ["Groups", "Users"])
def test_an_id_that_is_not_the_resource_s_is_refused_in_patch_and_put_alike(client, db, resource):
    """The rule behind the rename (scim_appliance.check_own_id): a client
    may send a resource's own id back, in PATCH and PUT alike, together with
    meta and schemas as a GET gave them; an id that differs is refused with
    mutability and changes nothing (RFC 7644 §3.5.1)."""
    if resource == "Groups":
        mine = okta(client, "POST", "/Groups", CREATE_GROUP, 201).json
        other = client.create_group("Other")
        put_body = {"schemas": [URN_GROUP], "displayName": "Test SCIMv2"}
    else:
        mine = okta_create_user(client)
        other = client.create_user("other@okta.local")
        put_body = {"schemas": [URN_USER], "userName": "test.user@okta.local"}
    path = "/%s/%s" % (resource, mine["id"])
    before = snapshot(db)
    for value in ({"id": other["id"]}, {"id": other["id"], "meta": mine["meta"]}, {"id": None}):
        assert_scim_error(client.patch(path, [{"op": "replace", "value": value}], status=400), 400, "mutability")
    assert_scim_error(client.patch(path, [{"op": "replace", "path": "id", "value": other["id"]}], status=400),
                      400, "mutability")
    assert_scim_error(client.put(path, dict(put_body, id=other["id"]), status=400), 400, "mutability")
    assert snapshot(db) == before
    echo = {"id": mine["id"], "meta": mine["meta"], "schemas": mine["schemas"]}
    assert client.patch(path, [{"op": "replace", "value": echo}]).status_int in (200, 204)
    assert client.patch(path, [{"op": "replace", "path": "id", "value": mine["id"]}]).status_int in (200, 204)
    assert snapshot(db) == before   # an echo changes nothing
    assert client.put(path, dict(put_body, **echo)).json["id"] == mine["id"]


def test_update_group_membership_with_a_remove_and_an_add(client, db):
    """REF, "Update specific Group membership" (OIN integrations: PATCH)."""
    user, other = okta_create_user(client), okta_create_user(client, CREATE_USER_2019)
    group = okta(client, "POST", "/Groups", CREATE_GROUP, 201).json
    client.patch("/Groups/" + group["id"], [{"op": "add", "path": "members", "value": [{"value": other["id"]}]}])
    okta(client, "PATCH", "/Groups/" + group["id"], UPDATE_MEMBERSHIP, 204,
         {OKTA_USER_ID: user["id"], OKTA_OTHER_USER_ID: other["id"]})
    assert stored_members(db, group["id"]) == {user["id"]}


def test_update_group_membership_with_several_removes_and_an_add(client, db, store):
    """REF_2019, "Update group details": several remove operations, one per
    member, on members[value eq "..."], then one add of several members."""
    remove_1, remove_2, keep, add_1, add_2 = make_users(store, 5)
    group = client.create_group("Team", members=[{"value": m} for m in (remove_1, remove_2, keep)])
    okta(client, "PATCH", "/Groups/" + group["id"], REMOVES_AND_ADD_2019, 204, {
        "removeUser1": remove_1, "removeUser2": remove_2, '"addUser1"': '"%s"' % add_1,
        '"addUser2"': '"%s"' % add_2})
    assert stored_members(db, group["id"]) == {keep, add_1, add_2}


def test_update_group_membership_with_a_put_of_the_whole_group(client, db, store):
    """REF, "Update specific Group membership" (App Integration Wizard
    integrations: PUT with the group's members), and REF_2019's PUT, which
    carries the group's id: the members become exactly those listed."""
    user = okta_create_user(client)
    old = make_users(store, 2)
    group = client.create_group("Test SCIMv2", members=[{"value": m} for m in old])
    updated = okta(client, "PUT", "/Groups/" + group["id"], PUT_GROUP, 200, {OKTA_USER_ID: user["id"]}).json
    assert (updated["id"], updated["displayName"]) == (group["id"], "Test SCIMv2")
    assert [(m["value"], m["display"]) for m in updated["members"]] == [(user["id"], "Test User")]
    assert stored_members(db, group["id"]) == {user["id"]}
    bob, pete = make_users(store, 2, "bob")
    okta(client, "PUT", "/Groups/" + group["id"], PUT_GROUP_2019, 200, {
        "{id}": group["id"], "978dc5c3d4aa4014a3678e9d30ef093a": bob, "54c76a50f48c42e38c10f350f8e6055e": pete})
    assert stored_members(db, group["id"]) == {bob, pete}
    assert stored_document(db, "groups", group["id"]) == {"displayName": "SCIM_test1"}


def test_a_full_push_replaces_all_members_and_an_empty_one_clears_the_group(client, db, store):
    """REF, "Update specific Group membership": "a full push of the
    membership ... replaces all the group members with the supplied object
    values". Pushing the same members again changes nothing, not even the
    version; a push of no members clears the group."""
    user, other = okta_create_user(client), okta_create_user(client, CREATE_USER_2019)
    group = client.create_group("Team", members=[{"value": m} for m in make_users(store, 3)])
    ids = {OKTA_USER_ID: user["id"], OKTA_OTHER_USER_ID: other["id"]}
    okta(client, "PATCH", "/Groups/" + group["id"], REPLACE_MEMBERS, 204, ids)
    assert stored_members(db, group["id"]) == {user["id"], other["id"]}
    version = group_version(db, group["id"])
    okta(client, "PATCH", "/Groups/" + group["id"], REPLACE_MEMBERS, 204, ids)
    assert group_version(db, group["id"]) == version
    empty = re.sub(r'"value": \[.*\]\s*\}\s*\]', '"value": []}]', REPLACE_MEMBERS, flags=re.S)
    okta(client, "PATCH", "/Groups/" + group["id"], empty, 204)
    assert stored_members(db, group["id"]) == set() and group_version(db, group["id"]) == version + 1


def test_delete_a_group_and_its_users_stay(client, db):
    """REF, "Delete a specific Group" ("Delete the group in the target
    app"), sent with REF_2019's headers, Content-Type included: 204, and the
    members are still there ("User accounts will not be deleted", Okta's
    SCIM test plan, C9318)."""
    user = okta_create_user(client)
    group = client.create_group("Gone", members=[{"value": user["id"]}])
    response = okta(client, "DELETE", "/Groups/" + group["id"], status=204)
    assert response.body == b""
    okta(client, "GET", "/Groups/" + group["id"], status=404)
    assert user_row(db, user["id"]) is not None and stored_members(db, group["id"]) == set()
    assert okta(client, "GET", "/Users/" + user["id"], status=200).json.get("groups", []) == []


# -- a whole group pushed at once -------------------------------------------------------------

def test_a_100000_member_group_is_pushed_whole_and_again(client, db, store):
    """Okta's App Integration Wizard integrations PUT a group's whole
    membership (REF, "Update specific Group membership"), and "Push Now"
    overwrites it in full (Okta's SCIM test plan, C9316); OIN integrations
    PATCH at most 1,000 membership changes at a time ("Custom Patch Batch
    Size ... between 100 and 1000", docs/guides/submit-app, 2021). A
    100,000-member group goes through both, and the next push, with one
    member changed, changes one row. (Timing is the benchmark's business:
    the note gives the figures; Okta closes the socket after 60 s, FAQ.)"""
    ids = make_users(store, 100001, "push")
    group = okta(client, "POST", "/Groups", CREATE_GROUP, 201).json
    members = [{"value": member_id, "display": "push-%06d@okta.local" % n} for n, member_id in enumerate(ids)]
    body = json.dumps({"schemas": [URN_GROUP], "displayName": "Test SCIMv2", "members": members[:100000]})
    assert len(body) > scim_appliance.MAX_BODY_BYTES
    started = time.monotonic()
    pushed = okta(client, "PUT", "/Groups/" + group["id"], body, 200)
    first = time.monotonic() - started
    assert len(pushed.json["members"]) == 100000
    assert db.execute("SELECT count(*) FROM members WHERE group_id = ?", (group["id"],)).fetchone()[0] == 100000
    again = dict(json.loads(body), members=members[1:])
    started = time.monotonic()
    okta(client, "PUT", "/Groups/" + group["id"], json.dumps(again), 200)
    second = time.monotonic() - started
    assert stored_members(db, group["id"]) == set(ids[1:])
    okta(client, "PATCH", "/Groups/" + group["id"], RENAME_GROUP, 204, {OKTA_GROUP_ID: group["id"]})
    batch = {"schemas": [scim_appliance.URN_PATCH], "Operations": [
        {"op": "remove", "path": 'members[value eq "%s"]' % ids[n]} for n in range(1, 1001)]}
    okta(client, "PATCH", "/Groups/" + group["id"], json.dumps(batch), 204)
    assert db.execute("SELECT count(*) FROM members WHERE group_id = ?", (group["id"],)).fetchone()[0] == 99000
    print("\n[okta] PUT of 100,000 members: %.1f s; the same push with one member changed: %.1f s"
          % (first, second))


# -- what every answer carries ----------------------------------------------------------------

def test_a_429_carries_retry_after_in_whole_seconds(wsgi_app, store, token):
    """CONCEPTS, "Handle SCIM server rate limiting (HTTP 429)": "Okta's
    rate-limit handling only supports integer values (seconds) in the
    Retry-After header"; anything else makes it wait five minutes. So does a
    503 (a storage fault)."""
    app = webtest.TestApp(wsgi_app, extra_environ={"REMOTE_ADDR": "192.0.2.77"})
    statuses = [app.get("/scim/Users", headers={"Authorization": "Bearer wrong"}, expect_errors=True).status_int
                for _ in range(scim_appliance.AUTH_FAILURE_LIMIT + 1)]
    assert statuses[-1] == 429
    throttled = app.get("/scim/Users", headers={"Authorization": "Bearer wrong"}, expect_errors=True)
    assert re.fullmatch(r"[1-9][0-9]*", throttled.headers["Retry-After"])
    store.monitor.min_free_bytes = 1 << 62
    refused = webtest.TestApp(wsgi_app).post("/scim/Users", json.dumps({"schemas": [URN_USER], "userName": "x"}),
                                             headers={"Authorization": "Bearer " + token,
                                                      "Content-Type": OKTA_BODY_TYPE}, expect_errors=True)
    assert refused.status_int == 503 and re.fullmatch(r"[1-9][0-9]*", refused.headers["Retry-After"])


# -- the OIN spec test, against the real server --------------------------------------------------

def raw_request(port, method, target, headers, body=b""):
    """(status, parsed JSON or None) of one request sent byte for byte. The
    spec test's collection writes its URLs unencoded (`?filter=userName eq
    "..."`); its HTTP client sends spaces as %20 and the quotes as they are."""
    target = target.replace(" ", "%20")
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: 127.0.0.1:%d" % port, "Connection: close",
             "Content-Length: %d" % len(body)] + ["%s: %s" % item for item in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        reply = receive_until_closed(sock)
    head, _, content = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content) if content else None


def test_the_oin_spec_test_passes_against_the_real_server(tmp_path):
    """SPEC_TEST, steps 1-12, each with the collection's method, URL,
    headers and body (its variables filled in as its Initial Script makes
    them), and its assertions. "Create at least one user in your SCIM server
    before running the Okta SCIM API test suite" (the prepare guide)."""
    server = start_live_server(str(tmp_path / "oin.db"))
    get_headers = {"Accept-Charset": "utf-8", "Content-Type": "application/scim+json; charset=utf-8",
                   "Accept": "application/scim+json", "User-Agent": "OKTA SCIM Integration"}
    auth = {"Authorization": "Bearer " + server.token}
    post_headers = dict(auth, **{"Content-Type": "application/json", "Accept": "application/scim+json; charset=utf-8"})
    email = "Runscope123Abcdefghi456@atko.com"
    try:
        assert server.request("POST", "/Users", json.loads(CREATE_USER))[0] == 201   # the user to find first

        def get(target, headers=None):
            return raw_request(server.port, "GET", "/scim" + target, dict(get_headers, **(headers or auth)))

        status, page = get("/Users?count=1&startIndex=1")                                         # 1
        assert status == 200 and page["Resources"] and URN_LIST in page["schemas"]
        assert all(isinstance(page[key], int) for key in ("itemsPerPage", "startIndex", "totalResults"))
        first = page["Resources"][0]
        assert all((first["id"], first["name"]["familyName"], first["name"]["givenName"], first["userName"],
                    first["emails"][0]["value"])) and first["active"] is True
        status, user = get("/Users/" + first["id"])                                                # 2
        assert status == 200 and user["id"] == first["id"] and user["name"]["givenName"]
        status, found = get('/Users?filter=userName eq "abcdefgh@atko.com"')                      # 3
        assert status == 200 and URN_LIST in found["schemas"] and found["totalResults"] == 0
        status, error = get("/Users/010101001010101011001010101011")                              # 4
        assert status == 404 and error["detail"] and URN_ERROR in error["schemas"]
        status, found = get('/Users?filter=userName eq "%s"' % email)                             # 5
        assert status == 200 and found["totalResults"] == 0
        body = ('{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"%s","name":{"givenName":'
                '"Runscope123","familyName":"Abcdefghi456"},"emails":[{"primary":true,"value":"%s","type":"work"}],'
                '"displayName":"Runscope123 Abcdefghi456","active":true}' % (email, email)).encode()
        status, created = raw_request(server.port, "POST", "/scim/Users", post_headers, body)     # 6
        assert status == 201 and created["active"] is True and created["id"]
        assert (created["name"], created["userName"]) == (
            {"givenName": "Runscope123", "familyName": "Abcdefghi456"}, email)
        assert URN_USER in created["schemas"]
        status, again = get("/Users/" + created["id"])                                             # 7
        assert status == 200 and again["userName"] == email and again["name"] == created["name"]
        status, _ = raw_request(server.port, "POST", "/scim/Users", post_headers, body)           # 8
        assert status == 409
        status, found = get('/Users?filter=userName eq "%s"' % email.upper())                     # 9
        assert status == 200 and [u["id"] for u in found["Resources"]] == [created["id"]]
        status, groups = get("/Groups")                                                            # 10
        assert status == 200 and isinstance(groups["Resources"], list)
        status, error = get('/Users?filter=userName eq "%s"' % email.upper(),                    # 11
                            {"Authorization": "non-token"})
        assert status == 401 and error["detail"] and error["status"] == "401" and URN_ERROR in error["schemas"]
        status, error = get("/Users/00919288221112222")                                           # 12
        assert status == 404 and error["detail"] and error["status"] == "404" and URN_ERROR in error["schemas"]
    finally:
        server.stop()
    assert {row[0] for row in query(server.db_path, "SELECT user_name FROM users")} == {
        "test.user@okta.local", email}
