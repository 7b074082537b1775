"""Request limits (issue 3 item 17; README "Limits"): each limit is documented
with the module's number, each excess is a SCIM 4xx error, and nothing is
changed by a refused request; exactly the limit is accepted."""

import json
import os
import re
import urllib.parse
import uuid

import pytest
import webtest

import scim_appliance
from conftest import assert_scim_error, ROOT, ScimClient, snapshot, stored_document, stored_members
from scim_appliance import GROUP, USER, URN_GROUP, URN_PATCH, URN_SEARCH, URN_USER, ScimError

SMALL_MEMBERS = 5   # MAX_MEMBERS for the HTTP tests, so that they need few users


# -- helpers --------------------------------------------------------------------

def count(db, table):
    return db.execute("SELECT count(*) FROM %s" % table).fetchone()[0]


def refs(ids):
    return [{"value": member_id} for member_id in ids]


def patch_body(*operations):
    return {"schemas": [URN_PATCH], "Operations": list(operations)}


def version(db, table, resource_id):
    return db.execute("SELECT version FROM %s WHERE id = ?" % table, (resource_id,)).fetchone()[0]


# -- PATCH operations per request -------------------------------------------------

def rename_operations(number, attribute):
    return [{"op": "replace", "path": attribute, "value": "name %04d" % i} for i in range(number)]


@pytest.mark.parametrize("resource", ["Users", "Groups"])
def test_patch_with_more_than_max_operations_is_400_too_many_and_changes_nothing(client, db, resource):
    """MAX_OPERATIONS + 1 operations (each one valid) → 400 tooMany; the resource is untouched."""
    created = client.create_user("ops@example.com") if resource == "Users" else client.create_group("Ops")
    before = snapshot(db)
    operations = rename_operations(scim_appliance.MAX_OPERATIONS + 1, "displayName")
    response = client.patch("/%s/%s" % (resource, created["id"]), operations, status="*")
    body = assert_scim_error(response, 400, "tooMany")
    assert str(scim_appliance.MAX_OPERATIONS) in body["detail"]
    assert snapshot(db) == before


@pytest.mark.parametrize("resource", ["Users", "Groups"])
def test_patch_with_exactly_max_operations_is_applied_in_order(client, db, resource):
    created = client.create_user("ops@example.com") if resource == "Users" else client.create_group("Ops")
    table = resource.lower()
    operations = rename_operations(scim_appliance.MAX_OPERATIONS, "displayName")
    response = client.patch("/%s/%s" % (resource, created["id"]), operations, status="*")
    assert response.status_int in (200, 204)
    last = "name %04d" % (scim_appliance.MAX_OPERATIONS - 1)
    assert stored_document(db, table, created["id"])["displayName"] == last
    assert version(db, table, created["id"]) == 2   # one request, one new version
    assert client.get("/%s/%s" % (resource, created["id"])).json["displayName"] == last


def test_max_operations_is_checked_before_the_operations_are_read():
    """The count alone refuses the request: MAX_OPERATIONS + 1 operations, even malformed ones."""
    body = patch_body(*([{"op": "frobnicate"}] * (scim_appliance.MAX_OPERATIONS + 1)))
    with pytest.raises(ScimError) as info:
        scim_appliance.read_patch_request(body)
    assert (info.value.status, info.value.scim_type) == (400, "tooMany")
    accepted = scim_appliance.read_patch_request(patch_body(*rename_operations(scim_appliance.MAX_OPERATIONS,
                                                                               "displayName")))
    assert len(accepted) == scim_appliance.MAX_OPERATIONS


# -- members per request (MAX_MEMBERS made small: the rule, not its size) -----------

@pytest.fixture
def small_members(monkeypatch):
    monkeypatch.setattr(scim_appliance, "MAX_MEMBERS", SMALL_MEMBERS)
    return SMALL_MEMBERS


@pytest.fixture
def user_ids(client):
    """SMALL_MEMBERS + 2 users: one already in the group, and more than the limit besides."""
    return [client.create_user("m%d@example.com" % i)["id"] for i in range(SMALL_MEMBERS + 2)]


@pytest.fixture
def group(client, user_ids):
    """A group with one member (user_ids[0]), so a wrongly applied change would show."""
    return client.create_group("Limited", members=refs(user_ids[:1]))


def test_post_group_with_more_than_max_members_is_400_too_many_and_stores_nothing(
        client, db, small_members, user_ids):
    before = snapshot(db)
    response = client.post("/Groups", {"schemas": [URN_GROUP], "displayName": "Too big",
                                       "members": refs(user_ids[:small_members + 1])}, status="*")
    assert_scim_error(response, 400, "tooMany")
    assert snapshot(db) == before
    assert count(db, "groups") == 0 and count(db, "members") == 0


