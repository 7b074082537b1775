"""The change feed (README "Following changes"): the events every write
appends in its own transaction, GET /events and /events/head with their
cursors, pruning, read tokens, and the feed on the admin page and /metrics.

Writes are sent as Entra and Okta send them (their documented bodies, the
same ones tests/test_entra.py and tests/test_okta.py replay), through the SCIM
app in process; the feed is read with webtest from the same app (/events is
beside /scim, not under it) with a read token. Each test checks the answer
and what is stored: the `events` table and the `scim_events` view.
"""

import contextlib
import io
import json
import re
import sqlite3
import threading
import time
import urllib.parse
import uuid

import pytest
import webtest

import scim_appliance
from conftest import PUBLIC_URL, ScimClient, assert_scim_error, fill, run_cli, snapshot, stored_members
from scim_appliance import URN_ENTERPRISE, URN_GROUP, URN_PATCH, URN_USER
from test_entra import (R7_CREATE_USER, R7_EXTERNAL_ID, R16_UPDATE_MULTI_VALUED, R18_DISABLE_FLAG,
                        R18_DISABLE_NO_FLAG, R22_MULTIPLE_REPLACE, R36_CREATE_GROUP, R37_RENAME_GROUP, R38_ADD_MEMBER,
                        R40_REMOVE_FLAG, R40_REMOVE_NO_FLAG, R40_REMOVE_TUTORIAL)
from test_okta import CREATE_GROUP as OKTA_CREATE_GROUP
from test_okta import CREATE_USER as OKTA_CREATE_USER
from test_okta import CREATE_USER_2019 as OKTA_CREATE_USER_2019
from test_okta import DEACTIVATE_USER as OKTA_DEACTIVATE_USER
from test_okta import OKTA_GROUP_ID, OKTA_OTHER_USER_ID, OKTA_USER_ID
from test_okta import PUT_GROUP as OKTA_PUT_GROUP
from test_okta import PUT_USER as OKTA_PUT_USER
from test_okta import PUT_USER_2019 as OKTA_PUT_USER_2019
from test_okta import RENAME_GROUP as OKTA_RENAME_GROUP
from test_okta import REPLACE_MEMBERS as OKTA_REPLACE_MEMBERS
from test_okta import UPDATE_MEMBERSHIP as OKTA_UPDATE_MEMBERSHIP

PREFIX = "urn:ietf:params:scim:event:prov:"
CREATE_URI = PREFIX + "create:full"
PATCH_URI = PREFIX + "patch:full"
PUT_URI = PREFIX + "put:full"
DELETE_URI = PREFIX + "delete"
DEACTIVATE_URI = PREFIX + "deactivate"
ACTIVATE_URI = PREFIX + "activate"

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
RANDOM_ID = re.compile(r"[0-9a-f]{8}(-?)[0-9a-f]{4}\1[0-9a-f]{4}\1[0-9a-f]{4}\1[0-9a-f]{12}")
ENVELOPE = {"cursor", "id", "type", "timestamp", "event_uri", "txn", "token_name", "resource", "data"}
TABLES = ("users", "groups", "members", "events")
ADMIN_PASSWORD = "correct horse battery staple"
ADMIN_ORIGIN = "http://localhost:80"   # webtest's Host: the admin page's own origin
DAY = 86400


# -- Microsoft Entra ID's request bodies, verbatim (as in tests/test_entra.py) ------------


R36_EXTERNAL_ID = "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159"


# -- Okta's request bodies, verbatim (as in tests/test_okta.py) -------------------------------


OKTA_HEADERS = {"Accept": "application/scim+json", "Accept-Charset": "utf-8",
                "User-Agent": "Okta SCIM Client 1.0.0"}


# -- fixtures and helpers -------------------------------------------------------------------

class Feed:
    """GET /events and /events/head with a bearer token, through webtest."""

    def __init__(self, app, token):
        self.app = app
        self.headers = {"Authorization": "Bearer " + token}

    def get(self, target, status=200):
        return self.app.get(target, headers=self.headers, status=status, expect_errors=status != 200)

    def page(self, after=None, limit=1000, **params):
        """One answer of GET /events, parsed."""
        query = dict(params, limit=limit)
        if after is not None:
            query["after"] = after
        response = self.get("/events?" + urllib.parse.urlencode(query))
        assert response.content_type == "application/json"
        assert response.headers["Cache-Control"] == "no-store"
        page = response.json
        assert set(page) == {"events", "next_cursor", "has_more"}
        return page

    def events(self, after=None):
        """Every event after `after` (None: from the oldest kept), page by page."""
        found, cursor = [], after
        while True:
            page = self.page(cursor)
            found += page["events"]
            cursor = page["next_cursor"]
            if not page["has_more"]:
                return found

    def head(self):
        return self.get("/events/head").json["cursor"]

    def error(self, target, status):
        return assert_scim_error(self.get(target, status), status, "*" if status == 400 else None)


@pytest.fixture
def read_token(store):
    return scim_appliance.create_token(store, "app", scope="read")


@pytest.fixture
def feed(client, read_token):
    return Feed(client.app, read_token)


@pytest.fixture
def okta_client(client, store):
    """Okta's connection: a provisioning token of its own, named okta."""
    return ScimClient(client.app, scim_appliance.create_token(store, "okta"))


def send(client, method, path, text, status, replacements=None):
    """A documented body, exactly as Entra sends it (scim+json with charset)."""
    return client.request(method, path, raw=fill(text, replacements), status=status)


def okta(client, method, path, text, status, replacements=None):
    """A documented body with Okta's headers."""
    return client.request(method, path, raw=fill(text, replacements), status=status, headers=OKTA_HEADERS)


def members_patch(op, *member_ids):
    return [{"op": op, "path": "members", "value": [{"value": member_id} for member_id in member_ids]}]


def stored_events(db):
    """The scim_events view, in sequence order, as dicts."""
    return [dict(row) for row in db.execute("SELECT * FROM scim_events ORDER BY seq")]


def event_count(db):
    return db.execute("SELECT count(*) FROM events").fetchone()[0]


def seqs(db):
    return [row[0] for row in db.execute("SELECT seq FROM events ORDER BY seq")]


def version_of(db, table, resource_id):
    return db.execute("SELECT version FROM %s WHERE id = ?" % table, (resource_id,)).fetchone()[0]


def seq_of(event):
    return int(event["cursor"].split(".")[0])


def without(resource, *keys):
    return {key: value for key, value in resource.items() if key not in keys}


def membership(events):
    """(type, member id, member type) of membership events, as a sorted list."""
    return sorted((e["type"], e["data"]["member"]["value"], e["data"]["member"]["type"]) for e in events)


def assert_envelope(event, token_name="entra"):
    """What every event carries (README "An event"), consistent with itself."""
    expected = ENVELOPE | ({"attributes"} if "attributes" in event else set())
    assert set(event) == expected, event
    for key in ("id", "txn"):   # 128 random bits in hex (a UUID's form or 32 digits)
        assert RANDOM_ID.fullmatch(event[key]), event[key]
    assert re.fullmatch(r"[1-9][0-9]*\.[0-9a-f]{12}", event["cursor"]), event["cursor"]
    assert event["cursor"] == "%d.%s" % (seq_of(event), event["id"].replace("-", "")[:12])
    assert TIMESTAMP.fullmatch(event["timestamp"]), event["timestamp"]
    assert event["token_name"] == token_name
    resource = event["resource"]
    # No location: the envelope is composed from the stored columns, and the
    # public URL is not one of them (a resource's data carries meta.location).
    assert set(resource) == {"type", "id", "externalId", "version"}
    assert re.fullmatch(r'W/"[1-9][0-9]*"', resource["version"])


def assert_membership_event(event, kind, group, member_id, member_type, version, uri, token_name="entra"):
    """A group.member_added/removed event of `group` (its id and displayName)."""
    assert_envelope(event, token_name)
    assert event["type"] == "group.member_" + kind
    assert event["event_uri"] == uri
    assert "attributes" not in event
    assert event["resource"]["type"] == "Group" and event["resource"]["id"] == group["id"]
    assert event["resource"]["externalId"] == group.get("externalId")
    assert event["resource"]["version"] == 'W/"%d"' % version
    assert event["data"] == {"group": {"value": group["id"], "display": group["displayName"]},
                             "member": {"value": member_id, "type": member_type}}


@contextlib.contextmanager
def writer(settings):
    """A connection of another process's kind, to change the file behind the appliance's back."""
    conn = sqlite3.connect(settings.db, timeout=10)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def cursors(events):
    return [event["cursor"] for event in events]


def backdate(settings, days, where="1 = 1", params=()):
    """Set the `time` of the events matching `where` to `days` days ago."""
    old = scim_appliance.utc_text(time.time() - days * DAY)
    with writer(settings) as conn:
        conn.execute("UPDATE events SET time = ? WHERE " + where, (old,) + tuple(params))


def make_events(client, count, prefix="user"):
    """`count` user.created events, one request each; their users' ids."""
    return [client.create_user("%s%d@example.com" % (prefix, n))["id"] for n in range(count)]


