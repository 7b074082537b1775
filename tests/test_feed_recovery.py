"""The change feed through crashes, restores and retention (README,
"Following changes"), against the real server:

1. kill -9 during concurrent writes: after each restart every acknowledged
   write has its events, every event's change is in the database, nothing
   a feed reader was shown is lost, and the sequence numbers stay
   contiguous across restarts.
2. `restore` from a backup: a cursor of the lost history is answered 410
   (beyond the head, and once the new history passes it, another history),
   never with the new events under the old numbers; a cursor from before
   the backup point continues with the new history.
3. retention: a server started on a database whose events are older than
   --events-days prunes them at once, all but the newest; their cursors get
   410 and the head still answers.
4. a backup taken during writes holds exactly the events of the changes it
   holds, and they are the live history's first events.
5. restore of a backup from before the feed (schema 1): an empty feed at
   "0", every old cursor 410, new events numbered from 1.
6. kill -9 during the prune: a gapless tail is left; the next start finishes.

The kill -9 test prints its seed; FEED_CRASH_SEED=<seed> repeats its timing.
"""

import collections
import http.client
import json
import os
import random
import sqlite3
import threading
import time

import pytest

import scim_appliance
from conftest import LiveServer, fetch, http_json, query, run_cli, start_live_server, wait_for
from scim_appliance import URN_ERROR, URN_GROUP, URN_PATCH, URN_USER

# The server died under the request (refused, reset, closed mid-response).
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)


# -- helpers -------------------------------------------------------------------------

def feed_url(server, path="/events"):
    return "http://127.0.0.1:%d%s" % (server.port, path)


def cursor_of(seq, event_id):
    """The cursor of event `seq` (README: "1042.3f9a0c1d2b4e")."""
    return "%d.%s" % (seq, event_id.replace("-", "")[:12])


def seq_of(cursor):
    return int(cursor.split(".")[0])


def feed_page(server, read_token, cursor=None, limit=1000, wait=None):
    """(status, parsed body) of one GET /events."""
    params = ["limit=%d" % limit]
    if cursor is not None:
        params.insert(0, "after=%s" % cursor)
    if wait is not None:
        params.append("wait=%d" % wait)
    status, _, body = http_json("GET", feed_url(server, "/events?" + "&".join(params)), token=read_token)
    return status, body


def follow(server, read_token, cursor="0"):
    """Every event after `cursor`, page by page: (events, the last next_cursor)."""
    events = []
    while True:
        status, page = feed_page(server, read_token, cursor)
        assert status == 200, (cursor, page)
        events += page["events"]
        assert page["next_cursor"] == (page["events"][-1]["cursor"] if page["events"] else cursor), page
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return events, cursor


def head(server, read_token):
    status, _, body = http_json("GET", feed_url(server, "/events/head"), token=read_token)
    assert status == 200, body
    return body["cursor"]


def assert_gone(server, read_token, cursor):
    """The cursor is answered 410 Gone, a SCIM error, and no events."""
    status, headers, body = http_json("GET", feed_url(server, "/events?after=%s&limit=1000" % cursor),
                                      token=read_token)
    assert status == 410, (cursor, body)
    assert headers.get("Content-Type", "").split(";")[0] == "application/scim+json", headers
    assert body["schemas"] == [URN_ERROR] and body["status"] == "410", body
    assert isinstance(body.get("detail"), str) and body["detail"] and "events" not in body, body
    return body


def event_rows(path):
    """{seq: (event_id, type, resource_type, resource_id, version, txn, parsed body)} of the events table."""
    return {row[0]: row[1:7] + (json.loads(row[7]),) for row in query(
        path, "SELECT seq, event_id, type, resource_type, resource_id, version, txn, event FROM scim_events "
              "ORDER BY seq")}


def user_body(user_name, display_name):
    return {"schemas": [URN_USER], "userName": user_name, "displayName": display_name}


def patch_body(*operations):
    return {"schemas": [URN_PATCH], "Operations": list(operations)}


def add_member(member_id):
    return patch_body({"op": "add", "path": "members", "value": [{"value": member_id}]})


# -- 1. kill -9 during concurrent writes ------------------------------------------------

ROUNDS = 3                  # server lives, each ended by SIGKILL
WRITERS = 3                 # writer threads per round
KILL_DELAY = (0.3, 1.2)     # seconds of writing after the round's first acknowledgement
ROUND_TIMEOUT = 60          # a round that sees no acknowledgement in this long fails

