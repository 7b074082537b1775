"""Storage faults (issue 15): whatever the storage does — a disk that fills,
a filesystem the kernel turns read-only, fsync failing, another process
holding SQLite's write lock — every write gets a clear 503 or succeeds,
reads go on, /healthz tells the truth, no acknowledged write is lost, and
writes succeed again by themselves as soon as the storage takes them.

The first tests force SQLite's failures through a connection stand-in and
run in process. The rest run the real server against real faults: a
size-limited tmpfs, an ext4 image on a loop device mounted with
errors=remount-ro, libfiu's fiu-run and fiu-ctrl (Debian's fiu-utils) and a
second SQLite connection. mount and losetup need root, which .ci/run has.
Each real scenario prints one line of figures (run with -s to see them);
nothing here asserts a duration.
"""

import collections
import errno
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.parse

import pytest
import webtest

import scim_appliance
from conftest import (LiveServer, assert_scim_error, fetch, free_port, healthz, query, run_cli, snapshot,
                      start_live_server, stored_members, wait_for)
from scim_appliance import URN_ERROR, URN_GROUP, URN_PATCH, URN_USER

BASE_URL = "https://scim.example.com/scim"
WRITERS = 8                   # client threads writing at once in the real scenarios


# -- helpers ---------------------------------------------------------------------

class FailingConnection:
    """A Store connection stand-in: the statements named in `failures`
    ({"COMMIT": message, ...}) raise sqlite3.OperationalError(message) once
    each, as SQLite raises them, without reaching SQLite; everything else
    goes to the real connection."""

    def __init__(self, conn, failures):
        self._conn = conn
        self.failures = dict(failures)

    def execute(self, sql, *args):
        message = self.failures.pop(sql.split(None, 1)[0].upper(), None)
        if message is not None:
            raise sqlite3.OperationalError(message)
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def failing_connection(store, failures):
    """(real connection, stand-in): this thread's connection of `store`
    replaced by a FailingConnection wherever the store keeps it."""
    real = store._connection()
    failing = FailingConnection(real, failures)
    store._local.conn = failing
    store._connections[store._connections.index(real)] = failing
    return real, failing


def user_body(user_name, **attributes):
    body = {"schemas": [URN_USER], "userName": user_name}
    body.update(attributes)
    return body


def add_member_body(user_id):
    return {"schemas": [URN_PATCH], "Operations": [{"op": "Add", "path": "members", "value": [{"value": user_id}]}]}


def report(scenario, **figures):
    print("\n[storage faults] %s: %s" % (scenario, ", ".join("%s=%s" % kv for kv in figures.items())))


def assert_refused_clearly(status, headers, body, words):
    """A write refused for a storage reason: 503, a SCIM Error (RFC 7644
    §3.12) naming the cause in `words`, and Retry-After."""
    assert status == 503, (status, body)
    assert headers.get("Content-Type", "").startswith("application/scim+json")
    assert body["schemas"] == [URN_ERROR] and body["status"] == "503" and "scimType" not in body, body
    assert words in body["detail"], body
    assert int(headers["Retry-After"]) > 0


