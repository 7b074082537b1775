"""The real server (waitress in a subprocess) and the command line, over real HTTP.

Process start-ups are kept few: one Entra conversation, one token life cycle
(with --public-url and SIGTERM), one start from environment variables, one
start with no arguments, and one refused start on a busy port.
"""

import hashlib
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

import scim_appliance
from conftest import ROOT, LiveServer, free_port, http_json, receive_until_closed, run_cli, wait_for
from scim_appliance import URN_ENTERPRISE, URN_GROUP, URN_LIST, URN_PATCH, URN_USER

SCRIPT = os.path.join(ROOT, "scim_appliance.py")
PUBLIC_URL = "https://scim.example.com"
LIST_KEYS = {"schemas", "totalResults", "Resources", "startIndex", "itemsPerPage"}


# -- helpers -----------------------------------------------------------------------

def patch_body(*operations):
    return {"schemas": [URN_PATCH], "Operations": list(operations)}


def q(**params):
    """A query string form-encoded the way Entra sends it ('+' and %22)."""
    return "?" + urllib.parse.urlencode(params)


def assert_list(body, ids):
    assert set(body) == LIST_KEYS
    assert body["schemas"] == [URN_LIST]
    assert body["totalResults"] == len(ids)
    assert body["startIndex"] == 1
    assert body["itemsPerPage"] == len(body["Resources"])
    assert [r["id"] for r in body["Resources"]] == ids


def member_ids(server, group_id):
    status, _, group = server.request("GET", "/Groups/" + group_id)
    assert status == 200
    return sorted(m["value"] for m in group.get("members", []))


def clean_env(**overrides):
    """The environment without any SCIM_APPLIANCE_* the machine may have set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCIM_APPLIANCE_")}
    env.update(overrides)
    return env


def start_process(args, env, cwd):
    """Start scim_appliance.py and read stdout up to the "SCIM endpoint:" line.

    Returns (process, banner lines); the caller stops the process.
    """
    process = subprocess.Popen([sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    lines = []
    while True:
        line = process.stdout.readline()
        if not line:
            stop_process(process)
            raise AssertionError("server exited: %s %s" % ("".join(lines), process.stderr.read()))
        lines.append(line.rstrip("\n"))
        if line.startswith("SCIM endpoint:"):
            return process, lines


def wait_for_port(port):
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop_process(process):
    """SIGTERM, then wait; returns (exit code, remaining stdout + stderr)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = process.stdout.read() + process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    return process.returncode, output



def db_bytes(db_path):
    """Every byte of the database, its WAL and shared memory files."""
    data = b""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            with open(db_path + suffix, "rb") as handle:
                data += handle.read()
    return data


# -- the whole Entra conversation against a real server -------------------------------

