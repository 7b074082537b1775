"""The Group lifecycle over HTTP: RFC 7644 §3.3-3.6 for /Groups, membership
in the members table, and what Entra sends (entra-requirements.md R20, R36-R42)."""

import json

import pytest

import scim_appliance
from conftest import assert_scim_error, PUBLIC_URL, stored_document, stored_members
from scim_appliance import URN_GROUP, URN_LIST

USERS_URL = PUBLIC_URL + "/scim/Users/"
GROUPS_URL = PUBLIC_URL + "/scim/Groups/"
MICROSOFT_GROUP_URI = "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"


# -- helpers --------------------------------------------------------------------

def group_row(db, group_id):
    row = db.execute("SELECT * FROM groups WHERE id = ?", (group_id,)).fetchone()
    return None if row is None else dict(row)


def group_count(db):
    return db.execute("SELECT count(*) FROM groups").fetchone()[0]


def member_rows(db, group_id):
    return sorted(tuple(r) for r in db.execute(
        "SELECT member_id, member_type FROM members WHERE group_id = ?", (group_id,)))


def snapshot(db, group_id):
    """Everything stored for a group: row (document, version...) and member rows."""
    return group_row(db, group_id), member_rows(db, group_id)





def user_member(user):
    return {"value": user["id"], "$ref": USERS_URL + user["id"], "type": "User",
            "display": user["displayName"]}


@pytest.fixture
def users(client):
    """Three users with display names."""
    return [client.create_user("user%d@example.com" % i, displayName="User %d" % i) for i in range(3)]


# -- create (R36, R41) ------------------------------------------------------------

def test_post_group_with_entra_body_returns_201_with_empty_members(client, db):
    """R36: Microsoft's create body, with its extra schema URI, → 201 and "members": []."""
    body = {
        "schemas": [URN_GROUP, MICROSOFT_GROUP_URI],
        "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
        "displayName": "displayName",
        "meta": {"resourceType": "Group"}}
    response = client.post("/Groups", body)
    created = response.json
    assert response.status_int == 201
    assert response.content_type == "application/scim+json"
    group_id = created["id"]
    assert response.headers["Location"] == created["meta"]["location"] == GROUPS_URL + group_id
    assert response.headers["ETag"] == created["meta"]["version"] == 'W/"1"'
    assert created["schemas"] == [URN_GROUP]
    assert created["externalId"] == "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159"
    assert created["displayName"] == "displayName"
    assert created["members"] == []
    assert created["meta"]["resourceType"] == "Group"
    assert created["meta"]["created"] == created["meta"]["lastModified"]
    row = group_row(db, group_id)
    assert row["display_name"] == "displayName"
    assert row["display_name_key"] == scim_appliance.fold("displayName")
    assert row["external_id"] == "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159"
    assert row["version"] == 1
    assert json.loads(row["document"]) == {"externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
                                           "displayName": "displayName"}
    assert member_rows(db, group_id) == []


def test_post_group_with_members_stores_and_returns_them(client, db, users):
    """RFC 7643 §4.2: members carry value, $ref, type and display; stored in the members table."""
    created = client.post("/Groups", {
        "schemas": [URN_GROUP], "displayName": "Team",
        "members": [{"value": users[0]["id"]},
                    {"value": users[1]["id"], "type": "User", "$ref": None},
                    {"value": users[2]["id"], "display": "ignored, read-only"}]}).json
    expected = sorted((user_member(u) for u in users), key=lambda m: m["value"])
    assert sorted(created["members"], key=lambda m: m["value"]) == expected
    assert member_rows(db, created["id"]) == sorted((u["id"], "User") for u in users)
    assert "members" not in stored_document(db, "groups", created["id"])
    fetched = client.get("/Groups/" + created["id"]).json
    assert fetched["members"] == created["members"]


@pytest.mark.parametrize("members", [
    [{"value": "does-not-exist"}],
    "existing-then-missing",
    [{"value": ""}],
    [{"display": "no value"}],
    [{"value": "USER", "type": "Group"}],
    [{"value": "USER", "type": "Robot"}],
])
def test_post_group_with_invalid_member_is_400_and_stores_nothing(client, db, users, members):
    """Adding a non-existent or mistyped member → 400 invalidValue and nothing applied."""
    if members == "existing-then-missing":
        members = [{"value": users[0]["id"]}, {"value": "f648f8d5ea4e4cd38e9c"}]
    members = [dict(m, value=users[0]["id"]) if m.get("value") == "USER" else m for m in members]
    response = client.post("/Groups", {"schemas": [URN_GROUP], "displayName": "Broken",
                                       "members": members}, status=400)
    assert_scim_error(response, 400, "invalidValue")
    assert group_count(db) == 0
    assert db.execute("SELECT count(*) FROM members").fetchone()[0] == 0