BEFORE = "Before"           # every user's displayName when created


class Ledger:
    """What the writers sent, and which of it was acknowledged (2xx).

    A request that died with the server is "in flight": it may or may not
    have committed, and is never sent again.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.creates = {}   # userName -> id once acknowledged, else None
        self.patches = {}   # user id -> [displayName, deactivated too?, acknowledged?]
        self.adds = {}      # user id -> acknowledged?


class CrashRound:
    """One server life: writers create users, PATCH them (a displayName;
    every third one deactivated in the same request: one user.deactivated
    naming both) and add them to the group; a follower reads the feed with
    long-polls; then SIGKILL."""

    def __init__(self, server, read_token, group_id, round_number, ledger, cursor):
        self.server = server
        self.read_token = read_token
        self.group_id = group_id
        self.round_number = round_number
        self.ledger = ledger
        self.cursor = cursor                    # where the follower starts
        self.seen = {}                          # seq -> event, as the follower was shown it
        self.first_ack = threading.Event()
        self.killed = threading.Event()
        self.unexpected = []                    # non-2xx answers, transport errors before the kill
        self.acks = 0

    def _call(self, method, path, body):
        """The answer's body ({} for 204), or None when the request died with the server."""
        try:
            status, _, answer = self.server.request(method, path, body)
        except TRANSPORT_ERRORS as exc:
            if not self.killed.is_set():
                self.unexpected.append("%s %s before the kill: %r" % (method, path, exc))
            return None
        if not 200 <= status < 300:
            self.unexpected.append("%s %s -> %s %s" % (method, path, status, answer))
            return None
        return answer or {}

    def writer(self, writer_number):
        ledger = self.ledger
        number = 0
        while not self.killed.is_set():
            number += 1
            name = "r%d-w%d-%d@feed.example.com" % (self.round_number, writer_number, number)
            with ledger.lock:
                ledger.creates[name] = None
            created = self._call("POST", "/Users", user_body(name, BEFORE))
            if created is None:
                return
            user_id = created["id"]
            with ledger.lock:
                ledger.creates[name] = user_id
                self.acks += 1
            self.first_ack.set()
            display, deactivate = "After %s" % name, number % 3 == 0
            operations = [{"op": "replace", "path": "displayName", "value": display}]
            if deactivate:
                operations.append({"op": "replace", "path": "active", "value": False})
            with ledger.lock:
                ledger.patches[user_id] = [display, deactivate, False]
            if self._call("PATCH", "/Users/" + user_id, patch_body(*operations)) is None:
                return
            with ledger.lock:
                ledger.patches[user_id][2] = True
                ledger.adds[user_id] = False
            if self._call("PATCH", "/Groups/" + self.group_id, add_member(user_id)) is None:
                return
            with ledger.lock:
                ledger.adds[user_id] = True
                self.acks += 2

    def follower(self):
        """Long-polls the feed; every event it is shown must survive the kill."""
        cursor = self.cursor
        while not self.killed.is_set():
            try:
                status, page = feed_page(self.server, self.read_token, cursor, limit=200, wait=1)
            except TRANSPORT_ERRORS as exc:
                if not self.killed.is_set():
                    self.unexpected.append("GET /events before the kill: %r" % exc)
                return
            if status != 200:
                self.unexpected.append("GET /events?after=%s -> %s %s" % (cursor, status, page))
                return
            for event in page["events"]:
                seq = seq_of(event["cursor"])
                if seq != seq_of(cursor) + 1:
                    self.unexpected.append("the feed jumped from %s to %s" % (cursor, event["cursor"]))
                self.seen[seq] = event
                cursor = event["cursor"]

    def run(self, delay):
        threads = [threading.Thread(target=self.writer, args=(n,), daemon=True) for n in range(WRITERS)]
        threads.append(threading.Thread(target=self.follower, daemon=True))
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
            for thread in threads:
                thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a client thread hung after the kill"
        return started


