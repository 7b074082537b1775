"""The change feed (README "Following changes") against the real server:
GET /events and /events/head over real HTTP, with writers, long-polls,
SIGTERM, the list-then-follow recipe, the export's cursor and the README's
own consumer example.

Nothing here asserts a duration: conditions are waited for with generous
deadlines, so that a loaded 2-core CI machine passes too. The one bound on
time is a behaviour's (a SIGTERM'd server exits long before its waiting
long-polls' 30 s are up).
"""

import collections
import http.client
import json
import os
import random
import re
import threading
import time
import urllib.parse
import uuid

import pytest

from conftest import ROOT, healthz, query, run_cli, start_live_server, wait_for
from scim_appliance import URN_GROUP, URN_PATCH, URN_USER

FEED_WAIT = 5            # seconds the followers of test 1 long-poll
POLL_WAIT = 30           # the long-polls parked in tests 2-4 (the most the feed allows)
DEADLINE = 60            # seconds a condition may take on a loaded machine


# -- helpers ---------------------------------------------------------------------

def start_feed_server(tmp_path, extra_args=()):
    """A real server on a fresh database with a provisioning token (server.token)
    and a read token for the feed (server.read_token), both made by the CLI
    before the server starts."""
    path = str(tmp_path / "feed.db")
    read_token = run_cli("token", "create", "--name", "app", "--scope", "read", "--db", path).stdout.strip()
    server = start_live_server(path, extra_args)
    server.read_token = read_token
    server.base_url = "http://127.0.0.1:%d" % server.port
    return server


@pytest.fixture
def feed_server(tmp_path):
    server = start_feed_server(tmp_path)
    yield server
    server.stop()


def http_get(server, path, token=None, timeout=DEADLINE):
    """(status, parsed JSON body or None) of one GET on a connection of its
    own (a path beside /scim, e.g. /events)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": "Bearer " + (token or server.read_token)})
        response = conn.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def feed_head(server):
    status, body = http_get(server, "/events/head")
    assert status == 200, body
    return body["cursor"]


def feed_page(server, cursor, limit=1000, wait=0, timeout=DEADLINE):
    path = "/events?after=%s&limit=%d" % (urllib.parse.quote(cursor), limit)
    if wait:
        path += "&wait=%d" % wait
    status, page = http_get(server, path, timeout=timeout)
    assert status == 200, page
    return page


def read_until(server, cursor, target):
    """Every event after `cursor` up to the cursor `target`, reading pages
    without waiting; (events, the cursor reached)."""
    events = []
    deadline = time.monotonic() + DEADLINE
    while cursor != target:
        assert time.monotonic() < deadline, "the feed did not reach %s from %s" % (target, cursor)
        page = feed_page(server, cursor)
        events.extend(page["events"])
        cursor = page["next_cursor"]
    return events, cursor


def by_request(events):
    """[(type, resource id), ...] per request (events sharing a txn, which
    follow one another), each request's sorted: the feed orders requests,
    and the README leaves the order within one request open."""
    requests = []
    for event in events:
        if not requests or requests[-1][0] != event["txn"]:
            requests.append((event["txn"], []))
        requests[-1][1].append((event["type"], event["resource"]["id"]))
    return [sorted(pairs) for _, pairs in requests]


def seq_of(cursor):
    """The sequence number a cursor names (the integer before the dot)."""
    return int(cursor.split(".")[0])


def version_of(text):
    """The integer in a weak ETag / meta.version: W/"4" -> 4."""
    match = re.fullmatch(r'W/"(\d+)"', text or "")
    assert match, text
    return int(match.group(1))


def user_body(user_name, **attributes):
    body = {"schemas": [URN_USER], "userName": user_name}
    body.update(attributes)
    return body


def group_body(display_name, member_ids=()):
    return {"schemas": [URN_GROUP], "displayName": display_name,
            "members": [{"value": member_id} for member_id in member_ids]}


def patch_body(*operations):
    return {"schemas": [URN_PATCH], "Operations": list(operations)}


def accepted_connections(server):
    """How many connections to the SCIM port the server process has
    accepted and holds open (ESTABLISHED sockets among its file
    descriptors, from Linux's /proc), or None where /proc is missing."""
    pid = server.process.pid
    try:
        names = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue   # closed in between
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = handle.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == server.port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


class LongPoll(threading.Thread):
    """One GET /events?wait= on a connection of its own; `sent` is set once
    the request is on its way, `status`/`page` (or `error`) once answered."""

    def __init__(self, server, cursor, wait=POLL_WAIT):
        super().__init__(daemon=True)
        self.server = server
        self.path = "/events?after=%s&limit=1000&wait=%d" % (urllib.parse.quote(cursor), wait)
        self.sent = threading.Event()
        self.status = self.page = self.error = None
        self.answered_at = None

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=2 * DEADLINE)
        try:
            conn.request("GET", self.path, headers={"Authorization": "Bearer " + self.server.read_token})
            self.sent.set()
            response = conn.getresponse()
            raw = response.read()
            self.status, self.page = response.status, json.loads(raw)
        except Exception as exc:   # asserted by the test: a closed connection is a failure
            self.error = repr(exc)
        finally:
            self.answered_at = time.monotonic()
            self.sent.set()
            conn.close()

    def outcome(self):
        """(status, event types) or ("error", message): what the test compares."""
        if self.error is not None:
            return ("error", self.error)
        return (self.status, tuple(event["type"] for event in self.page["events"]))