@pytest.mark.parametrize("body", [
    {"schemas": [URN_GROUP]}, {"displayName": ""}, {"displayName": "  "}, {"displayName": None},
    {"displayName": 7}, {"externalId": "x", "members": []},
])
def test_post_group_without_display_name_is_400_and_stores_nothing(client, db, body):
    """RFC 7643 §4.2: displayName is required."""
    assert_scim_error(client.post("/Groups", body, status=400), 400, "invalidValue")
    assert group_count(db) == 0


@pytest.mark.parametrize("raw", [b"[]", b'"group"', b"1"])
def test_post_group_with_non_object_body_is_400(client, db, raw):
    """RFC 7644 §3.3: the body must be a JSON object."""
    assert_scim_error(client.request("POST", "/Groups", raw=raw, status=400), 400, "invalidSyntax")
    assert group_count(db) == 0


@pytest.mark.parametrize("first,second", [("Sales", "SALES"), ("Straße", "STRASSE"),
                                          ("Ärzte", "ärzte"), ("Team", "Team")])
def test_duplicate_display_name_is_409_uniqueness(client, db, first, second):
    """R41: group displayName unique, compared case-insensitively → 409 uniqueness."""
    existing = client.create_group(first)
    error = assert_scim_error(client.post("/Groups", {"displayName": second}, status=409), 409, "uniqueness")
    assert error["detail"]
    assert group_count(db) == 1
    assert group_row(db, existing["id"])["display_name"] == first


# -- read (R20) -------------------------------------------------------------------

def test_get_group_with_excluded_members_has_no_members_key(client, db, users):
    """R20: GET /Groups/<id>?excludedAttributes=members → no members at all."""
    group = client.create_group("Excluded", externalId="60f1bb27",
                                members=[{"value": u["id"]} for u in users])
    body = client.get("/Groups/%s?excludedAttributes=members" % group["id"]).json
    assert "members" not in body
    assert body == {k: v for k, v in group.items() if k != "members"}
    assert len(stored_members(db, group["id"])) == 3


def test_filter_by_display_name_with_excluded_members(client, db, users):
    """R20: GET /Groups?excludedAttributes=members&filter=displayName eq "..." (Entra's query)."""
    group = client.create_group("displayName", externalId="0db508eb",
                                members=[{"value": users[0]["id"]}])
    client.create_group("other", members=[{"value": users[1]["id"]}])
    body = client.get('/Groups?excludedAttributes=members&filter=displayName eq "displayName"').json
    assert body["schemas"] == [URN_LIST]
    assert body["totalResults"] == 1 and body["itemsPerPage"] == 1 and body["startIndex"] == 1
    assert body["Resources"] == [{k: v for k, v in group.items() if k != "members"}]
    case_folded = client.get('/Groups?excludedAttributes=members&filter=displayName eq "DISPLAYNAME"').json
    assert [r["id"] for r in case_folded["Resources"]] == [group["id"]]
    none = client.get('/Groups?excludedAttributes=members&filter=displayName eq "missing"').json
    assert none == {"schemas": [URN_LIST], "totalResults": 0, "Resources": [], "startIndex": 1,
                    "itemsPerPage": 0}
    assert stored_members(db, group["id"]) == {users[0]["id"]}


def test_members_are_listed_in_a_stable_order(client, db, users):
    """RFC 7644 §3.4.1: the same group reads the same, whatever order members were added in."""
    ids = [u["id"] for u in users]
    forward = client.create_group("Forward", members=[{"value": i} for i in ids])
    backward = client.create_group("Backward", members=[{"value": i} for i in reversed(ids)])
    first = [m["value"] for m in client.get("/Groups/" + forward["id"]).json["members"]]
    assert sorted(first) == sorted(ids)
    assert [m["value"] for m in client.get("/Groups/" + forward["id"]).json["members"]] == first
    assert [m["value"] for m in client.get("/Groups/" + backward["id"]).json["members"]] == first
    listed = client.get("/Groups?sortBy=displayName").json["Resources"]
    assert [[m["value"] for m in g["members"]] for g in listed] == [first, first]
    assert stored_members(db, forward["id"]) == stored_members(db, backward["id"]) == set(ids)