def check_after_restart(server, path, read_token, group_id, ledger, shown):
    """Compare the restarted server's database and feed with the ledger and
    with every event shown before (`shown`: seq -> event). Returns problems."""
    problems = []
    events = event_rows(path)
    seqs = sorted(events)
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append("the sequence numbers are not 1..%d: gaps at %s"
                        % (len(seqs), sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))[:10]))
    counter = query(path, "SELECT seq FROM sqlite_sequence WHERE name = 'events'")
    if counter != [(len(seqs),)]:
        problems.append("AUTOINCREMENT's counter is %s, the newest event %d" % (counter, len(seqs)))
    # Nothing a reader was shown is lost or changed: it had been committed.
    for seq, event in sorted(shown.items()):
        row = events.get(seq)
        stored = None if row is None else dict(row[6], cursor=cursor_of(seq, row[0]))
        if stored != event:
            problems.append("event %d was shown as %s, is now %s" % (seq, event["id"], row and row[0]))

    users = {row[0]: (row[1], row[2], json.loads(row[3])) for row in query(
        path, "SELECT id, user_name, version, document FROM users")}
    members = {row[0]: row[1] for row in query(
        path, "SELECT member_id, member_type FROM members WHERE group_id = ?", (group_id,))}
    group_version = query(path, "SELECT version FROM groups WHERE id = ?", (group_id,))
    created = collections.Counter()
    user_events = collections.defaultdict(list)     # user id -> its events after user.created
    added = collections.Counter()
    last_version = {}
    for seq in seqs:
        event_id, kind, resource_type, resource_id, version, txn, body = events[seq]
        last_version[resource_id] = version
        if kind == "user.created":
            created[resource_id] += 1
        elif kind in ("user.updated", "user.deactivated"):
            user_events[resource_id].append((kind, version, txn, body))
        elif kind == "group.member_added":
            added[body["data"]["member"]["value"]] += 1
            if resource_id != group_id:
                problems.append("event %d: a member added to %s" % (seq, resource_id))
        elif kind != "group.created" or resource_id != group_id:
            problems.append("event %d: unexpected %s of %s" % (seq, kind, resource_id))

    # Every acknowledged create has exactly one user.created; every user.created's user exists.
    sent = ledger.creates
    for name, user_id in sent.items():
        if user_id is not None and user_id not in users:
            problems.append("acknowledged user %s (%s) is missing" % (user_id, name))
    for user_id, count in created.items():
        if user_id not in users:
            problems.append("user.created for %s, which is not in users (nothing deletes)" % user_id)
    for user_id, (user_name, version, document) in users.items():
        if created[user_id] != 1:
            problems.append("user %s (%s) has %d user.created events" % (user_id, user_name, created[user_id]))
        if user_name not in sent or sent[user_name] not in (None, user_id):
            problems.append("user %s (%s) was never sent, or acknowledged with another id" % (user_id, user_name))
        # Its PATCH: its one event or none; acknowledged: its event.
        patch = ledger.patches.get(user_id)
        events_of_user = user_events.get(user_id, [])
        kinds = sorted(kind for kind, *_ in events_of_user)
        expected = [] if patch is None else ["user.deactivated" if patch[1] else "user.updated"]
        if kinds not in ([expected] if patch is None or patch[2] else [[], expected]):
            problems.append("user %s: PATCH %s made events %s" % (user_id, patch, kinds))
        if events_of_user:
            if len({txn for _, _, txn, _ in events_of_user}) != 1:
                problems.append("user %s: one PATCH's events in several txns" % user_id)
            last = events_of_user[-1][3]["data"]
            # The event's change is in the database, and the stored row is the event's.
            if document.get("displayName") != last.get("displayName") or \
                    document.get("active") != last.get("active"):
                problems.append("user %s is stored as %r, its last event says %r" % (user_id, document, last))
        want = (BEFORE, None, 1) if not events_of_user else (patch[0], False if patch[1] else None, 2)
        if (document.get("displayName"), document.get("active"), version) != want:
            problems.append("user %s: stored (displayName, active, version) %r, want %r"
                            % (user_id, (document.get("displayName"), document.get("active"), version), want))
        if last_version.get(user_id) != version:
            problems.append("user %s: version %d, its last event's %s" % (user_id, version,
                                                                         last_version.get(user_id)))
    # Membership: an event iff the member is stored; acknowledged adds are both.
    for user_id, count in added.items():
        if count != 1 or user_id not in ledger.adds:
            problems.append("member %s: %d group.member_added events, add sent: %s"
                            % (user_id, count, ledger.adds.get(user_id)))
    for user_id in set(members) | set(added) | {u for u, acked in ledger.adds.items() if acked}:
        if (user_id in members) != (added[user_id] == 1) or ledger.adds.get(user_id) and user_id not in members:
            problems.append("member %s: stored %s, events %d, add acknowledged %s"
                            % (user_id, user_id in members, added[user_id], ledger.adds.get(user_id)))
        if user_id in members and (user_id not in users or members[user_id] != "User"):
            problems.append("member %s is no user" % user_id)
    if group_version != [(1 + len(members),)] or last_version.get(group_id) != 1 + len(members):
        problems.append("the group's version %s, its last event's %s, with %d members"
                        % (group_version, last_version.get(group_id), len(members)))

    # The feed serves exactly the table, cursor by cursor, and its head is the newest.
    feed, cursor = follow(server, read_token, "0")
    table = [dict(events[seq][6], cursor=cursor_of(seq, events[seq][0])) for seq in seqs]
    if feed != table:
        problems.append("GET /events (%d events) is not the events table (%d)" % (len(feed), len(table)))
    if head(server, read_token) != (table[-1]["cursor"] if table else "0") or cursor != head(server, read_token):
        problems.append("GET /events/head is not the newest event")
    return problems