def make_users_silently(store, count, prefix="bulk"):
    """`count` users written straight to the store, with no event (fast set-up)."""
    now = scim_appliance.utc_now()
    ids = []
    with store.write() as tx:
        for number in range(count):
            user_id = scim_appliance.new_resource_id()
            document = {"userName": "%s-%04d@example.com" % (prefix, number), "active": True}
            tx.insert_resource("users", scim_appliance._row_for(scim_appliance.USER, user_id, document, now, 1,
                                                                created=now))
            ids.append(user_id)
    return ids


# -- 1. Entra's writes and their events ---------------------------------------------------------

def test_entra_post_user_is_one_user_created_event_carrying_the_user(client, feed, db):
    user = send(client, "POST", "/Users", R7_CREATE_USER, 201).json
    events = feed.events()
    assert len(events) == 1
    event = events[0]
    assert_envelope(event)
    assert event["cursor"].startswith("1.")
    assert (event["type"], event["event_uri"]) == ("user.created", CREATE_URI)
    assert "attributes" not in event
    assert event["resource"] == {"type": "User", "id": user["id"], "externalId": R7_EXTERNAL_ID,
                                 "version": 'W/"1"'}
    # data: the user as GET returns it, without groups.
    got = client.get("/Users/" + user["id"]).json
    assert event["data"] == without(got, "groups") == without(user, "groups")
    assert "groups" not in event["data"]
    assert event["data"]["meta"]["version"] == 'W/"1"'
    row, = stored_events(db)
    assert (row["seq"], row["event_id"], row["type"], row["event_uri"], row["resource_type"], row["resource_id"],
            row["external_id"], row["version"], row["txn"], row["token_name"], row["time"]) == (
        1, event["id"], "user.created", CREATE_URI, "User", user["id"], R7_EXTERNAL_ID, 1, event["txn"], "entra",
        event["timestamp"])


R16_PATHS = ["emails", "name.familyName"]
R22_PATHS = ["displayName", "emails", "name.givenName", "name.familyName", "externalId",
             URN_ENTERPRISE + ":employeeNumber"]


@pytest.mark.parametrize("text, paths, external_id", [
    (R16_UPDATE_MULTI_VALUED, R16_PATHS, R7_EXTERNAL_ID),
    (R22_MULTIPLE_REPLACE, R22_PATHS, "Eqpj"),
], ids=["R16-multi-valued", "R22-six-replaces-with-urn-path"])
def test_entra_patch_with_paths_is_user_updated_naming_exactly_the_changed_paths(client, feed, db, text, paths,
                                                                                 external_id):
    user_id = send(client, "POST", "/Users", R7_CREATE_USER, 201).json["id"]
    head = feed.head()
    updated = send(client, "PATCH", "/Users/" + user_id, text, 200).json
    event, = feed.events(head)
    assert_envelope(event)
    assert (event["type"], event["event_uri"]) == ("user.updated", PATCH_URI)
    assert sorted(event["attributes"]) == sorted(paths) and len(event["attributes"]) == len(paths)
    assert event["resource"]["version"] == 'W/"2"' == updated["meta"]["version"]
    assert event["resource"]["externalId"] == external_id
    assert event["data"] == without(updated, "groups")
    assert event["data"] == without(client.get("/Users/" + user_id).json, "groups")
    row = stored_events(db)[-1]
    assert (row["seq"], row["type"], row["version"], row["external_id"]) == (2, "user.updated", 2, external_id)
    assert version_of(db, "users", user_id) == 2


@pytest.mark.parametrize("disable", [R18_DISABLE_NO_FLAG, R18_DISABLE_FLAG, OKTA_DEACTIVATE_USER],
                         ids=["string-False", "boolean-false", "pathless-value"])
def test_entra_deactivate_forms_are_user_deactivated_and_reactivation_user_reactivated(client, feed, db, disable):
    user_id = send(client, "POST", "/Users", R7_CREATE_USER, 201).json["id"]
    head = feed.head()
    disabled = send(client, "PATCH", "/Users/" + user_id, disable, 200).json
    assert disabled["active"] is False
    event, = feed.events(head)
    assert_envelope(event)
    assert (event["type"], event["event_uri"], event["attributes"]) == ("user.deactivated", DEACTIVATE_URI,
                                                                         ["active"])
    assert event["resource"]["version"] == 'W/"2"'
    assert event["data"]["active"] is False and event["data"] == without(disabled, "groups")

    head = event["cursor"]
    enable = disable.replace('"False"', '"True"').replace("false", "true")
    assert enable != disable
    enabled = send(client, "PATCH", "/Users/" + user_id, enable, 200).json
    event, = feed.events(head)
    assert_envelope(event)
    assert (event["type"], event["event_uri"], event["attributes"]) == ("user.reactivated", ACTIVATE_URI,
                                                                         ["active"])
    assert event["resource"]["version"] == 'W/"3"'
    assert event["data"]["active"] is True and event["data"] == without(enabled, "groups")
    assert [row["type"] for row in stored_events(db)] == ["user.created", "user.deactivated", "user.reactivated"]
    assert [row["version"] for row in stored_events(db)] == [1, 2, 3]


def test_a_patch_of_active_and_another_attribute_is_one_deactivated_event_naming_both(client, feed, db):
    """One event per resource and request: a deactivation that also renames
    is one user.deactivated whose attributes name both changes."""
    user_id = send(client, "POST", "/Users", R7_CREATE_USER, 201).json["id"]
    head = feed.head()
    client.patch("/Users/" + user_id, [{"op": "Replace", "path": "name.familyName", "value": "Leaver"},
                                       {"op": "Replace", "path": "active", "value": "False"}], status=200)
    deactivated, = feed.events(head)
    assert (deactivated["type"], deactivated["event_uri"], sorted(deactivated["attributes"])) == (
        "user.deactivated", DEACTIVATE_URI, ["active", "name.familyName"])
    assert deactivated["resource"]["version"] == 'W/"2"'
    assert deactivated["data"]["name"]["familyName"] == "Leaver" and deactivated["data"]["active"] is False

    # And back, with another change: one user.reactivated.
    head = deactivated["cursor"]
    client.patch("/Users/" + user_id, [{"op": "replace", "value": {"active": True, "displayName": "Back"}}],
                 status=200)
    reactivated, = feed.events(head)
    assert (reactivated["type"], reactivated["event_uri"], sorted(reactivated["attributes"])) == (
        "user.reactivated", ACTIVATE_URI, ["active", "displayName"])
    assert reactivated["txn"] != deactivated["txn"]
    assert reactivated["data"]["displayName"] == "Back" and reactivated["data"]["active"] is True
    rows = stored_events(db)
    assert [(row["type"], row["version"]) for row in rows] == [
        ("user.created", 1), ("user.deactivated", 2), ("user.reactivated", 3)]


def test_entra_group_create_and_rename_are_group_events_without_members(client, feed, db):
    group = send(client, "POST", "/Groups", R36_CREATE_GROUP, 201).json
    created, = feed.events()
    assert_envelope(created)
    assert (created["type"], created["event_uri"]) == ("group.created", CREATE_URI)
    assert created["resource"]["externalId"] == R36_EXTERNAL_ID
    assert created["data"] == without(group, "members")
    assert "members" not in created["data"]

    send(client, "PATCH", "/Groups/" + group["id"], R37_RENAME_GROUP, 204)
    renamed, = feed.events(created["cursor"])
    assert_envelope(renamed)
    assert (renamed["type"], renamed["event_uri"], renamed["attributes"]) == ("group.updated", PATCH_URI,
                                                                               ["displayName"])
    assert renamed["resource"]["version"] == 'W/"2"'
    assert renamed["data"] == client.get("/Groups/%s?excludedAttributes=members" % group["id"]).json
    assert renamed["data"]["displayName"] == "1879db59-3bdf-4490-ad68-ab880a269474updatedDisplayName"
    assert [(row["type"], row["resource_type"], row["version"]) for row in stored_events(db)] == [
        ("group.created", "Group", 1), ("group.updated", "Group", 2)]


def test_entra_group_add_members_is_one_member_added_event_per_member(client, feed, db):
    group = send(client, "POST", "/Groups", R36_CREATE_GROUP, 201).json
    ids = make_events(client, 4, "member")
    head = feed.head()
    send(client, "PATCH", "/Groups/" + group["id"], R38_ADD_MEMBER, 204, {"f648f8d5ea4e4cd38e9c": ids[0]})
    event, = feed.events(head)
    assert_membership_event(event, "added", group, ids[0], "User", 2, PATCH_URI)

    # Several members in one request: one event each, one txn, the group's new version.
    head = event["cursor"]
    client.request("PATCH", "/Groups/" + group["id"], {"schemas": [URN_PATCH], "Operations": [
        {"op": "Add", "path": "members", "value": [{"$ref": None, "value": ids[1]}, {"$ref": None, "value": ids[2]}]},
        {"op": "Add", "path": "members", "value": [{"$ref": None, "value": ids[3]}]}]}, status=204)
    events = feed.events(head)
    assert len(events) == 3
    assert membership(events) == sorted(("group.member_added", member, "User") for member in ids[1:])
    for event in events:
        assert_membership_event(event, "added", group, event["data"]["member"]["value"], "User", 3, PATCH_URI)
    assert len({event["txn"] for event in events}) == 1
    assert version_of(db, "groups", group["id"]) == 3
    assert stored_members(db, group["id"]) == set(ids)

    # Re-adding a member with a new one: an event for the new one only.
    newcomer = client.create_user("newcomer@example.com")["id"]
    head = feed.head()
    client.patch("/Groups/" + group["id"], members_patch("Add", ids[0], newcomer), status=204)
    event, = feed.events(head)
    assert_membership_event(event, "added", group, newcomer, "User", 4, PATCH_URI)


