"""Data safety and data out: schema migrations from an older database,
the stable SQL views, `backup` / `restore` / `check` / `export` through the
real CLI, GET /healthz, and the lock that keeps two servers (or a server and
a restore) off one database."""

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest
import webtest

import scim_appliance
from conftest import PUBLIC_URL, ROOT, LiveServer, free_ports, healthz, query, read_only, run_cli

FIXTURE_V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "schema-v1.db")
V1_TOKEN = "scimapp_zKzXEOcyVHYUPhHMaFZQHmFh11baq7iSZt8YeP6XujE"
BOSS = "1aff6135-2c3c-4b9b-9f2b-a17d4620281e"
WORKER = "d6c18df0-bf1b-4716-a853-05df0453eeef"
SALES = "527316fe-7b7b-459c-a865-a160d8e722bb"
V1_USER_TIME = "2026-11-29T01:55:20.429Z"
V1_GROUP_TIME = "2026-11-29T01:55:20.430Z"
ENTERPRISE = scim_appliance.URN_ENTERPRISE

# The documented columns of the views, in their documented order.
SCIM_USERS_COLUMNS = ["id", "user_name", "external_id", "display_name", "given_name", "family_name", "email",
                      "active", "employee_number", "department", "manager_id", "created", "last_modified"]
SCIM_GROUPS_COLUMNS = ["id", "display_name", "external_id", "created", "last_modified"]
SCIM_GROUP_MEMBERS_COLUMNS = ["group_id", "member_id", "member_type"]
SCIM_EVENTS_COLUMNS = ["seq", "event_id", "time", "type", "event_uri", "resource_type", "resource_id",
                       "external_id", "version", "txn", "token_name", "event"]

# The rows the views give for the schema-v1 fixture once it is migrated.
V1_USER_ROWS = [
    (BOSS, "boss@contoso.example", "obj-boss", "The Boss", "Barb", "Boss", "boss@contoso.example", 1, "1",
     "Board", None, V1_USER_TIME, V1_USER_TIME),
    (WORKER, "worker@contoso.example", "obj-worker", None, "Wes", "Worker", "worker@contoso.example", 0, "42",
     "Sales", BOSS, V1_USER_TIME, V1_USER_TIME),
]
V1_GROUP_ROWS = [(SALES, "Sales", "obj-sales", V1_GROUP_TIME, V1_GROUP_TIME)]
V1_MEMBER_ROWS = [(SALES, BOSS, "User"), (SALES, WORKER, "User")]


# -- helpers -------------------------------------------------------------------

def copy_v1(tmp_path, name="v1.db"):
    """A private copy of the schema-v1 fixture (never touched in place)."""
    path = str(tmp_path / name)
    shutil.copyfile(FIXTURE_V1, path)
    return path


def file_state(path):
    """The bytes and modification time of a file: proof nothing wrote to it."""
    with open(path, "rb") as handle:
        return handle.read(), os.stat(path).st_mtime_ns


def view_columns(conn, view):
    return [row[1] for row in conn.execute("PRAGMA table_info(%s)" % view)]


def make_database(path, users=("someone@contoso.example",)):
    """A closed, current-schema database holding `users` (by userName)."""
    store = scim_appliance.Store(path)
    try:
        ids = [scim_appliance.create_resource(store, scim_appliance.USER,
                                              {"schemas": [scim_appliance.URN_USER], "userName": name},
                                              PUBLIC_URL + "/scim")["id"] for name in users]
    finally:
        store.close()
    return ids


def sidecar_files(directory):
    """The files in `directory` but the restore lock (DB.lock, empty, left by design)."""
    return sorted(name for name in os.listdir(directory) if not name.endswith(".lock"))


def entra_user(user_name, **extra):
    """A user body shaped like the ones Entra sends on its first sync."""
    body = {
        "schemas": [scim_appliance.URN_USER, ENTERPRISE],
        "externalId": "obj-" + user_name.split("@")[0],
        "userName": user_name,
        "active": True,
        "displayName": user_name.split("@")[0].title(),
        "name": {"formatted": "Given Family", "familyName": "Family", "givenName": "Given"},
        "title": "Engineer",
        "preferredLanguage": "en-US",
        "addresses": [{"type": "work", "locality": "Springfield", "country": "US", "primary": False}],
    }
    body.update(extra)
    return body


# -- 1. migration of a database made by schema version 1 ------------------------