def test_kill_9_during_writes_keeps_events_and_changes_together(tmp_path):
    """kill -9 the real server (durability full) while 3 writers create,
    PATCH and add users to a group and a follower long-polls the feed,
    3 times on one file; after each restart: every acknowledged write has
    exactly its events (a PATCH's two in one txn), every event's change is
    stored (and nothing else is), every event a reader was shown is still
    there, unchanged, seq is 1..N with AUTOINCREMENT's counter at N, and
    GET /events serves exactly the table."""
    seed = int(os.environ.get("FEED_CRASH_SEED", random.randrange(2 ** 32)))
    rng = random.Random(seed)
    path = str(tmp_path / "crash.db")
    read_token = run_cli("token", "create", "--name", "app", "--scope", "read", "--db", path).stdout.strip()
    ledger = Ledger()
    shown = {}         # seq -> event, every event any reader was shown
    group_id = None
    unexpected = []
    for round_number in range(1, ROUNDS + 2):
        if round_number == 1:
            server = start_live_server(path, ["--durability", "full"])
            token = server.token
            status, _, group = server.request("POST", "/Groups", {"schemas": [URN_GROUP], "displayName": "Feed"})
            assert status == 201, group
            group_id = group["id"]
        else:
            server = LiveServer(path, extra_args=("--durability", "full"))
            server.token = token
        try:
            problems = check_after_restart(server, path, read_token, group_id, ledger, shown)
            figures = ("seed %d, round %d: acknowledged creates %d of %d sent, events %d"
                       % (seed, round_number, sum(1 for i in ledger.creates.values() if i), len(ledger.creates),
                          len(event_rows(path))))
            assert problems == [], "%s\n%s" % (figures, "\n".join(problems[:20]))
            if round_number > ROUNDS:
                break
            cursor = head(server, read_token)   # the follower starts here: it reads this round's events
            shown.update({seq_of(event["cursor"]): event for event in follow(server, read_token)[0]})
            crash = CrashRound(server, read_token, group_id, round_number, ledger, cursor)
            started = crash.run(rng.uniform(*KILL_DELAY))
            shown.update(crash.seen)
            unexpected += ["round %d: %s" % (round_number, text) for text in crash.unexpected]
            assert started, "round %d: no write was acknowledged within %d s" % (round_number, ROUND_TIMEOUT)
        finally:
            output = server.stop()
    in_flight = (sum(1 for i in ledger.creates.values() if i is None),
                 sum(1 for p in ledger.patches.values() if not p[2]),
                 sum(1 for acked in ledger.adds.values() if not acked))
    print("\n%s; in flight at the kills: %d creates, %d PATCHes, %d member adds; follower saw %d events"
          % (figures, in_flight[0], in_flight[1], in_flight[2], len(shown)))
    assert "Traceback" not in output, output
    assert unexpected == [], "seed %d\n%s" % (seed, "\n".join(unexpected[:20]))
    acknowledged = [user_id for user_id in ledger.creates.values() if user_id]
    assert len(acknowledged) >= ROUNDS and any(ledger.adds.values()), figures
    assert len(shown) > len(acknowledged), "the follower saw none of the rounds' events"


# -- 2. restore from a backup ----------------------------------------------------------------

def create_user(server, user_name):
    status, _, body = server.request("POST", "/Users", user_body(user_name, user_name.split("@")[0]))
    assert status == 201, body
    return body["id"]