def tool(name):
    """A system command's path, root's sbin directories included."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def sh(*command):
    """Run a system command (mount, mkfs.ext4, fiu-ctrl ...); fail with its output."""
    result = subprocess.run((tool(command[0]),) + command[1:], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (command, result.stdout, result.stderr)
    return result.stdout


class Writers:
    """Client threads POSTing users (and adding them to `group_id`, when
    given) on a live server, each until `stop(thread's outcomes)` says so.
    Every outcome is kept: (what, key, status, headers, body)."""

    def __init__(self, server, prefix, stop, group_id=None, threads=WRITERS, extra=None):
        self.server, self.prefix, self.stop, self.group_id = server, prefix, stop, group_id
        self.extra = extra or {}
        self.outcomes = []
        self.first_success = None   # time.monotonic() when the first write was acknowledged
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def run(self):
        for thread in self._threads:
            thread.start()
        for thread in self._threads:
            thread.join(timeout=300)
        assert not any(thread.is_alive() for thread in self._threads)
        return self

    def _run(self, number):
        mine = []
        sequence = 0
        while not self.stop(mine):
            name = "%s-%d-%d@example.com" % (self.prefix, number, sequence)
            sequence += 1
            status, headers, body = self.server.request("POST", "/Users", user_body(name, **self.extra))
            mine.append(("user", name, status, headers, body))
            if status == 201 and self.first_success is None:
                with self._lock:
                    self.first_success = self.first_success or time.monotonic()
            if status == 201 and self.group_id is not None:
                status, headers, body = self.server.request("PATCH", "/Groups/" + self.group_id,
                                                            add_member_body(body["id"]))
                mine.append(("member", name, status, headers, body))
        with self._lock:
            self.outcomes.extend(mine)

    def statuses(self):
        return collections.Counter(status for _, _, status, _, _ in self.outcomes)

    def acknowledged(self, what="user"):
        return {key for kind, key, status, _, _ in self.outcomes if kind == what and status in (200, 201, 204)}

    def refused(self):
        return [(status, headers, body) for _, _, status, headers, body in self.outcomes
                if status not in (200, 201, 204)]


def refused_in_a_row(count):
    """A Writers stop rule: after `count` refusals in a row (or 600 writes)."""
    def stop(mine):
        tail = [status for kind, _, status, _, _ in mine if kind == "user"][-count:]
        return len(mine) >= 600 or (len(tail) == count and all(status == 503 for status in tail))
    return stop


def writes(count):
    """A Writers stop rule: after `count` user POSTs."""
    return lambda mine: sum(kind == "user" for kind, *_ in mine) >= count


def assert_reads_work(server, user_name):
    """A user found by Entra's lookup and read by id, and the list endpoint: 200."""
    status, _, listing = server.request("GET", "/Users?filter=" + urllib.parse.quote('userName eq "%s"'
                                                                                      % user_name))
    assert status == 200 and listing["totalResults"] == 1, listing
    status, _, user = server.request("GET", "/Users/" + listing["Resources"][0]["id"])
    assert status == 200 and user["userName"] == user_name
    assert server.request("GET", "/Users?count=5")[0] == 200


def assert_everything_acknowledged_is_stored(db_path, acknowledged_users, group_id=None, acknowledged_members=()):
    """After a restart: the file is sound and holds every acknowledged user
    and member (a refused write may or may not have reached the file)."""
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]
    stored = {row[0] for row in query(db_path, "SELECT user_name FROM users")}
    missing = set(acknowledged_users) - stored
    assert not missing, sorted(missing)[:5]
    if group_id is not None:
        members = {row[0] for row in query(db_path, "SELECT u.user_name FROM members m JOIN users u "
                                                    "ON u.id = m.member_id WHERE m.group_id = ?", (group_id,))}
        assert not set(acknowledged_members) - members
    return stored


def metrics(server):
    """{(name, labels text): value} of the admin listener's /metrics."""
    status, _, text = fetch("http://127.0.0.1:%d/metrics" % server.admin_port)
    assert status == 200
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels] = float(value)
    return samples


def restart(server, extra_args=()):
    """Stop `server` (SIGTERM) and start a new one on its database."""
    output = server.stop()
    assert server.process.returncode == 0, output
    again = LiveServer(server.db_path, list(extra_args))
    again.token = server.token
    return again, output


# -- 1. every transaction ends (unit) ---------------------------------------------------

def test_a_failed_commit_is_rolled_back_and_the_next_write_on_that_connection_succeeds(store, db):
    """SQLite may leave the transaction open when COMMIT fails (SQLITE_FULL,
    SQLITE_IOERR, SQLITE_BUSY); the store rolls it back, so the connection's
    next BEGIN works."""
    real, failing = failing_connection(store, {"COMMIT": "disk I/O error"})
    with pytest.raises(scim_appliance.StorageFault) as raised:
        scim_appliance.create_resource(store, scim_appliance.USER, user_body("lost@example.com"), BASE_URL)
    assert (raised.value.status, raised.value.kind) == (503, "io-error")
    assert raised.value.detail.startswith("disk I/O error") and raised.value.retry_after > 0
    assert not real.in_transaction and not store._write_lock.locked()
    assert store.monitor.condition == "io-error"
    scim_appliance.create_resource(store, scim_appliance.USER, user_body("kept@example.com"), BASE_URL)
    assert store._local.conn is failing   # the same connection, working
    assert [row[0] for row in db.execute("SELECT user_name FROM users")] == ["kept@example.com"]
    assert store.monitor.condition is None


def test_a_connection_whose_rollback_fails_too_is_discarded_and_replaced(store, db):
    real, failing = failing_connection(store, {"COMMIT": "disk I/O error", "ROLLBACK": "disk I/O error"})
    with pytest.raises(scim_appliance.StorageFault):
        scim_appliance.create_resource(store, scim_appliance.USER, user_body("lost@example.com"), BASE_URL)
    assert store._local.conn is None and failing not in store._connections
    with pytest.raises(sqlite3.ProgrammingError):
        real.execute("SELECT 1")   # closed: its open transaction went with it
    scim_appliance.create_resource(store, scim_appliance.USER, user_body("kept@example.com"), BASE_URL)
    assert store._local.conn is not None and store._local.conn is not real
    assert [row[0] for row in db.execute("SELECT user_name FROM users")] == ["kept@example.com"]


