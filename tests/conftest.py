"""Shared fixtures: a database in tmp_path, a token, the SCIM app under
webtest (wrapped exactly as `serve` wraps it), and a real server process."""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import webtest

import scim_appliance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC_URL = "https://scim.example.com"
SCIM_JSON = "application/scim+json; charset=utf-8"   # what Entra sends (R3)


@pytest.fixture
def settings(tmp_path):
    return scim_appliance.Settings(db=str(tmp_path / "scim.db"), public_url=PUBLIC_URL)


@pytest.fixture
def store(settings):
    store = scim_appliance.Store(settings.db)
    yield store
    store.close()


@pytest.fixture
def token(store):
    return scim_appliance.create_token(store, "entra")


@pytest.fixture
def activity(store):
    """The activity log, shared by the SCIM app and the admin page as in production
    (flushed by hand: no background thread in tests)."""
    return scim_appliance.ActivityLog(store)


@pytest.fixture
def wsgi_app(store, settings, activity):
    return scim_appliance.make_scim_app(store, settings, activity)


class ScimClient:
    """webtest with a bearer token and SCIM bodies: `client.post("/Users", {...})`.

    Paths are relative to /scim. Every call returns the webtest response;
    `status` is asserted by webtest (pass "*" to accept anything).
    """

    def __init__(self, app, token):
        self.app = app
        self.token = token

    def request(self, method, path, body=None, status=None, headers=None, raw=None,
                content_type=SCIM_JSON):
        all_headers = {}
        if self.token is not None:
            all_headers["Authorization"] = "Bearer " + self.token
        if body is not None or raw is not None:
            all_headers["Content-Type"] = content_type
        all_headers.update(headers or {})
        payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode("utf-8"))
        return self.app.request("/scim" + path, method=method, body=payload, headers=all_headers,
                                status=status, expect_errors=status is not None)

    def get(self, path, status=200, **kw):
        return self.request("GET", path, status=status, **kw)

    def post(self, path, body, status=201, **kw):
        return self.request("POST", path, body, status=status, **kw)

    def put(self, path, body, status=200, **kw):
        return self.request("PUT", path, body, status=status, **kw)

    def patch(self, path, operations, status=None, **kw):
        body = {"schemas": [scim_appliance.URN_PATCH], "Operations": operations}
        return self.request("PATCH", path, body, status=status, **kw)

    def delete(self, path, status=204, **kw):
        return self.request("DELETE", path, status=status, **kw)

    # Shorthands for the common resources.

    def create_user(self, user_name, **attributes):
        body = {"schemas": [scim_appliance.URN_USER], "userName": user_name}
        body.update(attributes)
        return self.post("/Users", body).json

    def create_group(self, display_name, **attributes):
        body = {"schemas": [scim_appliance.URN_GROUP], "displayName": display_name}
        body.update(attributes)
        return self.post("/Groups", body).json


@pytest.fixture
def client(wsgi_app, token):
    """An authenticated SCIM client (webtest, in process)."""
    return ScimClient(webtest.TestApp(wsgi_app), token)


@pytest.fixture
def anonymous(wsgi_app):
    """A SCIM client that sends no Authorization header."""
    return ScimClient(webtest.TestApp(wsgi_app), None)


@pytest.fixture
def db(settings, store):
    """A separate read-only connection to the database, to check what was stored."""
    conn = sqlite3.connect("file:%s?mode=ro" % settings.db, uri=True)
    conn.row_factory = sqlite3.Row
    yield conn
    conn.close()


def media_type(response):
    return response.headers.get("Content-Type", "").split(";")[0].strip().lower()


def assert_scim_error(response, status, scim_type=None):
    """RFC 7644 §3.12: an application/scim+json Error with schemas, status (a
    string), detail, and scimType exactly when one applies (`scim_type`:
    None = absent, "*" = any)."""
    assert response.status_int == status, response.body
    assert media_type(response) == "application/scim+json"
    body = json.loads(response.body.decode("utf-8"))
    assert body["schemas"] == [scim_appliance.URN_ERROR]
    assert body["status"] == str(status)
    assert isinstance(body.get("detail"), str) and body["detail"]
    if scim_type is None:
        assert "scimType" not in body, body
    elif scim_type == "*":
        assert isinstance(body.get("scimType"), str) and body["scimType"]
    else:
        assert body.get("scimType") == scim_type, body
    return body


def fill(text, replacements=None):
    """A documented request body (Microsoft's, Okta's) with the example ids
    it names replaced by ours, as bytes; it must stay valid JSON."""
    for documented, ours in (replacements or {}).items():
        assert documented in text
        text = text.replace(documented, ours)
    json.loads(text)
    return text.encode("utf-8")


def stored_document(db, table, resource_id):
    """The JSON document stored for a user or group (None if there is no row)."""
    row = db.execute("SELECT document FROM %s WHERE id = ?" % table, (resource_id,)).fetchone()
    return None if row is None else json.loads(row["document"])


def snapshot(db, tables=("users", "groups", "members")):
    """Every row of `tables`, to prove a request changed nothing."""
    return {table: [tuple(row) for row in db.execute("SELECT * FROM %s ORDER BY 1, 2" % table)]
            for table in tables}


def stored_members(db, group_id):
    """The set of member ids stored for a group."""
    return {r[0] for r in db.execute("SELECT member_id FROM members WHERE group_id = ?", (group_id,))}


# -- a real server process ------------------------------------------------------