def test_restore_answers_410_for_cursors_of_the_lost_history_and_continues_the_shared_one(tmp_path):
    """A follower at cursor C (seq N); `backup` while the server runs; more
    writes, the follower reaches C2 (seq M > N); stop, `restore`, start.
    The head is C again; C2 (and every cursor after C) gets 410, first as
    beyond the head, then, once different writes pass M, as another
    history, never with the new events under the old numbers; C continues
    with exactly the new history's events, and "0" gives the shared part
    unchanged."""
    path = str(tmp_path / "feed.db")
    read_token = run_cli("token", "create", "--name", "app", "--scope", "read", "--db", path).stdout.strip()
    backup = str(tmp_path / "backup.db")
    server = start_live_server(path)
    token = server.token
    try:
        ann, bob, cai = (create_user(server, name) for name in ("ann@old.example", "bob@old.example",
                                                                 "cai@old.example"))
        status, _, group = server.request("POST", "/Groups", {
            "schemas": [URN_GROUP], "displayName": "Team", "members": [{"value": ann}, {"value": bob}]})
        assert status == 201, group
        shared, cursor_c = follow(server, read_token)
        assert [e["type"] for e in shared] == ["user.created"] * 3 + ["group.created"] + \
            ["group.member_added"] * 2
        assert head(server, read_token) == cursor_c and seq_of(cursor_c) == len(shared)

        run_cli("backup", backup, "--db", path)

        # The history the restore loses.
        assert server.request("PATCH", "/Users/" + ann, patch_body(
            {"op": "replace", "path": "displayName", "value": "Ann Lost"}))[0] == 200
        assert server.request("DELETE", "/Users/" + bob)[0] == 204
        dan = create_user(server, "dan@lost.example")
        assert server.request("PATCH", "/Groups/" + group["id"], add_member(dan))[0] == 204
        lost, cursor_c2 = follow(server, read_token, cursor_c)
        assert seq_of(cursor_c2) > seq_of(cursor_c) and len(lost) == seq_of(cursor_c2) - seq_of(cursor_c)
    finally:
        server.stop()

    run_cli("restore", backup, "--db", path)
    server = LiveServer(path)
    server.token = token           # the tokens are the backup's: both were made before it
    try:
        # The head is the restored database's; the lost history's cursors are beyond it.
        assert head(server, read_token) == cursor_c
        for event in lost:
            assert_gone(server, read_token, event["cursor"])
        assert follow(server, read_token, cursor_c) == ([], cursor_c)
        assert follow(server, read_token, "0") == (shared, cursor_c)
        status, _, users = server.request("GET", "/Users?count=100")
        assert status == 200 and {u["id"]: u["displayName"] for u in users["Resources"]} == {
            ann: "ann", bob: "bob", cai: "cai"}

        # Different writes: the new history, one event each, past M. Halfway
        # the old cursors are of another history below the head, beyond it above.
        new_users = []
        while seq_of(head(server, read_token)) <= seq_of(cursor_c2):
            new_users.append(create_user(server, "new%d@new.example" % len(new_users)))
            if len(new_users) == 1:
                for event in lost:
                    assert_gone(server, read_token, event["cursor"])
        assert server.request("DELETE", "/Users/" + cai)[0] == 204

        for event in lost:
            assert_gone(server, read_token, event["cursor"])
        assert_gone(server, read_token, cursor_c2)
        new, cursor = follow(server, read_token, cursor_c)
        assert cursor == head(server, read_token)
        assert [seq_of(e["cursor"]) for e in new] == list(range(seq_of(cursor_c) + 1, seq_of(cursor) + 1))
        assert not {e["id"] for e in new} & {e["id"] for e in lost}
        assert not {e["cursor"] for e in new} & {e["cursor"] for e in lost}
        assert [(e["type"], e["resource"]["id"]) for e in new] == \
            [("user.created", user_id) for user_id in new_users] + [("user.deleted", cai)]
        assert [e["data"]["userName"] for e in new[:-1]] == ["new%d@new.example" % n for n in range(len(new_users))]
        assert follow(server, read_token, "0") == (shared + new, cursor)
        # The table says the same: the new events carry the old numbers, with new ids.
        rows = event_rows(path)
        assert [cursor_of(seq, rows[seq][0]) for seq in sorted(rows)] == [e["cursor"] for e in shared + new]
    finally:
        output = server.stop()
    assert "Traceback" not in output, output


# -- 3. retention ---------------------------------------------------------------------------