def test_a_begin_refused_as_locked_is_a_503_with_retry_after_and_changes_nothing(store, db):
    failing_connection(store, {"BEGIN": "database is locked"})
    with pytest.raises(scim_appliance.StorageFault) as raised:
        scim_appliance.create_token(store, "blocked")
    assert raised.value.kind == "locked" and raised.value.retry_after > 0
    assert "locked by another process" in raised.value.detail
    assert db.execute("SELECT count(*) FROM tokens").fetchone()[0] == 0
    scim_appliance.create_token(store, "later")
    assert [row[0] for row in db.execute("SELECT name FROM tokens")] == ["later"]


def test_a_read_snapshot_that_fails_ends_and_the_next_read_works(store):
    real, _ = failing_connection(store, {"COMMIT": "disk I/O error"})
    with pytest.raises(scim_appliance.StorageFault) as raised:
        with store.read() as tx:
            tx.count("users", "1", ())
    assert raised.value.kind == "io-error" and not real.in_transaction
    assert store.monitor.condition is None                 # a read sets no write condition ...
    assert store.monitor.errors["io-error"] == 1           # ... but is counted
    with store.read() as tx:
        assert tx.count("users", "1", ()) == 0


def test_a_write_waits_for_another_process_s_lock_only_as_long_as_the_bound(tmp_path):
    path = str(tmp_path / "bounded.db")
    store = scim_appliance.Store(path, lock_timeout=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(scim_appliance.StorageFault) as raised:
            scim_appliance.create_token(store, "waiting")
        assert raised.value.kind == "locked" and "longer than 0.2 s" in raised.value.detail
        holder.execute("COMMIT")
        scim_appliance.create_token(store, "after")
        assert [row[0] for row in query(path, "SELECT name FROM tokens")] == ["after"]
    finally:
        holder.close()
        store.close()


def test_the_probe_clears_the_condition_once_a_write_commits_and_folds_the_wal_back(store, tmp_path):
    """While writes fail, the background probe writes the health row: its
    commit clears the condition, and a PASSIVE checkpoint then copies the
    WAL into the database file (so a WAL that grew while checkpoints failed
    is cut back to journal_size_limit at the next write)."""
    assert store._connection().execute("PRAGMA journal_size_limit").fetchone()[0] == scim_appliance.WAL_SIZE_LIMIT
    scim_appliance.create_token(store, "before")
    store.probe()   # writes succeed: nothing to do
    assert query(store.path, "SELECT count(*) FROM health") == [(0,)]
    store.monitor.failed("io-error")
    store.probe()
    assert store.monitor.condition is None
    alone = str(tmp_path / "db-file-alone.db")   # the database file without its -wal
    shutil.copyfile(store.path, alone)
    assert query(alone, "SELECT count(*) FROM health") == [(1,)]
    assert query(alone, "SELECT name FROM tokens") == [("before",)]


def test_after_a_full_disk_no_write_clears_it_until_space_comes_back(store, monkeypatch):
    """A small write can still fit in pages SQLite's WAL already holds on a
    full disk: until FULL_HEADROOM_BYTES are free, no success clears "full",
    and the probe does not even try."""
    store.monitor.failed("full")
    monkeypatch.setattr(scim_appliance, "FULL_HEADROOM_BYTES", 1 << 62)   # more than the volume has free
    store.probe()
    scim_appliance.create_token(store, "small")
    assert store.monitor.condition == "full"
    assert query(store.path, "SELECT count(*) FROM health") == [(0,)]
    monkeypatch.setattr(scim_appliance, "FULL_HEADROOM_BYTES", 1024)
    store.probe()
    assert store.monitor.condition is None and query(store.path, "SELECT count(*) FROM health") == [(1,)]


def test_a_write_inside_a_write_is_refused_at_once(store):
    """The write lock is not reentrant: a nested write says so instead of
    waiting for itself (and the outer one is rolled back)."""
    with pytest.raises(RuntimeError, match="not reentrant"):
        with store.write() as tx:
            tx.insert_token("outer", "digest-outer", scim_appliance.utc_now())
            with store.write():
                pass
    assert not store.read_once().token_names()


def test_a_cli_command_the_storage_refuses_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "cli.db")
    scim_appliance.Store(path).close()

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(scim_appliance.Transaction, "insert_token", full)
    assert scim_appliance.main(["token", "create", "--name", "entra", "--db", path]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "scim-appliance: writes are failing: the appliance's disk is full: nothing was changed; retry later\n"
        "scim-appliance: the appliance's disk is full: nothing was changed; retry later\n")


