"""Concurrency (issue 3, items 4-7): many client threads against the real
server (waitress, as shipped), and a unit test of the write transaction.

Each scenario prints one line of figures (statuses, counts, wall time) for
information; run with `-s` to see them. Nothing here asserts a duration.
"""

import collections
import concurrent.futures
import contextlib
import json
import sqlite3
import threading
import time

import pytest

import scim_appliance
from scim_appliance import URN_ENTERPRISE, URN_ERROR, URN_GROUP, URN_PATCH, URN_USER

CLIENT_THREADS = 32
BARRIER_TIMEOUT = 60          # seconds a released-together thread waits for the others


# -- helpers ---------------------------------------------------------------------

def patch_body(*operations):
    return {"schemas": [URN_PATCH], "Operations": list(operations)}


def run_all(calls, workers=CLIENT_THREADS):
    """Run the zero-argument `calls` on `workers` client threads.

    Returns (results in the order of `calls`, wall time in seconds). An
    exception in any call (a refused connection, a timeout) is re-raised.
    """
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(call) for call in calls]
        results = [future.result() for future in futures]
    return results, time.monotonic() - started


def released_together(calls):
    """Run `calls` on one thread each, all released at once by a Barrier."""
    barrier = threading.Barrier(len(calls))

    def wrap(call):
        def go():
            barrier.wait(timeout=BARRIER_TIMEOUT)
            return call()
        return go

    return run_all([wrap(call) for call in calls], workers=len(calls))