@pytest.mark.parametrize("backdated", ["all", "older"])
def test_a_server_prunes_expired_events_at_start_and_answers_their_cursors_410(tmp_path, backdated):
    """A database with 2,206 events (a group of 1,100 pushed at once: batches
    of a thousand to prune), some or all of them backdated to 2000 with
    sqlite3 before the server starts: the server prunes them within a few
    seconds of starting, never the newest; their cursors, and "0", get 410;
    the first kept one continues; the head still answers and the numbers
    go on after it."""
    path = str(tmp_path / "retention.db")
    base_url = "https://scim.example.com/scim"
    store = scim_appliance.Store(path, synchronous="NORMAL")
    try:
        read_token = scim_appliance.create_token(store, "app", scope="read")
        token = scim_appliance.create_token(store, "entra")
        ids = [scim_appliance.create_resource(store, scim_appliance.USER, user_body("u%d@old.example" % n, "U"),
                                              base_url, token_name="entra")["id"] for n in range(1100)]
        scim_appliance.create_resource(store, scim_appliance.GROUP, {
            "schemas": [URN_GROUP], "displayName": "Everyone", "members": [{"value": i} for i in ids]},
            base_url, token_name="entra")
        recent = [scim_appliance.create_resource(store, scim_appliance.USER, user_body("r%d@new.example" % n, "R"),
                                                 base_url, token_name="entra")["id"] for n in range(5)]
    finally:
        store.close()
    rows = event_rows(path)
    newest = max(rows)
    assert newest == 1100 + 1 + 1100 + 5
    cursors = {seq: cursor_of(seq, row[0]) for seq, row in rows.items()}
    last_old = newest if backdated == "all" else newest - len(recent)
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("UPDATE events SET time = '2000-01-01T00:00:00.000Z' WHERE seq <= ?", (last_old,))
    finally:
        conn.close()
    oldest_kept = newest if backdated == "all" else last_old + 1   # the newest event always stays

    server = LiveServer(path)   # --events-days: the default 30
    server.token = token
    try:
        wait_for(lambda: query(path, "SELECT min(seq), max(seq), count(*) FROM events")[0]
                 == (oldest_kept, newest, newest - oldest_kept + 1), timeout=60, what="the prune at start")
        assert query(path, "SELECT min(seq) FROM scim_events") == [(oldest_kept,)]
        for seq in (1, 1100, 2201, oldest_kept - 1):
            assert_gone(server, read_token, cursors[seq])
        assert_gone(server, read_token, "0")
        assert head(server, read_token) == cursors[newest]
        assert follow(server, read_token, cursors[newest]) == ([], cursors[newest])
        kept, _ = follow(server, read_token, cursors[oldest_kept])
        assert [e["cursor"] for e in kept] == [cursors[seq] for seq in range(oldest_kept + 1, newest + 1)]
        status, page = feed_page(server, read_token)   # no cursor: from the oldest kept
        assert status == 200 and page["events"][0]["cursor"] == cursors[oldest_kept], page
        _, _, metrics = fetch("http://127.0.0.1:%d/metrics" % server.admin_port)
        assert "scim_events_oldest_sequence %d\n" % oldest_kept in metrics
        assert "scim_events_head_sequence %d\n" % newest in metrics
        # Nothing but events went.
        assert query(path, "SELECT count(*) FROM users") == [(1105,)]
        assert query(path, "SELECT count(*) FROM members") == [(1100,)]

        # The numbers go on after the head; its cursor continues with the new event.
        user_id = create_user(server, "after@new.example")
        new, cursor = follow(server, read_token, cursors[newest])
        assert [(seq_of(e["cursor"]), e["type"], e["resource"]["id"]) for e in new] == [
            (newest + 1, "user.created", user_id)]
        assert head(server, read_token) == cursor
    finally:
        output = server.stop()
    assert "Traceback" not in output, output



# -- 4. a backup taken during writes ----------------------------------------------------------