@pytest.mark.parametrize("args, env, words", [
    (("--lock-timeout", "0.1"), {}, "--lock-timeout must be at least 0.5"),
    (("--lock-timeout", "soon"), {}, "--lock-timeout"),
    ((), {"SCIM_APPLIANCE_LOCK_TIMEOUT": "-3"}, "SCIM_APPLIANCE_LOCK_TIMEOUT"),
    (("--min-free-mb", "-1"), {}, "--min-free-mb must be at least 0"),
])
def test_storage_settings_out_of_range_are_refused_before_anything_starts(tmp_path, args, env, words):
    path = str(tmp_path / "never.db")
    result = run_cli("serve", "--db", path, "--port", str(free_port()), *args, env=env, check=False)
    assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "SCIM endpoint" not in result.stdout and not os.path.exists(path)


def test_the_storage_errors_sqlite_raises_are_told_apart():
    kinds = {message: scim_appliance.storage_fault_kind(sqlite3.OperationalError(message)) for message in (
        "database or disk is full", "disk I/O error", "attempt to write a readonly database",
        "database is locked", "database disk image is malformed", "file is not a database",
        "no such table: users")}
    assert kinds == {"database or disk is full": "full", "disk I/O error": "io-error",
                     "attempt to write a readonly database": "read-only", "database is locked": "locked",
                     "database disk image is malformed": "corrupt", "file is not a database": "corrupt",
                     "no such table: users": None}
    assert scim_appliance.storage_fault_kind(sqlite3.IntegrityError("UNIQUE constraint failed")) is None
    # From SQLite itself (Python 3.11+ carries the result code).
    conn = sqlite3.connect(":memory:")
    conn.execute("PRAGMA query_only = ON")
    with pytest.raises(sqlite3.OperationalError) as raised:
        conn.execute("CREATE TABLE t (x)")
    assert scim_appliance.storage_fault_kind(raised.value) == "read-only"


# -- 2. clear errors, reads, /healthz, the log (in process) ----------------------------

def test_refused_writes_get_a_clear_503_reads_go_on_and_the_next_good_write_heals(client, wsgi_app, store,
                                                                                activity, db, capsys):
    """SQLite refuses every write of the appliance's connection (query-only):
    each kind of write answers 503 with the cause and Retry-After and changes
    nothing; reads answer as usual; the log says it once; the activity log
    keeps its entries; the next write that commits ends it all."""
    user = client.create_user("ann@example.com")
    group = client.create_group("Team")
    capsys.readouterr()
    before = snapshot(db)
    conn = store._connection()
    conn.execute("PRAGMA query_only = ON")
    refused = [
        ("POST", "/Users", user_body("bob@example.com")),
        ("PUT", "/Users/" + user["id"], user_body("ann@example.com", displayName="Ann")),
        ("PATCH", "/Users/" + user["id"], {"schemas": [URN_PATCH], "Operations": [
            {"op": "replace", "path": "active", "value": False}]}),
        ("PATCH", "/Groups/" + group["id"], add_member_body(user["id"])),
        ("DELETE", "/Users/" + user["id"], None),
        ("POST", "/Groups", {"schemas": [URN_GROUP], "displayName": "Other"}),
    ]
    try:
        for method, path, body in refused:
            response = client.request(method, path, body, status="*")
            detail = assert_scim_error(response, 503)["detail"]
            assert detail.startswith("the database file is read-only") and "nothing was changed" in detail
            assert response.headers["Retry-After"] == "30"
        assert snapshot(db) == before
        assert client.get("/Users/" + user["id"]).json["userName"] == "ann@example.com"
        assert client.get("/Users?filter=" + urllib.parse.quote('userName eq "ann@example.com"')).json[
            "totalResults"] == 1
        assert client.get("/Groups/" + group["id"]).json["displayName"] == "Team"
        assert webtest.TestApp(wsgi_app).get("/healthz", status=503).body == b"read-only\n"
        assert activity.flush() is False   # kept for later
    finally:
        conn.execute("PRAGMA query_only = OFF")
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "writes" in line] == [
        "scim-appliance: writes are failing: the database file is read-only (its filesystem was remounted "
        "read-only, or its permissions changed): nothing was changed; retry later"]
    client.create_user("bob@example.com")
    assert webtest.TestApp(wsgi_app).get("/healthz").body == b"ok\n"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scim-appliance: writes succeed again, after ")
    assert activity.flush() is True
    failed = db.execute("SELECT method, status, detail FROM activity WHERE status = 503").fetchall()
    assert [(method, status) for method, status, _ in failed] == [(m, 503) for m, _, _ in refused]
    assert all(detail.startswith("the database file is read-only") for _, _, detail in failed)
    assert stored_members(db, group["id"]) == set()


