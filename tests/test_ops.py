"""Operations: /metrics (Prometheus), the access log, graceful SIGTERM,
--version, clear start-up errors, and print-config (nginx, Caddy, systemd).

Already covered elsewhere, so not repeated here: the SCIM port in use
(test_server.py), a newer schema refused by Store() itself (test_storage.py),
the waitress queue-warning rate limit (test_server.py), and nginx in front of
a real appliance end to end (test_nginx.py).
"""

import http.client
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import pytest

import scim_appliance
from conftest import (fetch, free_port, free_ports, http_json, LiveServer, NGINX, nginx_config, receive_until_closed, ROOT,
                      run_cli, self_signed_certificate, start_live_server)
from scim_appliance import URN_GROUP, URN_USER

SCRIPT = os.path.join(ROOT, "scim_appliance.py")
# systemd-analyze: in the Debian image, and .ci/run installs systemd where it is missing.
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

ALICE_FILTER = 'userName eq "alice@example.com"'
TIME = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"
PLAIN_LINE = re.compile(r'^(%s) (\S+) "(\S+) (.*)" (\d{3}) (\d+\.\d)ms token=(-|"(?:[^"\\]|\\.)*")$' % TIME)


# -- helpers -----------------------------------------------------------------------------

def clean_env(**overrides):
    """The environment without any SCIM_APPLIANCE_* the machine may have set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCIM_APPLIANCE_")}
    env.update(overrides)
    return env


def make_token(db_path):
    return run_cli("token", "create", "--name", "entra", "--db", db_path).stdout.strip()


def live(tmp_path, name="ops.db", extra_args=()):
    return start_live_server(str(tmp_path / name), extra_args)


def user_body(user_name, **attributes):
    body = {"schemas": [URN_USER], "userName": user_name}
    body.update(attributes)
    return body


def wait_for_lines(path, count, timeout=30):
    """The file's lines once it has at least `count` of them (or whatever it has at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def scim_and_admin_ports():
    """--port and --admin-port arguments with two different free ports."""
    port, admin_port = free_ports(2)
    return ["--port", str(port), "--admin-port", str(admin_port)]