def free_ports(count):
    """`count` different free loopback ports. They are bound all at once and
    then let go: two binds to port 0 one after the other return the same
    port now and then (about 7 times in 100,000)."""
    sockets = []
    try:
        for _ in range(count):
            sockets.append(socket.socket())
            sockets[-1].bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port():
    return free_ports(1)[0]


def wait_for(condition, timeout=30, interval=0.05, what="the condition"):
    """Call `condition` until it returns something true, and return that;
    fail after `timeout` seconds (generous: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s did not hold within %g s" % (what, timeout))
        time.sleep(interval)


def receive_until_closed(sock, size=1 << 16):
    """Everything `sock` receives until the server closes the connection."""
    chunks = []
    while True:
        chunk = sock.recv(size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def run_cli(*args, env=None, check=True, timeout=30):
    """Run `python scim_appliance.py ARGS` and return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scim_appliance.py")] + list(args),
                            capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError("CLI %s failed (%d): %s" % (args, result.returncode, result.stderr))
    return result


def read_only(path):
    """What the customer's software does: open the file read-only."""
    return sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)), uri=True, timeout=30)


def query(path, sql, params=()):
    """The rows of one SELECT on a database file, read-only."""
    conn = read_only(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def healthz(port, method="GET"):
    """(status, headers, raw body) of /healthz over real HTTP, with no token."""
    request = urllib.request.Request("http://127.0.0.1:%d/healthz" % port, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def fetch(url):
    """(status, headers, text) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers, response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode("utf-8")


def http_json(method, url, body=None, token=None, headers=None):
    """(status, headers, parsed JSON or None) for one request to an absolute URL."""
    all_headers = {"Content-Type": SCIM_JSON} if body is not None else {}
    if token:
        all_headers["Authorization"] = "Bearer " + token
    all_headers.update(headers or {})
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, response.headers, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, error.headers, json.loads(raw) if raw else None


class LiveServer:
    """`python scim_appliance.py serve` in a subprocess on a free loopback port
    (or `port`); `wrapper` is a command to run it under (`fiu-run -x`)."""

    def __init__(self, db_path, extra_args=(), env=None, port=None, wrapper=()):
        self.db_path = db_path
        scim_port, admin_port = free_ports(2)
        self.port = port or scim_port
        if "--admin-port" not in extra_args:
            extra_args = ["--admin-port", str(admin_port)] + list(extra_args)
        if "--log-file" not in extra_args:
            # The access log (a line per request) in a file: a pipe nobody
            # reads until the end would fill up and stall the server.
            self.log_file = db_path + ".access.log"
            extra_args = ["--log-file", self.log_file] + list(extra_args)
        else:
            self.log_file = extra_args[list(extra_args).index("--log-file") + 1]
        self.admin_port = int(extra_args[list(extra_args).index("--admin-port") + 1])
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.process = subprocess.Popen(
            list(wrapper) + [sys.executable, os.path.join(ROOT, "scim_appliance.py"), "serve", "--db", db_path,
                             "--port", str(self.port)] + list(extra_args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)
        self.banner = self._wait_until_listening()
        self.url = "http://127.0.0.1:%d/scim" % self.port
        self.token = None

    def _wait_until_listening(self):
        deadline = time.monotonic() + 20
        lines = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError("server exited: %s %s" % ("".join(lines), self.process.stderr.read()))
            lines.append(line)
            if line.startswith("SCIM endpoint:"):
                break
        # The banner is printed once the socket is bound; wait until it accepts.
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return "".join(lines)
            except OSError:
                time.sleep(0.05)
        raise AssertionError("server did not start: %s" % "".join(lines))

    def request(self, method, path, body=None, token=None, headers=None):
        """(status, headers, parsed JSON or None) for one request over real HTTP."""
        return http_json(method, self.url + path, body, token if token is not None else self.token, headers)

    def stop(self):
        """Stop the server (once; later calls give the same output): its stdout + stderr."""
        if getattr(self, "output", None) is not None:
            return self.output
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output = self.process.stdout.read() + self.process.stderr.read()
        self.process.stdout.close()
        self.process.stderr.close()
        return self.output


def start_live_server(db_path, extra_args=(), wrapper=()):
    """A LiveServer on `db_path`, with a token named entra made by `token create`."""
    token = run_cli("token", "create", "--name", "entra", "--db", db_path).stdout.strip()
    server = LiveServer(db_path, list(extra_args), wrapper=wrapper)
    server.token = token
    return server


@pytest.fixture
def live_server(tmp_path):
    """A real server on a fresh database, with a token made by `token create`."""
    server = start_live_server(str(tmp_path / "live.db"))
    yield server
    server.stop()


# -- nginx, for the reverse-proxy tests ---------------------------------------------

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def self_signed_certificate(directory, host):
    """(certificate, key) paths of a one-day self-signed certificate for `host`."""
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=%s" % host, "-addext", "subjectAltName=DNS:%s" % host,
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key


def nginx_config(directory, server_block):
    """Write `server_block` (from `print-config nginx`) and a minimal nginx.conf
    that includes it, with every path inside `directory`; returns nginx.conf's path."""
    (directory / "scim-appliance.conf").write_text(server_block)
    conf = directory / "nginx.conf"
    conf.write_text("""
%(user)s
daemon off;
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log;
events { worker_connections 64; }
http {
    access_log %(dir)s/access.log;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    include %(dir)s/scim-appliance.conf;
}
""" % {"user": "user root;" if os.geteuid() == 0 else "", "dir": str(directory)})
    return str(conf)