def test_below_the_free_space_floor_writes_are_refused_before_sqlite_is_asked(client, wsgi_app, store, db):
    version = db.execute("PRAGMA data_version").fetchone()[0]
    store.monitor.min_free_bytes = 1 << 62   # more than any disk has
    response = client.post("/Users", user_body("ann@example.com"), status=503)
    detail = assert_scim_error(response, 503)["detail"]
    assert detail.startswith("the appliance's disk is nearly full") and "--min-free-mb" in detail
    assert response.headers["Retry-After"] == "30"
    assert webtest.TestApp(wsgi_app).get("/healthz", status=503).body == b"full\n"
    assert db.execute("PRAGMA data_version").fetchone()[0] == version   # nothing reached the file
    store.monitor.min_free_bytes = 0
    client.create_user("ann@example.com")
    assert webtest.TestApp(wsgi_app).get("/healthz").body == b"ok\n"


def test_a_read_the_storage_fails_is_a_503_too_never_a_500(client, monkeypatch, capsys):
    def failing(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr(scim_appliance.Transaction, "select", failing)
    response = client.get("/Users?filter=" + urllib.parse.quote('userName eq "x"'), status=503)
    assert assert_scim_error(response, 503)["detail"] == (
        "disk I/O error: the request could not be answered; retry later")
    assert "Traceback" not in capsys.readouterr().err


def test_the_activity_log_keeps_what_it_cannot_write_drops_the_oldest_and_counts_them(store, db, monkeypatch):
    monkeypatch.setattr(scim_appliance, "ACTIVITY_MAX_PENDING", 5)
    log = scim_appliance.ActivityLog(store)
    conn = store._connection()
    conn.execute("PRAGMA query_only = ON")
    try:
        for number in range(4):
            log.record(201, ("entra", "POST", "User", "id-%d" % number, "u%d" % number, "created", 201, None, None))
        assert log.flush() is False and log.dropped == 0
        for number in range(4, 8):
            log.record(201, ("entra", "POST", "User", "id-%d" % number, "u%d" % number, "created", 201, None, None))
        assert log.flush() is False and log.dropped == 3
    finally:
        conn.execute("PRAGMA query_only = OFF")
    assert log.flush() is True
    assert [row[0] for row in db.execute("SELECT resource_name FROM activity ORDER BY id")] == [
        "u3", "u4", "u5", "u6", "u7"]
    assert db.execute("SELECT sum(requests) FROM request_counts").fetchone()[0] == 8


class RawStream:
    """An unbuffered binary file stand-in: writes at most `room` more bytes,
    then fails with ENOSPC, as a full disk does."""

    def __init__(self, room):
        self.room = room
        self.data = b""

    def write(self, view):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = bytes(view[:self.room])
        self.room -= len(taken)
        self.data += taken
        return len(taken)


def test_the_access_log_drops_what_a_full_disk_refuses_says_so_twice_and_keeps_lines_whole(capfd):
    stream = RawStream(room=20)
    log = scim_appliance.AccessLog("plain", stream)
    environ = {"REMOTE_ADDR": "127.0.0.1", "REQUEST_METHOD": "GET", "PATH_INFO": "/scim/Users"}
    for _ in range(3):
        log.record(environ, 200, 0.001)
    log.flush()                     # 20 bytes of the first line get out, then ENOSPC
    log.record(environ, 200, 0.001)
    log.flush()
    assert log.dropped == 4
    stream.room = 10 ** 6           # space again
    log.record(environ, 201, 0.002)
    log.flush()
    lines = stream.data.decode().split("\n")
    assert len(lines[0]) == 20 and lines[1].endswith('"GET /scim/Users" 201 2.0ms token=-') and lines[2] == ""
    said = [line for line in capfd.readouterr().err.splitlines() if "access log" in line]
    assert len(said) == 2 and "No space left on device" in said[0] and "4 lines dropped" in said[1]


# -- 3. a real full disk -----------------------------------------------------------------

@pytest.fixture
def volume(tmp_path):
    """A 4 MB tmpfs of its own for the database (root: .ci/run runs as root)."""
    path = tmp_path / "volume"
    path.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path))
    yield path
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def fill(directory, leave):
    """A filler file in `directory` that leaves `leave` bytes free."""
    free = shutil.disk_usage(directory).free
    filler = os.path.join(directory, "filler")
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("threads", ["0", "4"])
def test_a_full_disk_refuses_writes_clearly_keeps_reads_and_heals_once_space_is_freed(volume, threads):
    db_path = str(volume / "scim.db")
    # The floor off, so that SQLite itself runs into ENOSPC; the access log
    # on the same disk, so that it runs out too.
    server = start_live_server(db_path, ["--threads", threads, "--min-free-mb", "0"])
    try:
        status, _, group = server.request("POST", "/Groups", {"schemas": [URN_GROUP], "displayName": "All"})
        assert status == 201
        filler = fill(str(volume), leave=768 * 1024)
        full = Writers(server, "full", refused_in_a_row(3), group_id=group["id"],
                       extra={"displayName": "x" * 1000}).run()
        statuses = full.statuses()
        assert set(statuses) <= {201, 204, 503} and statuses[503] >= WRITERS, statuses
        for status, headers, body in full.refused():
            assert_refused_clearly(status, headers, body, "the appliance's disk is full")
        acknowledged = full.acknowledged()
        assert acknowledged, statuses
        assert_reads_work(server, sorted(acknowledged)[0])
        assert server.request("GET", "/Groups/" + group["id"])[0] == 200
        assert healthz(server.port)[0::2] == (503, b"full\n")
        samples = metrics(server)
        assert samples['scim_storage_errors_total{kind="full"}'] >= statuses[503]
        assert samples["scim_storage_writable"] == 0

        os.remove(filler)
        freed = time.monotonic()
        healed = Writers(server, "healed", writes(5), group_id=group["id"]).run()
        first_ok = healed.first_success - freed
        assert healed.statuses() == {201: 5 * WRITERS, 204: 5 * WRITERS}, healed.statuses()
        assert healthz(server.port)[0::2] == (200, b"ok\n")
        server, output = restart(server, ["--threads", threads, "--min-free-mb", "0"])
        assert "writes are failing: the appliance's disk is full" in output
        assert "writes succeed again" in output
        stored = assert_everything_acknowledged_is_stored(
            db_path, acknowledged | healed.acknowledged(), group["id"],
            full.acknowledged("member") | healed.acknowledged("member"))
        assert server.request("POST", "/Users", user_body("after-restart@example.com"))[0] == 201
    finally:
        server.stop()
    report("disk full, --threads %s" % threads, statuses_while_full=dict(statuses),
           acknowledged=len(acknowledged), found=len(acknowledged & stored),
           seconds_from_freeing_space_to_first_201=round(first_ok, 3))