def assert_one_line_error(result, *words):
    """A refused start: non-zero, nothing on stdout, one `scim-appliance: ...` line on stderr."""
    assert result.returncode != 0, result
    assert "SCIM endpoint" not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("scim-appliance: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def port_is_free(port):
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# -- a tiny Prometheus text-format (0.0.4) parser ---------------------------------------

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE_LINE = re.compile(r"^(%s)(?:\{(.*)\})? (\S+)$" % METRIC_NAME)
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def _unescape(value):
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def parse_labels(text):
    labels = {}
    position = 0
    while position < len(text):
        match = LABEL_PAIR.match(text, position)
        assert match, "bad labels: %r" % text
        assert match.group(1) not in labels, "label repeated: %r" % text
        labels[match.group(1)] = _unescape(match.group(2))
        position = match.end()
        if position < len(text):
            assert text[position] == ",", "bad labels: %r" % text
            position += 1
    return labels


def family_of(name, types):
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[:-len(suffix)]
        if name.endswith(suffix) and types.get(base) in ("histogram", "summary"):
            return base
    raise AssertionError("sample %s has no # TYPE line before it" % name)


def parse_prometheus(text):
    """(types {family: type}, samples [(name, labels, value)]); asserts the format."""
    assert text.endswith("\n")
    types, helps, samples = {}, set(), []
    for line in text[:-1].split("\n"):
        assert line.strip(), "blank line in the exposition"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE") and len(parts) == 4 and re.fullmatch(METRIC_NAME, parts[2]), line
            if parts[1] == "TYPE":
                assert parts[3] in TYPES, line
                assert parts[2] not in types, "two TYPE lines for %s" % parts[2]
                types[parts[2]] = parts[3]
            else:
                assert parts[2] not in helps, "two HELP lines for %s" % parts[2]
                helps.add(parts[2])
            continue
        match = SAMPLE_LINE.match(line)
        assert match, "not a sample line: %r" % line
        name, labels, value = match.group(1), parse_labels(match.group(2) or ""), float(match.group(3))
        family_of(name, types)   # a TYPE line came first
        samples.append((name, labels, value))
    return types, samples


def sample_values(samples, name):
    """{frozenset of label items: value} of one metric."""
    return {frozenset(labels.items()): value for n, labels, value in samples if n == name}


def histogram(samples, name):
    """([(le, cumulative count)] sorted by le, _count, _sum)."""
    buckets = sorted(((float(labels["le"]), value) for n, labels, value in samples if n == name + "_bucket"),
                     key=lambda bucket: bucket[0])
    count = [value for n, _, value in samples if n == name + "_count"]
    total = [value for n, _, value in samples if n == name + "_sum"]
    assert len(count) == 1 and len(total) == 1
    return buckets, count[0], total[0]


def assert_histogram_is_consistent(buckets, count):
    assert buckets, "no buckets"
    assert buckets[-1][0] == math.inf, "the last bucket is +Inf"
    assert len({le for le, _ in buckets}) == len(buckets), "a bucket bound repeats"
    values = [value for _, value in buckets]
    assert values == sorted(values), "buckets are cumulative: %r" % buckets
    assert values[-1] == count


# -- /metrics ------------------------------------------------------------------------------

def test_metrics_on_the_admin_listener_after_real_scim_traffic(tmp_path):
    server = live(tmp_path)
    try:
        status, _, alice = server.request("POST", "/Users", user_body("alice@example.com", active=True))
        assert status == 201
        status, _, bob = server.request("POST", "/Users", user_body("bob@example.com", active=False))
        assert status == 201
        status, _, group = server.request("POST", "/Groups", {"schemas": [URN_GROUP], "displayName": "Team"})
        assert status == 201
        status, _, found = server.request("GET", "/Users?" + urllib.parse.urlencode(
            {"filter": ALICE_FILTER, "count": 5}))
        assert status == 200 and [r["id"] for r in found["Resources"]] == [alice["id"]]
        assert server.request("GET", "/Users/" + alice["id"])[0] == 200
        missing = str(uuid.uuid4())
        assert server.request("GET", "/Users/" + missing)[0] == 404
        assert server.request("GET", "/Users", token="scimapp_not-a-real-token")[0] == 401

        status, headers, text = fetch("http://127.0.0.1:%d/metrics" % server.admin_port)
        db_size = os.path.getsize(server.db_path)
        # The SCIM listener has no /metrics (and the Prometheus text never leaks there).
        scim_status, _, scim_body = http_json("GET", "http://127.0.0.1:%d/metrics" % server.port)
    finally:
        server.stop()

    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    for name, value in scim_appliance.ADMIN_SECURITY_HEADERS:
        assert headers[name] == value, name
    assert scim_status == 404 and scim_body["status"] == "404"

    types, samples = parse_prometheus(text)
    assert types["scim_requests_total"] == "counter"
    assert types["scim_request_duration_seconds"] == "histogram"
    assert types["scim_users"] == types["scim_groups"] == "gauge"
    assert types["scim_token_last_used_age_seconds"] == types["scim_database_bytes"] == "gauge"

    requests = {(labels["method"], labels["route"], labels["status"]): value
                for name, labels, value in samples if name == "scim_requests_total"}
    assert all(set(labels) == {"method", "route", "status"}
               for name, labels, _ in samples if name == "scim_requests_total")
    assert requests == {
        ("POST", "/Users", "201"): 2,
        ("POST", "/Groups", "201"): 1,
        ("GET", "/Users", "200"): 1,
        ("GET", "/Users/{id}", "200"): 1,
        ("GET", "/Users/{id}", "404"): 1,
        ("GET", "/Users", "401"): 1,
    }

    buckets, count, total = histogram(samples, "scim_request_duration_seconds")
    assert_histogram_is_consistent(buckets, count)
    assert [le for le, _ in buckets[:-1]] == list(scim_appliance.RequestMetrics.BUCKETS)
    assert count == sum(requests.values()) == 7
    assert 0 < total < 60

    assert sample_values(samples, "scim_users") == {frozenset({("active", "true")}): 1,
                                                    frozenset({("active", "false")}): 1}
    assert sample_values(samples, "scim_groups") == {frozenset(): 1}
    ages = sample_values(samples, "scim_token_last_used_age_seconds")
    assert list(ages) == [frozenset({("token", "entra")})]
    assert 0 <= ages[frozenset({("token", "entra")})] < 120
    sizes = sample_values(samples, "scim_database_bytes")
    assert sizes[frozenset({("file", "db")})] == db_size > 0
    assert set(sizes) <= {frozenset({("file", "db")}), frozenset({("file", "wal")})}
    started = sample_values(samples, "scim_process_start_time_seconds")[frozenset()]
    assert abs(started - time.time()) < 120

    # Routes and counts only: no id, userName, group name or token anywhere.
    for secret in (alice["id"], bob["id"], group["id"], missing, "alice", "bob", "Team", server.token):
        assert secret not in text, secret
    for _, labels, _ in samples:
        for value in labels.values():
            assert "@" not in value and not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", value), value


def test_prometheus_text_escapes_label_values_and_counts_exactly(store):
    """Unit: label values escaped (quote, backslash, newline), histogram
    buckets cumulative, an unknown method counted as "other", revoked tokens left out."""
    odd_name = 'say "hi"\\now\nthen'
    odd_token = scim_appliance.create_token(store, odd_name)
    gone_token = scim_appliance.create_token(store, "gone")
    activity = scim_appliance.ActivityLog(store)
    check = scim_appliance.TokenCheck(store, activity.record_token_use)
    assert check(odd_token) == odd_name and check(gone_token) == "gone"   # both get a last_used
    activity.flush()
    scim_appliance.revoke_token(store, "gone")

    metrics = scim_appliance.RequestMetrics()
    for method, route, status, seconds in (("GET", "/Users", 200, 0.0005), ("GET", "/Users", 200, 0.003),
                                           ("PATCH", "/Groups/{id}", 204, 0.2), ("BREW", "other", 501, 50.0)):
        metrics.record(method, route, status, seconds)
    text = scim_appliance.prometheus_text(metrics, store, now=time.time() + 5)

    assert odd_name not in text   # the raw newline would have split the sample
    types, samples = parse_prometheus(text)
    ages = sample_values(samples, "scim_token_last_used_age_seconds")
    assert list(ages) == [frozenset({("token", odd_name)})]
    assert 4 <= ages[frozenset({("token", odd_name)})] < 10
    assert sample_values(samples, "scim_requests_total") == {
        frozenset({("method", "GET"), ("route", "/Users"), ("status", "200")}): 2,
        frozenset({("method", "PATCH"), ("route", "/Groups/{id}"), ("status", "204")}): 1,
        frozenset({("method", "other"), ("route", "other"), ("status", "501")}): 1,
    }
    buckets, count, total = histogram(samples, "scim_request_duration_seconds")
    assert_histogram_is_consistent(buckets, count)
    cumulative = dict(buckets)
    assert (cumulative[0.001], cumulative[0.0025], cumulative[0.005], cumulative[0.25], cumulative[10.0],
            cumulative[math.inf]) == (1, 1, 2, 3, 3, 4)
    assert count == 4 and total == pytest.approx(50.2035)
    assert sample_values(samples, "scim_users") == {frozenset({("active", "true")}): 0,
                                                    frozenset({("active", "false")}): 0}


def test_prometheus_text_shows_the_storage_condition_errors_free_space_and_dropped_lines(store):
    metrics = scim_appliance.RequestMetrics()
    types, samples = parse_prometheus(scim_appliance.prometheus_text(metrics, store, dropped={"activity": 0}))
    assert types["scim_storage_writable"] == types["scim_data_volume_free_bytes"] == "gauge"
    assert types["scim_storage_errors_total"] == types["scim_log_lines_dropped_total"] == "counter"
    assert sample_values(samples, "scim_storage_writable") == {frozenset(): 1}
    assert sample_values(samples, "scim_storage_errors_total") == {
        frozenset({("kind", kind)}): 0 for kind in ("full", "read-only", "io-error", "locked", "corrupt")}
    assert sample_values(samples, "scim_data_volume_free_bytes")[frozenset()] == shutil.disk_usage(
        os.path.dirname(store.path)).free

    store.monitor.failed("full")
    store.monitor.failed("full")
    store.monitor.failed("io-error", writing=False)
    types, samples = parse_prometheus(scim_appliance.prometheus_text(metrics, store, dropped={
        "activity": 3, "access": 7}))
    assert sample_values(samples, "scim_storage_writable") == {frozenset(): 0}
    errors = sample_values(samples, "scim_storage_errors_total")
    assert errors[frozenset({("kind", "full")})] == 2 and errors[frozenset({("kind", "io-error")})] == 1
    assert sample_values(samples, "scim_log_lines_dropped_total") == {
        frozenset({("log", "activity")}): 3, frozenset({("log", "access")}): 7}


# -- the access log ---------------------------------------------------------------------------

def test_access_log_plain_lines_leave_out_query_values_and_the_token(tmp_path):
    server = live(tmp_path)
    try:
        status, _, alice = server.request("POST", "/Users", user_body("alice@example.com"))
        assert status == 201
        first = wait_for_lines(server.log_file, 1)
        assert len(first) == 1   # written while the server runs (every second), not only at exit
        query = "?" + urllib.parse.urlencode({"filter": ALICE_FILTER, "count": 5})
        assert server.request("GET", "/Users" + query)[0] == 200
        assert server.request("GET", "/Users/" + alice["id"] + "?attributes=userName")[0] == 200
        assert server.request("GET", "/Users", token="scimapp_wrong-token-for-the-log")[0] == 401
        assert server.request("DELETE", "/Users/" + alice["id"])[0] == 204
        # The last request is answered just before SIGTERM: the shutdown writes it.
    finally:
        output = server.stop()
    text = open(server.log_file, encoding="utf-8").read()
    lines = text.splitlines()
    assert len(lines) == 5, text
    parsed = [PLAIN_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [m.group(2, 3, 4, 5, 7) for m in parsed] == [
        ("127.0.0.1", "POST", "/scim/Users", "201", '"entra"'),
        ("127.0.0.1", "GET", "/scim/Users?filter&count", "200", '"entra"'),
        ("127.0.0.1", "GET", "/scim/Users/%s?attributes" % alice["id"], "200", '"entra"'),
        ("127.0.0.1", "GET", "/scim/Users", "401", "-"),
        ("127.0.0.1", "DELETE", "/scim/Users/%s" % alice["id"], "204", '"entra"'),
    ]
    assert all(float(m.group(6)) < 10000 for m in parsed)
    for secret in ("alice", "userName", server.token, "wrong-token-for-the-log", "Bearer"):
        assert secret not in text, secret
    assert server.token not in output


def test_access_log_json_lines(tmp_path):
    server = live(tmp_path, extra_args=["--log-format", "json"])
    try:
        assert server.request("GET", "/Users?" + urllib.parse.urlencode({"filter": ALICE_FILTER}))[0] == 200
        assert server.request("GET", "/Groups", token="scimapp_nope")[0] == 401
        assert len(wait_for_lines(server.log_file, 2)) == 2   # flushed while running
        assert server.request("POST", "/Users", user_body("carol@example.com"))[0] == 201
    finally:
        server.stop()
    text = open(server.log_file, encoding="utf-8").read()
    entries = [json.loads(line) for line in text.splitlines()]
    assert len(entries) == 3
    for entry in entries:
        assert set(entry) == {"time", "client", "method", "path", "status", "duration_ms", "token"}
        assert re.fullmatch(TIME, entry["time"]) and entry["client"] == "127.0.0.1"
        assert isinstance(entry["duration_ms"], (int, float)) and 0 <= entry["duration_ms"] < 10000
    assert [(e["method"], e["path"], e["status"], e["token"]) for e in entries] == [
        ("GET", "/scim/Users?filter", 200, "entra"),
        ("GET", "/scim/Groups", 401, None),
        ("POST", "/scim/Users", 201, "entra"),
    ]
    assert "alice" not in text and "carol" not in text and server.token not in text


def test_access_log_goes_to_stderr_without_a_log_file(tmp_path):
    db_path = str(tmp_path / "stderr.db")
    token = make_token(db_path)
    port, admin_port = free_ports(2)
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "serve", "--db", db_path, "--port", str(port), "--admin-port", str(admin_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=str(tmp_path))
    try:
        while not process.stdout.readline().startswith("SCIM endpoint:"):
            assert process.poll() is None, process.stderr.read()
        url = "http://127.0.0.1:%d/scim" % port
        deadline = time.monotonic() + 20
        while True:
            try:
                status = http_json("GET", url + "/Users?" + urllib.parse.urlencode({"filter": ALICE_FILTER}),
                                   token=token)[0]
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert status == 200
        assert http_json("GET", url + "/Users", token="scimapp_nope")[0] == 401
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
        stdout, stderr = process.stdout.read(), process.stderr.read()
        process.stdout.close()
        process.stderr.close()
    assert code == 0 and "stopped" in stdout
    access = [PLAIN_LINE.match(line) for line in stderr.splitlines() if PLAIN_LINE.match(line)]
    assert [m.group(2, 3, 4, 5, 7) for m in access] == [
        ("127.0.0.1", "GET", "/scim/Users?filter", "200", '"entra"'),
        ("127.0.0.1", "GET", "/scim/Users", "401", "-"),
    ]
    assert not PLAIN_LINE.search(stdout) and "/scim/Users" not in stdout
    assert "alice" not in stderr and token not in stderr
    assert not any(name.endswith(".log") for name in os.listdir(str(tmp_path)))


@pytest.mark.parametrize("form", ["plain", "json"])
def test_an_access_log_entry_stays_on_one_line(form):
    log = scim_appliance.AccessLog(form)
    path = '/scim/Users/a"b\nc\r\td\\e\x00'
    line = log.format((1700000000.25, "10.0.0.1", "GET", path, "", 404, 0.0123, 'we"ird\nname'))
    assert line.endswith("\n") and line.count("\n") == 1
    assert not re.search(r"[\x00-\x1f]", line[:-1]), line
    if form == "json":
        entry = json.loads(line)
        assert entry == {"time": "2023-11-14T22:13:20.250Z", "client": "10.0.0.1", "method": "GET", "path": path,
                         "status": 404, "duration_ms": 12.3, "token": 'we"ird\nname'}
    else:
        match = PLAIN_LINE.match(line[:-1])
        assert match, line
        assert match.group(1, 2, 3, 5, 6) == ("2023-11-14T22:13:20.250Z", "10.0.0.1", "GET", "404", "12.3")
        assert json.loads('"%s"' % match.group(4)) == path
        assert json.loads(match.group(7)) == 'we"ird\nname'


def test_logged_path_keeps_parameter_names_only():
    def logged(path, query):
        return scim_appliance.logged_path(path, query)

    assert logged("/scim/Users", "") == "/scim/Users"
    assert logged("/scim/Users", "filter=userName+eq+%22alice%40example.com%22&count=5") == \
        "/scim/Users?filter&count"
    assert logged("/scim/Users", "&&startIndex=3&&attributes") == "/scim/Users?startIndex&attributes"


# -- graceful SIGTERM ---------------------------------------------------------------------------

def post_user(port, token, user_name, results):
    """POST one user on its own connection; results[user_name] = status or the transport error."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/scim/Users", json.dumps(user_body(user_name)), {
            "Content-Type": "application/scim+json", "Authorization": "Bearer " + token, "Connection": "close"})
        response = connection.getresponse()
        response.read()
        results[user_name] = response.status
    except (OSError, http.client.HTTPException) as exc:
        results[user_name] = repr(exc)
    finally:
        connection.close()


def test_sigterm_under_load_answers_every_committed_write_and_checkpoints(tmp_path):
    """Eight clients creating users as fast as they can; SIGTERM in the middle.
    The process exits 0 promptly, and the database holds exactly the users
    whose 201 reached a client: no acknowledged write lost, and no write
    committed whose answer was lost (a request the server never got to, or
    dropped, is never executed)."""
    server = live(tmp_path, "sigterm.db")
    outcomes = []   # (userName, status or transport error), in order
    lock = threading.Lock()

    def client(number):
        for sequence in range(100000):
            name = "load-%d-%d@example.com" % (number, sequence)
            result = {}
            post_user(server.port, server.token, name, result)
            with lock:
                outcomes.append((name, result[name]))
            if result[name] != 201:
                return

    def acknowledged():
        with lock:
            return [name for name, result in outcomes if result == 201]

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 15
        while len(acknowledged()) < 40 and time.monotonic() < deadline and len(outcomes) == len(acknowledged()):
            time.sleep(0.01)
        assert len(acknowledged()) >= 40 and len(outcomes) == len(acknowledged()), outcomes[-3:]
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=10)
        took = time.monotonic() - signalled
        for thread in threads:
            thread.join(timeout=25)
    finally:
        output = server.stop()
    assert code == 0 and took < 5, (code, took)
    assert "scim-appliance stopped" in output and "still running" not in output
    assert not any(thread.is_alive() for thread in threads)
    failures = [result for _, result in outcomes if result != 201]
    # Every client ended on a refused or closed connection (no other status, none hung).
    assert len(failures) == 8 and all(isinstance(result, str) for result in failures), failures

    wal = server.db_path + "-wal"
    assert not os.path.exists(wal) or os.path.getsize(wal) == 0   # checkpointed at shutdown
    conn = sqlite3.connect(server.db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = [row[0] for row in conn.execute("SELECT user_name FROM users")]
    finally:
        conn.close()
    assert len(stored) == len(set(stored))
    assert set(stored) == set(acknowledged())


def test_sigterm_lets_the_request_being_executed_finish_and_answer(tmp_path):
    """Deterministic: the request is held inside the server (another connection
    holds SQLite's write lock) when SIGTERM arrives; it still commits, gets its
    201, and the process then exits 0 with the WAL checkpointed (truncated)."""
    server = live(tmp_path, "inflight.db", ["--lock-timeout", "120"])
    results = {}
    try:
        post_user(server.port, server.token, "warmup@example.com", results)
        assert results == {"warmup@example.com": 201}
        blocker = sqlite3.connect(server.db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        request = threading.Thread(target=post_user, args=(server.port, server.token, "held@example.com", results))
        request.start()
        time.sleep(0.4)   # the request is in the server, waiting for the lock
        assert "held@example.com" not in results
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.4)
        assert server.process.poll() is None   # still finishing the request
        assert "held@example.com" not in results
        blocker.execute("COMMIT")
        code = server.process.wait(timeout=10)
        request.join(timeout=10)
        # With another connection still open, the server's close is not the
        # last one (SQLite would checkpoint then): only its own checkpoint
        # leaves the WAL empty.
        wal = server.db_path + "-wal"
        assert not os.path.exists(wal) or os.path.getsize(wal) == 0
        blocker.close()
    finally:
        output = server.stop()
    assert code == 0 and "scim-appliance stopped" in output and "still running" not in output
    assert results["held@example.com"] == 201
    conn = sqlite3.connect(server.db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert sorted(r[0] for r in conn.execute("SELECT user_name FROM users")) == [
            "held@example.com", "warmup@example.com"]
    finally:
        conn.close()


@pytest.mark.parametrize("threads", ["0", "1"])
def test_sigterm_lets_requests_that_arrived_behind_a_running_one_finish_too(tmp_path, threads):
    """A is held inside the server (another connection holds SQLite's write
    lock) and B arrives behind it before SIGTERM: both commit and get their
    201. B waits in the writers' queue behind A (waitress's own run() would
    cancel it, closing B's connection): with one worker thread, and on the
    event loop (0), where writes run on a thread of their own."""
    server = live(tmp_path, "queued.db", ["--threads", threads, "--lock-timeout", "120"])
    results = {}
    try:
        post_user(server.port, server.token, "warmup@example.com", results)
        blocker = sqlite3.connect(server.db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        held = threading.Thread(target=post_user, args=(server.port, server.token, "a@example.com", results))
        held.start()
        time.sleep(0.3)
        queued = threading.Thread(target=post_user, args=(server.port, server.token, "b@example.com", results))
        queued.start()
        time.sleep(0.3)
        assert "a@example.com" not in results and "b@example.com" not in results
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.6)
        assert server.process.poll() is None
        blocker.execute("COMMIT")
        blocker.close()
        code = server.process.wait(timeout=10)
        held.join(timeout=10)
        queued.join(timeout=10)
    finally:
        output = server.stop()
    assert code == 0 and "scim-appliance stopped" in output and "Canceling" not in output
    assert results == {"warmup@example.com": 201, "a@example.com": 201, "b@example.com": 201}
    conn = sqlite3.connect(server.db_path)
    try:
        assert sorted(r[0] for r in conn.execute("SELECT user_name FROM users")) == [
            "a@example.com", "b@example.com", "warmup@example.com"]
    finally:
        conn.close()


def test_sigterm_right_after_start_still_stops_gracefully(tmp_path):
    """SIGTERM as soon as the banner is out: a clean stop, exit 0, never the
    default action (-15) or a stop that skips the cleanup."""
    for attempt in range(5):
        server = live(tmp_path, "early-%d.db" % attempt)
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=10)
        output = server.stop()
        assert code == 0 and "scim-appliance stopped" in output, (attempt, code, output[-500:])


def test_sigterm_sends_the_rest_of_a_response_the_client_is_still_reading(tmp_path):
    """A 10 MB listing, read slowly: SIGTERM arrives while most of it is still
    in the server's buffers; the server keeps sending until the client has
    all of it, then exits 0."""
    db_path = str(tmp_path / "big.db")
    store = scim_appliance.Store(db_path)
    try:
        token = scim_appliance.create_token(store, "entra")
        for number in range(500):
            scim_appliance.create_resource(store, scim_appliance.USER, user_body(
                "big%d@example.com" % number, title="x" * 20000), "http://127.0.0.1/scim")
    finally:
        store.close()
    server = LiveServer(db_path)
    try:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)   # no autotuning: the server must wait
        client.settimeout(20)
        client.connect(("127.0.0.1", server.port))
        client.sendall(("GET /scim/Users?count=1000 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
                        "Connection: close\r\n\r\n" % token).encode("ascii"))
        received = [client.recv(4096)]   # the response has started
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.process.poll() is None   # still sending
        received.append(receive_until_closed(client, 1 << 20))
        client.close()
        code = server.process.wait(timeout=10)
    finally:
        output = server.stop()
    assert code == 0 and "scim-appliance stopped" in output and "still running" not in output
    head, _, body = b"".join(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    assert length > 8 * 1024 * 1024 and len(body) == length
    listing = json.loads(body)
    assert listing["totalResults"] == len(listing["Resources"]) == 500


# -- --version and refused starts ------------------------------------------------------------------

def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == "scim-appliance %s\n" % scim_appliance.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", scim_appliance.__version__)


def test_admin_port_in_use_is_refused_with_one_line_and_frees_the_scim_port(tmp_path):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        admin_port = busy.getsockname()[1]
        result = run_cli("serve", "--db", str(tmp_path / "admin-busy.db"), "--port", str(port),
                         "--admin-port", str(admin_port), check=False)
    line = assert_one_line_error(result, "127.0.0.1:%d" % admin_port)
    assert "in use" in line.lower()
    assert port_is_free(port)   # the SCIM listener opened first was closed again
    # ... and so was the server lock: the next start on the same database works.
    server = LiveServer(str(tmp_path / "admin-busy.db"))
    try:
        assert server.request("GET", "/ServiceProviderConfig")[0] == 200
    finally:
        assert "stopped" in server.stop()


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_unusable_data_path_is_refused_with_one_line(tmp_path, where):
    (tmp_path / "file.txt").write_text("a regular file\n")
    db_path = {"under-a-file": str(tmp_path / "file.txt" / "scim.db"), "proc": "/proc/scim-appliance-test.db"}[where]
    result = run_cli("serve", "--db", db_path, *scim_and_admin_ports(),
                     check=False)
    line = assert_one_line_error(result, db_path)
    assert "cannot use" in line
    assert (tmp_path / "file.txt").read_text() == "a regular file\n"


def test_a_database_from_a_newer_version_stops_serve_and_is_left_unchanged(tmp_path):
    db_path = str(tmp_path / "future.db")
    store = scim_appliance.Store(db_path)
    scim_appliance.create_token(store, "entra")
    store.close()
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = %d" % (scim_appliance.SCHEMA_VERSION + 1))
    conn.close()
    before = open(db_path, "rb").read()
    assert not os.path.exists(db_path + "-wal")
    result = run_cli("serve", "--db", db_path, *scim_and_admin_ports(),
                     check=False)
    assert_one_line_error(result, db_path, "schema version %d" % (scim_appliance.SCHEMA_VERSION + 1),
                          str(scim_appliance.SCHEMA_VERSION))
    assert open(db_path, "rb").read() == before
    assert not os.path.exists(db_path + "-wal") or os.path.getsize(db_path + "-wal") == 0


def test_an_unwritable_log_file_is_refused_with_one_line(tmp_path):
    (tmp_path / "file.txt").write_text("")
    log_path = str(tmp_path / "file.txt" / "access.log")
    port, admin_port = free_ports(2)
    result = run_cli("serve", "--db", str(tmp_path / "log.db"), "--port", str(port), "--admin-port",
                     str(admin_port), "--log-file", log_path, check=False)
    line = assert_one_line_error(result, log_path)
    assert "log file" in line
    assert port_is_free(port)


# -- print-config ----------------------------------------------------------------------------------

CONFIG_ARGS = ("--public-url", "https://scim.example.com", "--port", "9080", "--admin-port", "9081",
               "--db", "/var/lib/scim/scim.db", "--user", "scimsvc")


def print_config(kind, *extra):
    result = run_cli("print-config", kind, *(CONFIG_ARGS + extra), env=clean_env())
    assert result.stderr == ""
    return result.stdout


def directives(text):
    """The lines that are not comments or blank."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def block(text, opening):
    """The body of the `{ ... }` block whose opening line is `opening` (braces matched)."""
    lines = [line.strip() for line in text.splitlines()]
    assert lines.count(opening) == 1, opening
    depth, body = 0, []
    for line in lines[lines.index(opening):]:
        if line.startswith("#"):
            continue
        depth += line.count("{") - line.count("}")
        body.append(line)
        if depth == 0:
            return body[1:-1]
    raise AssertionError("unbalanced block %s" % opening)


def test_print_config_nginx():
    text = print_config("nginx")
    assert text.startswith("#")   # commented
    lines = directives(text)
    assert sum(line.count("{") for line in lines) == sum(line.count("}") for line in lines)
    server = block(text, "server {")
    assert "listen 443 ssl;" in server and "listen [::]:443 ssl;" in server
    assert "server_name scim.example.com;" in server
    assert "ssl_certificate     /etc/ssl/certs/scim.example.com.pem;" in server
    assert "ssl_certificate_key /etc/ssl/private/scim.example.com.key;" in server
    protocols = next(line for line in server if line.startswith("ssl_protocols ")).rstrip(";").split()[1:]
    assert "TLSv1.2" in protocols and set(protocols) <= {"TLSv1.2", "TLSv1.3"}
    locations = {line for line in server if line.startswith("location ")}
    assert locations == {"location /scim {", "location = /healthz {", "location / {"}
    scim = block(text, "location /scim {")
    assert "proxy_pass http://127.0.0.1:9080;" in scim
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in scim
    assert not any("$proxy_add_x_forwarded_for" in line for line in scim)
    assert block(text, "location = /healthz {") == ["proxy_pass http://127.0.0.1:9080;"]
    assert block(text, "location / {") == ["return 404;"]
    assert not any("9081" in line for line in lines)   # the admin page is never proxied
    assert [line for line in lines if "proxy_pass" in line] == ["proxy_pass http://127.0.0.1:9080;"] * 2
    assert "--public-url https://scim.example.com --trusted-proxy 127.0.0.1" in text


def test_print_config_nginx_passes_nginx_t(tmp_path):
    cert, key = self_signed_certificate(tmp_path, "scim.example.com")
    conf = nginx_config(tmp_path, print_config("nginx", "--cert", cert, "--key", key))
    result = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", conf],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr


def test_print_config_caddy():
    text = print_config("caddy")
    assert text.startswith("#")
    lines = directives(text)
    assert sum(line.count("{") for line in lines) == sum(line.count("}") for line in lines)
    assert lines[0] == "scim.example.com {"
    site = block(text, "scim.example.com {")
    assert block(text, "tls {") == ["protocols tls1.2 tls1.3"]
    scim = block(text, "handle /scim* {")
    assert scim[0] == "reverse_proxy 127.0.0.1:9080 {"
    assert "header_up X-Forwarded-For {remote_host}" in scim
    assert block(text, "handle /healthz {") == ["reverse_proxy 127.0.0.1:9080"]
    assert block(text, "handle {") == ["respond 404"]
    assert [line for line in site if line.startswith("reverse_proxy")] == \
        ["reverse_proxy 127.0.0.1:9080 {", "reverse_proxy 127.0.0.1:9080"]
    assert not any("9081" in line for line in lines)
    assert "--public-url https://scim.example.com --trusted-proxy 127.0.0.1" in text


def systemd_unit(text):
    """{section: {key: [values]}} of a unit file (comments dropped, `\\` continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    sections, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]")
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, line
        key, value = line.split("=", 1)
        current.setdefault(key, []).append(value)
    return sections


def test_print_config_systemd(tmp_path):
    text = print_config("systemd")
    assert text.startswith("#")
    unit = systemd_unit(text)
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["User"] == ["scimsvc"] and service["Group"] == ["scimsvc"]
    assert service["ReadWritePaths"] == ["/var/lib/scim"]
    assert service["WorkingDirectory"] == ["/var/lib/scim"]
    assert service["KillSignal"] == ["SIGTERM"]
    # systemd must wait out the graceful shutdown before it SIGKILLs.
    assert int(service["TimeoutStopSec"][0]) > scim_appliance.SHUTDOWN_GRACE_SECONDS
    assert service["ProtectSystem"] == ["strict"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "useradd --system --home /var/lib/scim --shell /usr/sbin/nologin scimsvc" in text

    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == sys.executable and os.path.isabs(argv[0])
    assert argv[1] == SCRIPT and argv[2] == "serve"
    assert exec_start.split(" serve ", 1)[1].startswith("--db /var/lib/scim/scim.db ")
    assert "--public-url https://scim.example.com --trusted-proxy 127.0.0.1" in exec_start
    # What systemd runs is a valid `serve` command line with these settings.
    args = scim_appliance.build_parser().parse_args(argv[2:])
    assert (args.command, args.db, args.host, args.port, args.admin_host, args.admin_port, args.public_url,
            args.trusted_proxy) == ("serve", "/var/lib/scim/scim.db", "127.0.0.1", 9080, "127.0.0.1", 9081,
                                    "https://scim.example.com", "127.0.0.1")

    unit_path = tmp_path / "scim-appliance.service"
    unit_path.write_text(text)
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit_path)], capture_output=True, text=True,
                            timeout=60)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


def test_print_config_systemd_makes_a_relative_db_absolute(tmp_path):
    result = run_cli("print-config", "systemd", "--public-url", "https://scim.example.com", "--db", "data/scim.db",
                     env=clean_env())
    service = systemd_unit(result.stdout)["Service"]
    absolute = os.path.join(ROOT, "data", "scim.db")
    assert "--db %s " % absolute in service["ExecStart"][0]
    assert service["ReadWritePaths"] == service["WorkingDirectory"] == [os.path.dirname(absolute)]


@pytest.mark.parametrize("kind, public_url", [("nginx", "http://scim.example.com"),
                                              ("systemd", "http://scim.example.com"), ("caddy", "")])
def test_print_config_needs_an_https_public_url(kind, public_url):
    result = run_cli("print-config", kind, "--public-url", public_url, env=clean_env(), check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "scim-appliance: print-config needs --public-url https://...: Entra calls only HTTPS"]