@pytest.mark.parametrize("text, documented_id", [
    (R40_REMOVE_TUTORIAL, "f648f8d5ea4e4cd38e9c"),
    (R40_REMOVE_NO_FLAG, "u1091"),
    (R40_REMOVE_FLAG, "7f4bc1a3-285e-48ae-8202-5accb43efb0e"),
], ids=["tutorial-ref-null", "value-list", "value-filter"])
def test_entra_group_remove_member_forms_are_one_member_removed_event(client, feed, db, text, documented_id):
    group = send(client, "POST", "/Groups", R36_CREATE_GROUP, 201).json
    ids = make_events(client, 3, "member")
    client.patch("/Groups/" + group["id"], members_patch("Add", *ids), status=204)
    head = feed.head()
    send(client, "PATCH", "/Groups/" + group["id"], text, 204, {documented_id: ids[1]})
    event, = feed.events(head)
    assert_membership_event(event, "removed", group, ids[1], "User", 3, PATCH_URI)
    assert stored_members(db, group["id"]) == {ids[0], ids[2]}
    row = stored_events(db)[-1]
    assert (row["type"], row["resource_id"], row["version"], row["txn"]) == (
        "group.member_removed", group["id"], 3, event["txn"])


def test_removing_every_member_is_one_member_removed_event_each(client, feed, db):
    group = client.create_group("Everyone")
    ids = make_events(client, 3, "member")
    client.patch("/Groups/" + group["id"], members_patch("add", *ids), status=204)
    head = feed.head()
    client.patch("/Groups/" + group["id"], [{"op": "remove", "path": "members"}], status=204)
    events = feed.events(head)
    assert membership(events) == sorted(("group.member_removed", member, "User") for member in ids)
    for event in events:
        assert_membership_event(event, "removed", group, event["data"]["member"]["value"], "User", 3, PATCH_URI)
    assert len({event["txn"] for event in events}) == 1
    assert stored_members(db, group["id"]) == set()


def test_deleting_a_user_removes_it_from_each_group_then_leaves_a_tombstone(client, feed, db):
    user = send(client, "POST", "/Users", R7_CREATE_USER, 201).json
    other = client.create_user("stays@example.com")
    first = client.create_group("First")
    second = client.create_group("Second")
    client.patch("/Groups/" + first["id"], members_patch("add", user["id"], other["id"]), status=204)
    client.patch("/Groups/" + second["id"], members_patch("add", user["id"]), status=204)
    send(client, "PATCH", "/Users/" + user["id"], R16_UPDATE_MULTI_VALUED, 200)
    last = client.get("/Users/" + user["id"]).json
    assert last["meta"]["version"] == 'W/"2"'
    head = feed.head()

    client.delete("/Users/" + user["id"])
    events = feed.events(head)
    assert [event["type"] for event in events] == ["group.member_removed"] * 2 + ["user.deleted"]
    assert len({event["txn"] for event in events}) == 1
    assert [seq_of(event) for event in events] == list(range(seq_of(events[0]), seq_of(events[0]) + 3))
    removed = {event["resource"]["id"]: event for event in events[:2]}
    assert set(removed) == {first["id"], second["id"]}
    # Each group's version moved on; the event carries the new one, as stored.
    assert_membership_event(removed[first["id"]], "removed", first, user["id"], "User",
                            version_of(db, "groups", first["id"]), PATCH_URI)
    assert_membership_event(removed[second["id"]], "removed", second, user["id"], "User",
                            version_of(db, "groups", second["id"]), PATCH_URI)
    assert version_of(db, "groups", first["id"]) == 3 and version_of(db, "groups", second["id"]) == 3
    tombstone = events[2]
    assert_envelope(tombstone)
    assert (tombstone["event_uri"], tombstone["resource"]["version"]) == (DELETE_URI, 'W/"2"')
    assert tombstone["resource"]["externalId"] == R7_EXTERNAL_ID
    assert "attributes" not in tombstone
    assert tombstone["data"] == without(last, "groups")
    assert db.execute("SELECT count(*) FROM users WHERE id = ?", (user["id"],)).fetchone()[0] == 0
    assert stored_members(db, first["id"]) == {other["id"]}


def test_deleting_a_group_is_exactly_one_group_deleted_event_without_members(client, feed, db):
    group = send(client, "POST", "/Groups", R36_CREATE_GROUP, 201).json
    ids = make_events(client, 2, "member")
    client.patch("/Groups/" + group["id"], members_patch("add", *ids), status=204)
    last = client.get("/Groups/%s?excludedAttributes=members" % group["id"]).json
    head = feed.head()
    client.delete("/Groups/" + group["id"])
    event, = feed.events(head)
    assert_envelope(event)
    assert (event["type"], event["event_uri"]) == ("group.deleted", DELETE_URI)
    assert event["resource"]["version"] == 'W/"2"' and event["resource"]["externalId"] == R36_EXTERNAL_ID
    assert "members" not in event["data"]
    assert event["data"] == last
    assert [row["type"] for row in stored_events(db)][-1:] == ["group.deleted"]
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 2


def test_deleting_a_nested_group_removes_it_from_its_parent_group(client, feed, db):
    parent = client.create_group("Parent")
    child = client.create_group("Child")
    member = client.create_user("member@example.com")
    client.patch("/Groups/" + child["id"], members_patch("add", member["id"]), status=204)
    client.patch("/Groups/" + parent["id"], members_patch("add", child["id"]), status=204)
    head = feed.head()
    client.delete("/Groups/" + child["id"])
    removed, deleted = feed.events(head)
    assert_membership_event(removed, "removed", parent, child["id"], "Group", 3, PATCH_URI)
    assert (deleted["type"], deleted["resource"]["id"]) == ("group.deleted", child["id"])
    assert removed["txn"] == deleted["txn"]
    assert version_of(db, "groups", parent["id"]) == 3


# -- 2. Okta's writes -------------------------------------------------------------------------------

def test_okta_put_of_a_user_is_put_updated_and_active_false_is_deactivated(okta_client, feed, db):
    user = okta(okta_client, "POST", "/Users", OKTA_CREATE_USER, 201).json
    replacements = {OKTA_USER_ID: user["id"]}
    head = feed.head()
    okta(okta_client, "PUT", "/Users/" + user["id"], OKTA_PUT_USER, 200, replacements)
    event, = feed.events(head)
    assert_envelope(event, "okta")
    assert (event["type"], event["event_uri"]) == ("user.updated", PUT_URI)
    # PUT replaces: what it changed and what it left out (displayName, locale, externalId).
    assert sorted(event["attributes"]) == sorted(["name.givenName", "name.middleName", "emails", "displayName",
                                                  "locale", "externalId"])
    assert event["resource"]["externalId"] is None and event["resource"]["version"] == 'W/"2"'

    # active false, nothing else: user.deactivated alone.
    head = event["cursor"]
    put = OKTA_PUT_USER.replace('"active": true', '"active": false')
    deactivated = okta(okta_client, "PUT", "/Users/" + user["id"], put, 200, replacements).json
    event, = feed.events(head)
    assert_envelope(event, "okta")
    assert (event["type"], event["event_uri"], event["attributes"]) == ("user.deactivated", DEACTIVATE_URI,
                                                                         ["active"])
    assert event["data"] == without(deactivated, "groups") and event["data"]["active"] is False

    # active true and a new given name: one user.reactivated naming both.
    head = event["cursor"]
    put = OKTA_PUT_USER.replace('"Another"', '"Yet Another"')
    okta(okta_client, "PUT", "/Users/" + user["id"], put, 200, replacements)
    reactivated, = feed.events(head)
    assert (reactivated["type"], reactivated["event_uri"], sorted(reactivated["attributes"])) == (
        "user.reactivated", ACTIVATE_URI, ["active", "name.givenName"])
    assert [(row["type"], row["event_uri"], row["version"], row["token_name"]) for row in stored_events(db)] == [
        ("user.created", CREATE_URI, 1, "okta"), ("user.updated", PUT_URI, 2, "okta"),
        ("user.deactivated", DEACTIVATE_URI, 3, "okta"), ("user.reactivated", ACTIVATE_URI, 4, "okta")]


def test_okta_pathless_patch_deactivates_and_reactivates(okta_client, feed, db):
    user = okta(okta_client, "POST", "/Users", OKTA_CREATE_USER, 201).json
    okta(okta_client, "PATCH", "/Users/" + user["id"], OKTA_DEACTIVATE_USER, 200)
    okta(okta_client, "PATCH", "/Users/" + user["id"], OKTA_DEACTIVATE_USER.replace("false", "true"), 200)
    events = feed.events()
    assert [(e["type"], e["event_uri"], e.get("attributes"), e["resource"]["version"]) for e in events] == [
        ("user.created", CREATE_URI, None, 'W/"1"'), ("user.deactivated", DEACTIVATE_URI, ["active"], 'W/"2"'),
        ("user.reactivated", ACTIVATE_URI, ["active"], 'W/"3"')]
    assert {e["token_name"] for e in events} == {"okta"}