def test_below_the_floor_a_real_server_refuses_writes_up_front_and_heals(volume):
    db_path = str(volume / "scim.db")
    server = start_live_server(db_path, ["--min-free-mb", "2"])
    try:
        assert server.request("POST", "/Users", user_body("before@example.com"))[0] == 201
        filler = fill(str(volume), leave=1024 * 1024)
        status, headers, body = server.request("POST", "/Users", user_body("refused@example.com"))
        assert_refused_clearly(status, headers, body, "the appliance's disk is nearly full")
        assert "below the 2 MB floor" in body["detail"]
        assert healthz(server.port)[0::2] == (503, b"full\n")
        assert_reads_work(server, "before@example.com")
        os.remove(filler)
        assert server.request("POST", "/Users", user_body("after@example.com"))[0] == 201
        assert healthz(server.port)[0::2] == (200, b"ok\n")
    finally:
        server.stop()
    assert {row[0] for row in query(db_path, "SELECT user_name FROM users")} == {
        "before@example.com", "after@example.com"}


# -- 4. a filesystem the kernel turns read-only ---------------------------------------------

@pytest.fixture
def ext4_volume(tmp_path):
    """(image, mount point, loop device name): a 32 MB ext4 image on a loop
    device, mounted with errors=remount-ro, as Debian mounts its root."""
    image, mount_point = str(tmp_path / "ext4.img"), tmp_path / "ext4"
    mount_point.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(32 * 1024 * 1024)
    sh("mkfs.ext4", "-q", "-F", image)
    sh("mount", "-o", "loop,errors=remount-ro", image, str(mount_point))
    device = next(line.split()[0] for line in open("/proc/mounts") if line.split()[1] == str(mount_point))
    yield image, mount_point, os.path.basename(device)
    subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True)