def test_entra_conversation_against_the_real_server(live_server):
    """R5, R7-R11, R13, R16-R18, R20, R25, R26, R35-R42 end to end over real HTTP."""
    server = live_server
    port = server.port
    assert "SCIM endpoint: http://127.0.0.1:%d/scim" % port in server.banner.splitlines()
    assert "token create" not in server.banner   # a token exists: no instructions

    # R5 Test Connection: a random GUID, form-encoded → 200 and an empty list.
    status, headers, body = server.request(
        "GET", "/Users?filter=userName+eq+%22" + str(uuid.uuid4()) + "%22")
    assert status == 200
    assert headers["Content-Type"].startswith("application/scim+json")
    assert body == {"schemas": [URN_LIST], "totalResults": 0, "Resources": [], "startIndex": 1,
                    "itemsPerPage": 0}
    status, _, body = server.request("GET", "/Groups?filter=displayName+eq+%22" + str(uuid.uuid4()) + "%22")
    assert status == 200
    assert_list(body, [])

    # R7 create user.
    user_body = {
        "schemas": [URN_USER, URN_ENTERPRISE],
        "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
        "userName": "Test_User_00aa00aa-bb11-cc22-dd33-44ee44ee44ee",
        "active": True,
        "emails": [{"primary": True, "type": "work",
                    "value": "Test_User_11bb11bb-cc22-dd33-ee44-55ff55ff55ff@testuser.com"}],
        "meta": {"resourceType": "User"},
        "name": {"formatted": "givenName familyName", "familyName": "familyName", "givenName": "givenName"},
        "roles": [],
    }
    status, headers, user = server.request("POST", "/Users", user_body)
    assert status == 201
    assert headers["Content-Type"].startswith("application/scim+json")
    user_id = user["id"]
    location = "http://127.0.0.1:%d/scim/Users/%s" % (port, user_id)
    assert headers["Location"] == location == user["meta"]["location"]
    assert user["userName"] == user_body["userName"]
    assert user["active"] is True

    # R9 get.
    status, headers, got = server.request("GET", "/Users/" + user_id)
    assert status == 200
    assert got == user
    assert headers["ETag"] == got["meta"]["version"]

    # R10/R13 query by userName in another case, and by externalId.
    status, _, body = server.request("GET", "/Users" + q(filter='userName eq "%s"' % user_body["userName"].upper()))
    assert status == 200
    assert_list(body, [user_id])
    status, _, body = server.request("GET", "/Users" + q(filter='externalId eq "%s"' % user_body["externalId"]))
    assert_list(body, [user_id])

    # R16 multi-valued update, R17 single-valued update.
    status, _, user = server.request("PATCH", "/Users/" + user_id, patch_body(
        {"op": "Replace", "path": 'emails[type eq "work"].value', "value": "updatedEmail@microsoft.com"},
        {"op": "Replace", "path": "name.familyName", "value": "updatedFamilyName"}))
    assert status == 200
    assert user["emails"] == [{"value": "updatedEmail@microsoft.com", "type": "work", "primary": True}]
    assert user["name"]["familyName"] == "updatedFamilyName"
    new_name = "5b50642d-79fc-4410-9e90-4c077cdd1a59@testuser.com"
    status, _, user = server.request("PATCH", "/Users/" + user_id, patch_body(
        {"op": "Replace", "path": "userName", "value": new_name}))
    assert status == 200
    assert user["userName"] == new_name

    # R18 disable with the string "False", enable with true.
    status, _, user = server.request("PATCH", "/Users/" + user_id, patch_body(
        {"op": "Replace", "path": "active", "value": "False"}))
    assert status == 200
    assert user["active"] is False
    status, _, user = server.request("PATCH", "/Users/" + user_id, patch_body(
        {"op": "replace", "path": "active", "value": True}))
    assert status == 200
    assert user["active"] is True

    # R25/R26 manager set as a plain string, returned as {"value": id}; then removed.
    status, _, manager = server.request("POST", "/Users", {"schemas": [URN_USER], "userName": "manager@testuser.com"})
    assert status == 201
    manager_id = manager["id"]
    status, _, user = server.request("PATCH", "/Users/" + user_id, {
        "Operations": [{"op": "Add", "path": URN_ENTERPRISE + ":manager", "value": manager_id}],
        "schemas": [URN_PATCH]})
    assert status == 200
    assert user[URN_ENTERPRISE]["manager"]["value"] == manager_id
    status, _, user = server.request("PATCH", "/Users/" + user_id, patch_body(
        {"op": "Remove", "path": URN_ENTERPRISE + ":manager"}))
    assert status == 200
    assert "manager" not in user.get(URN_ENTERPRISE, {})

    status, _, third = server.request("POST", "/Users", {"schemas": [URN_USER], "userName": "third@testuser.com"})
    assert status == 201
    third_id = third["id"]

    # R36 create group (ADSCIM schema URI), R37 rename.
    status, headers, group = server.request("POST", "/Groups", {
        "schemas": [URN_GROUP, "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"],
        "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159", "displayName": "displayName",
        "meta": {"resourceType": "Group"}})
    assert status == 201
    assert group["members"] == [] and group["schemas"] == [URN_GROUP]
    group_id = group["id"]
    assert headers["Location"] == "http://127.0.0.1:%d/scim/Groups/%s" % (port, group_id)
    status, _, body = server.request("PATCH", "/Groups/" + group_id, patch_body(
        {"op": "Replace", "path": "displayName", "value": "renamed group"}))
    assert (status, body) == (204, None)

    # R38/R39 add members ("$ref": null, several at once).
    status, _, body = server.request("PATCH", "/Groups/" + group_id, patch_body(
        {"op": "Add", "path": "members", "value": [{"$ref": None, "value": user_id},
                                                   {"$ref": None, "value": manager_id},
                                                   {"$ref": None, "value": third_id}]}))
    assert (status, body) == (204, None)
    assert member_ids(server, group_id) == sorted([user_id, manager_id, third_id])

    # R40 remove: value list, then members[value eq ...].
    status, _, _ = server.request("PATCH", "/Groups/" + group_id, patch_body(
        {"op": "Remove", "path": "members", "value": [{"$ref": None, "value": third_id}]}))
    assert status == 204
    assert member_ids(server, group_id) == sorted([user_id, manager_id])
    status, _, _ = server.request("PATCH", "/Groups/" + group_id, patch_body(
        {"op": "remove", "path": 'members[value eq "%s"]' % manager_id}))
    assert status == 204
    assert member_ids(server, group_id) == [user_id]
    # ... and remove all (no value).
    server.request("PATCH", "/Groups/" + group_id, patch_body(
        {"op": "Add", "path": "members", "value": [{"value": third_id}]}))
    assert member_ids(server, group_id) == sorted([user_id, third_id])
    status, _, _ = server.request("PATCH", "/Groups/" + group_id, patch_body({"op": "remove", "path": "members"}))
    assert status == 204
    assert member_ids(server, group_id) == []
    server.request("PATCH", "/Groups/" + group_id, patch_body(
        {"op": "Add", "path": "members", "value": [{"value": user_id}]}))

    # R20 reads with excludedAttributes=members: no members key.
    status, _, group = server.request("GET", "/Groups/%s?excludedAttributes=members" % group_id)
    assert status == 200
    assert "members" not in group
    assert group["displayName"] == "renamed group"
    status, _, body = server.request(
        "GET", "/Groups?excludedAttributes=members&filter=displayName+eq+%22renamed+group%22")
    assert_list(body, [group_id])
    assert "members" not in body["Resources"][0]

    # R35 delete user, R42 delete group.
    status, _, body = server.request("DELETE", "/Users/" + user_id)
    assert (status, body) == (204, None)
    status, _, error = server.request("GET", "/Users/" + user_id)
    assert status == 404 and error["status"] == "404"
    assert member_ids(server, group_id) == []
    status, _, body = server.request("DELETE", "/Groups/" + group_id)
    assert (status, body) == (204, None)
    status, _, _ = server.request("GET", "/Groups/" + group_id)
    assert status == 404

    # Stop the server (SIGTERM) and look at the file it leaves behind.
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=15) == 0
    conn = sqlite3.connect(server.db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        users = {row[0] for row in conn.execute("SELECT id FROM users")}
        assert users == {manager_id, third_id}
        assert conn.execute("SELECT count(*) FROM groups").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM members").fetchone()[0] == 0
        document = json.loads(conn.execute("SELECT document FROM users WHERE id = ?", (manager_id,)).fetchone()[0])
        assert document == {"userName": "manager@testuser.com"}
    finally:
        conn.close()


# -- the command line ----------------------------------------------------------------

def test_help_documents_every_setting_and_its_variable():
    """`--help` lists the commands; `serve --help` names every flag and SCIM_APPLIANCE_* variable."""
    top = run_cli("--help")
    assert "serve" in top.stdout and "token" in top.stdout
    assert "environment variable" in top.stdout
    serve_help = run_cli("serve", "--help").stdout
    for field, flag, variable, _, _ in scim_appliance.SETTINGS_TABLE:
        assert variable.startswith("SCIM_APPLIANCE_")
        assert variable in serve_help, variable
        assert flag in serve_help, flag
    token_help = run_cli("token", "create", "--help").stdout
    assert "--name" in token_help and "SCIM_APPLIANCE_DB" in token_help


def test_token_life_cycle_public_url_and_sigterm(tmp_path):
    """token create/list/revoke against a running `serve --public-url`; SIGTERM exits 0."""
    db_path = str(tmp_path / "tokens.db")
    server = LiveServer(db_path, extra_args=("--public-url", PUBLIC_URL))
    try:
        banner = server.banner.splitlines()
        assert "SCIM endpoint: %s/scim" % PUBLIC_URL in banner
        status, headers, _ = server.request("GET", "/Users", token="scimapp_made-up")
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")

        created = run_cli("token", "create", "--name", "entra", "--db", db_path)
        lines = created.stdout.splitlines()
        assert len(lines) == 1
        entra_token = lines[0]
        assert entra_token == entra_token.strip() and len(entra_token) >= 32 and " " not in entra_token
        backup_token = run_cli("token", "create", "--name", "backup", "--db", db_path).stdout.strip()
        assert backup_token != entra_token

        # A second live token with the same name is refused.
        duplicate = run_cli("token", "create", "--name", "entra", "--db", db_path, check=False)
        assert duplicate.returncode != 0
        assert duplicate.stdout == ""
        assert "entra" in duplicate.stderr

        # The token works; meta.location and Location come from --public-url.
        status, headers, user = server.request("POST", "/Users", {"schemas": [URN_USER], "userName": "pub@x.com"},
                                               token=entra_token)
        assert status == 201
        assert user["meta"]["location"] == "%s/scim/Users/%s" % (PUBLIC_URL, user["id"])
        assert headers["Location"] == user["meta"]["location"]

        # Stored: digests only, never the tokens. The token's use is written
        # by the activity log, within a second.
        def token_rows():
            conn = sqlite3.connect(db_path)
            try:
                rows = {name: (digest, created_at, last_used) for name, digest, created_at, last_used
                        in conn.execute("SELECT name, digest, created, last_used FROM tokens")}
            finally:
                conn.close()
            return rows if rows["entra"][2] is not None else None
        rows = wait_for(token_rows, what="the token's last_used")
        assert rows["entra"][0] == hashlib.sha256(entra_token.encode()).hexdigest()
        assert rows["backup"][0] == hashlib.sha256(backup_token.encode()).hexdigest()
        assert rows["entra"][2] is not None and rows["backup"][2] is None
        stored = db_bytes(db_path)
        assert entra_token.encode() not in stored and backup_token.encode() not in stored

        # token list: name, created, last used; never the token.
        listing = run_cli("token", "list", "--db", db_path).stdout
        assert entra_token not in listing and backup_token not in listing
        assert "LAST USED" in listing.upper()
        entra_line = next(line for line in listing.splitlines() if line.startswith("entra"))
        backup_line = next(line for line in listing.splitlines() if line.startswith("backup"))
        assert rows["entra"][1] in entra_line and rows["entra"][2] in entra_line
        assert rows["backup"][1] in backup_line and "never" in backup_line

        # Revoke: the running server refuses the token at once; the other one still works.
        revoked = run_cli("token", "revoke", "entra", "--db", db_path)
        assert revoked.returncode == 0
        status, _, _ = server.request("GET", "/Users", token=entra_token)
        assert status == 401
        status, _, body = server.request("GET", "/Users", token=backup_token)
        assert status == 200 and body["totalResults"] == 1
        assert "revoked" in run_cli("token", "list", "--db", db_path).stdout

        # Revoking a name that has no live token fails with a message on stderr.
        for name in ("nosuchtoken", "entra"):
            unknown = run_cli("token", "revoke", name, "--db", db_path, check=False)
            assert unknown.returncode != 0
            assert name in unknown.stderr
        # After revocation the name is free again.
        again = run_cli("token", "create", "--name", "entra", "--db", db_path).stdout.strip()
        status, _, _ = server.request("GET", "/Users", token=again)
        assert status == 200
    finally:
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=15)
        finally:
            output = server.stop()
    assert code == 0
    assert "stopped" in output
    # The database had no token at start: the banner says how to make one.
    assert "token create" in server.banner and db_path in server.banner