def test_okta_put_of_a_group_s_member_list_gives_events_for_the_difference(okta_client, client, feed, db):
    keep, leave_1, leave_2 = make_events(client, 3, "old")
    group = okta(okta_client, "POST", "/Groups", OKTA_CREATE_GROUP, 201).json
    okta_client.patch("/Groups/" + group["id"], members_patch("add", keep, leave_1, leave_2), status=204)
    newcomer = okta(okta_client, "POST", "/Users", OKTA_CREATE_USER, 201).json["id"]
    body = json.loads(OKTA_PUT_GROUP)
    body["members"] += [{"value": keep, "display": "keep"}]
    head = feed.head()
    put = okta(okta_client, "PUT", "/Groups/" + group["id"], json.dumps(body), 200, {OKTA_USER_ID: newcomer}).json
    events = feed.events(head)
    assert membership(events) == sorted([("group.member_added", newcomer, "User"),
                                         ("group.member_removed", leave_1, "User"),
                                         ("group.member_removed", leave_2, "User")])
    for event in events:
        kind = event["type"].rpartition("_")[2]
        assert_membership_event(event, kind, group, event["data"]["member"]["value"], "User", 3, PUT_URI, "okta")
    assert len({event["txn"] for event in events}) == 1
    assert put["meta"]["version"] == 'W/"3"'
    assert stored_members(db, group["id"]) == {keep, newcomer}


def test_okta_patch_replace_of_members_gives_events_for_the_difference(okta_client, client, feed, db):
    user = okta(okta_client, "POST", "/Users", OKTA_CREATE_USER, 201).json["id"]
    other = okta(okta_client, "POST", "/Users", OKTA_CREATE_USER_2019, 201).json["id"]
    gone = client.create_user("gone@example.com")["id"]
    group = okta(okta_client, "POST", "/Groups", OKTA_CREATE_GROUP, 201).json
    okta_client.patch("/Groups/" + group["id"], members_patch("add", user, gone), status=204)
    head = feed.head()
    okta(okta_client, "PATCH", "/Groups/" + group["id"], OKTA_REPLACE_MEMBERS, 204,
         {OKTA_USER_ID: user, OKTA_OTHER_USER_ID: other})
    events = feed.events(head)
    assert membership(events) == sorted([("group.member_added", other, "User"),
                                         ("group.member_removed", gone, "User")])
    assert {(event["event_uri"], event["resource"]["version"], event["token_name"]) for event in events} == {
        (PATCH_URI, 'W/"3"', "okta")}
    assert stored_members(db, group["id"]) == {user, other}

    # Okta's remove-and-add PATCH: the other user leaves, the first is there already.
    head = feed.head()
    okta(okta_client, "PATCH", "/Groups/" + group["id"], OKTA_UPDATE_MEMBERSHIP, 204,
         {OKTA_USER_ID: user, OKTA_OTHER_USER_ID: other})
    event, = feed.events(head)
    assert_membership_event(event, "removed", group, other, "User", 4, PATCH_URI, "okta")


def test_a_group_put_with_a_new_name_and_members_is_group_updated_then_member_events(okta_client, client, feed):
    old, new = make_events(client, 2, "m")
    group = okta_client.create_group("Old name", members=[{"value": old}])
    head = feed.head()
    okta_client.put("/Groups/" + group["id"], {"schemas": [URN_GROUP], "displayName": "New name",
                                                "members": [{"value": new}]})
    updated, *members = feed.events(head)
    assert (updated["type"], updated["event_uri"], updated["attributes"]) == ("group.updated", PUT_URI,
                                                                               ["displayName"])
    assert updated["data"]["displayName"] == "New name" and "members" not in updated["data"]
    renamed = dict(group, displayName="New name")
    assert membership(members) == sorted([("group.member_added", new, "User"), ("group.member_removed", old, "User")])
    for event in members:
        kind = event["type"].rpartition("_")[2]
        assert_membership_event(event, kind, renamed, event["data"]["member"]["value"], "User", 2, PUT_URI, "okta")
    assert {event["txn"] for event in members} == {updated["txn"]}


def test_a_password_change_is_user_updated_naming_password_and_never_carries_it(okta_client, feed, db):
    user = okta(okta_client, "POST", "/Users", OKTA_CREATE_USER, 201).json
    head = feed.head()
    okta_client.patch("/Users/" + user["id"], [{"op": "replace", "value": {"password": "n3w-Secret-Passw0rd"}}],
                      status=200)
    event, = feed.events(head)
    assert (event["type"], event["event_uri"], event["attributes"]) == ("user.updated", PATCH_URI, ["password"])
    assert event["resource"]["version"] == 'W/"2"'
    assert "password" not in event["data"]
    rows = db.execute("SELECT event FROM scim_events").fetchall()
    assert not any("n3w-Secret" in row[0] or "1mz050nq" in row[0] for row in rows)
    assert "1mz050nq" not in json.dumps(feed.events())


def test_the_same_membership_change_gives_the_same_events_whatever_the_form(client, okta_client, feed, db):
    a, b, c, d, e = make_events(client, 5, "m")
    before, after = [a, b, c], [b, c, d, e]
    forms = {
        "entra-patch-add-remove": lambda group: client.patch("/Groups/" + group["id"], [
            {"op": "Remove", "path": "members", "value": [{"value": a}]},
            {"op": "Add", "path": "members", "value": [{"value": d}, {"value": e}]}], status=204),
        "okta-patch-filter-remove-add": lambda group: okta_client.patch("/Groups/" + group["id"], [
            {"op": "remove", "path": 'members[value eq "%s"]' % a},
            {"op": "add", "path": "members", "value": [{"value": d}, {"value": e}]}], status=204),
        "okta-put": lambda group: okta_client.put("/Groups/" + group["id"], {
            "schemas": [URN_GROUP], "displayName": group["displayName"],
            "members": [{"value": member} for member in after]}),
        "okta-patch-replace": lambda group: okta_client.patch("/Groups/" + group["id"], [
            {"op": "replace", "path": "members", "value": [{"value": member} for member in after]}], status=204),
    }
    seen = {}
    for name, change in forms.items():
        group = client.create_group(name, members=[{"value": member} for member in before])
        head = feed.head()
        change(group)
        events = feed.events(head)
        assert len({event["txn"] for event in events}) == 1, name
        assert {event["resource"]["version"] for event in events} == {'W/"2"'}, name
        assert all(event["resource"]["id"] == group["id"] for event in events), name
        seen[name] = membership(events)
        assert stored_members(db, group["id"]) == set(after), name
    expected = sorted([("group.member_removed", a, "User"), ("group.member_added", d, "User"),
                       ("group.member_added", e, "User")])
    assert seen == {name: expected for name in forms}


def test_a_group_created_with_members_is_group_created_then_one_member_added_each(okta_client, client, feed):
    ids = make_events(client, 2, "m")
    head = feed.head()
    group = okta_client.create_group("With members", members=[{"value": member} for member in ids])
    created, *added = feed.events(head)
    assert (created["type"], created["event_uri"]) == ("group.created", CREATE_URI)
    assert "members" not in created["data"]
    assert membership(added) == sorted(("group.member_added", member, "User") for member in ids)
    for event in added:
        assert_membership_event(event, "added", group, event["data"]["member"]["value"], "User", 1, CREATE_URI,
                                "okta")
    assert {event["txn"] for event in added} == {created["txn"]}


# -- 3. writes that change nothing ---------------------------------------------------------------------

def test_entra_resending_the_same_values_emits_nothing_and_keeps_the_version(client, feed, db):
    user_id = send(client, "POST", "/Users", R7_CREATE_USER, 201).json["id"]
    group = send(client, "POST", "/Groups", R36_CREATE_GROUP, 201).json
    send(client, "PATCH", "/Users/" + user_id, R16_UPDATE_MULTI_VALUED, 200)
    send(client, "PATCH", "/Users/" + user_id, R18_DISABLE_NO_FLAG, 200)
    send(client, "PATCH", "/Groups/" + group["id"], R37_RENAME_GROUP, 204)
    send(client, "PATCH", "/Groups/" + group["id"], R38_ADD_MEMBER, 204, {"f648f8d5ea4e4cd38e9c": user_id})
    head, before = feed.head(), snapshot(db, TABLES)
    assert (version_of(db, "users", user_id), version_of(db, "groups", group["id"])) == (3, 3)

    again = send(client, "PATCH", "/Users/" + user_id, R16_UPDATE_MULTI_VALUED, 200).json
    assert again["meta"]["version"] == 'W/"3"'
    for disable in (R18_DISABLE_NO_FLAG, R18_DISABLE_FLAG, OKTA_DEACTIVATE_USER):
        assert send(client, "PATCH", "/Users/" + user_id, disable, 200).json["meta"]["version"] == 'W/"3"'
    send(client, "PATCH", "/Groups/" + group["id"], R37_RENAME_GROUP, 204)
    send(client, "PATCH", "/Groups/" + group["id"], R38_ADD_MEMBER, 204, {"f648f8d5ea4e4cd38e9c": user_id})
    # Removing a member that is not there changes nothing either.
    stranger = scim_appliance.new_resource_id()
    send(client, "PATCH", "/Groups/" + group["id"], R40_REMOVE_FLAG, 204,
         {"7f4bc1a3-285e-48ae-8202-5accb43efb0e": stranger})

    assert feed.events(head) == []
    assert feed.head() == head
    assert snapshot(db, TABLES) == before