def test_post_group_with_exactly_max_members_stores_them_all(client, db, small_members, user_ids):
    created = client.create_group("Just right", members=refs(user_ids[:small_members]))
    assert stored_members(db, created["id"]) == set(user_ids[:small_members])
    assert stored_document(db, "groups", created["id"])["displayName"] == "Just right"


def test_put_group_with_more_than_max_members_is_400_too_many_and_changes_nothing(
        client, db, small_members, user_ids, group):
    before = snapshot(db)
    response = client.put("/Groups/" + group["id"], {"schemas": [URN_GROUP], "displayName": "Renamed",
                                                     "members": refs(user_ids[1:small_members + 2])}, status="*")
    assert_scim_error(response, 400, "tooMany")
    assert snapshot(db) == before
    assert stored_members(db, group["id"]) == {user_ids[0]}


def test_put_group_with_exactly_max_members_replaces_them(client, db, small_members, user_ids, group):
    new = user_ids[2:small_members + 2]
    client.put("/Groups/" + group["id"], {"schemas": [URN_GROUP], "displayName": "Renamed", "members": refs(new)})
    assert stored_members(db, group["id"]) == set(new)
    assert version(db, "groups", group["id"]) == 2


def too_many_member_patches(ids, limit):
    """PATCH bodies naming limit + 1 members (ids[0] is a member, the rest are not)."""
    over = ids[1:limit + 2]
    assert len(over) == limit + 1
    half = len(over) // 2
    return {
        "add_one_operation": [{"op": "add", "path": "members", "value": refs(over)}],
        "add_without_path": [{"op": "add", "value": {"members": refs(over)}}],
        "replace_members": [{"op": "replace", "path": "members", "value": refs(over)}],
        "remove_by_value_list": [{"op": "remove", "path": "members", "value": refs(ids[:limit + 1])}],
        "add_across_operations": [{"op": "add", "path": "members", "value": refs([member_id])}
                                  for member_id in over],
        "add_in_two_halves": [{"op": "add", "path": "members", "value": refs(over[:half])},
                              {"op": "add", "path": "members", "value": refs(over[half:])}],
        "add_then_remove": [{"op": "add", "path": "members", "value": refs(over[:half])},
                            {"op": "remove", "path": "members", "value": refs(over[half:])}],
    }


@pytest.mark.parametrize("form", sorted(too_many_member_patches(["x"] * 10, 5)))
def test_patch_naming_more_than_max_members_is_400_too_many_and_changes_nothing(
        client, db, small_members, user_ids, group, form):
    """Members named in one PATCH are counted over all its operations (README: "members named in one request")."""
    before = snapshot(db)
    operations = too_many_member_patches(user_ids, small_members)[form]
    assert_scim_error(client.patch("/Groups/" + group["id"], operations, status="*"), 400, "tooMany")
    assert snapshot(db) == before
    assert stored_members(db, group["id"]) == {user_ids[0]}


@pytest.mark.parametrize("split", [1, 2, SMALL_MEMBERS])
def test_patch_adding_exactly_max_members_in_any_number_of_operations_is_applied(
        client, db, small_members, user_ids, group, split):
    new = user_ids[1:small_members + 1]
    operations = [{"op": "add", "path": "members", "value": refs(new[i::split])} for i in range(split)]
    assert client.patch("/Groups/" + group["id"], operations, status="*").status_int == 204
    assert stored_members(db, group["id"]) == {user_ids[0]} | set(new)
    assert version(db, "groups", group["id"]) == 2


def test_members_limit_is_checked_before_the_members_are_looked_up(client, db):
    """At the real MAX_MEMBERS over HTTP: MAX_MEMBERS + 1 ids (none of which exist) is tooMany,
    not a database lookup answered invalidValue; the body stays under a group's body limit."""
    ids = [str(uuid.uuid4()) for _ in range(scim_appliance.MAX_MEMBERS + 1)]
    body = {"schemas": [URN_GROUP], "displayName": "Huge", "members": refs(ids)}
    assert scim_appliance.MAX_BODY_BYTES < len(json.dumps(body).encode()) < scim_appliance.MAX_GROUP_BODY_BYTES
    assert_scim_error(client.post("/Groups", body, status="*"), 400, "tooMany")
    assert count(db, "groups") == 0 and count(db, "members") == 0
    body["members"] = refs(ids[:-1])   # at the limit the ids are looked up: none exists
    assert_scim_error(client.post("/Groups", body, status="*"), 400, "invalidValue")
    assert count(db, "groups") == 0 and count(db, "members") == 0