def test_environment_variables_instead_of_flags(tmp_path):
    """SCIM_APPLIANCE_PORT / _DB / _PUBLIC_URL configure `serve` (and _DB the token commands)."""
    port = free_port()
    db_path = str(tmp_path / "from-env.db")
    token = run_cli("token", "create", "--name", "entra", env={"SCIM_APPLIANCE_DB": db_path}).stdout.strip()
    assert os.path.exists(db_path)
    env = clean_env(SCIM_APPLIANCE_PORT=str(port), SCIM_APPLIANCE_DB=db_path,
                    SCIM_APPLIANCE_PUBLIC_URL=PUBLIC_URL)
    process, banner = start_process(["serve"], env, str(tmp_path))
    try:
        assert "SCIM endpoint: %s/scim" % PUBLIC_URL in banner
        assert not any("token create" in line for line in banner)   # the env db has a token
        wait_for_port(port)
        status, headers, user = http_json("POST", "http://127.0.0.1:%d/scim/Users" % port,
                                     {"schemas": [URN_USER], "userName": "env@x.com"}, token=token)
        assert status == 201
        assert user["meta"]["location"] == "%s/scim/Users/%s" % (PUBLIC_URL, user["id"])
        assert headers["Location"] == user["meta"]["location"]
    finally:
        code, output = stop_process(process)
    assert code == 0 and "stopped" in output
    assert not os.path.exists(str(tmp_path / "scim_appliance.db"))   # the default was not used
    conn = sqlite3.connect(db_path)
    try:
        assert [row[0] for row in conn.execute("SELECT user_name FROM users")] == ["env@x.com"]
    finally:
        conn.close()