def test_okta_put_of_an_unchanged_user_and_group_emits_nothing(okta_client, feed, db):
    user = okta(okta_client, "POST", "/Users", OKTA_CREATE_USER, 201).json
    group = okta(okta_client, "POST", "/Groups", OKTA_CREATE_GROUP, 201).json
    other = okta(okta_client, "POST", "/Users", OKTA_CREATE_USER_2019, 201).json
    mine = {OKTA_USER_ID: user["id"]}
    both = {OKTA_USER_ID: user["id"], OKTA_OTHER_USER_ID: other["id"]}
    okta(okta_client, "PUT", "/Users/" + user["id"], OKTA_PUT_USER, 200, mine)
    okta(okta_client, "PUT", "/Groups/" + group["id"], OKTA_PUT_GROUP, 200, mine)
    head, before = feed.head(), snapshot(db, TABLES)

    assert okta(okta_client, "PUT", "/Users/" + user["id"], OKTA_PUT_USER, 200, mine).json["meta"]["version"] == \
        'W/"2"'
    assert okta(okta_client, "PUT", "/Groups/" + group["id"], OKTA_PUT_GROUP, 200, mine).json["meta"][
        "version"] == 'W/"2"'
    # The rename Okta sends with every membership update, with the name unchanged.
    okta(okta_client, "PATCH", "/Groups/" + group["id"], OKTA_RENAME_GROUP, 204, {OKTA_GROUP_ID: group["id"]})
    assert feed.events(head) == [] and snapshot(db, TABLES) == before
    # A full push of the members it has: replace, then again.
    okta(okta_client, "PATCH", "/Groups/" + group["id"], OKTA_REPLACE_MEMBERS, 204, both)
    head, before = feed.head(), snapshot(db, TABLES)
    okta(okta_client, "PATCH", "/Groups/" + group["id"], OKTA_REPLACE_MEMBERS, 204, both)
    okta(okta_client, "PATCH", "/Users/" + user["id"], OKTA_DEACTIVATE_USER.replace("false", "true"), 200)

    assert feed.events(head) == []
    assert snapshot(db, TABLES) == before


def test_okta_put_that_resends_the_stored_password_emits_nothing(okta_client, feed, db):
    """Okta's 2019 PUT carries the password; sent again unchanged, the user
    is unchanged: no event, and the version stays (README: "A write that
    changes nothing ... gives no event and keeps the version")."""
    user = okta(okta_client, "POST", "/Users", OKTA_CREATE_USER_2019, 201).json
    first = okta(okta_client, "PUT", "/Users/" + user["id"], OKTA_PUT_USER_2019, 200, {"{id}": user["id"]}).json
    head = feed.head()
    assert first["meta"]["version"] == 'W/"2"'
    again = okta(okta_client, "PUT", "/Users/" + user["id"], OKTA_PUT_USER_2019, 200, {"{id}": user["id"]}).json
    assert [(e["type"], e.get("attributes")) for e in feed.events(head)] == []
    assert again["meta"]["version"] == 'W/"2"'
    assert version_of(db, "users", user["id"]) == 2


def test_a_patch_removing_and_adding_back_the_same_member_emits_nothing(client, feed, db):
    group = client.create_group("Team")
    member, outsider = make_events(client, 2, "m")
    client.patch("/Groups/" + group["id"], members_patch("add", member), status=204)
    head, before = feed.head(), snapshot(db, ("groups", "events"))
    client.patch("/Groups/" + group["id"], [
        {"op": "remove", "path": 'members[value eq "%s"]' % member},
        {"op": "add", "path": "members", "value": [{"value": member}]}], status=204)
    client.patch("/Groups/" + group["id"], members_patch("Remove", member) + members_patch("Add", member),
                 status=204)
    # And the other way round: a non-member added and removed again.
    client.patch("/Groups/" + group["id"], members_patch("add", outsider) + members_patch("remove", outsider),
                 status=204)
    assert feed.events(head) == []
    assert snapshot(db, ("groups", "events")) == before
    assert version_of(db, "groups", group["id"]) == 2
    assert stored_members(db, group["id"]) == {member}


# -- 4. a refused write appends no event --------------------------------------------------------------

FAILING_WRITES = {
    "409-duplicate-userName": (409, lambda c, ids: c.post("/Users", {"schemas": [URN_USER],
                                                                      "userName": "ALICE@example.com"}, status=409)),
    "409-rename-onto-a-taken-userName": (409, lambda c, ids: c.patch(
        "/Users/" + ids["bob"], [{"op": "Replace", "path": "userName", "value": "alice@example.com"}], status=409)),
    "400-patch-adds-an-unknown-member": (400, lambda c, ids: c.patch(
        "/Groups/" + ids["group"], members_patch("Add", ids["bob"], ids["unknown"]), status=400)),
    "400-post-group-with-an-unknown-member": (400, lambda c, ids: c.post(
        "/Groups", {"schemas": [URN_GROUP], "displayName": "New",
                    "members": [{"value": ids["alice"]}, {"value": ids["unknown"]}]}, status=400)),
    "400-put-group-drops-one-and-names-an-unknown-one": (400, lambda c, ids: c.put(
        "/Groups/" + ids["group"], {"schemas": [URN_GROUP], "displayName": "Team",
                                     "members": [{"value": ids["unknown"]}]}, status=400)),
    "400-unknown-patch-op": (400, lambda c, ids: c.patch(
        "/Users/" + ids["bob"], [{"op": "frobnicate", "path": "displayName", "value": "x"}], status=400)),
    "412-stale-if-match-on-patch": (412, lambda c, ids: c.patch(
        "/Users/" + ids["bob"], [{"op": "Replace", "path": "displayName", "value": "x"}], status=412,
        headers={"If-Match": 'W/"1"'})),
    "412-stale-if-match-on-delete": (412, lambda c, ids: c.delete("/Users/" + ids["bob"], status=412,
                                                                  headers={"If-Match": 'W/"1"'})),
    "404-patch-of-an-unknown-user": (404, lambda c, ids: c.patch(
        "/Users/" + ids["unknown"], [{"op": "Replace", "path": "active", "value": "False"}], status=404)),
    "404-delete-of-an-unknown-group": (404, lambda c, ids: c.delete("/Groups/" + ids["unknown"], status=404)),
    "404-put-of-an-unknown-user": (404, lambda c, ids: c.put(
        "/Users/" + ids["unknown"], {"schemas": [URN_USER], "userName": "x@example.com"}, status=404)),
}


@pytest.mark.parametrize("case", list(FAILING_WRITES))
def test_a_refused_write_appends_no_event(client, feed, db, case):
    status, write = FAILING_WRITES[case]
    alice = client.create_user("alice@example.com")["id"]
    bob = client.create_user("bob@example.com")["id"]
    client.patch("/Users/" + bob, [{"op": "Replace", "path": "displayName", "value": "Bob"}], status=200)
    group = client.create_group("Team", members=[{"value": alice}])["id"]
    ids = {"alice": alice, "bob": bob, "group": group, "unknown": scim_appliance.new_resource_id()}
    head, before = feed.head(), snapshot(db, TABLES)
    newest = seqs(db)[-1]

    assert_scim_error(write(client, ids), status, "*" if status in (400, 409) else None)
    assert snapshot(db, TABLES) == before
    assert feed.head() == head and feed.events(head) == []
    # No number was used up by the rolled-back write: the next event follows on.
    client.create_user("carol@example.com")
    assert seqs(db)[-1] == newest + 1
    assert [event["type"] for event in feed.events(head)] == ["user.created"]


# -- 5. sequence numbers, txn, ids, the scim_events view -------------------------------------------------

def test_events_are_numbered_in_commit_order_with_one_txn_per_request(client, feed, db):
    head = "0"
    requests = []   # the events of each request, in order

    def request(write):
        nonlocal head
        write()
        events = feed.events(head)
        assert events, "each of these writes makes events"
        head = events[-1]["cursor"]
        requests.append(events)

    alice, bob = {}, {}
    group = {}
    request(lambda: alice.update(send(client, "POST", "/Users", R7_CREATE_USER, 201).json))
    request(lambda: bob.update(client.create_user("bob@example.com")))
    request(lambda: group.update(client.create_group("Team", members=[{"value": alice["id"]}])))
    request(lambda: client.patch("/Groups/" + group["id"], members_patch("add", bob["id"]), status=204))
    request(lambda: send(client, "PATCH", "/Users/" + alice["id"], R22_MULTIPLE_REPLACE, 200))
    request(lambda: client.patch("/Users/" + alice["id"], [{"op": "replace", "value": {"active": False,
                                                                                       "title": "Ex"}}], status=200))
    request(lambda: client.delete("/Users/" + alice["id"]))
    request(lambda: client.delete("/Groups/" + group["id"]))

    assert [[event["type"] for event in events] for events in requests] == [
        ["user.created"], ["user.created"], ["group.created", "group.member_added"], ["group.member_added"],
        ["user.updated"], ["user.deactivated"], ["group.member_removed", "user.deleted"],
        ["group.deleted"]]
    everything = [event for events in requests for event in events]
    assert [seq_of(event) for event in everything] == list(range(1, len(everything) + 1))
    assert seqs(db) == list(range(1, len(everything) + 1))
    assert feed.events() == everything   # the whole feed from the start: the same events
    for events in requests:
        assert len({event["txn"] for event in events}) == 1
        assert len({event["timestamp"] for event in events}) == 1
    assert len({events[0]["txn"] for events in requests}) == len(requests)
    assert len({event["id"] for event in everything}) == len(everything)
    assert [event["timestamp"] for event in everything] == sorted(event["timestamp"] for event in everything)
    for event in everything:
        assert_envelope(event)
    assert feed.head() == everything[-1]["cursor"]