# -- members per request at the real limit, in the PATCH engine (no database) --------

def empty_group_document():
    return scim_appliance.canonical_document(GROUP, {"schemas": [URN_GROUP], "displayName": "Big"})


MEMBER_IDS = ["member-%06d" % i for i in range(100001)]


def test_real_members_limit_is_a_hundred_thousand():
    """The README promises 100,000 (an Okta group push names a group's whole
    membership in one request); the engine tests below rely on it."""
    assert scim_appliance.MAX_MEMBERS == 100000


@pytest.mark.parametrize("parts", [1, 2, 7])
def test_apply_patch_accepts_exactly_max_members(parts):
    ids = MEMBER_IDS[:scim_appliance.MAX_MEMBERS]
    operations = scim_appliance.read_patch_request(patch_body(*[
        {"op": "add", "path": "members", "value": refs(ids[i::parts])} for i in range(parts)]))
    document = empty_group_document()
    patched, changes = scim_appliance.apply_patch(GROUP, document, operations)
    assert patched == document
    assert [change[0] for change in changes] == ["add"] * parts
    assert sorted(member_id for change in changes for member_id, _ in change[1]) == ids


@pytest.mark.parametrize("parts", [1, 2, 7])
def test_apply_patch_refuses_max_members_plus_one(parts):
    ids = MEMBER_IDS[:scim_appliance.MAX_MEMBERS + 1]
    operations = scim_appliance.read_patch_request(patch_body(*[
        {"op": "add", "path": "members", "value": refs(ids[i::parts])} for i in range(parts)]))
    document = empty_group_document()
    with pytest.raises(ScimError) as info:
        scim_appliance.apply_patch(GROUP, document, operations)
    assert (info.value.status, info.value.scim_type) == (400, "tooMany")
    assert document == empty_group_document()   # pure: the input is untouched


def test_group_body_accepts_max_members_and_refuses_one_more():
    """POST/PUT bodies go through the same check (canonical_document, before any transaction)."""
    body = {"schemas": [URN_GROUP], "displayName": "Big"}
    document = scim_appliance.canonical_document(GROUP, dict(body, members=refs(MEMBER_IDS[:-1])))
    assert len(document["members"]) == scim_appliance.MAX_MEMBERS
    with pytest.raises(ScimError) as info:
        scim_appliance.canonical_document(GROUP, dict(body, members=refs(MEMBER_IDS)))
    assert (info.value.status, info.value.scim_type) == (400, "tooMany")


# -- filter length ----------------------------------------------------------------------

def padded_filter(resource, length):
    """A filter of exactly `length` characters that matches the one resource made below."""
    head = 'userName eq "alice@example.com"' if resource == "Users" else 'displayName eq "Staff"'
    head += ' or externalId eq "'
    text = head + "x" * (length - len(head) - 1) + '"'
    assert len(text) == length
    return text


@pytest.fixture
def staff(client):
    client.create_user("alice@example.com")
    client.create_group("Staff")


@pytest.mark.parametrize("how", ["GET", "POST .search"])
@pytest.mark.parametrize("resource", ["Users", "Groups"])
def test_filter_longer_than_max_filter_length_is_400_invalid_filter(client, db, staff, resource, how):
    before = snapshot(db)
    text = padded_filter(resource, scim_appliance.MAX_FILTER_LENGTH + 1)
    if how == "GET":
        response = client.get("/%s?%s" % (resource, urllib.parse.urlencode({"filter": text})), status="*")
    else:
        response = client.post("/%s/.search" % resource, {"schemas": [URN_SEARCH], "filter": text}, status="*")
    body = assert_scim_error(response, 400, "invalidFilter")
    assert str(scim_appliance.MAX_FILTER_LENGTH) in body["detail"]
    assert snapshot(db) == before


@pytest.mark.parametrize("how", ["GET", "POST .search"])
@pytest.mark.parametrize("resource", ["Users", "Groups"])
def test_filter_of_exactly_max_filter_length_is_parsed_and_applied(client, db, staff, resource, how):
    text = padded_filter(resource, scim_appliance.MAX_FILTER_LENGTH)
    if how == "GET":
        page = client.get("/%s?%s" % (resource, urllib.parse.urlencode({"filter": text}))).json
    else:
        page = client.post("/%s/.search" % resource, {"schemas": [URN_SEARCH], "filter": text}, status=200).json
    assert page["totalResults"] == 1
    expected = "alice@example.com" if resource == "Users" else "Staff"
    assert page["Resources"][0].get("userName", page["Resources"][0].get("displayName")) == expected