def test_member_display_comes_from_the_users_display_name(client, db, users):
    """RFC 7643 §4.2: members.display is the member's displayName (readOnly), kept current."""
    group = client.create_group("Display", members=[{"value": users[0]["id"], "display": "Wrong"}])
    assert client.get("/Groups/" + group["id"]).json["members"][0]["display"] == "User 0"
    client.patch("/Users/" + users[0]["id"],
                 [{"op": "replace", "path": "displayName", "value": "Renamed"}], status=200)
    assert client.get("/Groups/" + group["id"]).json["members"][0]["display"] == "Renamed"
    assert group_row(db, group["id"])["display_name"] == "Display"


def test_unknown_group_id_is_404(client, db):
    """R14: 404 with the Error schema for GET, PUT, PATCH and DELETE of an unknown group."""
    client.create_group("Exists")
    missing = "/Groups/cdb1ce18f65944079d37"
    assert_scim_error(client.get(missing, status=404), 404)
    assert_scim_error(client.put(missing, {"displayName": "X"}, status=404), 404)
    assert_scim_error(client.patch(missing, [{"op": "replace", "path": "displayName", "value": "X"}],
                              status=404), 404)
    assert_scim_error(client.delete(missing, status=404), 404)
    assert group_count(db) == 1
    assert group_row(db, "cdb1ce18f65944079d37") is None


# -- replace (RFC 7644 §3.5.1) ----------------------------------------------------

def test_put_replaces_display_name_and_sets_members_exactly(client, db, users):
    """RFC 7644 §3.5.1: a group PUT sets members to exactly those listed."""
    group = client.create_group("Before", externalId="ext-g",
                                members=[{"value": users[0]["id"]}, {"value": users[1]["id"]}])
    response = client.put("/Groups/" + group["id"], {
        "schemas": [URN_GROUP], "displayName": "After",
        "members": [{"value": users[1]["id"]}, {"value": users[2]["id"]}]})
    replaced = response.json
    assert replaced["displayName"] == "After"
    assert "externalId" not in replaced          # omitted → cleared
    assert sorted(m["value"] for m in replaced["members"]) == sorted([users[1]["id"], users[2]["id"]])
    assert response.headers["ETag"] == replaced["meta"]["version"] == 'W/"2"'
    assert replaced["meta"]["created"] == group["meta"]["created"]
    assert stored_members(db, group["id"]) == {users[1]["id"], users[2]["id"]}
    row = group_row(db, group["id"])
    assert row["display_name"] == "After" and row["external_id"] is None and row["version"] == 2
    assert json.loads(row["document"]) == {"displayName": "After"}
    assert client.get("/Groups/" + group["id"]).json == replaced


def test_put_without_members_empties_the_group(client, db, users):
    """RFC 7644 §3.5.1: members omitted from a PUT are cleared."""
    group = client.create_group("Full", members=[{"value": u["id"]} for u in users])
    replaced = client.put("/Groups/" + group["id"], {"displayName": "Full"}).json
    assert replaced["members"] == []
    assert stored_members(db, group["id"]) == set()


def test_put_ignores_read_only_attributes(client, db, users):
    """RFC 7644 §3.5.1: meta in a PUT body is ignored; the id may be sent
    back, and only unchanged (check_own_id, test_okta.py)."""
    group = client.create_group("RO")
    assert_scim_error(client.put("/Groups/" + group["id"], {"id": "other", "displayName": "RO"}, status=400),
                      400, "mutability")
    replaced = client.put("/Groups/" + group["id"], {
        "id": group["id"], "displayName": "RO", "meta": {"version": 'W/"50"', "created": "2000-01-01T00:00:00Z"},
        "members": [{"value": users[0]["id"], "display": "Not mine"}]}).json
    assert replaced["id"] == group["id"]
    assert replaced["meta"]["version"] == 'W/"2"'
    assert replaced["meta"]["created"] == group["meta"]["created"]
    assert replaced["members"] == [user_member(users[0])]
    assert group_row(db, "other") is None
    assert member_rows(db, group["id"]) == [(users[0]["id"], "User")]