@contextlib.contextmanager
def live_db(server):
    """A read-only connection to the running server's database file."""
    conn = sqlite3.connect("file:%s?mode=ro" % server.db_path, uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def db_members(server, group_id):
    with live_db(server) as conn:
        return [r[0] for r in conn.execute("SELECT member_id FROM members WHERE group_id = ?",
                                           (group_id,))]


def listed_members(server, group_id):
    """The member ids GET /Groups/{id} lists (each once)."""
    status, _, group = server.request("GET", "/Groups/" + group_id)
    assert status == 200, group
    values = [m["value"] for m in group.get("members", [])]
    assert len(values) == len(set(values)), "a member is listed twice"
    return set(values)


def assert_http_scim_error(status, body, expected_status, scim_type):
    """RFC 7644 §3.12 over real HTTP: a SCIM Error body with this scimType."""
    assert status == expected_status, body
    assert body["schemas"] == [URN_ERROR]
    assert body["status"] == str(expected_status)
    assert body.get("scimType") == scim_type, body


def create_users(server, names):
    """POST one user per name (concurrently); returns their ids in order."""
    def create(name):
        return lambda: server.request("POST", "/Users", {"schemas": [URN_USER], "userName": name,
                                                         "displayName": name.split("@")[0]})
    results, _ = run_all([create(name) for name in names])
    assert [status for status, _, _ in results] == [201] * len(names), \
        collections.Counter(status for status, _, _ in results)
    return [body["id"] for _, _, body in results]


def create_group(server, display_name):
    status, _, body = server.request("POST", "/Groups", {"schemas": [URN_GROUP],
                                                         "displayName": display_name})
    assert status == 201, body
    return body["id"]


def report(scenario, **figures):
    print("\n[concurrency] %s: %s" % (scenario, ", ".join("%s=%s" % kv for kv in figures.items())))


def assert_statuses_and_members(server, group_id, results, statuses, members):
    """Every response had the expected status, and the group holds exactly
    `members`: each once in the members table, and in GET /Groups/{id}."""
    counted = collections.Counter(status for status, _, _ in results)
    assert counted == statuses, counted
    stored = db_members(server, group_id)
    assert len(stored) == len(members)
    assert set(stored) == set(members)
    assert listed_members(server, group_id) == set(members)
    return counted


# -- item 4: concurrent membership changes on one group ----------------------------

def test_200_concurrent_member_adds_and_100_concurrent_removals_lose_nothing(live_server):
    """Issue 3 item 4: 200 concurrent add-member PATCHes -> 200 members, all 204;
    100 concurrent removals (both Entra forms) -> exactly the other 100 remain."""
    server = live_server
    user_ids = create_users(server, ["member%03d@example.com" % n for n in range(200)])
    group_id = create_group(server, "Crowd")

    def add(user_id):
        return lambda: server.request("PATCH", "/Groups/" + group_id, patch_body(
            {"op": "Add", "path": "members", "value": [{"value": user_id}]}))

    results, add_seconds = run_all([add(user_id) for user_id in user_ids])
    add_statuses = assert_statuses_and_members(server, group_id, results, {204: 200}, user_ids)

    # Remove every other user, alternating the two forms Entra sends.
    leaving, staying = user_ids[0::2], user_ids[1::2]

    def remove(index, user_id):
        if index % 2 == 0:
            operation = {"op": "Remove", "path": "members", "value": [{"value": user_id}]}
        else:
            operation = {"op": "Remove", "path": 'members[value eq "%s"]' % user_id}
        return lambda: server.request("PATCH", "/Groups/" + group_id, patch_body(operation))

    results, remove_seconds = run_all([remove(i, user_id) for i, user_id in enumerate(leaving)])
    removal_statuses = assert_statuses_and_members(server, group_id, results, {204: 100}, staying)
    with live_db(server) as conn:   # the users themselves are untouched
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 200
    report("item 4", adds=200, add_statuses=dict(add_statuses), add_wall="%.2fs" % add_seconds,
           removals=100, removal_statuses=dict(removal_statuses), removal_wall="%.2fs" % remove_seconds,
           members_after=len(staying))


# -- item 5: concurrent creation of one userName -----------------------------------

ASCII_VARIANTS = ["Race@Example.com", "RACE@example.com", "race@EXAMPLE.com", "rAcE@eXaMpLe.CoM",
                  "race@example.com", "RACE@EXAMPLE.COM", "Race@example.com", "rACE@example.com",
                  "raCe@example.Com", "racE@Example.COM", "RaCe@ExAmPlE.cOm", "rAcE@example.com",
                  "RAce@example.com", "raCE@example.com", "Race@EXAMPLE.com", "rACE@EXAMPLE.COM"]
# Full Unicode case folding: "ß" and "ẞ" fold to "ss", and a decomposed
# "A" + U+0308 is the same name as the composed "Ä" once normalised (NFC).
UNICODE_VARIANTS = ["STRASSE@x", "straße@x", "Straße@x", "STRAẞE@x", "strasse@x", "Strasse@x",
                    "sTRASSE@x", "STRAße@X", "straSSe@X", "STRASSE@X", "straẞe@x", "StraSSe@x",
                    "strAsse@x", "STRAsse@x", "sTraße@x", "strasSE@X"]
COMBINING_VARIANTS = ["Änne@x", "änne@x", "A\u0308nne@x", "a\u0308nne@x", "ÄNNE@x", "A\u0308NNE@x",
                      "äNNE@x", "a\u0308NNE@X", "ÄnNe@x", "Änne@X", "änNe@x", "A\u0308nnE@x",
                      "ÄNNe@x", "a\u0308nne@X", "ÄnnE@X", "änne@X"]


@pytest.mark.parametrize("variants", [ASCII_VARIANTS, UNICODE_VARIANTS, COMBINING_VARIANTS],
                         ids=["ascii-case", "unicode-folding", "combining-marks"])
def test_16_concurrent_posts_of_one_username_create_exactly_one_user(live_server, variants):
    """Issue 3 item 5: userName is unique case-insensitively (RFC 7643 §4.1.1,
    caseExact false): 16 POSTs released together -> one 201, fifteen 409
    uniqueness, one row."""
    assert len(variants) == 16 and len(set(variants)) == 16
    assert len({scim_appliance.fold(name) for name in variants}) == 1
    key = scim_appliance.fold(variants[0])
    server = live_server

    def post(name):
        return lambda: server.request("POST", "/Users", {"schemas": [URN_USER], "userName": name})

    results, seconds = released_together([post(name) for name in variants])
    statuses = collections.Counter(status for status, _, _ in results)
    assert statuses == {201: 1, 409: 15}, statuses
    for status, _, body in results:
        if status == 409:
            assert_http_scim_error(status, body, 409, "uniqueness")
    (winner_index, (_, _, created)), = [(i, r) for i, r in enumerate(results) if r[0] == 201]
    assert created["userName"] == variants[winner_index]
    with live_db(server) as conn:
        rows = conn.execute("SELECT id, user_name, user_name_key FROM users").fetchall()
    assert [tuple(r) for r in rows] == [(created["id"], variants[winner_index], key)]
    status, _, fetched = server.request("GET", "/Users/" + created["id"])
    assert status == 200 and fetched["userName"] == variants[winner_index]
    report("item 5 (%s)" % variants[0], posts=16, statuses=dict(statuses), rows=len(rows),
           wall="%.2fs" % seconds)


# -- item 6: concurrent PATCHes of one user; delete racing group adds -------------

ENTERPRISE = URN_ENTERPRISE + ":"
# (PATCH path, how to find it in the returned or stored document, value for round r)
USER_ATTRIBUTES = [
    ("displayName", ("displayName",), "Display %d"),
    ("title", ("title",), "Title %d"),
    ("nickName", ("nickName",), "Nick %d"),
    ("name.givenName", ("name", "givenName"), "Given %d"),
    ("name.familyName", ("name", "familyName"), "Family %d"),
    ("externalId", ("externalId",), "ext-%d"),
    ("preferredLanguage", ("preferredLanguage",), "de-CH-x-%d"),
    ("locale", ("locale",), "fr-CH-x-%d"),
    ("timezone", ("timezone",), "Etc/GMT-%d"),
    ("userType", ("userType",), "Type %d"),
    (ENTERPRISE + "employeeNumber", (URN_ENTERPRISE, "employeeNumber"), "E%05d"),
    (ENTERPRISE + "department", (URN_ENTERPRISE, "department"), "Department %d"),
]
ROUNDS = 5


def dig(document, keys):
    for key in keys:
        document = document[key]
    return document


def test_concurrent_patches_of_different_attributes_of_one_user_lose_none(live_server):
    """Issue 3 item 6: 12 threads, each replacing a different attribute of one
    user, released together (5 rounds) -> all 200, every value kept, and
    meta.version moves on by exactly 12 per round, one step per PATCH."""
    server = live_server
    status, _, user = server.request("POST", "/Users", {"schemas": [URN_USER],
                                                        "userName": "busy@example.com",
                                                        "name": {"givenName": "B", "familyName": "U"}})
    assert status == 201 and user["meta"]["version"] == 'W/"1"'
    user_id = user["id"]

    def replace(path, value):
        return lambda: server.request("PATCH", "/Users/" + user_id, patch_body(
            {"op": "Replace", "path": path, "value": value}))

    walls = []
    for round_number in range(1, ROUNDS + 1):
        base = 1 + 12 * (round_number - 1)
        calls = [replace(path, template % round_number) for path, _, template in USER_ATTRIBUTES]
        results, seconds = released_together(calls)
        walls.append(seconds)
        assert [status for status, _, _ in results] == [200] * 12, [r[:1] + r[2:] for r in results]
        # Each PATCH saw its own version: they ran one after another.
        versions = sorted(int(body["meta"]["version"][3:-1]) for _, _, body in results)
        assert versions == list(range(base + 1, base + 13))

        status, _, fetched = server.request("GET", "/Users/" + user_id)
        assert status == 200
        assert fetched["meta"]["version"] == 'W/"%d"' % (base + 12)
        with live_db(server) as conn:
            row = conn.execute("SELECT version, external_id, display_name, document FROM users "
                               "WHERE id = ?", (user_id,)).fetchone()
        stored = json.loads(row["document"])
        for path, keys, template in USER_ATTRIBUTES:
            expected = template % round_number
            assert dig(fetched, keys) == expected, path
            assert dig(stored, keys) == expected, path
        assert row["version"] == base + 12
        assert (row["external_id"], row["display_name"]) == ("ext-%d" % round_number,
                                                            "Display %d" % round_number)
        assert stored["userName"] == "busy@example.com"
    report("item 6a", rounds=ROUNDS, patches_per_round=12, statuses={200: 12 * ROUNDS},
           final_version=1 + 12 * ROUNDS, wall_per_round="/".join("%.2f" % w for w in walls) + "s")


GROUPS = 10
VICTIMS = 20


def test_deleting_a_user_while_it_is_added_to_groups_leaves_no_dangling_member(live_server):
    """Issue 3 item 6: per user, 10 threads PATCH-add it to 10 groups while one
    thread deletes it, all released together (20 users) -> no 5xx, and no
    group keeps (in the members table or in GET) a member that does not exist."""
    server = live_server
    keeper, = create_users(server, ["keeper@example.com"])
    group_ids = [create_group(server, "Team %02d" % n) for n in range(GROUPS)]
    for group_id in group_ids:   # a member that stays, so "empty" is not the only right answer
        status, _, body = server.request("PATCH", "/Groups/" + group_id, patch_body(
            {"op": "Add", "path": "members", "value": [{"value": keeper}]}))
        assert status == 204, body
    victims = create_users(server, ["victim%02d@example.com" % n for n in range(VICTIMS)])

    def add(group_id, user_id):
        return lambda: server.request("PATCH", "/Groups/" + group_id, patch_body(
            {"op": "Add", "path": "members", "value": [{"value": user_id}]}))

    def delete(user_id):
        return lambda: server.request("DELETE", "/Users/" + user_id)

    add_statuses = collections.Counter()
    delete_statuses = collections.Counter()
    seconds = 0.0
    for user_id in victims:
        calls = [add(group_id, user_id) for group_id in group_ids] + [delete(user_id)]
        results, wall = released_together(calls)
        seconds += wall
        for status, _, body in results[:-1]:
            add_statuses[status] += 1
            assert status < 500, body
            if status == 400:
                assert_http_scim_error(status, body, 400, "invalidValue")
            else:
                assert status in (204, 404), body
        delete_status, _, delete_body = results[-1]
        delete_statuses[delete_status] += 1
        assert delete_status == 204, delete_body

    with live_db(server) as conn:
        dangling = conn.execute(
            "SELECT m.group_id, m.member_id FROM members m "
            "LEFT JOIN users u ON u.id = m.member_id "
            "LEFT JOIN groups g ON g.id = m.member_id "
            "WHERE u.id IS NULL AND g.id IS NULL").fetchall()
        remaining_users = {r[0] for r in conn.execute("SELECT id FROM users")}
        memberships = {(r[0], r[1]) for r in conn.execute("SELECT group_id, member_id FROM members")}
    assert dangling == []
    assert remaining_users == {keeper}
    assert memberships == {(group_id, keeper) for group_id in group_ids}
    for group_id in group_ids:
        assert listed_members(server, group_id) == {keeper}
    for user_id in victims:
        status, _, _ = server.request("GET", "/Users/" + user_id)
        assert status == 404
    report("item 6b", users_deleted=VICTIMS, groups=GROUPS, add_statuses=dict(add_statuses),
           delete_statuses=dict(delete_statuses), dangling=len(dangling), wall="%.2fs" % seconds)


# -- item 7: the write transaction itself (no server) -------------------------------

STORES = 2
THREADS_PER_STORE = 8
APPENDS_PER_THREAD = 15


def test_read_append_write_through_two_stores_loses_no_update(tmp_path):
    """Issue 3 item 7 (design.md §2): read-append-write transactions from two
    Store objects on one file (so only SQLite, not the per-Store Python lock,
    keeps them apart) lose no append and raise nothing. A deferred BEGIN
    fails this (the second writer's snapshot is stale: "database is locked"),
    and so do writes outside a transaction (one append overwrites another)."""
    path = str(tmp_path / "race.db")
    stores = [scim_appliance.Store(path) for _ in range(STORES)]
    try:
        created = scim_appliance.create_resource(
            stores[0], scim_appliance.USER, {"schemas": [URN_USER], "userName": "counter@example.com",
                                             "emails": [{"value": "first@example.com"}]},
            "https://scim.example.com/scim")
        user_id = created["id"]
        errors = []
        barrier = threading.Barrier(STORES * THREADS_PER_STORE)

        def append_emails(store, thread_number):
            barrier.wait(timeout=BARRIER_TIMEOUT)
            for n in range(APPENDS_PER_THREAD):
                try:
                    with store.write() as tx:
                        row = tx.get_resource("users", user_id)
                        document = json.loads(row["document"])
                        # Let the other store's writer run between the read
                        # and the write: a window a deferred BEGIN loses in.
                        time.sleep(0.001)
                        document["emails"].append({"value": "t%02d-%02d@example.com" % (thread_number, n)})
                        tx.update_resource("users", row, scim_appliance._row_for(
                            scim_appliance.USER, user_id, document, scim_appliance.utc_now(),
                            row["version"] + 1))
                except Exception as exc:   # asserted below, with the others
                    errors.append(repr(exc))

        started = time.monotonic()
        threads = [threading.Thread(target=append_emails, args=(stores[k % STORES], k))
                   for k in range(STORES * THREADS_PER_STORE)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
    finally:
        for store in stores:
            store.close()

    total = STORES * THREADS_PER_STORE * APPENDS_PER_THREAD
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        version, document = conn.execute("SELECT version, document FROM users WHERE id = ?",
                                         (user_id,)).fetchone()
    finally:
        conn.close()
    emails = [e["value"] for e in json.loads(document)["emails"]][1:]
    report("item 7", transactions=total, errors=len(errors), appends_kept=len(emails),
           wall="%.2fs" % seconds)
    assert errors == []
    assert len(emails) == total
    assert set(emails) == {"t%02d-%02d@example.com" % (k, n)
                           for k in range(STORES * THREADS_PER_STORE) for n in range(APPENDS_PER_THREAD)}
    assert version == 1 + total