def test_a_schema_v1_database_is_carried_forward_with_its_data_and_token(tmp_path):
    path = copy_v1(tmp_path)
    assert query(path, "PRAGMA user_version") == [(1,)]

    server = LiveServer(path)
    server.token = V1_TOKEN
    try:
        assert query(path, "PRAGMA user_version") == [(scim_appliance.SCHEMA_VERSION,)]
        # The token made by the old code still authenticates...
        status, _, _ = server.request("GET", "/Users", token="scimapp_" + "x" * 43)
        assert status == 401
        status, _, boss = server.request("GET", "/Users/" + BOSS)
        assert status == 200, boss
        # ...and every attribute came through.
        url = server.url
        sales_ref = {"value": SALES, "$ref": url + "/Groups/" + SALES, "display": "Sales", "type": "direct"}
        assert boss == {
            "schemas": [scim_appliance.URN_USER, ENTERPRISE],
            "id": BOSS, "externalId": "obj-boss", "userName": "boss@contoso.example",
            "name": {"givenName": "Barb", "familyName": "Boss"}, "displayName": "The Boss", "active": True,
            "emails": [{"value": "boss@contoso.example", "type": "work", "primary": True}],
            "groups": [sales_ref],
            ENTERPRISE: {"employeeNumber": "1", "department": "Board"},
            "meta": {"resourceType": "User", "created": V1_USER_TIME, "lastModified": V1_USER_TIME,
                     "location": url + "/Users/" + BOSS, "version": 'W/"1"'},
        }
        status, _, worker = server.request("GET", "/Users/" + WORKER)
        assert status == 200, worker
        assert worker == {
            "schemas": [scim_appliance.URN_USER, ENTERPRISE],
            "id": WORKER, "externalId": "obj-worker", "userName": "worker@contoso.example",
            "name": {"givenName": "Wes", "familyName": "Worker"}, "active": False,
            "emails": [{"value": "home@example.org", "type": "home"},
                       {"value": "worker@contoso.example", "type": "work", "primary": True}],
            "groups": [sales_ref],
            ENTERPRISE: {"employeeNumber": "42", "department": "Sales",
                         "manager": {"value": BOSS, "$ref": url + "/Users/" + BOSS}},
            "meta": {"resourceType": "User", "created": V1_USER_TIME, "lastModified": V1_USER_TIME,
                     "location": url + "/Users/" + WORKER, "version": 'W/"1"'},
        }
        status, _, group = server.request("GET", "/Groups/" + SALES)
        assert status == 200, group
        assert group == {
            "schemas": [scim_appliance.URN_GROUP], "id": SALES, "externalId": "obj-sales", "displayName": "Sales",
            "members": [{"value": BOSS, "$ref": url + "/Users/" + BOSS, "type": "User", "display": "The Boss"},
                        {"value": WORKER, "$ref": url + "/Users/" + WORKER, "type": "User"}],
            "meta": {"resourceType": "Group", "created": V1_GROUP_TIME, "lastModified": V1_GROUP_TIME,
                     "location": url + "/Groups/" + SALES, "version": 'W/"1"'},
        }
        # The old unique indexes still serve filters (userName is case-insensitive).
        status, _, found = server.request("GET", '/Users?filter=userName%20eq%20%22WORKER@contoso.example%22')
        assert status == 200 and [r["id"] for r in found["Resources"]] == [WORKER]
        status, _, found = server.request("GET", '/Groups?filter=externalId%20eq%20%22obj-sales%22')
        assert status == 200 and [r["id"] for r in found["Resources"]] == [SALES]

        # The views give the old rows, read by another process, read-only, while the server runs.
        conn = read_only(path)
        try:
            assert conn.execute("SELECT * FROM scim_users ORDER BY user_name").fetchall() == V1_USER_ROWS
            assert conn.execute("SELECT * FROM scim_groups").fetchall() == V1_GROUP_ROWS
            assert conn.execute("SELECT * FROM scim_group_members ORDER BY member_id").fetchall() == V1_MEMBER_ROWS
            # The tokens table gained version 2's columns and version 4's scope; the
            # old token has no hint and keeps provisioning.
            assert [r[1] for r in conn.execute("PRAGMA table_info(tokens)")] == [
                "name", "digest", "created", "last_used", "revoked", "hint", "expires", "scope"]
            assert conn.execute("SELECT name, hint, expires, revoked, scope FROM tokens").fetchall() == [
                ("entra", None, None, None, "provision")]
        finally:
            conn.close()

        listing = run_cli("token", "list", "--db", path).stdout
        line = next(line for line in listing.splitlines() if line.startswith("entra "))
        fields = line.split()
        assert fields[1] == "-" and fields[-1] == "active", listing

        # The migrated database takes writes, and the view shows them.
        status, _, created = server.request("POST", "/Users", {"schemas": [scim_appliance.URN_USER],
                                                               "userName": "new@contoso.example"})
        assert status == 201, created
        assert query(path, "SELECT user_name, email, active FROM scim_users WHERE id = ?", (created["id"],)) == [
            ("new@contoso.example", None, None)]
    finally:
        output = server.stop()
    assert "scim-appliance stopped" in output

    def state():
        conn = read_only(path)
        try:
            return (conn.execute("PRAGMA user_version").fetchone()[0],
                    conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall(),
                    [conn.execute("SELECT * FROM %s ORDER BY 1, 2" % table).fetchall()
                     for table in ("users", "groups", "members", "scim_users")],
                    conn.execute("SELECT name, digest, created, revoked, hint, expires FROM tokens").fetchall())
        finally:
            conn.close()

    before = state()
    assert before[0] == scim_appliance.SCHEMA_VERSION
    # A second start: nothing is migrated again, nothing changes.
    second = LiveServer(path)
    try:
        status, _, boss_again = second.request("GET", "/Users/" + BOSS, token=V1_TOKEN)
        assert status == 200 and boss_again["meta"] == {**boss["meta"], "location": second.url + "/Users/" + BOSS}
    finally:
        second.stop()
    assert state() == before


# -- 2. the stable views ---------------------------------------------------------

def test_the_views_have_exactly_the_documented_columns(settings, store):
    conn = read_only(settings.db)
    try:
        assert view_columns(conn, "scim_users") == SCIM_USERS_COLUMNS
        assert view_columns(conn, "scim_groups") == SCIM_GROUPS_COLUMNS
        assert view_columns(conn, "scim_group_members") == SCIM_GROUP_MEMBERS_COLUMNS
        assert view_columns(conn, "scim_events") == SCIM_EVENTS_COLUMNS
        assert {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'")} == {
            "scim_users", "scim_groups", "scim_group_members", "scim_events"}
    finally:
        conn.close()