def replay_events(path):
    """Replay a database file's events table into {user id: (userName,
    displayName, version)} and {(group id, member id)}, and its group
    versions; problems with the sequence go in the returned list."""
    problems = []
    rows = event_rows(path)
    if sorted(rows) != list(range(1, len(rows) + 1)):
        problems.append("%s: seq is not 1..%d" % (path, len(rows)))
    if query(path, "SELECT seq FROM sqlite_sequence WHERE name = 'events'") != [(len(rows),)]:
        problems.append("%s: AUTOINCREMENT's counter is not the newest event" % path)
    users, members, versions = {}, set(), {}
    for seq in sorted(rows):
        _, kind, _, resource_id, version, _, body = rows[seq]
        versions[resource_id] = version
        data = body["data"]
        if kind in ("user.created", "user.updated", "user.deactivated", "user.reactivated"):
            users[resource_id] = (data["userName"], data.get("displayName"), version)
        elif kind == "user.deleted":
            users.pop(resource_id)
        elif kind == "group.member_added":
            members.add((resource_id, data["member"]["value"]))
        elif kind == "group.member_removed":
            members.remove((resource_id, data["member"]["value"]))
    return users, members, versions, problems


def stored_state(path):
    users = {row[0]: (row[1], row[2], row[3]) for row in query(
        path, "SELECT id, user_name, display_name, version FROM users")}
    members = set(query(path, "SELECT group_id, member_id FROM members"))
    groups = dict(query(path, "SELECT id, version FROM groups"))
    return users, members, groups


def test_a_backup_taken_during_writes_holds_exactly_the_events_of_the_changes_it_holds(tmp_path):
    """`backup` twice while 3 writers create, rename, add to a group and
    delete users: each backup's events, replayed, are exactly its users,
    their versions and its memberships; its seq is 1..N (AUTOINCREMENT's
    counter at N), and its events are the live history's first N."""
    path = str(tmp_path / "live.db")
    run_cli("token", "create", "--name", "app", "--scope", "read", "--db", path)
    server = start_live_server(path)
    stop = threading.Event()
    failures = []
    acks = collections.Counter()

    def writer(number):
        n = 0
        while not stop.is_set():
            n += 1
            status, _, user = server.request("POST", "/Users", user_body("w%d-%d@backup.example" % (number, n), "B"))
            steps = [(status, 201)]
            if status == 201:
                steps.append((server.request("PATCH", "/Users/" + user["id"], patch_body(
                    {"op": "replace", "path": "displayName", "value": "Renamed %d" % n}))[0], 200))
                steps.append((server.request("PATCH", "/Groups/" + group_id, add_member(user["id"]))[0], 204))
                if n % 4 == 0:
                    steps.append((server.request("DELETE", "/Users/" + user["id"])[0], 204))
            for got, want in steps:
                if got != want:
                    failures.append((got, want))
                    return
            acks[number] += 1

    try:
        status, _, group = server.request("POST", "/Groups", {"schemas": [URN_GROUP], "displayName": "All"})
        assert status == 201, group
        group_id = group["id"]
        threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(3)]
        for thread in threads:
            thread.start()
        backups = []
        try:
            for number in range(2):
                wait_for(lambda: sum(acks.values()) >= 10 * (number + 1), timeout=60, what="writes acknowledged")
                backups.append(str(tmp_path / ("backup%d.db" % number)))
                run_cli("backup", backups[-1], "--db", path)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert not failures, failures
    finally:
        output = server.stop()
    assert "Traceback" not in output, output
    live = event_rows(path)
    for backup in backups + [path]:
        users, members, versions, problems = replay_events(backup)
        assert problems == []
        stored_users, stored_members, groups = stored_state(backup)
        assert users == stored_users, backup
        assert members == stored_members, backup
        assert {gid: versions[gid] for gid in groups} == groups, backup
        rows = event_rows(backup)
        assert {seq: row[0] for seq, row in rows.items()} == {seq: live[seq][0] for seq in rows}, backup
    assert 0 < len(event_rows(backups[0])) < len(event_rows(backups[1])) < len(live)


# -- 5. restore from a backup made before the feed existed -------------------------------------

FIXTURE_V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "schema-v1.db")