def park_polls(server, count, cursor, wait=POLL_WAIT):
    """Start `count` long-polls and wait until every one has sent its request."""
    polls = [LongPoll(server, cursor, wait) for _ in range(count)]
    for poll in polls:
        poll.start()
    wait_for(lambda: all(poll.sent.is_set() for poll in polls), timeout=DEADLINE,
             what="%d long-polls sending their request" % count)
    return polls


def wait_until_accepted(server, count, timeout=POLL_WAIT - 5):
    """Wait until the server has accepted `count` connections (the polls'),
    within their wait (POLL_WAIT); a pause where /proc is missing."""
    if accepted_connections(server) is None:
        time.sleep(1)
        return
    try:
        wait_for(lambda: accepted_connections(server) >= count, timeout=timeout)
    except AssertionError:
        raise AssertionError("the server accepted %s of %d long-poll connections within %d s"
                             % (accepted_connections(server), count, timeout)) from None


# -- 1. every acknowledged write's events, exactly once, in commit order -----------

WRITERS = 16
FOLLOWERS = 4
ROUNDS = 3


class Expectations:
    """The events the writes acknowledged so far must have produced, by
    resource: users -> [(type, version)], group lifecycle -> [type],
    (group, member) -> [member_added/member_removed]. Each key is only ever
    changed by one writer thread, so each list's order is known; the lock
    only guards the dicts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.users = collections.defaultdict(list)
        self.groups = collections.defaultdict(list)
        self.members = collections.defaultdict(list)
        self.deleted_members = []               # (group id, user id): the user's DELETE removed it
        self.counts = collections.Counter()    # "user 201", "user 409", "delete group 204", ...
        self.unexpected = []                    # answers other than the one expected

    def user(self, user_id, kind, version):
        with self.lock:
            self.users[user_id].append((kind, version))

    def group(self, group_id, kind):
        with self.lock:
            self.groups[group_id].append(kind)

    def member(self, group_id, member_id, kind):
        with self.lock:
            self.members[group_id, member_id].append(kind)


def expectations_of_feed(events):
    """The same three dicts built from the feed's events."""
    users, groups, members = (collections.defaultdict(list) for _ in range(3))
    for event in events:
        resource = event["resource"]
        if resource["type"] == "User":
            users[resource["id"]].append((event["type"], version_of(resource["version"])))
        elif event["type"] in ("group.member_added", "group.member_removed"):
            assert event["data"]["group"]["value"] == resource["id"], event
            members[resource["id"], event["data"]["member"]["value"]].append(event["type"])
        else:
            groups[resource["id"]].append(event["type"])
    return users, groups, members


