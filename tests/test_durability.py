"""Durability (issue 3, items 1-3): no acknowledged write is lost when the
server is killed, a damaged database is refused untouched, and the
`--durability full|normal` setting does what it says.

The kill -9 harness (item 1) is the slow test here: it starts the real
server about 20 times on one database file, so it takes ~30-60 s on 2 cores.
Run it alone, with its figures shown, with
`python -m pytest tests/test_durability.py -s -k kill`.
"""

import hashlib
import http.client
import json
import os
import random
import re
import shutil
import sqlite3
import threading
import time

import pytest

import scim_appliance
from conftest import LiveServer, free_port, run_cli
from scim_appliance import URN_ENTERPRISE, URN_GROUP, URN_PATCH, URN_USER

BASE_URL = "https://scim.example.com/scim"


# -- helpers ---------------------------------------------------------------------

def file_digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def wal_bytes(path):
    """How many bytes the -wal file next to `path` holds (0 if there is none)."""
    wal = path + "-wal"
    return os.path.getsize(wal) if os.path.exists(wal) else 0


def quick_check(path):
    """`PRAGMA quick_check` on a read-only connection: ["ok"] or the complaints."""
    try:
        conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
        try:
            return [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return [str(exc)]


def user_body(user_name, number):
    return {
        "schemas": [URN_USER, URN_ENTERPRISE],
        "userName": user_name,
        "displayName": "Crash Test %s" % number,
        "emails": [{"value": user_name, "type": "work", "primary": True}],
        URN_ENTERPRISE: {"employeeNumber": "E%06d" % number},
    }


def add_member_body(user_id):
    return {"schemas": [URN_PATCH],
            "Operations": [{"op": "Add", "path": "members", "value": [{"value": user_id}]}]}


# Transport failures: the server died under the request (refused, reset,
# closed mid-response). Such a request was never acknowledged.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)


# -- 1. kill -9 harness ------------------------------------------------------------

ROUNDS = 20                 # server starts, each ended by SIGKILL
WRITERS = 4                 # client threads per round
KILL_DELAY = (0.2, 1.5)     # seconds of writing (after the round's first acknowledgement)
ROUND_TIMEOUT = 60          # a round that sees no acknowledgement in this long fails


class CrashRound:
    """One server life: writer threads over real HTTP until the server is killed."""

    def __init__(self, server, group_id, round_number, acknowledged_users, acknowledged_members):
        self.server = server
        self.group_id = group_id
        self.round_number = round_number
        self.users = acknowledged_users          # id -> body sent, shared across rounds
        self.members = acknowledged_members      # set of user ids, shared across rounds
        self.lock = threading.Lock()
        self.first_ack = threading.Event()
        self.killed = threading.Event()
        self.stop = threading.Event()
        self.unexpected = []                     # non-2xx answers, transport errors before the kill
        self.acks = 0

    def _call(self, method, path, body):
        """The status, or None when the request died with the server."""
        try:
            status, _, answer = self.server.request(method, path, body)
        except TRANSPORT_ERRORS as exc:
            if not self.killed.is_set():
                with self.lock:
                    self.unexpected.append("%s %s before the kill: %r" % (method, path, exc))
            return None, None
        if not 200 <= status < 300:
            with self.lock:
                self.unexpected.append("%s %s -> %s %s" % (method, path, status, answer))
            return None, None
        return status, answer

    def writer(self, writer_number):
        sequence = 0
        while not self.stop.is_set():
            sequence += 1
            number = (self.round_number * 100 + writer_number) * 100000 + sequence
            body = user_body("r%d-w%d-%d@crash.example.com" % (self.round_number, writer_number, sequence),
                             number)
            status, created = self._call("POST", "/Users", body)
            if status is None:
                return
            with self.lock:
                self.users[created["id"]] = body
                self.acks += 1
            self.first_ack.set()
            status, _ = self._call("PATCH", "/Groups/" + self.group_id, add_member_body(created["id"]))
            if status is None:
                return
            with self.lock:
                self.members.add(created["id"])
                self.acks += 1

    def run(self, delay):
        threads = [threading.Thread(target=self.writer, args=(n,), daemon=True) for n in range(WRITERS)]
        for thread in threads:
            thread.start()
        try:
            started = self.first_ack.wait(ROUND_TIMEOUT)
            if started:
                time.sleep(delay)
        finally:
            self.killed.set()
            self.server.process.kill()          # SIGKILL: no graceful shutdown
            self.server.process.wait(timeout=30)
            self.stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a writer hung after the kill"
        return started


def check_database(path, group_id, users, members):
    """Open the crashed database with sqlite3 (which runs WAL recovery) and
    compare it with everything acknowledged so far. Returns {what: problem},
    `what` being ("user", id), ("member", id), ("dangling", id), ("integrity",)
    or ("group",)."""
    problems = {}
    conn = sqlite3.connect(path, timeout=30)
    try:
        integrity = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
        if integrity != ["ok"]:
            problems["integrity",] = "integrity_check: %s" % integrity[:5]
        stored = {row[0]: (row[1], json.loads(row[2]))
                  for row in conn.execute("SELECT id, user_name, document FROM users")}
        stored_members = {row[0] for row in conn.execute(
            "SELECT member_id FROM members WHERE group_id = ?", (group_id,))}
        if conn.execute("SELECT count(*) FROM groups WHERE id = ?", (group_id,)).fetchone()[0] != 1:
            problems["group",] = "the group %s is gone" % group_id
    finally:
        conn.close()
    for user_id, body in users.items():
        if user_id not in stored:
            problems["user", user_id] = "acknowledged user %s (%s) is missing" % (user_id, body["userName"])
            continue
        user_name, document = stored[user_id]
        got = {"userName": document.get("userName"), "displayName": document.get("displayName"),
               "emails": document.get("emails"),
               "employeeNumber": document.get(URN_ENTERPRISE, {}).get("employeeNumber")}
        want = {"userName": body["userName"], "displayName": body["displayName"],
                "emails": body["emails"], "employeeNumber": body[URN_ENTERPRISE]["employeeNumber"]}
        if got != want or user_name != body["userName"]:
            problems["user", user_id] = ("user %s stored as %r (column %r), acknowledged as %r"
                                         % (user_id, got, user_name, want))
    for user_id in members - stored_members:
        problems["member", user_id] = "acknowledged member %s is not in the group" % user_id
    for user_id in stored_members - set(stored):
        problems["dangling", user_id] = "the group lists %s, which is not a user" % user_id
    return problems


def test_kill_9_at_random_moments_loses_no_acknowledged_user_or_member(tmp_path):
    """Issue 3 item 1: SIGKILL the real server (durability full) while 4
    threads create users and add them to a group, 20 times on one file;
    after each kill every 2xx-acknowledged user is stored with the content
    sent, every acknowledged member is in the group, and integrity_check is ok.

    Odd rounds check the file in place; even rounds check a copy of the
    crashed files, so the next server start itself recovers the hot WAL
    (and the later checks prove that recovery lost nothing)."""
    seed = int(os.environ.get("DURABILITY_SEED", random.randrange(2 ** 32)))
    rng = random.Random(seed)
    path = str(tmp_path / "crash.db")
    token = run_cli("token", "create", "--name", "entra", "--db", path).stdout.strip()
    store = scim_appliance.Store(path)
    try:
        group_id = scim_appliance.create_resource(
            store, scim_appliance.GROUP, {"schemas": [URN_GROUP], "displayName": "Crash testers"},
            BASE_URL)["id"]
    finally:
        store.close()

    users, members = {}, set()
    problems, unexpected, outputs = {}, [], []
    rounds = 0
    for round_number in range(1, ROUNDS + 1):
        server = LiveServer(path, extra_args=("--durability", "full"))   # explicit: CI may set the env var
        server.token = token
        crash = CrashRound(server, group_id, round_number, users, members)
        try:
            started = crash.run(rng.uniform(*KILL_DELAY))
        finally:
            output = server.stop()   # already dead: collects its output, closes the pipes
        rounds += 1
        unexpected += ["round %d: %s" % (round_number, text) for text in crash.unexpected]
        if not started:
            problems["idle", round_number] = ("round %d: no write was acknowledged within %d s"
                                              % (round_number, ROUND_TIMEOUT))
            outputs.append(output)
        if round_number % 2:
            checked = path
        else:
            copy_dir = tmp_path / ("copy%d" % round_number)
            copy_dir.mkdir()
            copy = str(copy_dir / "crash.db")
            for suffix in ("", "-wal"):
                if os.path.exists(path + suffix):
                    shutil.copyfile(path + suffix, copy + suffix)
            checked = copy
        for what, problem in check_database(checked, group_id, users, members).items():
            problems.setdefault(what, "round %d: %s" % (round_number, problem))
        if checked != path:
            shutil.rmtree(os.path.dirname(checked))
        if problems:
            break
    # The last round's hot WAL: recovered by a plain sqlite3 open here too.
    for what, problem in check_database(path, group_id, users, members).items():
        problems.setdefault(what, "final check: %s" % problem)
    lost = sum(1 for what in problems if what[0] in ("user", "member"))

    figures = ("kill -9 harness (seed %d): rounds=%d, acknowledged user creates=%d, "
               "acknowledged member adds=%d, lost=%d"
               % (seed, rounds, len(users), len(members), lost))
    print("\n" + figures)
    assert problems == {}, "%s\n%s\n%s" % (figures, "\n".join(list(problems.values())[:20]),
                                           "\n".join(outputs)[-2000:])
    assert unexpected == [], "%s\n%s" % (figures, "\n".join(unexpected[:20]))
    assert rounds == ROUNDS, figures
    assert len(users) >= ROUNDS and members, figures


# -- 2. quick check: a damaged file is refused, untouched ----------------------------

USERS_IN_SAMPLE = 300


@pytest.fixture(scope="module")
def sample_database(tmp_path_factory):
    """A real database of a few hundred users in one group, closed cleanly (no -wal)."""
    path = str(tmp_path_factory.mktemp("sample") / "sample.db")
    store = scim_appliance.Store(path, synchronous="NORMAL")
    try:
        ids = [scim_appliance.create_resource(store, scim_appliance.USER, user_body("u%d@example.com" % n, n),
                                              BASE_URL)["id"] for n in range(USERS_IN_SAMPLE)]
        scim_appliance.create_resource(
            store, scim_appliance.GROUP,
            {"schemas": [URN_GROUP], "displayName": "Everyone", "members": [{"value": i} for i in ids]},
            BASE_URL)
    finally:
        store.close()
    assert wal_bytes(path) == 0
    assert quick_check(path) == ["ok"]
    return path


def btree_pages(path):
    """Page numbers (after page 2) whose first byte is a b-tree page type."""
    with open(path, "rb") as handle:
        data = handle.read()
    page_size = int.from_bytes(data[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = []
    for number in range(3, len(data) // page_size + 1):
        if data[(number - 1) * page_size] in (0x02, 0x05, 0x0A, 0x0D):
            pages.append(number)
    return page_size, pages


@pytest.fixture
def corrupt_database(sample_database, tmp_path):
    """A copy of the sample with the b-tree headers of a few pages destroyed:
    page type 0x07 (no such type) and a cell count of 0xff.. (byte 3)."""
    path = str(tmp_path / "corrupt.db")
    shutil.copyfile(sample_database, path)
    page_size, pages = btree_pages(path)
    assert len(pages) >= 8, pages
    with open(path, "r+b") as handle:
        for number in pages[::max(1, len(pages) // 4)][:4]:
            handle.seek((number - 1) * page_size)
            handle.write(b"\x07")
            handle.seek((number - 1) * page_size + 3)
            handle.write(b"\xff")
    assert quick_check(path) != ["ok"], "the corruption must make quick_check fail"
    # quick_check's read-only connection may leave an empty -wal; nothing in it.
    assert wal_bytes(path) == 0
    return path


def open_with_serve(path):
    result = run_cli("serve", "--db", path, "--port", str(free_port()), check=False)
    return result.returncode, result.stdout, result.stderr


def open_with_token_create(path):
    result = run_cli("token", "create", "--name", "entra", "--db", path, check=False)
    return result.returncode, result.stdout, result.stderr


def open_with_store(path):
    with pytest.raises(scim_appliance.DatabaseError) as raised:
        scim_appliance.Store(path)
    return 1, "", "scim-appliance: %s" % raised.value


@pytest.mark.parametrize("opener", [open_with_serve, open_with_token_create, open_with_store],
                         ids=["serve", "token-create", "Store"])
def test_a_database_failing_quick_check_is_refused_with_a_clear_message_and_left_untouched(
        corrupt_database, opener):
    """Issue 3 item 2: serve, `token create` and Store refuse a file whose
    quick check fails: non-zero exit, a message naming the integrity check
    and backups, no banner, no traceback, and not one byte of the file changed."""
    before = file_digest(corrupt_database)
    returncode, stdout, stderr = opener(corrupt_database)
    assert returncode != 0, (stdout, stderr)
    assert "integrity check" in stderr and "backup" in stderr, stderr
    assert stderr.startswith("scim-appliance: ") and corrupt_database in stderr, stderr
    assert "Traceback" not in stderr + stdout, stderr
    assert "SCIM endpoint" not in stdout, stdout
    assert file_digest(corrupt_database) == before
    assert wal_bytes(corrupt_database) == 0
    assert quick_check(corrupt_database) != ["ok"]   # still the same damaged file


def test_a_healthy_database_passes_the_quick_check_and_opens(sample_database, tmp_path):
    """Issue 3 item 2, negative control: the undamaged sample opens in Store
    and in `token create`, with every user still there."""
    path = str(tmp_path / "healthy.db")
    shutil.copyfile(sample_database, path)
    store = scim_appliance.Store(path)
    try:
        with store.read() as tx:
            assert tx.conn.execute("SELECT count(*) FROM users").fetchone()[0] == USERS_IN_SAMPLE
            assert tx.conn.execute("SELECT count(*) FROM members").fetchone()[0] == USERS_IN_SAMPLE
    finally:
        store.close()
    result = run_cli("token", "create", "--name", "entra", "--db", path)
    assert result.stdout.strip() and result.stderr == ""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT name FROM tokens").fetchall() == [("entra",)]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


# -- 3. the durability setting -----------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [({}, 2), ({"synchronous": "FULL"}, 2),
                                              ({"synchronous": "NORMAL"}, 1)],
                         ids=["default-full", "full", "normal"])
def test_store_connections_use_the_requested_synchronous_level(tmp_path, kwargs, expected):
    """Issue 3 item 3: PRAGMA synchronous is 2 (FULL) by default and 1 for
    NORMAL, on every thread's connection."""
    store = scim_appliance.Store(str(tmp_path / "sync.db"), **kwargs)
    try:
        seen = [store._connection().execute("PRAGMA synchronous").fetchone()[0]]
        thread = threading.Thread(
            target=lambda: seen.append(store._connection().execute("PRAGMA synchronous").fetchone()[0]))
        thread.start()
        thread.join(timeout=30)
        assert seen == [expected, expected]
    finally:
        store.close()


def test_serve_with_durability_normal_starts_and_serves(tmp_path):
    """Issue 3 item 3: `serve --durability normal` accepts and stores writes."""
    path = str(tmp_path / "normal.db")
    token = run_cli("token", "create", "--name", "entra", "--db", path).stdout.strip()
    server = LiveServer(path, extra_args=("--durability", "normal"))
    server.token = token
    try:
        status, _, created = server.request("POST", "/Users", user_body("normal@example.com", 7))
        assert status == 201, created
        status, _, fetched = server.request("GET", "/Users/" + created["id"])
        assert status == 200 and fetched["userName"] == "normal@example.com"
    finally:
        output = server.stop()
    assert "Traceback" not in output
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT id, user_name FROM users").fetchall()
    finally:
        conn.close()
    assert rows == [(created["id"], "normal@example.com")]


@pytest.mark.parametrize("args, env", [(("--durability", "bogus"), {}),
                                       ((), {"SCIM_APPLIANCE_DURABILITY": "bogus"})],
                         ids=["flag", "environment"])
def test_an_unknown_durability_is_refused_before_anything_starts(tmp_path, args, env):
    """Issue 3 item 3: only full and normal are durability levels; anything
    else ends `serve` with a message, no banner, and no database created."""
    path = str(tmp_path / "bogus.db")
    result = run_cli("serve", "--db", path, "--port", str(free_port()), *args, env=env, check=False)
    assert result.returncode != 0
    assert "durability" in result.stderr and "bogus" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "SCIM endpoint" not in result.stdout
    assert not os.path.exists(path)


def test_serve_help_documents_durability_and_what_normal_risks():
    """Issue 3 item 3: --help names both levels, the default, and that
    `normal` risks the last commits on power loss but not on a process crash."""
    result = run_cli("serve", "--help")
    text = re.sub(r"\s+", " ", result.stdout)
    match = re.search(r"--durability DURABILITY (.*?)(?= --[a-z])", text)
    assert match, text
    help_text = match.group(1)
    assert "full" in help_text and "normal" in help_text, help_text
    assert "power loss" in help_text, help_text
    normal = help_text[help_text.index("normal"):]
    assert "crash" in normal and "power loss" in normal, help_text
    assert "default full" in help_text, help_text