@pytest.mark.parametrize("name", ["Taken", "TAKEN", "taken"])
def test_put_to_another_groups_display_name_is_409_and_changes_nothing(client, db, users, name):
    """R41: uniqueness on PUT; the failed PUT leaves document, version and members as they were."""
    client.create_group("Taken")
    group = client.create_group("Mine", externalId="keep", members=[{"value": users[0]["id"]}])
    before = snapshot(db, group["id"])
    response = client.put("/Groups/" + group["id"], {
        "displayName": name, "members": [{"value": users[1]["id"]}]}, status=409)
    assert_scim_error(response, 409, "uniqueness")
    assert snapshot(db, group["id"]) == before


def test_group_may_change_the_case_of_its_own_display_name(client, db):
    """R41: renaming a group to its own name in another case is no conflict."""
    group = client.create_group("casing")
    assert client.put("/Groups/" + group["id"], {"displayName": "CASING"}).json["displayName"] == "CASING"
    assert group_row(db, group["id"])["display_name"] == "CASING"


@pytest.mark.parametrize("members", [[{"value": "missing-id"}], "existing-then-missing",
                                     [{"display": "User 0"}]])
def test_put_with_invalid_member_is_400_and_changes_nothing(client, db, users, members):
    """A non-existent member, or an entry naming no member → 400 invalidValue;
    the group is left as it was."""
    if members == "existing-then-missing":
        members = [{"value": users[2]["id"]}, {"value": "missing-id"}]
    group = client.create_group("Stable", members=[{"value": users[0]["id"]}])
    before = snapshot(db, group["id"])
    response = client.put("/Groups/" + group["id"], {"displayName": "Renamed", "members": members},
                          status=400)
    assert_scim_error(response, 400, "invalidValue")
    assert snapshot(db, group["id"]) == before


def test_put_with_stale_if_match_is_412_and_changes_nothing(client, db, users):
    """RFC 7644 §3.14: If-Match with an old version → 412."""
    group = client.create_group("Versioned", members=[{"value": users[0]["id"]}])
    client.put("/Groups/" + group["id"], {"displayName": "Versioned 2", "members": [{"value": users[0]["id"]}]})
    before = snapshot(db, group["id"])
    response = client.put("/Groups/" + group["id"], {"displayName": "Stale"},
                          headers={"If-Match": 'W/"1"'}, status=412)
    assert_scim_error(response, 412)
    assert snapshot(db, group["id"]) == before
    ok = client.put("/Groups/" + group["id"], {"displayName": "Fresh"}, headers={"If-Match": 'W/"2"'})
    assert ok.json["meta"]["version"] == 'W/"3"'
    assert group_row(db, group["id"])["display_name"] == "Fresh"


# -- delete (R42) -----------------------------------------------------------------

def test_delete_group_removes_it_and_its_memberships(client, db, users):
    """R42: 204; then 404; members rows gone; users' groups no longer list it."""
    group = client.create_group("Doomed", members=[{"value": u["id"]} for u in users])
    kept = client.create_group("Kept", members=[{"value": users[0]["id"]}])
    assert {g["value"] for g in client.get("/Users/" + users[0]["id"]).json["groups"]} == {
        group["id"], kept["id"]}
    response = client.delete("/Groups/" + group["id"])
    assert response.status_int == 204 and response.body == b""
    assert_scim_error(client.get("/Groups/" + group["id"], status=404), 404)
    assert group_row(db, group["id"]) is None
    assert member_rows(db, group["id"]) == []
    assert stored_members(db, kept["id"]) == {users[0]["id"]}
    assert [g["value"] for g in client.get("/Users/" + users[0]["id"]).json["groups"]] == [kept["id"]]
    for user in users[1:]:
        assert "groups" not in client.get("/Users/" + user["id"]).json
    listed = client.get("/Groups").json
    assert [g["id"] for g in listed["Resources"]] == [kept["id"]]
    assert_scim_error(client.delete("/Groups/" + group["id"], status=404), 404)