def test_restoring_a_backup_from_before_the_feed_starts_an_empty_feed_and_old_cursors_get_410(tmp_path):
    """Restore of a schema-1 database (no events table) over a database with
    a history: the feed starts empty at "0", every old cursor gets 410 (first
    beyond the head, then of another history once new events take its
    number), and the new events are numbered from 1."""
    path = str(tmp_path / "feed.db")
    run_cli("token", "create", "--name", "app", "--scope", "read", "--db", path)
    server = start_live_server(path)
    read_token = run_cli("token", "create", "--name", "reader", "--scope", "read", "--db", path).stdout.strip()
    try:
        for name in ("a@old.example", "b@old.example", "c@old.example"):
            create_user(server, name)
        old, _ = follow(server, read_token)
        assert len(old) == 3
    finally:
        server.stop()
    source = str(tmp_path / "v1.db")
    with open(FIXTURE_V1, "rb") as handle, open(source, "wb") as copy:
        copy.write(handle.read())
    run_cli("restore", source, "--db", path)
    # The restored tokens are the backup's: new ones for this test.
    token = run_cli("token", "create", "--name", "provisioner", "--db", path).stdout.strip()
    read_token = run_cli("token", "create", "--name", "reader", "--scope", "read", "--db", path).stdout.strip()
    server = LiveServer(path)
    server.token = token
    try:
        assert head(server, read_token) == "0"
        assert follow(server, read_token, "0") == ([], "0")
        for event in old:
            assert_gone(server, read_token, event["cursor"])
        new_user = create_user(server, "new@new.example")
        new, cursor = follow(server, read_token, "0")
        assert [(seq_of(e["cursor"]), e["type"], e["resource"]["id"]) for e in new] == [
            (1, "user.created", new_user)]
        assert new[0]["id"] != old[0]["id"] and cursor == head(server, read_token)
        for event in old:
            assert_gone(server, read_token, event["cursor"])
        status, _, users = server.request("GET", "/Users?count=100")
        assert status == 200 and users["totalResults"] == 3, users   # the fixture's two and the new one
    finally:
        output = server.stop()
    assert "Traceback" not in output, output


# -- 6. kill -9 during the prune ---------------------------------------------------------------

def test_kill_9_during_the_prune_at_start_leaves_a_gapless_tail_and_the_next_start_finishes(tmp_path):
    """A database of ~12,000 expired events (batches of a thousand per
    transaction): kill -9 the server soon after its prune begins. Whatever
    the moment, what is left is seq oldest..newest without a gap, the newest
    event intact, users and members untouched; the next start prunes the
    rest, all but the newest, whose cursor is still the head."""
    path = str(tmp_path / "prune.db")
    base_url = "https://scim.example.com/scim"
    store = scim_appliance.Store(path, synchronous="NORMAL")
    try:
        read_token = scim_appliance.create_token(store, "app", scope="read")
        ids = [scim_appliance.create_resource(store, scim_appliance.USER, user_body("u%d@prune.example" % n, "U"),
                                              base_url, token_name="entra")["id"] for n in range(6000)]
        scim_appliance.create_resource(store, scim_appliance.GROUP, {
            "schemas": [URN_GROUP], "displayName": "Everyone", "members": [{"value": i} for i in ids]},
            base_url, token_name="entra")
    finally:
        store.close()
    rows = event_rows(path)
    newest = max(rows)
    newest_cursor = cursor_of(newest, rows[newest][0])
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("UPDATE events SET time = '2000-01-01T00:00:00.000Z'")
    finally:
        conn.close()

    def bounds():
        return query(path, "SELECT min(seq), max(seq), count(*) FROM events")[0]

    server = LiveServer(path)
    try:
        wait_for(lambda: bounds()[0] > 1, timeout=60, interval=0.01, what="the prune's first batch")
        time.sleep(random.uniform(0, 0.05))
    finally:
        server.process.kill()
        server.process.wait(timeout=30)
        server.stop()
    oldest, last, count = bounds()
    print("\nkilled with events %d..%d left of 1..%d" % (oldest, last, newest))
    assert last == newest and count == newest - oldest + 1, (oldest, last, count)
    assert (oldest - 1) % scim_appliance.EVENTS_PRUNE_BATCH == 0, "a batch half deleted: %d" % oldest
    assert query(path, "SELECT event_id FROM events WHERE seq = ?", (newest,)) == [(rows[newest][0],)]
    assert query(path, "SELECT count(*) FROM users") == [(6000,)]
    assert query(path, "SELECT count(*) FROM members") == [(6000,)]

    server = LiveServer(path)
    try:
        wait_for(lambda: bounds() == (newest, newest, 1), timeout=60, what="the prune at the second start")
        assert head(server, read_token) == newest_cursor
        assert follow(server, read_token, newest_cursor) == ([], newest_cursor)
        for seq in {1, oldest} - {newest}:   # pruned by the first start, and by the second
            assert_gone(server, read_token, cursor_of(seq, rows[seq][0]))
    finally:
        output = server.stop()
    assert "Traceback" not in output, output