def test_a_filesystem_forced_read_only_refuses_writes_clearly_keeps_reads_and_loses_nothing(ext4_volume):
    """The kernel switches the filesystem to read-only under the running
    server (ext4's errors=remount-ro, set off through its trigger_fs_error
    switch). Writes get a clear 503 naming it, reads and /healthz answer,
    and after the admin's fix — unmount, fsck, mount; Linux refuses to make
    a forced read-only ext4 writable in place, and refuses `mount -o
    remount,ro` of any filesystem while SQLite holds files on it open for
    writing — every acknowledged write is there."""
    image, mount_point, device = ext4_volume
    db_path = str(mount_point / "scim.db")
    server = start_live_server(db_path, ["--min-free-mb", "1"])   # the image is smaller than the default floor
    try:
        status, _, group = server.request("POST", "/Groups", {"schemas": [URN_GROUP], "displayName": "All"})
        assert status == 201, group
        before = Writers(server, "before", writes(3), group_id=group["id"]).run()
        assert before.statuses() == {201: 3 * WRITERS, 204: 3 * WRITERS}
        with open("/sys/fs/ext4/%s/trigger_fs_error" % device, "w") as switch:
            switch.write("scim-appliance storage fault test\n")
        during = Writers(server, "during", writes(2), group_id=group["id"]).run()
        assert during.statuses() == {503: 2 * WRITERS}, during.statuses()
        for status, headers, body in during.refused():
            assert_refused_clearly(status, headers, body, "the database file is read-only")
        user_id = server.request("GET", "/Users?count=1")[2]["Resources"][0]["id"]
        status, headers, body = server.request("PATCH", "/Users/" + user_id, {"schemas": [URN_PATCH], "Operations": [
            {"op": "replace", "path": "active", "value": False}]})
        assert_refused_clearly(status, headers, body, "read-only")
        assert_reads_work(server, sorted(before.acknowledged())[0])
        assert healthz(server.port)[0::2] == (503, b"read-only\n")
        output = server.stop()
        assert server.process.returncode == 0 and "writes are failing: the database file is read-only" in output
    finally:
        server.stop()
    sh("umount", str(mount_point))
    fsck = subprocess.run([tool("fsck.ext4"), "-f", "-y", image], capture_output=True, text=True, timeout=120)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr   # 1: errors corrected
    sh("mount", "-o", "loop,errors=remount-ro", image, str(mount_point))
    assert_everything_acknowledged_is_stored(db_path, before.acknowledged(), group["id"],
                                             before.acknowledged("member"))
    again = LiveServer(db_path, ["--min-free-mb", "1"])
    again.token = server.token
    try:
        assert again.request("POST", "/Users", user_body("after@example.com"))[0] == 201
        assert healthz(again.port)[0::2] == (200, b"ok\n")
    finally:
        again.stop()
    report("ext4 forced read-only", acknowledged=len(before.acknowledged()),
           statuses_while_read_only=dict(during.statuses()))


# -- 5. injected I/O errors (libfiu) ------------------------------------------------------------

def fiu_ctrl(server, command):
    sh("fiu-ctrl", "-c", command, str(server.process.pid))


@pytest.mark.parametrize("threads", ["0", "4"])
def test_injected_fsync_errors_never_get_a_500_lose_no_acknowledged_write_and_heal(tmp_path, threads):
    """fsync and fdatasync fail with EIO at random (libfiu's posix/io/sync
    points) during a burst of creates and member PATCHes: each write is
    acknowledged or refused with 503 "disk I/O error", never 500; every
    acknowledged write is in the database afterwards; once the faults stop,
    every write succeeds again without a restart."""
    db_path = str(tmp_path / "fiu.db")
    server = start_live_server(db_path, ["--threads", threads], wrapper=["fiu-run", "-x"])
    try:
        status, _, group = server.request("POST", "/Groups", {"schemas": [URN_GROUP], "displayName": "All"})
        assert status == 201
        fiu_ctrl(server, "enable_random name=posix/io/sync/*,probability=0.3")
        try:
            faulty = Writers(server, "faulty", writes(15), group_id=group["id"]).run()
        finally:
            fiu_ctrl(server, "disable name=posix/io/sync/*")
        statuses = faulty.statuses()
        assert set(statuses) <= {201, 204, 503} and statuses[503] > 0 and statuses[201] > 0, statuses
        for status, headers, body in faulty.refused():
            assert_refused_clearly(status, headers, body, "disk I/O error")
        healed = Writers(server, "healed", writes(3), group_id=group["id"]).run()
        assert healed.statuses() == {201: 3 * WRITERS, 204: 3 * WRITERS}, healed.statuses()
        assert wait_for(lambda: healthz(server.port)[0::2] == (200, b"ok\n"), what="/healthz 200")
        server, output = restart(server, ["--threads", threads])
        assert "writes are failing: disk I/O error" in output and "Traceback" not in output
        acknowledged = faulty.acknowledged() | healed.acknowledged()
        stored = assert_everything_acknowledged_is_stored(
            db_path, acknowledged, group["id"], faulty.acknowledged("member") | healed.acknowledged("member"))
    finally:
        server.stop()
    report("fsync EIO at p=0.3, --threads %s" % threads, statuses=dict(statuses),
           acknowledged=len(acknowledged), found=len(acknowledged & stored))