def test_the_views_show_what_entra_provisioned(client, settings):
    manager = client.post("/Users", entra_user(
        "mgr@contoso.example", emails=[{"primary": True, "type": "work", "value": "mgr@contoso.example"}],
        **{ENTERPRISE: {"employeeNumber": "7", "department": "Board"}})).json
    # The primary email is the second one; the first is not primary.
    ada = client.post("/Users", entra_user(
        "ada@contoso.example",
        name={"givenName": "Ada", "familyName": "Lovelace", "formatted": "Ada Lovelace"},
        emails=[{"type": "home", "value": "ada@home.example"},
                {"type": "work", "value": "ada@contoso.example", "primary": True}],
        **{ENTERPRISE: {"employeeNumber": "1815", "department": "Analytics",
                        "manager": {"value": manager["id"]}}})).json
    # No email is primary: the first one is used. Inactive.
    first = client.post("/Users", entra_user(
        "first@contoso.example", active=False,
        emails=[{"type": "work", "value": "first@contoso.example"}, {"type": "home", "value": "second@home.example"}]
    )).json
    # No emails, no active, no name, no extension.
    bare = client.create_user("bare@contoso.example")

    rows = {row[0]: row for row in query(settings.db, "SELECT * FROM scim_users")}
    assert len(rows) == 4
    assert rows[ada["id"]] == (
        ada["id"], "ada@contoso.example", "obj-ada", "Ada", "Ada", "Lovelace", "ada@contoso.example", 1, "1815",
        "Analytics", manager["id"], ada["meta"]["created"], ada["meta"]["lastModified"])
    assert rows[manager["id"]][6:11] == ("mgr@contoso.example", 1, "7", "Board", None)
    assert rows[first["id"]] == (
        first["id"], "first@contoso.example", "obj-first", "First", "Given", "Family", "first@contoso.example", 0,
        None, None, None, first["meta"]["created"], first["meta"]["lastModified"])
    assert rows[bare["id"]] == (
        bare["id"], "bare@contoso.example", None, None, None, None, None, None, None, None, None,
        bare["meta"]["created"], bare["meta"]["lastModified"])

    # Groups, with a user and a nested group as members.
    inner = client.create_group("Inner", externalId="obj-inner")
    outer = client.create_group("Outer", members=[{"value": ada["id"]}, {"value": first["id"]},
                                                  {"value": inner["id"]}])
    assert sorted(query(settings.db, "SELECT * FROM scim_groups")) == sorted([
        (inner["id"], "Inner", "obj-inner", inner["meta"]["created"], inner["meta"]["lastModified"]),
        (outer["id"], "Outer", None, outer["meta"]["created"], outer["meta"]["lastModified"])])
    assert sorted(query(settings.db, "SELECT * FROM scim_group_members")) == sorted([
        (outer["id"], ada["id"], "User"), (outer["id"], first["id"], "User"), (outer["id"], inner["id"], "Group")])

    # Changes show at once: a new primary email, a rename, a removed member.
    client.patch("/Users/" + ada["id"], [
        {"op": "replace", "path": "emails[type eq \"work\"].primary", "value": False},
        {"op": "replace", "path": "emails[type eq \"home\"].primary", "value": True},
        {"op": "replace", "path": "active", "value": False}], status=200)
    client.patch("/Groups/" + outer["id"], [
        {"op": "replace", "path": "displayName", "value": "Outer renamed"},
        {"op": "remove", "path": "members[value eq \"%s\"]" % first["id"]}], status=204)
    changed = client.get("/Users/" + ada["id"]).json
    assert query(settings.db, "SELECT email, active, last_modified FROM scim_users WHERE id = ?", (ada["id"],)) == [
        ("ada@home.example", 0, changed["meta"]["lastModified"])]
    assert query(settings.db, "SELECT display_name FROM scim_groups WHERE id = ?", (outer["id"],)) == [
        ("Outer renamed",)]
    client.delete("/Users/" + ada["id"])
    assert sorted(query(settings.db, "SELECT member_id, member_type FROM scim_group_members")) == [
        (inner["id"], "Group")]
    assert query(settings.db, "SELECT count(*) FROM scim_users WHERE id = ?", (ada["id"],)) == [(0,)]


def test_read_only_readers_and_the_appliance_do_not_block_each_other(client, settings, store):
    client.create_user("before@contoso.example")
    reader = read_only(settings.db)
    reader.isolation_level = None
    try:
        assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.execute("DELETE FROM users")

        # The appliance holds a write transaction open: the reader reads the committed data.
        now = scim_appliance.utc_now()
        with store.write() as tx:
            tx.insert_resource("users", scim_appliance._row_for(
                scim_appliance.USER, scim_appliance.new_resource_id(), {"userName": "pending@contoso.example"},
                now, 1, created=now))
            started = time.monotonic()
            names = [r[0] for r in reader.execute("SELECT user_name FROM scim_users")]
            assert time.monotonic() - started < 1.0
            assert names == ["before@contoso.example"]
        assert sorted(r[0] for r in reader.execute("SELECT user_name FROM scim_users")) == [
            "before@contoso.example", "pending@contoso.example"]

        # A reader holds a snapshot open: the appliance still commits at once.
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM scim_users").fetchone()[0] == 2
        started = time.monotonic()
        client.create_user("during@contoso.example")
        assert time.monotonic() - started < 2.0
        assert reader.execute("SELECT count(*) FROM scim_users").fetchone()[0] == 2   # its snapshot
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM scim_users").fetchone()[0] == 3
    finally:
        reader.close()