def test_no_arguments_serves_with_the_defaults(tmp_path):
    """`python scim_appliance.py` alone = serve on 127.0.0.1:8080 with ./scim_appliance.db."""
    env = clean_env()
    ports = {}
    for name, default, variable in (("scim", 8080, "SCIM_APPLIANCE_PORT"),
                                    ("admin", 8081, "SCIM_APPLIANCE_ADMIN_PORT")):
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", default))
            ports[name] = default
        except OSError:
            # Taken on this machine: move the port, still check everything else.
            ports[name] = free_port()
            env[variable] = str(ports[name])
    port = ports["scim"]
    process, banner = start_process([], env, str(tmp_path))
    try:
        assert "SCIM endpoint: http://127.0.0.1:%d/scim" % port in banner
        text = "\n".join(banner)
        assert "Admin page: http://127.0.0.1:%d/" % ports["admin"] in text
        assert "Admin setup code: " in text
        wait_for_port(port)
        status, headers, config = http_json("GET", "http://127.0.0.1:%d/scim/ServiceProviderConfig" % port)
        assert status == 200 and config["patch"]["supported"] is True
        status, _, _ = http_json("GET", "http://127.0.0.1:%d/scim/Users" % port)
        assert status == 401
        with urllib.request.urlopen("http://127.0.0.1:%d/setup" % ports["admin"], timeout=10) as page:
            assert page.status == 200 and b"Setup code" in page.read()
    finally:
        code, output = stop_process(process)
    assert code == 0 and "stopped" in output
    # How to make a token is in the banner; the default database is in the cwd.
    assert "token create" in text and "scim_appliance.db" in text
    db_path = tmp_path / "scim_appliance.db"
    assert db_path.exists()
    conn = sqlite3.connect(str(db_path))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"users", "groups", "members", "tokens"} <= tables
    finally:
        conn.close()