class MixedWriter(threading.Thread):
    """A provisioning client making users and groups of its own (and
    joining its users to one shared group) through every kind of write,
    some of them failing on purpose, and recording the events each
    acknowledged write must produce."""

    def __init__(self, server, number, shared_group, expected):
        super().__init__(daemon=True)
        self.server = server
        self.number = number
        self.shared = shared_group
        self.expected = expected
        self.error = None

    def call(self, method, path, body, want, label):
        status, _, answer = self.server.request(method, path, body)
        with self.expected.lock:
            self.expected.counts["%s %d" % (label, status)] += 1
            if status != want:
                self.expected.unexpected.append("writer %d: %s %s -> %d (wanted %d): %s"
                                                % (self.number, method, path, status, want, answer))
        return status, answer

    def run(self):
        try:
            for round_number in range(ROUNDS):
                self.round(round_number)
        except Exception as exc:   # asserted by the test
            self.error = repr(exc)

    def round(self, r):
        exp, name = self.expected, "w%02d-r%d" % (self.number, r)
        unknown = str(uuid.uuid4())

        # Two users; the same userName again in another case is 409.
        _, ua = self.call("POST", "/Users", user_body(name + "-a@feed.example.com"), 201, "create user")
        exp.user(ua["id"], "user.created", 1)
        _, ub = self.call("POST", "/Users", user_body(name + "-b@feed.example.com", displayName="B " + name),
                          201, "create user")
        exp.user(ub["id"], "user.created", 1)
        self.call("POST", "/Users", user_body(name.upper() + "-A@FEED.example.com"), 409, "create user")

        # A group created with a member; its displayName again is 409, an unknown member 400.
        _, group = self.call("POST", "/Groups", group_body("Team " + name, [ua["id"]]), 201, "create group")
        gid = group["id"]
        exp.group(gid, "group.created")
        exp.member(gid, ua["id"], "group.member_added")
        self.call("POST", "/Groups", group_body("TEAM " + name.upper()), 409, "create group")
        self.call("POST", "/Groups", group_body("Other " + name, [unknown]), 400, "create group")

        # PATCH add; an add with one unknown member fails whole (ub joins nothing).
        self.call("PATCH", "/Groups/" + gid, patch_body(
            {"op": "add", "path": "members", "value": [{"value": ub["id"]}]}), 204, "patch group")
        exp.member(gid, ub["id"], "group.member_added")
        self.call("PATCH", "/Groups/" + self.shared, patch_body(
            {"op": "add", "path": "members", "value": [{"value": ub["id"]}, {"value": unknown}]}),
            400, "patch group")
        self.call("PATCH", "/Groups/" + self.shared, patch_body(
            {"op": "add", "path": "members", "value": [{"value": ua["id"]}]}), 204, "patch group")
        exp.member(self.shared, ua["id"], "group.member_added")

        # Deactivate, the same again (no change: no event), reactivate; rename ub.
        user_path = "/Users/" + ua["id"]
        _, answer = self.call("PATCH", user_path, patch_body({"op": "replace", "path": "active", "value": False}),
                              200, "patch user")
        exp.user(ua["id"], "user.deactivated", version_of(answer["meta"]["version"]))
        _, again = self.call("PATCH", user_path, patch_body({"op": "replace", "value": {"active": False}}),
                             200, "patch user")
        if again["meta"]["version"] != answer["meta"]["version"]:
            with exp.lock:
                exp.unexpected.append("an unchanged PATCH moved %s's version on" % ua["id"])
        _, answer = self.call("PATCH", user_path, patch_body({"op": "replace", "path": "active", "value": True}),
                              200, "patch user")
        exp.user(ua["id"], "user.reactivated", version_of(answer["meta"]["version"]))
        ua_version = version_of(answer["meta"]["version"])
        _, answer = self.call("PATCH", "/Users/" + ub["id"], patch_body(
            {"op": "replace", "path": "displayName", "value": "Renamed " + name}), 200, "patch user")
        exp.user(ub["id"], "user.updated", version_of(answer["meta"]["version"]))
        ub_version = version_of(answer["meta"]["version"])

        # PUT the group: renamed, ua out; the same PUT again changes nothing.
        renamed = group_body("Team " + name + " renamed", [ub["id"]])
        self.call("PUT", "/Groups/" + gid, renamed, 200, "put group")
        exp.group(gid, "group.updated")
        exp.member(gid, ua["id"], "group.member_removed")
        self.call("PUT", "/Groups/" + gid, renamed, 200, "put group")

        # Delete ub (it leaves the group in the same transaction); then 404s.
        self.call("DELETE", "/Users/" + ub["id"], None, 204, "delete user")
        exp.user(ub["id"], "user.deleted", ub_version)
        exp.member(gid, ub["id"], "group.member_removed")
        with exp.lock:
            exp.deleted_members.append((gid, ub["id"]))
        self.call("DELETE", "/Users/" + ub["id"], None, 404, "delete user")
        self.call("PATCH", "/Users/" + ub["id"], patch_body(
            {"op": "replace", "path": "displayName", "value": "gone"}), 404, "patch user")
        self.call("PATCH", "/Groups/" + gid, patch_body(
            {"op": "add", "path": "members", "value": [{"value": ub["id"]}]}), 400, "patch group")

        if r % 2 == 0:
            # Delete the group (one event, none per member); ua stays in the shared group.
            self.call("DELETE", "/Groups/" + gid, None, 204, "delete group")
            exp.group(gid, "group.deleted")
            self.call("DELETE", "/Groups/" + gid, None, 404, "delete group")
        else:
            # ua leaves the shared group, then is deleted (no membership left: no member event).
            self.call("PATCH", "/Groups/" + self.shared, patch_body(
                {"op": "remove", "path": 'members[value eq "%s"]' % ua["id"]}), 204, "patch group")
            exp.member(self.shared, ua["id"], "group.member_removed")
            self.call("DELETE", user_path, None, 204, "delete user")
            exp.user(ua["id"], "user.deleted", ua_version)


class Follower(threading.Thread):
    """A consumer long-polling the feed from "0" until it reaches `final`
    (set once the writers are done)."""

    def __init__(self, server, final):
        super().__init__(daemon=True)
        self.server = server
        self.final = final            # a one-item list, filled in by the test
        self.events = []
        self.polls = 0
        self.error = None

    def run(self):
        cursor = "0"
        deadline = time.monotonic() + 3 * DEADLINE
        try:
            while True:
                page = feed_page(self.server, cursor, wait=FEED_WAIT)
                self.polls += 1
                self.events.extend(page["events"])
                cursor = page["next_cursor"]
                if self.final and cursor == self.final[0] and not page["has_more"]:
                    return
                if time.monotonic() > deadline:
                    self.error = "stuck at %s (final %s)" % (cursor, self.final)
                    return
        except Exception as exc:   # asserted by the test
            self.error = repr(exc)