# -- 3. backup while writes run, and restore ------------------------------------------

def test_a_backup_taken_while_writes_run_holds_every_write_acknowledged_before_it(live_server, tmp_path):
    acked = []          # (monotonic time the 201 arrived, id, userName)
    failures = []
    stop = threading.Event()
    lock = threading.Lock()

    def writer(prefix):
        number = 0
        while not stop.is_set():
            number += 1
            name = "%s-%d@contoso.example" % (prefix, number)
            try:
                status, _, body = live_server.request("POST", "/Users", {
                    "schemas": [scim_appliance.URN_USER], "userName": name, "active": True})
            except Exception as exc:   # reported below
                failures.append(repr(exc))
                return
            if status != 201:
                failures.append((status, body))
                return
            with lock:
                acked.append((time.monotonic(), body["id"], name))

    threads = [threading.Thread(target=writer, args=("w%d" % k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    backup = str(tmp_path / "backup.db")
    try:
        deadline = time.monotonic() + 10
        while len(acked) < 40 and time.monotonic() < deadline and not failures:
            time.sleep(0.01)
        assert len(acked) >= 40, failures
        backup_started = time.monotonic()
        result = run_cli("backup", backup, "--db", live_server.db_path)
        backup_ended = time.monotonic()
        # `check` also runs beside the writers.
        checked = run_cli("check", "--db", live_server.db_path)
        count_at_end = len(acked)
        while len(acked) < count_at_end + 20 and time.monotonic() < deadline + 10 and not failures:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert failures == []
    assert "backed up" in result.stderr
    assert "ok, schema version %d" % scim_appliance.SCHEMA_VERSION in checked.stdout
    # The writes went on while the backup ran, and after it.
    assert any(backup_started < at < backup_ended for at, _, _ in acked), "no write finished during the backup"
    assert len(acked) >= count_at_end + 20

    before = {user_id: name for at, user_id, name in acked if at < backup_started}
    everything = {user_id: name for _, user_id, name in acked}
    conn = read_only(backup)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == scim_appliance.SCHEMA_VERSION
        in_backup = dict(conn.execute("SELECT id, user_name FROM scim_users").fetchall())
    finally:
        conn.close()
    assert not os.path.exists(backup + "-wal")
    assert set(before) <= set(in_backup), "acknowledged before the backup but missing from it"
    assert all(in_backup[user_id] == name for user_id, name in before.items())
    assert set(in_backup) <= set(everything)   # nothing half-written or invented
    assert len(in_backup) < len(everything)    # the writes after it are not in it

    token = live_server.token
    live_server.stop()
    restored = str(tmp_path / "restored.db")
    result = run_cli("restore", backup, "--db", restored)
    assert "restored" in result.stderr
    assert dict(query(restored, "SELECT id, user_name FROM scim_users")) == in_backup
    server = LiveServer(restored)
    try:
        for user_id, name in before.items():
            status, _, body = server.request("GET", "/Users/" + user_id, token=token)
            assert status == 200 and body["userName"] == name, (user_id, status, body)
        missing = next(user_id for user_id in everything if user_id not in in_backup)
        assert server.request("GET", "/Users/" + missing, token=token)[0] == 404
    finally:
        server.stop()


def test_backup_never_overwrites_an_existing_file(tmp_path):
    path = str(tmp_path / "scim.db")
    make_database(path)
    destination = str(tmp_path / "existing.db")
    with open(destination, "wb") as handle:
        handle.write(b"precious data, not a database")
    before = file_state(destination)
    result = run_cli("backup", destination, "--db", path, check=False)
    assert result.returncode == 1
    assert "exists" in result.stderr and destination in result.stderr
    assert file_state(destination) == before
    # A new destination works, and is a complete database on its own.
    fresh = str(tmp_path / "fresh.db")
    run_cli("backup", fresh, "--db", path)
    assert query(fresh, "SELECT user_name FROM scim_users") == [("someone@contoso.example",)]


# -- 4. restore refusals, and restoring an old backup ---------------------------------

def test_restore_is_refused_while_a_server_uses_the_database(live_server, tmp_path):
    status, _, first = live_server.request("POST", "/Users", {"schemas": [scim_appliance.URN_USER],
                                                              "userName": "first@contoso.example"})
    assert status == 201
    backup = str(tmp_path / "backup.db")
    run_cli("backup", backup, "--db", live_server.db_path)
    status, _, later = live_server.request("POST", "/Users", {"schemas": [scim_appliance.URN_USER],
                                                              "userName": "later@contoso.example"})
    assert status == 201
    rows_before = query(live_server.db_path, "SELECT * FROM users ORDER BY id")

    result = run_cli("restore", backup, "--db", live_server.db_path, check=False)
    assert result.returncode == 1
    assert "a server is using" in result.stderr and live_server.db_path in result.stderr, result.stderr
    assert query(live_server.db_path, "SELECT * FROM users ORDER BY id") == rows_before
    assert live_server.request("GET", "/Users/" + later["id"])[0] == 200

    # Once the server has stopped, the same restore goes through and the later user is gone.
    live_server.stop()
    run_cli("restore", backup, "--db", live_server.db_path)
    assert query(live_server.db_path, "SELECT id FROM scim_users") == [(first["id"],)]


def _sqlite_file(path, user_version):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE other_app (x)")
    conn.execute("PRAGMA user_version = %d" % user_version)
    conn.commit()
    conn.close()


def _subtly_corrupt(path, user_name):
    """Change `user_name` in its table row only (as a flipped bit on disk
    would), so that the row and the userName index disagree."""
    data = bytearray(open(path, "rb").read())
    needle = user_name.encode()
    changed, position = 0, 0
    while True:
        position = data.find(needle, position)
        if position < 0:
            break
        page = position // 4096
        if data[page * 4096 + (100 if page == 0 else 0)] == 0x0D:   # a table b-tree leaf page
            data[position] = ord("x")
            changed += 1
        position += 1
    assert changed
    with open(path, "wb") as handle:
        handle.write(bytes(data))


@pytest.mark.parametrize("source_kind", ["text", "empty", "other-sqlite", "newer", "corrupt"])
def test_restore_refuses_a_bad_source_and_leaves_the_target_untouched(tmp_path, source_kind):
    target = str(tmp_path / "target.db")
    make_database(target, users=("keep@contoso.example",))
    source = str(tmp_path / "source.db")
    if source_kind == "text":
        with open(source, "w") as handle:
            handle.write("this is not a database\n" * 200)
    elif source_kind == "empty":
        open(source, "wb").close()
    elif source_kind == "other-sqlite":
        _sqlite_file(source, 0)
    elif source_kind == "newer":
        make_database(str(tmp_path / "made.db"), users=("other@contoso.example",))
        run_cli("backup", source, "--db", str(tmp_path / "made.db"))
        conn = sqlite3.connect(source)
        conn.execute("PRAGMA user_version = %d" % (scim_appliance.SCHEMA_VERSION + 1))
        conn.commit()
        conn.close()
    else:
        make_database(str(tmp_path / "made.db"), users=["user%02d@contoso.example" % i for i in range(30)])
        run_cli("backup", source, "--db", str(tmp_path / "made.db"))
        _subtly_corrupt(source, "user17@contoso.example")
    target_before = file_state(target)
    source_before = file_state(source)
    files_before = sidecar_files(tmp_path)

    result = run_cli("restore", source, "--db", target, check=False)
    assert result.returncode == 1, result.stderr
    expected = {"text": "not a usable SQLite database", "empty": "not a scim-appliance database",
                "other-sqlite": "not a scim-appliance database", "newer": "schema version",
                "corrupt": "integrity check"}[source_kind]
    assert expected in result.stderr and source in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert file_state(target) == target_before
    assert file_state(source) == source_before
    assert sidecar_files(tmp_path) == files_before
    assert query(target, "SELECT user_name FROM scim_users") == [("keep@contoso.example",)]


@pytest.mark.parametrize("source_kind", ["text", "other-sqlite", "empty"])
def test_restore_of_a_bad_source_does_not_create_the_target(tmp_path, source_kind):
    source = str(tmp_path / "source")
    if source_kind == "other-sqlite":   # a sound SQLite file, but not the appliance's (version 0)
        _sqlite_file(source, 0)
    else:
        with open(source, "w") as handle:
            handle.write("not a database\n" * 100 if source_kind == "text" else "")
    target = str(tmp_path / "new.db")
    result = run_cli("restore", source, "--db", target, check=False)
    assert result.returncode == 1 and "scim-appliance:" in result.stderr
    assert not os.path.exists(target)


@pytest.mark.parametrize("command", [["backup", "copy.db"], ["export", "users"]])
def test_backup_and_export_of_a_mistyped_database_path_fail_and_create_nothing(tmp_path, command):
    """A typo in --db is an error, not an empty directory to back up or export."""
    missing = str(tmp_path / "typo.db")
    args = [str(tmp_path / part) if part.endswith(".db") else part for part in command]
    result = run_cli(*args, "--db", missing, check=False)
    assert result.returncode == 1 and "typo.db does not exist" in result.stderr
    assert result.stdout == ""
    assert sorted(os.listdir(str(tmp_path))) == []


def test_restoring_a_schema_v1_backup_migrates_it(tmp_path):
    source = copy_v1(tmp_path, "old-backup.db")
    source_before = file_state(source)
    target = str(tmp_path / "target.db")
    make_database(target, users=("replaced@contoso.example",))

    result = run_cli("restore", source, "--db", target)
    assert "restored" in result.stderr
    assert file_state(source) == source_before   # read, never written
    conn = read_only(target)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == scim_appliance.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT * FROM scim_users ORDER BY user_name").fetchall() == V1_USER_ROWS
        assert conn.execute("SELECT * FROM scim_groups").fetchall() == V1_GROUP_ROWS
        assert conn.execute("SELECT * FROM scim_group_members ORDER BY member_id").fetchall() == V1_MEMBER_ROWS
        assert conn.execute("SELECT name, hint FROM tokens").fetchall() == [("entra", None)]
    finally:
        conn.close()
    server = LiveServer(target)
    try:
        status, _, body = server.request("GET", "/Users/" + WORKER, token=V1_TOKEN)
        assert status == 200 and body["userName"] == "worker@contoso.example"
        assert server.request("GET", "/Users?filter=userName%20eq%20%22replaced@contoso.example%22",
                              token=V1_TOKEN)[2]["totalResults"] == 0
    finally:
        server.stop()


# -- 5. check ----------------------------------------------------------------------

def test_check_passes_a_sound_database_and_changes_nothing(tmp_path):
    path = str(tmp_path / "good.db")
    make_database(path)
    before = file_state(path)
    result = run_cli("check", "--db", path)
    assert result.returncode == 0
    assert "ok, schema version %d" % scim_appliance.SCHEMA_VERSION in result.stdout
    assert file_state(path) == before


def test_check_reports_an_old_schema_version_without_migrating(tmp_path):
    path = copy_v1(tmp_path)
    before = file_state(path)
    result = run_cli("check", "--db", path)
    assert result.returncode == 0
    assert "schema version 1" in result.stdout and str(scim_appliance.SCHEMA_VERSION) in result.stdout
    assert file_state(path) == before
    assert query(path, "PRAGMA user_version") == [(1,)]


def test_check_fails_on_a_row_that_disagrees_with_its_index(tmp_path):
    path = str(tmp_path / "corrupt.db")
    make_database(path, users=["user%02d@contoso.example" % i for i in range(30)])
    assert run_cli("check", "--db", path).returncode == 0
    _subtly_corrupt(path, "user17@contoso.example")
    before = file_state(path)
    result = run_cli("check", "--db", path, check=False)
    assert result.returncode == 1
    assert "fails SQLite's integrity check" in result.stderr and "missing from index" in result.stderr, \
        result.stderr
    assert file_state(path) == before


def test_check_fails_on_pages_overwritten_with_garbage(tmp_path):
    path = str(tmp_path / "garbage.db")
    make_database(path, users=["user%03d@contoso.example" % i for i in range(300)])
    size = os.path.getsize(path)
    assert size >= 10 * 4096
    with open(path, "r+b") as handle:
        handle.seek(4096)   # page 2 to the end; page 1 (header and schema root) stays
        handle.write(os.urandom(size - 4096))
    before = file_state(path)
    result = run_cli("check", "--db", path, check=False)
    assert result.returncode == 1
    assert path in result.stderr and ("malformed" in result.stderr or "integrity check" in result.stderr), \
        result.stderr
    assert "Traceback" not in result.stderr
    assert file_state(path) == before


def test_check_fails_on_a_file_that_is_not_a_database_or_does_not_exist(tmp_path):
    path = str(tmp_path / "notes.db")
    with open(path, "w") as handle:
        handle.write("hello, not a database\n" * 300)
    before = file_state(path)
    result = run_cli("check", "--db", path, check=False)
    assert result.returncode == 1
    assert "not a usable SQLite database" in result.stderr
    assert file_state(path) == before

    missing = str(tmp_path / "missing.db")
    result = run_cli("check", "--db", missing, check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert not os.path.exists(missing)


# -- 6. export ---------------------------------------------------------------------

@pytest.fixture
def directory(client):
    """A few users and groups made through the API, as Entra would."""
    boss = client.post("/Users", entra_user(
        "boss@contoso.example", displayName='Boss, "The" Zoë',
        emails=[{"type": "work", "value": "boss@contoso.example", "primary": True}],
        **{ENTERPRISE: {"employeeNumber": "1", "department": "Board"}})).json
    worker = client.post("/Users", entra_user(
        "worker@contoso.example", active=False, emails=[{"type": "work", "value": "w@contoso.example"}],
        **{ENTERPRISE: {"department": "Sales", "manager": {"value": boss["id"]}}})).json
    bare = client.create_user("bare@contoso.example")
    sales = client.create_group("Sales", externalId="obj-sales",
                                members=[{"value": boss["id"]}, {"value": worker["id"]}])
    board = client.create_group("Board", members=[{"value": boss["id"]}, {"value": sales["id"]}])
    empty = client.create_group("Empty")
    return {"users": [boss["id"], worker["id"], bare["id"]], "groups": [sales["id"], board["id"], empty["id"]]}


def export(db_path, what, form, *extra):
    return run_cli("export", what, "--format", form, "--db", db_path, *extra)


@pytest.mark.parametrize("what", ["users", "groups"])
def test_json_and_ndjson_exports_are_the_scim_resources(client, settings, directory, what, tmp_path):
    endpoint = "/Users/" if what == "users" else "/Groups/"
    expected = {resource_id: client.get(endpoint + resource_id).json for resource_id in directory[what]}

    as_json = json.loads(export(settings.db, what, "json", "--public-url", PUBLIC_URL).stdout)
    assert isinstance(as_json, list)
    assert [resource["id"] for resource in as_json] == directory[what]   # storage (creation) order
    assert {resource["id"]: resource for resource in as_json} == expected
    if what == "groups":
        members = {group["displayName"]: {(m["value"], m["type"]) for m in group.get("members", [])}
                   for group in as_json}
        assert members == {"Sales": {(directory["users"][0], "User"), (directory["users"][1], "User")},
                           "Board": {(directory["users"][0], "User"), (directory["groups"][0], "Group")},
                           "Empty": set()}
    else:
        assert [g["display"] for g in as_json[0]["groups"]] == ["Board", "Sales"]

    ndjson = export(settings.db, what, "ndjson", "--public-url", PUBLIC_URL).stdout
    lines = ndjson.split("\n")
    assert lines[-1] == "" and all(lines[:-1])
    assert [json.loads(line) for line in lines[:-1]] == as_json

    # --output writes the file and nothing to stdout; locations follow --public-url.
    output = str(tmp_path / ("export.%s.json" % what))
    result = export(settings.db, what, "json", "--public-url", "https://directory.example.net/", "--output", output)
    assert result.stdout == ""
    with open(output, encoding="utf-8") as handle:
        relocated = json.load(handle)
    assert [r["meta"]["location"] for r in relocated] == [
        "https://directory.example.net/scim%s%s" % (endpoint, resource_id) for resource_id in directory[what]]
    # Every URL in it (meta.location, $ref) moved; nothing else changed.
    assert json.dumps(relocated).replace("https://directory.example.net/scim", PUBLIC_URL + "/scim") == \
        json.dumps(as_json)


@pytest.mark.parametrize("what, view, columns", [("users", "scim_users", SCIM_USERS_COLUMNS),
                                                 ("groups", "scim_groups", SCIM_GROUPS_COLUMNS)])
def test_csv_export_is_the_view(settings, directory, db, what, view, columns, tmp_path):
    output = str(tmp_path / "export.csv")
    assert export(settings.db, what, "csv", "--output", output).stdout == ""
    with open(output, "rb") as handle:
        raw = handle.read()
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    assert rows[0] == columns
    expected = [["" if value is None else str(value) for value in row]
                for row in db.execute("SELECT * FROM %s" % view)]
    assert sorted(rows[1:]) == sorted(expected)
    assert len(rows) == 1 + len(directory[what])
    stdout = subprocess.run([sys.executable, os.path.join(ROOT, "scim_appliance.py"), "export", what,
                             "--format", "csv", "--db", settings.db], capture_output=True, timeout=30, cwd=ROOT)
    assert stdout.returncode == 0 and stdout.stdout == raw   # stdout gives the same bytes
    if what == "users":
        boss = next(row for row in rows if row[1] == "boss@contoso.example")
        assert boss[3] == 'Boss, "The" Zoë'     # quoted and UTF-8, read back intact
        assert boss[7] == "1"


def test_an_empty_directory_exports_as_empty(settings, store):
    for what, columns in (("users", SCIM_USERS_COLUMNS), ("groups", SCIM_GROUPS_COLUMNS)):
        assert json.loads(export(settings.db, what, "json").stdout) == []
        assert export(settings.db, what, "ndjson").stdout == ""
        assert list(csv.reader(io.StringIO(export(settings.db, what, "csv").stdout))) == [columns]


RICH_USER = {
    "schemas": [scim_appliance.URN_USER, ENTERPRISE], "userName": "placeholder", "active": True,
    "displayName": "Some Person With A Longer Name", "title": "Engineer of many things",
    "name": {"givenName": "Some", "familyName": "Person", "formatted": "Some Person"},
    "emails": [{"value": "someone@contoso.example", "type": "work", "primary": True},
               {"value": "someone@home.example", "type": "home"}],
    "addresses": [{"type": "work", "streetAddress": "1 Main Street", "locality": "Springfield",
                   "postalCode": "12345", "country": "US", "primary": True}],
    "phoneNumbers": [{"value": "+1 555 0100", "type": "work"}],
    ENTERPRISE: {"department": "Department of Examples", "employeeNumber": "1", "costCenter": "CC-1",
                 "organization": "Contoso"},
}


def bulk_directory(path, count):
    """`count` users, all members of one group, written in one transaction."""
    document = scim_appliance.canonical_document(scim_appliance.USER, RICH_USER)
    store = scim_appliance.Store(path)
    try:
        now = scim_appliance.utc_now()
        with store.write() as tx:
            group_id = scim_appliance.new_resource_id()
            tx.insert_resource("groups", scim_appliance._row_for(
                scim_appliance.GROUP, group_id, {"displayName": "Everyone"}, now, 1, created=now))
            ids = []
            for number in range(count):
                user_id = scim_appliance.new_resource_id()
                ids.append(user_id)
                tx.insert_resource("users", scim_appliance._row_for(
                    scim_appliance.USER, user_id, dict(document, userName="user%06d@contoso.example" % number),
                    now, 1, created=now))
            tx.add_members(group_id, [(user_id, "User") for user_id in ids])
    finally:
        store.close()


def peak_rss_kib(args):
    """The peak resident set size (KiB) of `python scim_appliance.py ARGS`, run
    as the only child of a fresh interpreter."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", probe, sys.executable, os.path.join(ROOT, "scim_appliance.py")]
                            + list(args), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def test_export_streams_memory_does_not_grow_with_the_directory(tmp_path):
    small, large = 3000, 30000
    peaks = {}
    for count in (small, large):
        path = str(tmp_path / ("dir%d.db" % count))
        bulk_directory(path, count)
        for what, form in (("users", "json"), ("users", "csv"), ("groups", "json")):
            output = str(tmp_path / ("%d.%s.%s" % (count, what, form)))
            peaks[count, what, form] = peak_rss_kib(["export", what, "--format", form, "--db", path,
                                                     "--output", output])
        with open(str(tmp_path / ("%d.users.json" % count)), encoding="utf-8") as handle:
            users = json.load(handle)
        assert len(users) == count and len({u["id"] for u in users}) == count
        assert users[-1]["userName"] == "user%06d@contoso.example" % (count - 1)
        assert users[0]["groups"][0]["display"] == "Everyone"
        with open(str(tmp_path / ("%d.users.csv" % count)), encoding="utf-8") as handle:
            assert sum(1 for _ in handle) == count + 1
        with open(str(tmp_path / ("%d.groups.json" % count)), encoding="utf-8") as handle:
            assert len(json.load(handle)[0]["members"]) == count
        del users
    # The large export's output is ~40 MB of JSON; held in memory it would
    # cost far more than that. Streaming, the peak barely moves.
    assert os.path.getsize(str(tmp_path / ("%d.users.json" % large))) > 30 * 1024 * 1024
    for what, form in (("users", "json"), ("users", "csv"), ("groups", "json")):
        growth = peaks[large, what, form] - peaks[small, what, form]
        assert growth < 15 * 1024, (what, form, peaks)


# -- 7. /healthz ---------------------------------------------------------------------

def test_healthz_answers_without_a_token_on_the_real_server(live_server):
    status, headers, body = healthz(live_server.port)
    assert status == 200 and body == b"ok\n"
    assert headers.get("Cache-Control") == "no-store"
    assert headers.get("Content-Type") == "text/plain; charset=utf-8"
    status, _, body = healthz(live_server.port, "HEAD")
    assert status == 200 and body == b""
    status, headers, _ = healthz(live_server.port, "POST")
    assert status == 405 and headers.get("Allow") == "GET, HEAD"
    # The SCIM endpoints still want a token.
    assert live_server.request("GET", "/Users", token="")[0] == 401
    # A probe is not a write: whether writes succeed is what the last real write found.
    assert query(live_server.db_path, "SELECT checked FROM health") == []


def test_healthz_writes_nothing_and_is_not_counted_in_the_activity_log(wsgi_app, activity, db):
    app = webtest.TestApp(wsgi_app)
    version = db.execute("PRAGMA data_version").fetchone()[0]
    response = app.get("/healthz")
    assert response.status_int == 200 and response.body == b"ok\n"
    assert response.headers["Cache-Control"] == "no-store"
    assert app.head("/healthz").status_int == 200
    response = app.post("/healthz", status=405)
    assert response.headers["Allow"] == "GET, HEAD" and response.body == b""
    assert db.execute("PRAGMA data_version").fetchone()[0] == version   # nobody committed anything

    activity.flush()
    assert db.execute("SELECT count(*) FROM activity").fetchone()[0] == 0
    assert db.execute("SELECT coalesce(sum(requests), 0) FROM request_counts").fetchone()[0] == 0
    # A SCIM request is counted, through the same log.
    app.get("/scim/Users", status=401)
    activity.flush()
    assert db.execute("SELECT coalesce(sum(requests), 0) FROM request_counts").fetchone()[0] == 1


def test_healthz_is_503_while_writes_fail_and_200_after_the_next_write_succeeds(client, wsgi_app, store):
    """It reflects real writes: a write SQLite refuses (here the appliance's
    connection is made query-only) turns it 503 with the reason; the next
    write that commits turns it back. The other faults are in
    test_storage_faults.py."""
    app = webtest.TestApp(wsgi_app)
    conn = store._connection()
    conn.execute("PRAGMA query_only = ON")
    try:
        assert app.get("/healthz").body == b"ok\n"   # nothing has failed yet
        client.post("/Users", {"schemas": [scim_appliance.URN_USER], "userName": "ro@example.com"}, status=503)
        response = app.get("/healthz", status=503)
        assert response.body == b"read-only\n" and response.headers["Cache-Control"] == "no-store"
        assert app.head("/healthz", status=503).body == b""
        assert client.get("/Users").json["totalResults"] == 0   # reads go on
    finally:
        conn.execute("PRAGMA query_only = OFF")
    assert app.get("/healthz", status=503).body == b"read-only\n"   # until a write succeeds
    client.create_user("rw@example.com")
    assert app.get("/healthz").body == b"ok\n"


def test_healthz_is_503_full_below_the_free_space_floor(wsgi_app, store):
    app = webtest.TestApp(wsgi_app)
    store.monitor.min_free_bytes = 1 << 62   # more than any disk has
    assert app.get("/healthz", status=503).body == b"full\n"
    store.monitor.min_free_bytes = 0
    assert app.get("/healthz").body == b"ok\n"


# -- 8. one server per database ----------------------------------------------------------

def test_a_second_server_on_the_same_database_is_refused_until_the_first_stops(live_server, tmp_path):
    port, admin_port = free_ports(2)
    second = run_cli("serve", "--db", live_server.db_path, "--port", str(port),
                     "--admin-port", str(admin_port), "--log-file", str(tmp_path / "second.log"),
                     check=False, timeout=20)
    assert second.returncode != 0
    assert "another scim-appliance is serving" in second.stderr and live_server.db_path in second.stderr, \
        second.stderr
    assert "SCIM endpoint" not in second.stdout
    # The first one is unaffected.
    assert live_server.request("GET", "/Users")[0] == 200
    token = live_server.token
    live_server.stop()

    third = LiveServer(live_server.db_path)
    try:
        status, _, body = third.request("POST", "/Users", {"schemas": [scim_appliance.URN_USER],
                                                           "userName": "after@contoso.example"}, token=token)
        assert status == 201, body
        assert healthz(third.port)[0] == 200
    finally:
        third.stop()