# -- request body size ----------------------------------------------------------------

def user_of_size(user_name, size):
    """A User body whose JSON encoding (as ScimClient sends it) is exactly `size` bytes."""
    body = {"schemas": [URN_USER], "userName": user_name, "displayName": ""}
    body["displayName"] = "x" * (size - len(json.dumps(body).encode("utf-8")))
    assert len(json.dumps(body).encode("utf-8")) == size
    return body


def test_body_over_max_body_bytes_is_413_and_stores_nothing(client, db):
    """The default limit, MAX_BODY_BYTES (1 MiB): one byte more → SCIM 413."""
    assert scim_appliance.Settings().max_body_bytes == scim_appliance.MAX_BODY_BYTES
    response = client.post("/Users", user_of_size("big@example.com", scim_appliance.MAX_BODY_BYTES + 1),
                           status="*")
    assert_scim_error(response, 413)
    assert count(db, "users") == 0


def test_body_of_exactly_max_body_bytes_is_accepted(client, db):
    body = user_of_size("fits@example.com", scim_appliance.MAX_BODY_BYTES)
    created = client.post("/Users", body).json
    assert stored_document(db, "users", created["id"])["displayName"] == body["displayName"]


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_put_or_patch_over_max_body_bytes_is_413_and_changes_nothing(client, db, method):
    created = client.create_user("keep@example.com", displayName="Keep")
    before = snapshot(db)
    if method == "PUT":
        response = client.put("/Users/" + created["id"],
                              user_of_size("keep@example.com", scim_appliance.MAX_BODY_BYTES + 1), status="*")
    else:
        response = client.patch("/Users/" + created["id"], [
            {"op": "replace", "path": "displayName", "value": "y" * scim_appliance.MAX_BODY_BYTES}], status="*")
    assert_scim_error(response, 413)
    assert snapshot(db) == before
    assert client.get("/Users/" + created["id"]).json["displayName"] == "Keep"


# -- page size -------------------------------------------------------------------------

@pytest.fixture
def more_users_than_a_page(settings, db):
    """MAX_PAGE_SIZE + 1 users, inserted in one transaction on a second
    connection without fsync (only to keep the setup fast)."""
    seeder = scim_appliance.Store(settings.db, synchronous="OFF")
    try:
        now = scim_appliance.utc_now()
        with seeder.write() as tx:
            for number in range(scim_appliance.MAX_PAGE_SIZE + 1):
                document = {"userName": "page%05d@example.com" % number}
                tx.insert_resource("users", scim_appliance._row_for(USER, str(uuid.uuid4()), document, now, 1,
                                                                     created=now))
    finally:
        seeder.close()
    assert count(db, "users") == scim_appliance.MAX_PAGE_SIZE + 1
    return scim_appliance.MAX_PAGE_SIZE + 1


@pytest.mark.parametrize("request_kind", ["GET /Users", "GET /", "POST /Users/.search", "POST /.search"])
def test_count_above_max_page_size_is_capped_to_it(client, anonymous, more_users_than_a_page, request_kind):
    """RFC 7644 §3.4.2.4: the server may return fewer than `count`; it returns at most MAX_PAGE_SIZE,
    which is what /ServiceProviderConfig publishes as filter.maxResults."""
    assert anonymous.get("/ServiceProviderConfig").json["filter"]["maxResults"] == scim_appliance.MAX_PAGE_SIZE
    for asked in (scim_appliance.MAX_PAGE_SIZE + 1, 10 ** 9):
        method, path = request_kind.split(" ")
        path = "" if path == "/" else path
        if method == "GET":
            page = client.get("%s?count=%d" % (path, asked)).json
        else:
            page = client.post(path, {"schemas": [URN_SEARCH], "count": asked}, status=200).json
        assert page["totalResults"] == more_users_than_a_page
        assert page["itemsPerPage"] == len(page["Resources"]) == scim_appliance.MAX_PAGE_SIZE


def test_cap_and_published_max_results_both_follow_max_page_size(store, settings, token, monkeypatch):
    """The published maxResults is the constant, not a copy of its value."""
    monkeypatch.setattr(scim_appliance, "MAX_PAGE_SIZE", 3)
    client = ScimClient(webtest.TestApp(scim_appliance.make_scim_app(store, settings)), token)
    for number in range(5):
        client.create_user("few%d@example.com" % number)
    assert client.get("/ServiceProviderConfig").json["filter"]["maxResults"] == 3
    page = client.get("/Users?count=4").json
    assert page["totalResults"] == 5 and page["itemsPerPage"] == len(page["Resources"]) == 3