def test_the_scim_events_view_has_one_row_per_event_equal_to_the_feed_s(client, feed, db):
    user = send(client, "POST", "/Users", R7_CREATE_USER, 201).json
    group = send(client, "POST", "/Groups", R36_CREATE_GROUP, 201).json
    send(client, "PATCH", "/Groups/" + group["id"], R38_ADD_MEMBER, 204, {"f648f8d5ea4e4cd38e9c": user["id"]})
    send(client, "PATCH", "/Users/" + user["id"], R18_DISABLE_NO_FLAG, 200)
    client.delete("/Users/" + user["id"])
    events = feed.events()
    rows = stored_events(db)
    assert len(rows) == len(events) == 6
    assert list(rows[0]) == ["seq", "event_id", "time", "type", "event_uri", "resource_type", "resource_id",
                             "external_id", "version", "txn", "token_name", "event"]
    for row, event in zip(rows, events):
        assert json.loads(row["event"]) == without(event, "cursor")
        assert "cursor" not in json.loads(row["event"])
        assert (row["seq"], row["event_id"], row["time"], row["type"], row["event_uri"], row["resource_type"],
                row["resource_id"], row["external_id"], row["txn"], row["token_name"]) == (
            seq_of(event), event["id"], event["timestamp"], event["type"], event["event_uri"],
            event["resource"]["type"], event["resource"]["id"], event["resource"]["externalId"], event["txn"],
            event["token_name"])
        assert 'W/"%d"' % row["version"] == event["resource"]["version"]
    # `SELECT * FROM scim_events WHERE seq > ?` follows it from another process.
    later = db.execute("SELECT event_id FROM scim_events WHERE seq > ? ORDER BY seq", (3,)).fetchall()
    assert [row[0] for row in later] == [event["id"] for event in events[3:]]


# -- 6. GET /events ----------------------------------------------------------------------------------------

def test_paging_with_limit_continues_without_duplicates_or_gaps(client, feed):
    make_events(client, 7)
    everything = feed.page()["events"]
    assert len(everything) == 7
    pages, cursor = [], None
    while True:
        page = feed.page(cursor, limit=3)
        pages.append(page)
        if page["events"]:
            assert page["next_cursor"] == page["events"][-1]["cursor"]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert [(len(page["events"]), page["has_more"]) for page in pages] == [(3, True), (3, True), (1, False)]
    assert [event for page in pages for event in page["events"]] == everything
    assert [seq_of(event) for event in everything] == list(range(1, 8))
    # limit=1 walks them one at a time; the last page's has_more is false.
    cursor, walked = "0", []
    for number in range(7):
        page = feed.page(cursor, limit=1)
        assert page["has_more"] is (number < 6)
        walked += page["events"]
        cursor = page["next_cursor"]
    assert walked == everything


def test_without_after_the_feed_starts_at_the_oldest_with_100_events_by_default(client, store, feed):
    ids = make_users_silently(store, 101)
    client.create_group("Big", members=[{"value": member} for member in ids])   # 102 events
    page = feed.get("/events").json
    assert len(page["events"]) == scim_appliance.DEFAULT_EVENTS_PAGE == 100
    assert page["has_more"] is True
    assert [seq_of(event) for event in page["events"]] == list(range(1, 101))
    assert page["events"][0]["type"] == "group.created"
    assert page["next_cursor"] == page["events"][-1]["cursor"]
    rest = feed.get("/events?after=" + page["next_cursor"]).json
    assert [seq_of(event) for event in rest["events"]] == [101, 102] and rest["has_more"] is False
    assert feed.page(after="0")["events"] == feed.page()["events"]
    assert len(feed.page(limit=1000)["events"]) == 102


def test_the_head_is_the_newest_event_s_cursor_and_0_before_the_first(client, feed):
    response = feed.get("/events/head")
    assert response.content_type == "application/json"
    assert response.json == {"cursor": "0"}
    assert feed.get("/events/head/").json == {"cursor": "0"}
    make_events(client, 3)
    events = feed.events()
    assert feed.head() == events[-1]["cursor"] == feed.page()["next_cursor"]
    assert seq_of(events[-1]) == 3


def test_an_empty_feed_and_the_end_of_the_feed_keep_the_cursor(client, feed):
    assert feed.page() == {"events": [], "next_cursor": "0", "has_more": False}
    assert feed.page("0") == {"events": [], "next_cursor": "0", "has_more": False}
    make_events(client, 2)
    last = feed.events()[-1]["cursor"]
    for _ in range(2):
        assert feed.page(last) == {"events": [], "next_cursor": last, "has_more": False}
    client.create_user("late@example.com")
    page = feed.page(last)
    assert [event["type"] for event in page["events"]] == ["user.created"]
    assert page["next_cursor"] == page["events"][0]["cursor"] != last


def test_a_long_poll_of_an_empty_tail_answers_empty_at_its_deadline(client, feed):
    make_events(client, 1)
    last = feed.head()
    started = time.monotonic()
    page = feed.page(last, wait=1)
    elapsed = time.monotonic() - started
    assert page == {"events": [], "next_cursor": last, "has_more": False}
    assert elapsed >= 0.9   # it waited for its deadline (no upper bound: the machine may be loaded)


def test_a_long_poll_answers_as_soon_as_a_change_commits(client, store, feed, monkeypatch):
    waiting = threading.Event()
    wait_past = store.event_head.wait_past

    def noted_wait_past(seq, timeout):
        waiting.set()
        return wait_past(seq, timeout)
    monkeypatch.setattr(store.event_head, "wait_past", noted_wait_past)
    answer = {}

    def poll():
        other = Feed(webtest.TestApp(client.app.app), feed.headers["Authorization"].split()[1])
        started = time.monotonic()
        answer["page"] = other.page("0", wait=20)
        answer["seconds"] = time.monotonic() - started
    thread = threading.Thread(target=poll)
    thread.start()
    try:
        assert waiting.wait(10), "the long-poll never waited"
        user = client.create_user("awaited@example.com")
    finally:
        thread.join(30)
    assert not thread.is_alive()
    # Woken by the commit: at its deadline it would have answered no event.
    assert [(event["type"], event["resource"]["id"]) for event in answer["page"]["events"]] == [
        ("user.created", user["id"])]


@pytest.mark.parametrize("cursor", ["abc", "5", "5.XYZ", "-1", "", "5.abcdef01234", "5.abcdef0123456",
                                    "05.abcdef012345", "5.ABCDEF012345", "1.2.3"])
def test_a_malformed_cursor_is_400_invalid_value(client, feed, cursor):
    make_events(client, 1)
    error = feed.error("/events?" + urllib.parse.urlencode({"after": cursor}), 400)
    assert error["scimType"] == "invalidValue"
    assert "cursor" in error["detail"]


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=-1", "limit=ten", "wait=31", "wait=-1",
                                   "wait=1.5", "limit=1000&wait=31"])
def test_a_limit_or_wait_out_of_range_is_400(client, feed, query):
    error = feed.error("/events?" + query, 400)
    assert error["scimType"] == "invalidValue"


def test_the_limits_of_limit_and_wait_are_accepted(client, feed):
    make_events(client, 2)
    assert len(feed.page(limit=1)["events"]) == 1
    assert len(feed.page(limit=1000, wait=0)["events"]) == 2
    assert len(feed.page("0", limit=1000, wait=30)["events"]) == 2   # something to answer: no wait


def test_a_cursor_beyond_the_head_is_410(client, feed):
    make_events(client, 3)
    events = feed.events()
    tag = events[-1]["cursor"].split(".")[1]
    for cursor in ("4." + tag, "4.000000000000", "999999." + tag):
        error = feed.error("/events?after=" + cursor, 410)
        assert "/events/head" in error["detail"] and "beyond the newest event" in error["detail"]
    assert feed.head() == events[-1]["cursor"]


def test_a_cursor_whose_id_does_not_match_its_event_is_410(client, feed, settings):
    make_events(client, 3)
    events = feed.events()
    error = feed.error("/events?after=2.000000000000", 410)
    assert "/events/head" in error["detail"] and "another history" in error["detail"]
    assert feed.page(events[1]["cursor"])["events"] == events[2:]
    # What a restore from an older copy looks like: number 2 is another event now.
    with writer(settings) as conn:
        conn.execute("UPDATE events SET event_id = ? WHERE seq = 2", (str(uuid.uuid4()),))
    feed.error("/events?after=" + events[1]["cursor"], 410)
    assert feed.page(events[0]["cursor"], limit=1)["events"][0]["cursor"] != events[1]["cursor"]