@pytest.mark.parametrize("command", [["serve"], []], ids=["serve", "options-without-command"])
def test_port_in_use_exits_non_zero_with_a_message(tmp_path, command):
    """A busy port: non-zero exit, a one-line reason on stderr, no endpoint banner.
    Options without a command mean `serve` too (`scim_appliance.py [serve] --port N`)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(*(command + ["--port", str(port), "--db", str(tmp_path / "busy.db")]), check=False)
    assert result.returncode != 0
    assert "SCIM endpoint" not in result.stdout
    assert str(port) in result.stderr
    assert "Traceback" not in result.stderr
    assert "listen" in result.stderr.lower() or "in use" in result.stderr.lower()


def test_queue_depth_warning_lets_one_record_through_per_interval():
    now = [0.0]
    limit = scim_appliance.RateLimitedLog(interval=60, clock=lambda: now[0])

    def record():
        return logging.LogRecord("waitress.queue", logging.WARNING, __file__, 1, "Task queue depth is %d", (3,),
                                 None)

    first = record()
    assert limit.filter(first) and first.getMessage() == "Task queue depth is 3"
    assert [limit.filter(record()) for _ in range(500)] == [False] * 500
    now[0] += 59.9
    assert not limit.filter(record())
    now[0] += 0.2
    summary = record()
    assert limit.filter(summary)
    assert summary.getMessage() == "Task queue depth is 3 (and 501 more such warnings in the last 60 s)"
    now[0] += 60
    quiet = record()
    assert limit.filter(quiet) and quiet.getMessage() == "Task queue depth is 3"


def test_a_burst_on_one_worker_logs_the_queue_warning_at_most_once(tmp_path):
    """Sixteen clients at once on the one worker thread: waitress would warn
    "Task queue depth" for nearly every request; the log gets one line."""
    db_path = str(tmp_path / "burst.db")
    token = run_cli("token", "create", "--name", "entra", "--db", db_path).stdout.strip()
    server = LiveServer(db_path, ["--threads", "1"])
    statuses = []
    try:
        def client():
            for _ in range(15):
                statuses.append(server.request("GET", "/Users?count=1", token=token)[0])

        workers = [threading.Thread(target=client) for _ in range(16)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        output = server.stop()
    assert statuses == [200] * 240
    assert output.count("Task queue depth") <= 1


# -- requests on the event loop (--threads 0, the default) -------------------------

class EventLoop:
    """create_waitress_server(app, 0) on a loopback port, its loop run by a
    thread of this process the way serve() runs it."""

    def __init__(self, app):
        self.server, run_pending = scim_appliance.create_waitress_server(app, 0, host="127.0.0.1", port=0)
        self.port = int(self.server.effective_port)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=scim_appliance.run_event_loop, daemon=True,
                                       args=(self.server, run_pending, self.stopping, 0.05))
        self.thread.start()

    def close(self):
        self.stopping.set()
        self.thread.join(timeout=10)
        self.server.close()


def http_get(port, path, timeout=20):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path).encode())
        return receive_until_closed(client)


def test_event_loop_runs_requests_on_its_own_thread_in_arrival_order():
    seen = []

    def app(environ, start_response):
        seen.append((environ["PATH_INFO"], threading.current_thread()))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]

    loop = EventLoop(app)
    try:
        with socket.create_connection(("127.0.0.1", loop.port), timeout=10) as client:
            # Three pipelined requests on one connection, answered in order.
            client.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(3)))
            received = b""
            while received.count(b"HTTP/1.1 200") < 3 or not received.endswith(b"/2"):
                received += client.recv(4096)
        assert [body[-2:] for body in received.split(b"HTTP/1.1 200")[1:]] == [b"/0", b"/1", b"/2"]
        assert http_get(loop.port, "/3").endswith(b"\r\n\r\n/3")
    finally:
        loop.close()
    assert [path for path, _ in seen] == ["/0", "/1", "/2", "/3"]
    assert {thread for _, thread in seen} == {loop.thread}   # no worker thread


def test_event_loop_never_waits_for_a_client_that_does_not_read():
    """A 24 MB response (over waitress's 16 MB outbuf_high_watermark, where a
    writer waits for the loop to send) to a client that reads nothing yet: the
    loop must not wait for itself. It finishes the response into its buffers
    and goes on serving others; the slow client then gets every byte."""
    chunk = b"x" * (1 << 20)

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/big":
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(24 * len(chunk)))])
            return (chunk for _ in range(24))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"small"]

    loop = EventLoop(app)
    try:
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        slow.settimeout(20)
        slow.connect(("127.0.0.1", loop.port))
        slow.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.5)
        assert http_get(loop.port, "/other", timeout=5).endswith(b"\r\n\r\nsmall")   # the loop is free
        received = receive_until_closed(slow)
        slow.close()
    finally:
        loop.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == chunk * 24


def test_a_stopping_server_keeps_its_trigger_until_no_worker_can_pull_it():
    """serve()'s stop closes the listening socket at once (_stop_listening)
    but the trigger pipe only when no worker thread is left (_shut_down). A
    worker finishing a request pulls the trigger: os.write() on the closed
    pipe's number once wrote its b"x" over byte 0 of the database file,
    whose connection had taken that number."""
    release = threading.Event()

    def app(environ, start_response):
        release.wait(20)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"late"]

    server, run_pending = scim_appliance.create_waitress_server(
        app, 0, writers=1, is_write=scim_appliance.is_write_request, host="127.0.0.1", port=0)
    stopping = threading.Event()
    loop = threading.Thread(target=scim_appliance.run_event_loop, args=(server, run_pending, stopping, 0.05),
                            daemon=True)
    loop.start()
    client = socket.create_connection(("127.0.0.1", int(server.effective_port)), timeout=20)
    try:
        client.sendall(b"POST /scim/Users HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        deadline = time.monotonic() + 20
        while not server.task_dispatcher.threads or not any(
                channel.requests for channel in list(server._map.values()) if hasattr(channel, "requests")):
            assert time.monotonic() < deadline, "the request never reached the writer thread"
            time.sleep(0.01)
        scim_appliance._stop_listening(server)
        scim_appliance._shut_down(server, timeout=0.2)   # the writer is still inside the request
        assert not server.trigger._closed and server.task_dispatcher.threads
        release.set()
        assert receive_until_closed(client).endswith(b"late")   # its pull reached the open pipe
        stopping.set()
        loop.join(timeout=10)
        deadline = time.monotonic() + 20
        while server.task_dispatcher.threads:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        scim_appliance._shut_down(server)
        assert server.trigger._closed
    finally:
        release.set()
        stopping.set()
        client.close()