def test_deleting_a_member_user_bumps_the_group_version(client, db, users):
    """RFC 7644 §3.14: the group changed (lost a member), so its version moves on."""
    group = client.create_group("Bumped", members=[{"value": users[0]["id"]}, {"value": users[1]["id"]}])
    untouched = client.create_group("Untouched", members=[{"value": users[1]["id"]}])
    client.delete("/Users/" + users[0]["id"])
    fetched = client.get("/Groups/" + group["id"])
    assert fetched.json["meta"]["version"] == fetched.headers["ETag"] == 'W/"2"'
    assert fetched.json["meta"]["lastModified"] >= group["meta"]["lastModified"]
    assert [m["value"] for m in fetched.json["members"]] == [users[1]["id"]]
    assert group_row(db, group["id"])["version"] == 2
    assert stored_members(db, group["id"]) == {users[1]["id"]}
    assert group_row(db, untouched["id"])["version"] == 1
    # The old ETag no longer matches.
    assert client.get("/Groups/" + group["id"], headers={"If-None-Match": 'W/"1"'}).status_int == 200
    assert_scim_error(client.put("/Groups/" + group["id"], {"displayName": "X"},
                            headers={"If-Match": 'W/"1"'}, status=412), 412)


# -- nested groups --------------------------------------------------------------

def test_a_group_can_contain_a_group(client, db, users):
    """RFC 7643 §4.2: members may be Groups (type "Group", $ref to /Groups)."""
    child = client.create_group("Child", members=[{"value": users[0]["id"]}])
    parent = client.create_group("Parent", members=[{"value": child["id"]}, {"value": users[1]["id"]}])
    expected = sorted([
        {"value": child["id"], "$ref": GROUPS_URL + child["id"], "type": "Group", "display": "Child"},
        user_member(users[1])], key=lambda m: m["value"])
    assert sorted(parent["members"], key=lambda m: m["value"]) == expected
    assert member_rows(db, parent["id"]) == sorted([(child["id"], "Group"), (users[1]["id"], "User")])
    typed = client.create_group("Typed", members=[{"value": child["id"], "type": "Group"}])
    assert typed["members"][0]["type"] == "Group"
    # Deleting the child removes it from the parent and bumps the parent.
    client.delete("/Groups/" + child["id"])
    assert stored_members(db, parent["id"]) == {users[1]["id"]}
    assert group_row(db, parent["id"])["version"] == 2
    assert [m["value"] for m in client.get("/Groups/" + parent["id"]).json["members"]] == [users[1]["id"]]


@pytest.mark.parametrize("how", ["put", "patch-add", "patch-replace"])
def test_a_group_cannot_contain_itself(client, db, users, how):
    """A group that is its own member → 400 invalidValue; nothing changes."""
    group = client.create_group("Selfish", members=[{"value": users[0]["id"]}])
    before = snapshot(db, group["id"])
    if how == "put":
        response = client.put("/Groups/" + group["id"], {
            "displayName": "Selfish", "members": [{"value": group["id"]}]}, status=400)
    else:
        op = "add" if how == "patch-add" else "replace"
        response = client.patch("/Groups/" + group["id"], [
            {"op": op, "path": "members", "value": [{"value": group["id"]}]}], status=400)
    assert_scim_error(response, 400, "invalidValue")
    assert snapshot(db, group["id"]) == before


# -- listing --------------------------------------------------------------------

def test_list_groups_pages_and_sorts(client, db):
    """R32 for groups: startIndex/count and sortBy displayName."""
    for name in ["delta", "Alpha", "charlie", "Bravo"]:
        client.create_group(name)
    body = client.get("/Groups?sortBy=displayName&startIndex=2&count=2").json
    assert body["totalResults"] == 4 and body["startIndex"] == 2 and body["itemsPerPage"] == 2
    assert [g["displayName"] for g in body["Resources"]] == ["Bravo", "charlie"]
    body = client.get("/Groups?sortBy=displayName&sortOrder=descending&count=0").json
    assert body["totalResults"] == 4 and body["Resources"] == [] and body["itemsPerPage"] == 0
    assert group_count(db) == 4


def test_group_attributes_projection(client, db, users):
    """RFC 7644 §3.4.2.5 on groups: attributes=displayName and members.value."""
    group = client.create_group("Projected", externalId="e", members=[{"value": users[0]["id"]}])
    assert client.get("/Groups/%s?attributes=displayName" % group["id"]).json == {
        "schemas": [URN_GROUP], "id": group["id"], "displayName": "Projected"}
    assert client.get("/Groups/%s?attributes=members.value" % group["id"]).json == {
        "schemas": [URN_GROUP], "id": group["id"], "members": [{"value": users[0]["id"]}]}
    listed = client.get('/Groups?attributes=id&filter=externalId eq "e"').json["Resources"]
    assert listed == [{"schemas": [URN_GROUP], "id": group["id"]}]
    assert stored_members(db, group["id"]) == {users[0]["id"]}