def test_16_writers_4_followers_every_acknowledged_write_exactly_once_in_commit_order(feed_server):
    """16 threads create, PATCH (active false/true, rename), PUT, add and
    remove members and DELETE users and groups (with 409s, 400s and 404s on
    purpose) while 4 followers long-poll from "0". Every follower sees the
    same events, numbered 1, 2, 3, ... with no gap or repeat, exactly the
    events table; every acknowledged write has its events, in its order per
    resource, and no refused one has any."""
    server = feed_server
    status, _, shared = server.request("POST", "/Groups", group_body("Everyone"))
    assert status == 201, shared
    expected = Expectations()
    expected.group(shared["id"], "group.created")

    final = []
    followers = [Follower(server, final) for _ in range(FOLLOWERS)]
    for follower in followers:
        follower.start()
    writers = [MixedWriter(server, n, shared["id"], expected) for n in range(WRITERS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=3 * DEADLINE)
    assert not any(writer.is_alive() for writer in writers), "a writer hung"
    assert [writer.error for writer in writers if writer.error] == []
    assert expected.unexpected == [], "\n".join(expected.unexpected[:20])

    final.append(feed_head(server))
    for follower in followers:
        follower.join(timeout=3 * DEADLINE)
    assert not any(follower.is_alive() for follower in followers), "a follower hung"
    assert [follower.error for follower in followers if follower.error] == []

    # Every follower saw the same numbered sequence: 1, 2, 3, ... head, each once.
    stored = [tuple(row) for row in query(server.db_path, "SELECT seq, event_id FROM events ORDER BY seq")]
    assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
    assert stored[-1][0] == seq_of(final[0])
    for follower in followers:
        seen = [(seq_of(event["cursor"]), event["id"]) for event in follower.events]
        seqs = [seq for seq, _ in seen]
        gaps = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
        assert gaps == [], "not consecutive: %s" % gaps[:10]
        for event in follower.events:   # the cursor carries the start of the event's id
            assert event["cursor"] == "%d.%s" % (seq_of(event["cursor"]), event["id"].replace("-", "")[:12])
        assert seen == stored
    assert len({json.dumps(f.events, sort_keys=True) for f in followers}) == 1

    # Every acknowledged write's events, in its order per resource; none of a refused write.
    events = followers[0].events
    users, groups, members = expectations_of_feed(events)
    assert dict(users) == dict(expected.users)
    assert dict(groups) == dict(expected.groups)
    assert dict(members) == dict(expected.members)
    types = collections.Counter(event["type"] for event in events)
    counts = expected.counts
    assert types["user.created"] == counts["create user 201"] == 2 * WRITERS * ROUNDS
    assert types["group.created"] == counts["create group 201"] + 1 == WRITERS * ROUNDS + 1
    assert types["user.deleted"] == counts["delete user 204"]
    assert types["group.deleted"] == counts["delete group 204"]
    created = [e["resource"]["id"] for e in events if e["type"] == "user.created"]
    assert len(created) == len(set(created))
    for refused in ("create user 409", "create group 409", "create group 400", "patch group 400",
                    "delete user 404", "patch user 404", "delete group 404"):
        assert counts[refused] > 0, refused   # the refusals did happen (and produced nothing, above)

    # One request's events share a txn: a deleted member's removal is in its user.deleted's.
    txn_of = {e["resource"]["id"]: e["txn"] for e in events if e["type"] == "user.deleted"}
    removal_txn = {(e["resource"]["id"], e["data"]["member"]["value"]): e["txn"]
                   for e in events if e["type"] == "group.member_removed"}
    assert len(expected.deleted_members) == WRITERS * ROUNDS
    for group_id, user_id in expected.deleted_members:
        assert removal_txn[group_id, user_id] == txn_of[user_id]
    # One txn per acknowledged request that changed something: 11 in even rounds (the group
    # is deleted), 12 in odd ones (ua leaves the shared group and is deleted), and the shared
    # group's creation; the PATCH and PUT that changed nothing have none.
    assert len({e["txn"] for e in events}) == 1 + WRITERS * sum(11 + r % 2 for r in range(ROUNDS))
    print("\n[feed] %d events, %d polls per follower, statuses %s"
          % (len(events), max(f.polls for f in followers), dict(counts)))


# -- 2, 3. long-polls hold up no lookup --------------------------------------------

def lookups_while_polls_wait(server, polls, lookups):
    """`lookups` filter GETs and /healthz probes, one after another, while
    `polls` wait; they must all be answered before the polls' wait ends
    (else they were held up behind the polls). Returns how many ran."""
    deadline = time.monotonic() + POLL_WAIT - 5
    for n in range(lookups):
        remaining = deadline - time.monotonic()
        assert remaining > 0, ("only %d of %d lookups were answered while %d long-polls waited "
                               "(the server has accepted %s connections)"
                               % (n, lookups, len(polls), accepted_connections(server)))
        path = "/scim/Users?filter=" + urllib.parse.quote('userName eq "nobody%d@example.com"' % n)
        try:
            status, body = http_get(server, path, token=server.token, timeout=remaining)
        except OSError as exc:
            raise AssertionError("lookup %d of %d was not answered while %d long-polls waited: %r "
                                 "(the server has accepted %s connections)"
                                 % (n, lookups, len(polls), exc, accepted_connections(server)))
        assert status == 200 and body["totalResults"] == 0, body
        if n % 10 == 0:
            status, _, text = healthz(server.port)
            assert (status, text) == (200, b"ok\n")
    answered = [poll for poll in polls if poll.answered_at is not None]
    assert answered == [], "%d long-polls were answered before any change: %s" % (
        len(answered), collections.Counter(poll.outcome() for poll in answered))
    return lookups


def assert_every_poll_gets_the_user(server, polls):
    """One POST /Users commits; every waiting poll answers with exactly its user.created."""
    status, _, user = server.request("POST", "/Users", user_body("awaited@example.com"))
    assert status == 201, user
    for poll in polls:
        poll.join(timeout=DEADLINE)
    assert not any(poll.is_alive() for poll in polls), "a long-poll was not answered"
    outcomes = collections.Counter(poll.outcome() for poll in polls)
    assert outcomes == {(200, ("user.created",)): len(polls)}, outcomes
    for poll in polls:
        event, = poll.page["events"]
        assert event["resource"]["id"] == user["id"]
        assert poll.page["next_cursor"] == event["cursor"] == feed_head(server)


def test_200_waiting_long_polls_hold_up_no_lookup_on_the_event_loop(feed_server):
    """Default mode (no --threads: reads run on the event loop): 200
    long-polls (wait=30) park, 200 filter lookups and /healthz probes are
    all answered while they wait, then one POST answers all 200 with its
    user.created."""
    server = feed_server
    polls = park_polls(server, 200, feed_head(server))
    wait_until_accepted(server, 200)
    lookups_while_polls_wait(server, polls, 200)
    assert_every_poll_gets_the_user(server, polls)


def test_waiting_long_polls_hold_up_no_lookup_with_threads(tmp_path):
    """--threads 2: the same with 20 long-polls."""
    server = start_feed_server(tmp_path, ["--threads", "2"])
    try:
        polls = park_polls(server, 20, feed_head(server))
        wait_until_accepted(server, 20)
        lookups_while_polls_wait(server, polls, 50)
        assert_every_poll_gets_the_user(server, polls)
    finally:
        server.stop()


# -- 4. SIGTERM answers the waiting long-polls -------------------------------------

def test_sigterm_answers_waiting_long_polls_and_exits_0(feed_server):
    """10 long-polls wait (wait=30); SIGTERM: each is answered 200 with no
    events (a closed connection fails), and the server exits 0 long before
    the polls' 30 s are up."""
    server = feed_server
    status, _, _ = server.request("POST", "/Users", user_body("before@example.com"))
    assert status == 201
    head = feed_head(server)
    polls = park_polls(server, 10, head)
    wait_until_accepted(server, 10)
    time.sleep(0.5)   # not a bound: lets the accepted requests reach their wait (it passes without, too)
    assert all(poll.answered_at is None for poll in polls)
    server.process.terminate()
    assert server.process.wait(timeout=25) == 0
    for poll in polls:
        poll.join(timeout=DEADLINE)
    outcomes = collections.Counter(poll.outcome() for poll in polls)
    assert outcomes == {(200, ()): 10}, outcomes
    for poll in polls:
        assert poll.page == {"events": [], "next_cursor": head, "has_more": False}
    output = server.stop()
    assert "scim-appliance stopped" in output
    assert "still running" not in output, output


# -- 5. list, then follow, with writes all along -----------------------------------

RECIPE_WRITERS = 4
SEED_USERS = 150
SEED_GROUPS = 10
WRITES_BETWEEN_PAGES = 3
FOLLOW_WRITES = 150


class WriteBudget:
    """How many more writes the writers may make: the test grants them, so
    that writes land between (and during) the listing's pages however fast
    or slow the machine is, and their number stays bounded."""

    def __init__(self):
        self.left = 0
        self.stopped = False
        self.changed = threading.Condition()

    def grant(self, count):
        with self.changed:
            self.left += count
            self.changed.notify_all()

    def stop(self):
        with self.changed:
            self.stopped = True
            self.changed.notify_all()

    def take(self):
        """True when a write may be made, False once stopped."""
        with self.changed:
            while not self.left and not self.stopped:
                self.changed.wait()
            if self.stopped:
                return False
            self.left -= 1
            return True


class RandomWriter(threading.Thread):
    """Creates, renames, (de)activates and deletes users and groups and
    changes memberships at random on a shared pool, one write per unit of
    `budget`, until it is stopped. 4xx answers (another thread got there
    first) are expected; 5xx and transport errors are failures."""

    def __init__(self, server, number, users, groups, pool_lock, budget):
        super().__init__(daemon=True)
        self.server, self.number = server, number
        self.users, self.groups, self.lock, self.budget = users, groups, pool_lock, budget
        self.rng = random.Random(number)
        self.writes = collections.Counter()
        self.errors = []

    def pick(self, pool):
        with self.lock:
            return self.rng.choice(pool) if pool else None

    def run(self):
        n = 0
        try:
            while self.budget.take():
                n += 1
                self.one(n)
        except Exception as exc:
            self.errors.append(repr(exc))

    def skipped(self):
        self.writes[0] += 1   # nothing to write to (an empty pool): counted, so the budget moves on

    def one(self, n):
        rng, tag = self.rng, "rw%d-%d" % (self.number, n)
        choice = rng.random()
        if choice < 0.2:
            status, _, body = self.server.request("POST", "/Users", user_body(
                tag + "@recipe.example.com", displayName=tag))
            if status == 201:
                with self.lock:
                    self.users.append(body["id"])
        elif choice < 0.4:
            user_id = self.pick(self.users)
            if user_id is None:
                return self.skipped()
            operation = rng.choice([
                {"op": "replace", "path": "active", "value": rng.random() < 0.5},
                {"op": "replace", "path": "displayName", "value": "Name " + tag},
                {"op": "replace", "path": "userName", "value": tag + "@renamed.example.com"}])
            status, _, body = self.server.request("PATCH", "/Users/" + user_id, patch_body(operation))
        elif choice < 0.5:
            user_id = self.pick(self.users)
            if user_id is None:
                return self.skipped()
            status, _, body = self.server.request("DELETE", "/Users/" + user_id)
            if status == 204:
                with self.lock:
                    if user_id in self.users:
                        self.users.remove(user_id)
        elif choice < 0.55:
            status, _, body = self.server.request("POST", "/Groups", group_body(
                "Group " + tag, [u for u in {self.pick(self.users), self.pick(self.users)} if u]))
            if status == 201:
                with self.lock:
                    self.groups.append(body["id"])
        elif choice < 0.85:
            group_id, user_id = self.pick(self.groups), self.pick(self.users)
            if group_id is None or user_id is None:
                return self.skipped()
            if rng.random() < 0.6:
                operation = {"op": "add", "path": "members", "value": [{"value": user_id}]}
            else:
                operation = {"op": "remove", "path": 'members[value eq "%s"]' % user_id}
            status, _, body = self.server.request("PATCH", "/Groups/" + group_id, patch_body(operation))
        elif choice < 0.95:
            group_id = self.pick(self.groups)
            if group_id is None:
                return self.skipped()
            members = [u for u in {self.pick(self.users) for _ in range(3)} if u]
            status, _, body = self.server.request("PUT", "/Groups/" + group_id, group_body(
                "Group " + tag, members))
        else:
            group_id = self.pick(self.groups)
            if group_id is None:
                return self.skipped()
            status, _, body = self.server.request("DELETE", "/Groups/" + group_id)
            if status == 204:
                with self.lock:
                    if group_id in self.groups:
                        self.groups.remove(group_id)
        self.writes[status] += 1
        if status >= 500:
            self.errors.append("%d %s" % (status, body))


class Replica:
    """A consumer's copy, kept the README's way: a representation is stored
    unless a newer meta.version of it is held; *.deleted deletes;
    group.member_* adds or removes the member."""

    def __init__(self):
        self.users = {}       # id -> (version, userName, active)
        self.groups = {}      # id -> (version, displayName)
        self.members = set()  # (group id, member id)

    def store_user(self, user):
        version = version_of(user["meta"]["version"])
        held = self.users.get(user["id"])
        if held is None or held[0] < version:
            self.users[user["id"]] = (version, user["userName"], user.get("active"))

    def store_group(self, group):
        version = version_of(group["meta"]["version"])
        held = self.groups.get(group["id"])
        if held is None or held[0] < version:
            self.groups[group["id"]] = (version, group["displayName"])

    def apply(self, event):
        kind, resource = event["type"], event["resource"]
        if kind == "user.deleted":
            self.users.pop(resource["id"], None)
        elif kind == "group.deleted":
            self.groups.pop(resource["id"], None)
            self.members = {(g, m) for g, m in self.members if g != resource["id"]}
        elif kind == "group.member_added":
            self.members.add((event["data"]["group"]["value"], event["data"]["member"]["value"]))
        elif kind == "group.member_removed":
            self.members.discard((event["data"]["group"]["value"], event["data"]["member"]["value"]))
        elif kind.startswith("user."):
            self.store_user(event["data"])
        elif kind.startswith("group."):
            self.store_group(event["data"])
        else:
            raise AssertionError("an event of an unknown type: %s" % kind)

    def view(self):
        return ({i: (name, active) for i, (_, name, active) in self.users.items()},
                {i: name for i, (_, name) in self.groups.items()}, set(self.members))


def list_all(server, resource, count, replica, between_pages=lambda: None):
    """Page through GET /scim/{resource} into `replica` as the README's
    recipe does: by id (`filter=id gt "<last id>"&sortBy=id`), so that a
    delete between two pages shifts nothing (startIndex pages would: the
    next resource moves onto the page already read); `between_pages` is
    called after each page. Returns how many pages."""
    last, pages = None, 0
    while True:
        where = "" if last is None else "&filter=" + urllib.parse.quote('id gt "%s"' % last)
        status, _, page = server.request("GET", "/%s?sortBy=id&count=%d%s" % (resource, count, where))
        assert status == 200, page
        pages += 1
        for item in page["Resources"]:
            if resource == "Users":
                replica.store_user(item)
            else:
                replica.store_group(item)
                replica.members.update((item["id"], member["value"]) for member in item.get("members", []))
        if len(page["Resources"]) < count:
            return pages
        last = page["Resources"][-1]["id"]
        between_pages()


def database_view(path):
    users = {row[0]: (row[1], None if row[2] is None else bool(row[2]))
             for row in query(path, "SELECT id, user_name, active FROM users")}
    groups = dict(query(path, "SELECT id, display_name FROM groups"))
    members = {tuple(row) for row in query(path, "SELECT group_id, member_id FROM members")}
    return users, groups, members


@pytest.mark.parametrize("user_page, group_page", [(10, 2), (1000, 1000)], ids=["paged", "one-page"])
def test_list_then_follow_with_writes_all_along_ends_equal_to_the_database(feed_server, user_page, group_page):
    """README's recipe, with 4 writers running all along: read the head,
    list every user and group page by page (a few writes land between any
    two pages), follow the feed from the head applying events idempotently
    by meta.version; once the writers stop and the consumer has caught up,
    its copy equals the database. "one-page" lists each resource type in a
    single page (nothing can shift between pages)."""
    server = feed_server
    users, groups, pool_lock, budget = [], [], threading.Lock(), WriteBudget()
    for n in range(SEED_USERS):
        status, _, body = server.request("POST", "/Users", user_body("seed%03d@recipe.example.com" % n))
        assert status == 201
        users.append(body["id"])
    for n in range(SEED_GROUPS):
        status, _, body = server.request("POST", "/Groups", group_body("Seed %d" % n, users[n::SEED_GROUPS]))
        assert status == 201
        groups.append(body["id"])
    writers = [RandomWriter(server, n, users, groups, pool_lock, budget) for n in range(RECIPE_WRITERS)]

    def writes():
        return sum(sum(writer.writes.values()) for writer in writers)

    def let_writes_land(count=WRITES_BETWEEN_PAGES):
        """Let `count` more writes land; as many again may run on into the next page."""
        target = writes() + count
        budget.grant(2 * count)
        wait_for(lambda: writes() >= target, timeout=DEADLINE, what="%d writes" % count)

    for writer in writers:
        writer.start()
    try:
        let_writes_land(20)
        replica = Replica()
        cursor = feed_head(server)
        followed = []
        before = writes()
        pages = list_all(server, "Users", user_page, replica, let_writes_land)
        let_writes_land()
        pages += list_all(server, "Groups", group_page, replica, let_writes_land)
        during = writes() - before
        # Follow while the writers go on, until they have written some more.
        budget.grant(FOLLOW_WRITES)
        deadline = time.monotonic() + DEADLINE
        while writes() < before + during + FOLLOW_WRITES and time.monotonic() < deadline:
            page = feed_page(server, cursor, wait=1)
            for event in page["events"]:
                replica.apply(event)
            followed.extend(page["events"])
            cursor = page["next_cursor"]
    finally:
        budget.stop()
        for writer in writers:
            writer.join(timeout=DEADLINE)
    assert not any(writer.is_alive() for writer in writers)
    assert [e for w in writers for e in w.errors] == []
    events, cursor = read_until(server, cursor, feed_head(server))
    for event in events:
        replica.apply(event)
    followed.extend(events)
    statuses = sum((w.writes for w in writers), collections.Counter())
    print("\n[feed] recipe: %d pages listed while %d writes ran, writes %s, %d events after the follow"
          % (pages, during, dict(statuses), len(events)))
    assert sum(count for status, count in statuses.items() if 200 <= status < 300) >= FOLLOW_WRITES // 2
    mine, database = replica.view(), database_view(server.db_path)
    changed = {event["resource"]["id"] for event in followed}
    unlisted = sorted(name for i, (name, _) in database[0].items() if i not in mine[0] and i not in changed)
    assert mine[0] == database[0], ("users differ: %s; missing from the copy with no event after the head "
                                    "(so the paged listing skipped them): %s"
                                    % (_difference(mine[0], database[0]), unlisted))
    assert mine[1] == database[1], "groups differ: %s" % _difference(mine[1], database[1])
    assert mine[2] == database[2], "memberships differ: only in the copy %s, only in the database %s" % (
        sorted(mine[2] - database[2])[:5], sorted(database[2] - mine[2])[:5])


def test_pages_by_id_lose_no_user_when_one_is_deleted_between_pages(feed_server):
    """The recipe's step 2 paged by id, with one write while listing: users
    a, b, c, d; head; page 1 (sortBy=id, count=2); a is deleted; page 2
    (id gt b). The copy equals the database (b, c, d). With startIndex
    pages, page 2 (startIndex=3) would have held only d: c moved onto page
    1 when a went, and c, unchanged, has no event either."""
    server = feed_server
    ids = {}
    for name in "abcd":
        status, _, body = server.request("POST", "/Users", user_body(name + "@paged.example.com"))
        assert status == 201
        ids[name] = body["id"]
    replica = Replica()
    cursor = feed_head(server)
    status, _, first = server.request("GET", "/Users?sortBy=id&count=2")
    assert status == 200 and [u["id"] for u in first["Resources"]] == [ids["a"], ids["b"]]
    status, _, _ = server.request("DELETE", "/Users/" + ids["a"])   # a write made while listing
    assert status == 204
    status, _, shifted = server.request("GET", "/Users?startIndex=3&count=2")
    assert status == 200 and [u["id"] for u in shifted["Resources"]] == [ids["d"]]   # why not by position
    status, _, second = server.request("GET", "/Users?sortBy=id&count=2&filter=" + urllib.parse.quote(
        'id gt "%s"' % ids["b"]))
    assert status == 200 and [u["id"] for u in second["Resources"]] == [ids["c"], ids["d"]]
    for user in first["Resources"] + second["Resources"]:
        replica.store_user(user)
    events, _ = read_until(server, cursor, feed_head(server))
    for event in events:
        replica.apply(event)
    assert [event["type"] for event in events] == ["user.deleted"]
    assert replica.view()[0] == database_view(server.db_path)[0]
    assert sorted(name for name, _ in replica.view()[0].values()) == [
        "b@paged.example.com", "c@paged.example.com", "d@paged.example.com"]


def _difference(mine, theirs):
    keys = set(mine) | set(theirs)
    return {key: (mine.get(key), theirs.get(key)) for key in sorted(keys)
            if mine.get(key) != theirs.get(key)}


# -- 6. export's cursor ------------------------------------------------------------

def test_export_cursor_follows_exactly_the_later_changes(feed_server):
    """`export users --format ndjson` while the server runs prints the
    cursor of its snapshot on stderr; the feed from that cursor has exactly
    the events of the changes made after it."""
    server = feed_server
    ids = []
    for n in range(5):
        status, _, body = server.request("POST", "/Users", user_body("export%d@example.com" % n))
        assert status == 201
        ids.append(body["id"])
    status, _, group = server.request("POST", "/Groups", group_body("Exported", ids[:2]))
    assert status == 201
    head = feed_head(server)

    result = run_cli("export", "users", "--format", "ndjson", "--db", server.db_path)
    match = re.search(r"^cursor: (\S+) \(", result.stderr, re.M)
    assert match, result.stderr
    cursor = match.group(1)
    assert cursor == head
    exported = [json.loads(line) for line in result.stdout.splitlines() if line]
    assert sorted(user["id"] for user in exported) == sorted(ids)

    # Later changes: their events, and nothing from before the export.
    status, _, later = server.request("POST", "/Users", user_body("later@example.com"))
    assert status == 201
    status, _, _ = server.request("PATCH", "/Users/" + ids[0], patch_body(
        {"op": "replace", "path": "active", "value": False}))
    assert status == 200
    status, _, _ = server.request("PATCH", "/Groups/" + group["id"], patch_body(
        {"op": "add", "path": "members", "value": [{"value": later["id"]}]}))
    assert status == 204
    status, _, _ = server.request("DELETE", "/Users/" + ids[1])
    assert status == 204
    events, reached = read_until(server, cursor, feed_head(server))
    assert by_request(events) == [
        [("user.created", later["id"])],
        [("user.deactivated", ids[0])],
        [("group.member_added", group["id"])],
        sorted([("user.deleted", ids[1]), ("group.member_removed", group["id"])]),
    ]
    members = [(e["type"], e["data"]["member"]["value"]) for e in events if e["type"].startswith("group.")]
    assert members == [("group.member_added", later["id"]), ("group.member_removed", ids[1])]
    assert all(seq_of(e["cursor"]) > seq_of(cursor) for e in events)
    assert reached == feed_head(server)


# -- 7. the README's consumer example ----------------------------------------------

def readme_example():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    match = re.search(r"<!-- feed-example:start -->\s*```python\n(.*?)```\s*<!-- feed-example:end -->", text, re.S)
    assert match, "the README's feed example is missing"
    return match.group(1)


def test_readme_consumer_example_follows_the_real_server(feed_server):
    """The README's `follow` (exec'd as printed): its first poll returns the
    writes made so far, its second waits for the next one; the cursor it
    returns is the head."""
    server = feed_server
    namespace = {}
    exec(compile(readme_example(), "README.md:feed-example", "exec"), namespace)
    follow = namespace["follow"]

    status, _, user = server.request("POST", "/Users", user_body("example@example.com"))
    assert status == 201
    status, _, group = server.request("POST", "/Groups", group_body("Example", [user["id"]]))
    assert status == 201
    status, _, _ = server.request("PATCH", "/Users/" + user["id"], patch_body(
        {"op": "replace", "path": "active", "value": False}))
    assert status == 200
    first = [[("user.created", user["id"])],
             sorted([("group.created", group["id"]), ("group.member_added", group["id"])]),
             [("user.deactivated", user["id"])]]

    collected, returned = [], []
    thread = threading.Thread(target=lambda: returned.append(
        follow(server.base_url, server.read_token, "0", on_event=collected.append, polls=2)), daemon=True)
    thread.start()
    # The first poll has answered with the writes so far; the second waits
    # (or finds) the next write, whichever comes first.
    wait_for(lambda: len(collected) >= 4, timeout=DEADLINE, what="the first poll's events")
    status, _, _ = server.request("DELETE", "/Users/" + user["id"])
    assert status == 204
    thread.join(timeout=DEADLINE)
    assert not thread.is_alive()
    assert by_request(collected) == first + [sorted([("user.deleted", user["id"]),
                                                     ("group.member_removed", group["id"])])]
    assert returned == [feed_head(server)]
    assert [seq_of(e["cursor"]) for e in collected] == list(range(1, 7))