def test_a_pruned_cursor_is_410_and_the_feed_then_starts_at_the_oldest_kept(client, store, feed, db, settings):
    make_events(client, 5)
    events = feed.events()
    backdate(settings, 2, "seq <= 3")
    assert scim_appliance.prune_events(store, 1, 1.0) == 3
    assert seqs(db) == [4, 5]
    for cursor in ("0", events[0]["cursor"], events[1]["cursor"], events[2]["cursor"]):
        error = feed.error("/events?after=" + cursor, 410)
        assert "/events/head" in error["detail"] and "older than the feed keeps" in error["detail"]
    assert feed.page() == {"events": events[3:], "next_cursor": events[4]["cursor"], "has_more": False}
    assert feed.page(events[3]["cursor"])["events"] == events[4:]
    assert feed.head() == events[4]["cursor"]


def test_cursor_0_is_good_until_event_1_is_pruned(client, store, feed, settings):
    make_events(client, 3)
    events = feed.events()
    backdate(settings, 2, "seq = 2")
    assert scim_appliance.prune_events(store, 1, 1.0) == 0   # a prefix only: event 1 is young
    assert cursors(feed.page("0")["events"]) == cursors(events)   # backdating changed their timestamps
    backdate(settings, 2, "seq = 1")
    assert scim_appliance.prune_events(store, 1, 1.0) == 2
    feed.error("/events?after=0", 410)
    assert cursors(feed.page()["events"]) == cursors(events[2:])


def test_the_newest_event_survives_pruning_so_the_head_stays_good(client, store, feed, db, settings):
    make_events(client, 4)
    events = feed.events()
    backdate(settings, 400)
    assert scim_appliance.prune_events(store, 30, 1.0) == 3
    assert scim_appliance.prune_events(store, 0, 1.0) == 0
    assert seqs(db) == [4]
    head = feed.head()
    assert head == events[-1]["cursor"]
    assert feed.page(head) == {"events": [], "next_cursor": head, "has_more": False}
    assert cursors(feed.page()["events"]) == cursors(events[3:])
    client.create_user("next@example.com")
    assert [seq_of(event) for event in feed.page(head)["events"]] == [5]


def test_events_younger_than_the_retention_are_kept(client, store, feed, db, settings):
    make_events(client, 4)
    backdate(settings, 29, "seq <= 2")
    assert scim_appliance.prune_events(store, 30, 1.0) == 0
    backdate(settings, 31, "seq = 1")
    assert scim_appliance.prune_events(store, 30, 1.0) == 1
    assert seqs(db) == [2, 3, 4]


def test_pruning_goes_in_batches_and_deletes_every_expired_event_but_the_newest(client, store, db, settings,
                                                                              monkeypatch):
    make_events(client, 7)
    backdate(settings, 40)
    monkeypatch.setattr(scim_appliance, "EVENTS_PRUNE_BATCH", 2)
    assert scim_appliance.prune_events(store, 30, 1.0) == 6
    assert seqs(db) == [7]


def test_sequence_numbers_are_never_handed_out_again(client, feed, db, settings):
    make_events(client, 5)
    events = feed.events()
    # The newest events go (as a restore of an older copy, or by hand).
    with writer(settings) as conn:
        conn.execute("DELETE FROM events WHERE seq >= 4")
    assert seqs(db) == [1, 2, 3]
    assert feed.head() == events[2]["cursor"]
    assert "/events/head" in feed.error("/events?after=" + events[4]["cursor"], 410)["detail"]
    user = client.create_user("after@example.com")
    assert seqs(db) == [1, 2, 3, 6]
    new, = feed.events(events[2]["cursor"])
    assert (seq_of(new), new["resource"]["id"]) == (6, user["id"])
    feed.error("/events?after=" + events[4]["cursor"], 410)   # 5 is not kept: it names no event now
    assert db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()[0] == 6


def test_export_returns_the_head_cursor_of_its_snapshot(client, store, feed):
    make_events(client, 3)
    out = io.BytesIO()
    cursor = scim_appliance.export_resources(store, scim_appliance.USER, "ndjson", out, PUBLIC_URL + "/scim")
    assert cursor == feed.head() == feed.events()[-1]["cursor"]
    assert len(out.getvalue().splitlines()) == 3


# -- 7. scopes ------------------------------------------------------------------------------------------

def test_a_read_token_reads_and_searches_users_and_groups(client, read_token, feed):
    user = client.create_user("alice@example.com")
    group = client.create_group("Team", members=[{"value": user["id"]}])
    reader = ScimClient(client.app, read_token)
    assert [u["id"] for u in reader.get("/Users").json["Resources"]] == [user["id"]]
    assert reader.get("/Users/" + user["id"]).json["groups"][0]["value"] == group["id"]
    got = reader.get("/Groups/" + group["id"]).json
    assert (got["displayName"], [m["value"] for m in got["members"]]) == ("Team", [user["id"]])
    search = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
              "filter": 'userName eq "alice@example.com"'}
    assert reader.post("/Users/.search", search, status=200).json["totalResults"] == 1
    assert reader.post("/.search", search, status=200).json["Resources"][0]["id"] == user["id"]
    groups = reader.post("/Groups/.search", {"filter": 'displayName eq "Team"'}, status=200).json
    assert [g["id"] for g in groups["Resources"]] == [group["id"]]
    assert reader.get("/ServiceProviderConfig").status_int == 200
    assert [event["type"] for event in feed.events()] == ["user.created", "group.created", "group.member_added"]


@pytest.mark.parametrize("path", ["/Users/.SEARCH", "/users/.Search", "/.SEARCH"])
def test_a_read_token_searches_with_any_spelling_of_the_endpoint(client, read_token, path):
    """Endpoint names are matched case-insensitively (the provisioning token
    is answered 200 here); a search is no write, so a read token may too."""
    user = client.create_user("alice@example.com")
    search = {"filter": 'userName eq "alice@example.com"'}
    assert client.post(path, search, status=200).json["Resources"][0]["id"] == user["id"]
    response = ScimClient(client.app, read_token).request("POST", path, search, status="*")
    assert response.status_int == 200, response.body
    assert response.json["Resources"][0]["id"] == user["id"]


WRITES = [
    ("POST", "/Users", lambda ids: {"schemas": [URN_USER], "userName": "new@example.com"}),
    ("PUT", "/Users/{user}", lambda ids: {"schemas": [URN_USER], "userName": "renamed@example.com"}),
    ("PATCH", "/Users/{user}", lambda ids: {"schemas": [URN_PATCH], "Operations": [
        {"op": "replace", "path": "active", "value": False}]}),
    ("DELETE", "/Users/{user}", None),
    ("POST", "/Groups", lambda ids: {"schemas": [URN_GROUP], "displayName": "New"}),
    ("PUT", "/Groups/{group}", lambda ids: {"schemas": [URN_GROUP], "displayName": "Team", "members": []}),
    ("PATCH", "/Groups/{group}", lambda ids: {"schemas": [URN_PATCH], "Operations": [
        {"op": "remove", "path": "members"}]}),
    ("DELETE", "/Groups/{group}", None),
]


@pytest.mark.parametrize("method, path, body", WRITES, ids=["%s %s" % (m, p) for m, p, _ in WRITES])
def test_a_read_token_cannot_write(client, read_token, feed, db, method, path, body):
    user = client.create_user("alice@example.com")
    group = client.create_group("Team", members=[{"value": user["id"]}])
    ids = {"user": user["id"], "group": group["id"]}
    before, head = snapshot(db, TABLES), feed.head()
    reader = ScimClient(client.app, read_token)
    response = reader.request(method, path.format(**ids), None if body is None else body(ids), status="*")
    error = assert_scim_error(response, 403)
    assert "read" in error["detail"]
    assert snapshot(db, TABLES) == before
    assert feed.head() == head


@pytest.mark.parametrize("path", ["/events", "/events/head", "/events?after=0&wait=1"])
def test_a_provisioning_token_cannot_read_the_feed(client, store, feed, path, monkeypatch):
    make_events(client, 1)
    waits = []
    monkeypatch.setattr(store.event_head, "wait_past", lambda *args: waits.append(args))
    response = client.app.get(path, headers={"Authorization": "Bearer " + client.token}, expect_errors=True)
    error = assert_scim_error(response, 403)
    assert "read token" in error["detail"]
    assert waits == []   # refused before any wait


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic eDp5"}],
                         ids=["none", "wrong", "basic"])