def test_group_patch_answers_204_and_stores_the_change(client, db, users):
    """R37, R38: group PATCH → 204 No Content; 200 with the projected group when attributes are asked."""
    group = client.create_group("Patched")
    response = client.patch("/Groups/" + group["id"], [
        {"op": "Add", "path": "members", "value": [{"$ref": None, "value": users[0]["id"]}]}])
    assert response.status_int == 204 and response.body == b""
    assert stored_members(db, group["id"]) == {users[0]["id"]}
    response = client.patch("/Groups/%s?excludedAttributes=members" % group["id"], [
        {"op": "Replace", "path": "displayName", "value": "Renamed"}], status=200)
    assert response.json["displayName"] == "Renamed" and "members" not in response.json
    assert response.headers["ETag"] == response.json["meta"]["version"] == 'W/"3"'
    assert group_row(db, group["id"])["display_name"] == "Renamed"


def test_put_with_excluded_members_answers_without_them(client, db):
    """RFC 7644 §3.9 on PUT: the response leaves members out; the stored members are set."""
    user = client.create_user("member@example.com")
    group = client.create_group("Quiet")
    response = client.put("/Groups/%s?excludedAttributes=members" % group["id"],
                          {"schemas": [URN_GROUP], "displayName": "Quiet", "members": [{"value": user["id"]}]})
    assert "members" not in response.json
    assert stored_members(db, group["id"]) == {user["id"]}


@pytest.fixture
def big_group(client, store):
    """A group of 2,500 members: more than two of the batches a GET streams."""
    members = [scim_appliance.create_resource(store, scim_appliance.USER,
                                              {"userName": "big%04d@example.com" % i, "displayName": "Big %d" % i},
                                              PUBLIC_URL + "/scim")["id"] for i in range(2500)]
    group = client.create_group("Big")
    for start in range(0, len(members), 500):
        client.patch("/Groups/" + group["id"], [{"op": "add", "path": "members",
                                                "value": [{"value": m} for m in members[start:start + 500]]}],
                     status=204)
    return group["id"], sorted(members)


def test_a_large_group_is_read_whole_in_order(client, db, big_group):
    """GET /Groups/{id} streams the members in batches: the JSON is whole and every member is there once."""
    group_id, members = big_group
    response = client.get("/Groups/" + group_id)
    body = response.json
    assert [m["value"] for m in body["members"]] == members
    assert body["members"][0] == {"value": members[0], "$ref": USERS_URL + members[0], "type": "User",
                                  "display": "Big %d" % int(stored_document(db, "users", members[0])["userName"][3:7])}
    assert body["displayName"] == "Big" and response.headers["ETag"] == body["meta"]["version"]
    assert stored_members(db, group_id) == set(members)


def test_a_large_group_read_honours_member_sub_attributes(client, big_group):
    group_id, members = big_group
    body = client.get("/Groups/%s?attributes=members.value" % group_id).json
    assert body["members"] == [{"value": m} for m in members]
    assert set(body) == {"schemas", "id", "members"}
    body = client.get("/Groups/%s?excludedAttributes=members.display,members.$ref" % group_id).json
    assert body["members"][-1] == {"value": members[-1], "type": "User"}


@pytest.mark.parametrize("method, headers", [("HEAD", {}), ("GET", {"If-None-Match": "*"})])
def test_a_group_read_that_sends_no_body_leaves_nothing_open(client, db, big_group, method, headers):
    """A streamed read holds a snapshot until its body is sent; HEAD and 304 must close it,
    or the thread's next transaction would fail."""
    group_id, members = big_group
    response = client.request(method, "/Groups/" + group_id, headers=headers, status="*")
    assert response.status_int in (200, 304) and response.body == b""
    client.patch("/Groups/" + group_id, [{"op": "remove", "path": "members", "value": [{"value": members[0]}]}],
                 status=204)
    assert stored_members(db, group_id) == set(members[1:])
    assert len(client.get("/Groups/" + group_id).json["members"]) == len(members) - 1