# -- 6. a lock held by another process ------------------------------------------------------------

@pytest.mark.parametrize("threads", ["0", "4"])
def test_a_lock_held_by_another_process_holds_up_no_read_and_the_writes_finish_after_it(tmp_path, threads):
    """While an sqlite3 connection holds BEGIN IMMEDIATE, writes wait for it
    (the bound here is far away) and lookups, /healthz and the admin page go
    on answering: every one of them completes while the writes are still
    waiting. Then the lock goes and every write commits."""
    db_path = str(tmp_path / "locked.db")
    server = start_live_server(db_path, ["--threads", threads, "--lock-timeout", "120"])
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        assert server.request("POST", "/Users", user_body("known@example.com"))[0] == 201
        holder.execute("BEGIN IMMEDIATE")
        waiting = Writers(server, "waiting", writes(1), threads=4)
        runner = threading.Thread(target=waiting.run, daemon=True)
        runner.start()
        worst, lookups, started = 0.0, 0, time.monotonic()
        while lookups < 40 or time.monotonic() - started < 2:
            began = time.monotonic()
            status, _, found = server.request("GET", "/Users?filter=" + urllib.parse.quote(
                'userName eq "known@example.com"'))
            worst = max(worst, time.monotonic() - began)
            assert status == 200 and found["totalResults"] == 1
            assert_reads_work(server, "known@example.com")
            assert healthz(server.port)[0] in (200, 503)   # 503 "locked" once a write has waited a second
            lookups += 1
        assert fetch("http://127.0.0.1:%d/login" % server.admin_port)[0] == 200
        assert runner.is_alive() and waiting.outcomes == []   # the writes still wait
        holder.execute("COMMIT")
        runner.join(timeout=120)
        assert waiting.statuses() == {201: 4}
        assert wait_for(lambda: healthz(server.port)[0::2] == (200, b"ok\n"), what="/healthz 200")
    finally:
        holder.close()
        server.stop()
    report("lock held by another process, --threads %s" % threads, lookups_while_held=lookups,
           worst_lookup_ms=round(worst * 1000, 1))


@pytest.mark.parametrize("threads", ["0", "4"])
def test_a_lock_held_longer_than_the_bound_gets_503_with_retry_after_never_500(tmp_path, threads):
    db_path = str(tmp_path / "bound.db")
    server = start_live_server(db_path, ["--threads", threads, "--lock-timeout", "1"])
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        status, _, user = server.request("POST", "/Users", user_body("known@example.com"))
        assert status == 201
        holder.execute("BEGIN IMMEDIATE")
        blocked = Writers(server, "blocked", writes(1), threads=3).run()
        status, headers, body = server.request("PATCH", "/Users/" + user["id"], {
            "schemas": [URN_PATCH], "Operations": [{"op": "replace", "path": "active", "value": False}]})
        for status, headers, body in blocked.refused() + [(status, headers, body)]:
            assert_refused_clearly(status, headers, body, "locked by another process")
            assert "longer than 1 s" in body["detail"]
        assert len(blocked.refused()) == 3
        assert_reads_work(server, "known@example.com")
        assert healthz(server.port)[0::2] == (503, b"locked\n")
        holder.execute("ROLLBACK")
        assert wait_for(lambda: healthz(server.port)[0::2] == (200, b"ok\n"), what="/healthz 200")
        assert server.request("POST", "/Users", user_body("after@example.com"))[0] == 201
    finally:
        holder.close()
        server.stop()
    assert {row[0] for row in query(db_path, "SELECT user_name FROM users")} == {
        "known@example.com", "after@example.com"}