@pytest.mark.parametrize("path", ["/events", "/events/head"])
def test_the_feed_without_a_valid_token_is_401(client, feed, path, headers):
    make_events(client, 1)
    response = client.app.get(path, headers=headers, expect_errors=True)
    assert_scim_error(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "events" not in response.text


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/events", "/events/head"])
def test_the_feed_is_read_with_get_only(client, read_token, feed, db, method, path):
    make_events(client, 1)
    before = snapshot(db, TABLES)
    response = client.app.request(path, method=method, body=b"{}", expect_errors=True,
                                  headers={"Authorization": "Bearer " + read_token,
                                           "Content-Type": "application/json"})
    assert_scim_error(response, 405)
    assert response.headers["Allow"] == "GET, HEAD"
    assert snapshot(db, TABLES) == before


def test_token_create_with_scope_read_on_the_cli_and_token_list_shows_the_scope(client, store, settings):
    client.create_user("alice@example.com")
    token = run_cli("token", "create", "--name", "hr-sync", "--scope", "read", "--db", settings.db).stdout.strip()
    assert token.startswith(scim_appliance.TOKEN_PREFIX)
    assert {(t["name"], t["scope"]) for t in scim_appliance.list_tokens(store)} == {("entra", "provision"),
                                                                                   ("hr-sync", "read")}
    listing = run_cli("token", "list", "--db", settings.db).stdout.splitlines()
    assert listing[0].split() == ["NAME", "STARTS", "CREATED", "LAST", "USED", "SCOPE", "STATUS"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert rows["hr-sync"][-2:] == ["read", "active"]
    assert rows["entra"][-2:] == ["provision", "active"]
    # The new token reads the feed, and may not write.
    reader = Feed(client.app, token)
    assert [event["type"] for event in reader.events()] == ["user.created"]
    assert_scim_error(ScimClient(client.app, token).post("/Users", {"schemas": [URN_USER], "userName": "x"},
                                                         status=403), 403)
    bad = run_cli("token", "create", "--name", "x", "--scope", "admin", "--db", settings.db, check=False)
    assert bad.returncode != 0
    assert "x" not in {t["name"] for t in scim_appliance.list_tokens(store)}


def test_rotating_a_token_keeps_its_scope(client, store, read_token):
    client.create_user("alice@example.com")
    name, rotated = scim_appliance.rotate_token(store, "app")
    assert name == "app (rotated 2)"
    _, provision_token = scim_appliance.rotate_token(store, "entra")
    assert {t["name"]: t["scope"] for t in scim_appliance.list_tokens(store)} == {
        "entra": "provision", "app": "read", "app (rotated 2)": "read", "entra (rotated 2)": "provision"}
    assert [event["type"] for event in Feed(client.app, rotated).events()] == ["user.created"]
    assert_scim_error(Feed(client.app, provision_token).get("/events", 403), 403)
    writer_client = ScimClient(client.app, provision_token)
    writer_client.create_user("bob@example.com")
    assert Feed(client.app, rotated).events()[-1]["token_name"] == "entra (rotated 2)"


def test_create_token_refuses_an_unknown_scope(store):
    with pytest.raises(ValueError):
        scim_appliance.create_token(store, "x", scope="admin")
    assert scim_appliance.list_tokens(store) == []


# -- 8. the admin page and /metrics ----------------------------------------------------------------------

def _csrf(page):
    tokens = set(re.findall(r'<input type="hidden" name="csrf" value="([^"]*)">', page.text))
    assert len(tokens) == 1, tokens
    return tokens.pop()


def _text(fragment):
    return " ".join(re.sub(r"<[^>]*>", " ", fragment).split())


def _element_text(page, element_id):
    match = re.search(r'<(\w+) id="%s"[^>]*>(.*?)</\1>' % re.escape(element_id), page.text, re.DOTALL)
    assert match, element_id
    return _text(match.group(2))


def _tokens_table(page):
    match = re.search(r'<table id="tokens">(.*?)</table>', page.text, re.DOTALL)
    assert match
    headings = [_text(cell) for cell in re.findall(r"<th>(.*?)</th>", match.group(1), re.DOTALL)]
    body = match.group(1).split("</thead>", 1)[1]
    return [dict(zip(headings, (_text(cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.DOTALL))))
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.DOTALL)]


@pytest.fixture
def metrics():
    return scim_appliance.RequestMetrics()


@pytest.fixture
def admin(store, settings, activity, metrics):
    """The admin page, logged in."""
    scim_appliance.set_admin_password(store, ADMIN_PASSWORD)
    app = webtest.TestApp(scim_appliance.make_admin_app(store, settings, activity, metrics=metrics))
    response = app.post("/login", {"password": ADMIN_PASSWORD, "csrf": _csrf(app.get("/login"))},
                        headers={"Origin": ADMIN_ORIGIN}, status=303)
    assert urllib.parse.urlsplit(response.headers["Location"]).path == "/"
    return app


def _token_form(admin, fields, status):
    return admin.post("/tokens", dict(fields, csrf=_csrf(admin.get("/tokens"))), headers={"Origin": ADMIN_ORIGIN},
                      status=status)


def test_the_admin_tokens_form_creates_a_read_token_and_shows_each_scope(admin, client, store):
    page = admin.get("/tokens")
    assert re.search(r'<select name="scope">\s*<option value="provision" selected>', page.text)
    assert '<option value="read">' in page.text
    created = _token_form(admin, {"name": "hr-sync", "scope": "read"}, 201)
    token = re.search(r'<code id="new-token">([^<]*)</code>', created.text).group(1)
    _token_form(admin, {"name": "okta"}, 201)   # no scope chosen: provision
    assert {t["name"]: t["scope"] for t in scim_appliance.list_tokens(store)} == {
        "entra": "provision", "hr-sync": "read", "okta": "provision"}
    rows = {row["Name"]: row for row in _tokens_table(admin.get("/tokens"))}
    assert {name: row["Scope"] for name, row in rows.items()} == {
        "entra": "provision", "hr-sync": "read", "okta": "provision"}
    client.create_user("alice@example.com")
    assert [event["type"] for event in Feed(client.app, token).events()] == ["user.created"]


def test_the_admin_tokens_form_refuses_an_unknown_scope(admin, store):
    page = _token_form(admin, {"name": "odd", "scope": "admin"}, 400)
    assert 'class="message error"' in page.text
    assert re.search(r'<code id="new-token">', page.text) is None
    assert [t["name"] for t in scim_appliance.list_tokens(store)] == []


def test_the_overview_shows_the_feed_s_head_and_oldest_event_kept(admin, client, store, settings):
    assert _element_text(admin.get("/"), "feed") == "no change recorded yet"
    make_events(client, 5)
    text = _element_text(admin.get("/"), "feed")
    oldest_time = re.fullmatch(r"head at event 5; oldest kept: 1, (\S+)", text)
    assert oldest_time, text
    backdate(settings, 60, "seq <= 2")
    assert scim_appliance.prune_events(store, 30, 1.0) == 2
    with store.read() as tx:
        kept_time = tx.event_time_at(3)
    assert _element_text(admin.get("/"), "feed") == "head at event 5; oldest kept: 3, %s" % kept_time


def _gauges(text):
    """{name: value} of the unlabelled samples of a Prometheus text, and their TYPE lines."""
    values, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#") and "{" not in line:
            name, value = line.split(" ")
            values[name] = float(value)
    return values, types


def test_metrics_show_the_feed_s_head_oldest_and_rate(admin, client, store, settings):
    values, types = _gauges(admin.get("/metrics").text)
    assert (values["scim_events_head_sequence"], values["scim_events_oldest_sequence"],
            values["scim_events_per_second"]) == (0, 0, 0)
    assert {types[name] for name in ("scim_events_head_sequence", "scim_events_oldest_sequence",
                                     "scim_events_per_second")} == {"gauge"}
    make_events(client, 4)
    group = client.create_group("Team")
    client.patch("/Groups/" + group["id"], members_patch("add", *[u["id"] for u in
                                                                  client.get("/Users").json["Resources"][:2]]),
                 status=204)   # 4 + 1 + 2 = 7 events, appended in this minute
    backdate(settings, 60, "seq <= 3")
    scim_appliance.prune_events(store, 30, 1.0)
    response = admin.get("/metrics")
    assert response.content_type == "text/plain"
    values, _ = _gauges(response.text)
    assert values["scim_events_head_sequence"] == 7
    assert values["scim_events_oldest_sequence"] == 4
    assert values["scim_events_per_second"] == pytest.approx(7 / 60, abs=0.001)
    assert re.search(r"^scim_events_per_second 0\.117$", response.text, re.MULTILINE)


# -- 9. retention -------------------------------------------------------------------------------------

def test_event_retention_prunes_at_most_every_activity_prune_seconds(client, store, db, settings, monkeypatch):
    now = [1000.0]
    calls = []
    prune = scim_appliance.prune_events

    def counted_prune(*args):
        calls.append(args)
        return prune(*args)
    monkeypatch.setattr(scim_appliance, "prune_events", counted_prune)
    retention = scim_appliance.EventRetention(store, 30, clock=lambda: now[0])
    make_events(client, 3, "first")
    backdate(settings, 31)
    retention()                                  # the first beat prunes
    assert seqs(db) == [3]
    assert len(calls) == 1 and calls[0][1] == 30

    make_events(client, 2, "second")
    backdate(settings, 31)
    for moment in (1000.0, 1300.0, 1000.0 + scim_appliance.ACTIVITY_PRUNE_SECONDS - 0.001):
        now[0] = moment
        retention()
    assert seqs(db) == [3, 4, 5] and len(calls) == 1
    now[0] = 1000.0 + scim_appliance.ACTIVITY_PRUNE_SECONDS
    retention()
    assert seqs(db) == [5] and len(calls) == 2
    now[0] += scim_appliance.ACTIVITY_PRUNE_SECONDS - 1
    retention()
    assert len(calls) == 2
    now[0] += 1
    retention()
    assert len(calls) == 3 and seqs(db) == [5]


@pytest.mark.parametrize("days", ["0", "-3"])
def test_serve_refuses_an_events_retention_under_a_day(tmp_path, days):
    """--events-days 0 would prune every event but the newest within seconds of
    start: no consumer could ever follow the feed. It is refused, and nothing starts."""
    result = run_cli("serve", "--events-days", days, "--db", str(tmp_path / "scim.db"), check=False)
    assert result.returncode == 1
    assert "--events-days must be at least 1" in result.stderr
    assert not (tmp_path / "scim.db").exists()