# -- the README documents each limit with the module's numbers ---------------------------

def readme_limits():
    """The README's limits table as {what: limit text}."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("**Limits.**", 1)
    assert len(section) == 2, "README.md has no **Limits.** table"
    rows = {}
    for line in section[1].lstrip().splitlines():
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and not set(cells[0]) <= set("-: ") and cells[0] != "what":
            rows[cells[0]] = cells[1]
    return rows


def number(pattern, text):
    found = re.search(pattern, text)
    assert found, "%r not found in %r" % (pattern, text)
    return [int(group.replace(",", "")) for group in found.groups()]


DOCUMENTED = [
    # (table row, pattern, module constants its numbers must equal, words the row must contain)
    ("request body", r"([\d,]+) MiB", lambda: [scim_appliance.MAX_BODY_BYTES // (1024 * 1024)],
     ("413", "--max-body-bytes")),
    ("a group's request body", r"([\d,]+) MiB", lambda: [scim_appliance.MAX_GROUP_BODY_BYTES // (1024 * 1024)],
     ("413", "--max-body-bytes")),
    ("filter", r"([\d,]+) characters", lambda: [scim_appliance.MAX_FILTER_LENGTH], ()),
    ("filter", r"([\d,]+) comparisons", lambda: [scim_appliance.MAX_FILTER_TERMS], ()),
    ("filter", r"([\d,]+) levels", lambda: [scim_appliance.MAX_FILTER_DEPTH], ()),
    ("JSON nesting", r"([\d,]+) levels", lambda: [scim_appliance.MAX_JSON_DEPTH], ()),
    ("page size", r"defaults to ([\d,]+) and is capped at ([\d,]+)",
     lambda: [scim_appliance.DEFAULT_PAGE_SIZE, scim_appliance.MAX_PAGE_SIZE], ("maxResults",)),
    ("PATCH", r"([\d,]+) operations", lambda: [scim_appliance.MAX_OPERATIONS], ("tooMany",)),
    ("group members", r"([\d,]+) members", lambda: [scim_appliance.MAX_MEMBERS], ("tooMany",)),
    ("failed authentication", r"([\d,]+) per client address per ([\d,]+) seconds",
     lambda: [scim_appliance.AUTH_FAILURE_LIMIT, scim_appliance.AUTH_FAILURE_WINDOW], ("429", "Retry-After")),
]


@pytest.mark.parametrize("row,pattern,constants,words", DOCUMENTED,
                         ids=["%s: %s" % (d[0], d[1]) for d in DOCUMENTED])
def test_readme_limits_table_states_the_module_constants(row, pattern, constants, words):
    """Issue 3 item 17: each limit documented, with the number the code enforces."""
    limits = readme_limits()
    assert row in limits, "README limits table has no %r row: %s" % (row, sorted(limits))
    assert number(pattern, limits[row]) == constants()
    for word in words:
        assert word in limits[row]


def test_a_group_body_may_be_larger_than_max_body_bytes_up_to_the_group_limit(client, db):
    """A group's POST, PUT and PATCH bodies may name MAX_MEMBERS members, so
    their limit is MAX_GROUP_BODY_BYTES; a user's stays MAX_BODY_BYTES."""
    padding = "x" * (2 * scim_appliance.MAX_BODY_BYTES)   # an unknown attribute: ignored, but it counts
    group = client.create_group("Roomy", padding=padding)
    client.put("/Groups/" + group["id"], {"schemas": [URN_GROUP], "displayName": "Roomy", "padding": padding})
    too_big = "x" * (scim_appliance.MAX_GROUP_BODY_BYTES + 1)
    before = snapshot(db)
    for method, path in (("POST", "/Groups"), ("PUT", "/Groups/" + group["id"])):
        response = client.request(method, path, {"schemas": [URN_GROUP], "displayName": "Roomy",
                                                  "padding": too_big}, status="*")
        assert_scim_error(response, 413)
    assert_scim_error(client.post("/Users", {"schemas": [URN_USER], "userName": "big@example.com",
                                             "padding": padding}, status="*"), 413)
    assert snapshot(db) == before


def test_readme_body_limit_is_exactly_one_mebibyte():
    assert scim_appliance.MAX_BODY_BYTES == 1024 * 1024
    assert number(r"([\d,]+) MiB", readme_limits()["request body"]) == [1]
