"""Behind a reverse proxy (issue 3, item 15), against real servers.

Forwarded headers are believed only from the configured --trusted-proxy
(waitress's proxy-header handling), and then only X-Forwarded-For: it names
the client for the failed-authentication throttle and the log. Nobody's
X-Forwarded-Host / -Proto / Forwarded ever shapes meta.location or Location:
they come from --public-url alone.

Four server starts: no trusted proxy; --trusted-proxy 127.0.0.1 (we are the
proxy) set by flag and by SCIM_APPLIANCE_TRUSTED_PROXY; and --trusted-proxy
10.9.9.9 (a proxy that is not us).
"""

import json
import sqlite3

import pytest

import scim_appliance
from conftest import LiveServer, run_cli
from scim_appliance import AUTH_FAILURE_LIMIT, URN_USER

PUBLIC_URL = "https://scim.example.com"
SPOOFED = "203.0.113.9"        # what the client claims to be (TEST-NET-3)
OTHER = "198.51.100.7"         # another forwarded client (TEST-NET-2)

# Everything a client can send to steer a naive server's idea of its own URL
# or of the client's address.
FORGED = {
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "http",
    "X-Forwarded-Port": "8443",
    "Forwarded": "for=%s;host=evil.example;proto=http" % SPOOFED,
}


def forged(address=SPOOFED):
    headers = dict(FORGED)
    headers["X-Forwarded-For"] = address
    return headers


def base_env(**overrides):
    """os.environ with no SCIM_APPLIANCE_TRUSTED_PROXY of the machine's own
    (LiveServer adds to os.environ; an empty value means "believe no one")."""
    env = {"SCIM_APPLIANCE_TRUSTED_PROXY": ""}
    env.update(overrides)
    return env


def start(tmp_path, extra_args=(), env=None):
    """A real server with --public-url and a token; the caller stops it."""
    db_path = str(tmp_path / "proxy.db")
    token = run_cli("token", "create", "--name", "entra", "--db", db_path).stdout.strip()
    server = LiveServer(db_path, extra_args=("--public-url", PUBLIC_URL) + tuple(extra_args),
                        env=base_env(**(env or {})))
    server.token = token
    return server


def fail(server, headers):
    """One request with a wrong token; returns (status, headers)."""
    status, response_headers, _ = server.request("GET", "/Users", token="not-the-token", headers=headers)
    return status, response_headers


def exhaust(server, headers):
    """AUTH_FAILURE_LIMIT failed authentications, each answered 401."""
    statuses = [fail(server, headers)[0] for _ in range(AUTH_FAILURE_LIMIT)]
    assert statuses == [401] * AUTH_FAILURE_LIMIT


def assert_throttled(server, headers):
    status, response_headers = fail(server, headers)
    assert status == 429
    assert int(response_headers["Retry-After"]) >= 1


def user_count(db_path):
    conn = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True)
    try:
        return conn.execute("SELECT count(*) FROM users").fetchone()[0]
    finally:
        conn.close()


def stored_user_name(db_path, user_id):
    conn = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True)
    try:
        row = conn.execute("SELECT document FROM users WHERE id = ?", (user_id,)).fetchone()
        return None if row is None else json.loads(row[0])["userName"]
    finally:
        conn.close()


def assert_locations_ignore_forwarded_headers(server, user_name):
    """POST, GET and list a user with every forged header: each location is
    the public URL's, and "evil.example" appears nowhere in any answer."""
    expected_prefix = PUBLIC_URL + "/scim/Users/"
    status, headers, user = server.request(
        "POST", "/Users", {"schemas": [URN_USER], "userName": user_name}, headers=forged())
    assert status == 201
    location = expected_prefix + user["id"]
    assert headers["Location"] == location
    assert user["meta"]["location"] == location
    assert stored_user_name(server.db_path, user["id"]) == user_name

    status, _, got = server.request("GET", "/Users/" + user["id"], headers=forged())
    assert status == 200
    assert got["meta"]["location"] == location

    status, _, listing = server.request("GET", "/Users?filter=userName+eq+%22" + user_name + "%22",
                                        headers=forged())
    assert status == 200
    assert [r["meta"]["location"] for r in listing["Resources"]] == [location]

    status, _, config = server.request("GET", "/ServiceProviderConfig", headers=forged())
    assert status == 200
    assert config["meta"]["location"] == PUBLIC_URL + "/scim/ServiceProviderConfig"

    for document in (user, got, listing):
        assert "http://" not in json.dumps(document)
    for document in (user, got, listing, config):
        text = json.dumps(document)
        assert "evil.example" not in text and "8443" not in text
    return user["id"]


# -- no --trusted-proxy: nobody's forwarded headers are believed -----------------------

def test_without_trusted_proxy_forwarded_headers_are_ignored(tmp_path):
    """Item 15: locations come from --public-url only; failures count against
    the real peer 127.0.0.1 whatever X-Forwarded-For says, and the log names it."""
    server = start(tmp_path)
    try:
        assert_locations_ignore_forwarded_headers(server, "alice@example.com")

        exhaust(server, forged(SPOOFED))
        # The header was not believed: a "different client" is the same 127.0.0.1 ...
        assert_throttled(server, forged(OTHER))
        assert_throttled(server, {"Forwarded": "for=%s" % OTHER})
        assert_throttled(server, {})
        # ... and a valid token is never refused, whatever headers come with it.
        status, _, _ = server.request("GET", "/ServiceProviderConfig", headers=forged(OTHER))
        assert status == 200
        assert user_count(server.db_path) == 1
    finally:
        output = server.stop()
    assert_failures_logged_only_for(output, "127.0.0.1", absent=(SPOOFED, OTHER))


def assert_failures_logged_only_for(output, address, absent):
    """The 1st and the limit-th failure are logged under `address`; the
    addresses in `absent` (forwarded, not believed) appear nowhere."""
    assert "authentication failed from %s (1 in" % address in output
    assert "authentication failed from %s (%d in" % (address, AUTH_FAILURE_LIMIT) in output
    for other in absent:
        assert other not in output


# -- --trusted-proxy 127.0.0.1: we are the proxy, X-Forwarded-For is believed ----------

@pytest.mark.parametrize("configured_by", ["flag", "environment"])
def test_trusted_proxy_forwarded_for_names_the_client(tmp_path, configured_by):
    """Item 15: from the trusted proxy, X-Forwarded-For is the client address
    (throttle and log) -- but X-Forwarded-Host still never shapes a location."""
    if configured_by == "flag":
        server = start(tmp_path, extra_args=("--trusted-proxy", "127.0.0.1"))
    else:
        server = start(tmp_path, env={"SCIM_APPLIANCE_TRUSTED_PROXY": "127.0.0.1"})
    try:
        assert_locations_ignore_forwarded_headers(server, "bob@example.com")

        exhaust(server, forged(SPOOFED))
        assert_throttled(server, forged(SPOOFED))
        # Only the address the proxy appended (the last hop) counts: a client
        # that prepends another one is still 203.0.113.9.
        assert_throttled(server, forged(OTHER + ", " + SPOOFED))
        # Other forwarded clients, and the proxy itself, are not throttled.
        assert fail(server, forged(OTHER))[0] == 401
        assert fail(server, forged(SPOOFED + ", " + OTHER))[0] == 401
        assert fail(server, {})[0] == 401
        # A valid token from the throttled address is never refused.
        status, _, _ = server.request("GET", "/ServiceProviderConfig", headers=forged(SPOOFED))
        assert status == 200
        assert user_count(server.db_path) == 1
    finally:
        output = server.stop()
    assert "authentication failed from %s (1 in" % SPOOFED in output
    assert "authentication failed from %s (%d in" % (SPOOFED, AUTH_FAILURE_LIMIT) in output
    assert "authentication failed from %s (1 in" % OTHER in output
    assert "authentication failed from 127.0.0.1 (1 in" in output   # the one request without the header
    assert "evil.example" not in output


# -- --trusted-proxy 10.9.9.9: a proxy that is not us; our headers are not believed ----

def test_forwarded_for_from_an_untrusted_peer_is_not_believed(tmp_path):
    """Item 15: a trusted proxy elsewhere does not make 127.0.0.1's
    X-Forwarded-For believable: throttling stays keyed on 127.0.0.1."""
    server = start(tmp_path, extra_args=("--trusted-proxy", "10.9.9.9"),
                   env={"SCIM_APPLIANCE_TRUSTED_PROXY": "127.0.0.1"})   # the flag wins over it
    try:
        location_user = assert_locations_ignore_forwarded_headers(server, "carol@example.com")
        assert stored_user_name(server.db_path, location_user) == "carol@example.com"

        exhaust(server, forged(SPOOFED))
        assert_throttled(server, forged(OTHER))
        assert_throttled(server, {})
        assert user_count(server.db_path) == 1
    finally:
        output = server.stop()
    assert_failures_logged_only_for(output, "127.0.0.1", absent=(SPOOFED, OTHER))


def test_trusted_proxy_setting_reads_flag_and_environment(monkeypatch):
    """Item 15: the flag and SCIM_APPLIANCE_TRUSTED_PROXY both set it; the flag wins; default none."""
    monkeypatch.delenv("SCIM_APPLIANCE_TRUSTED_PROXY", raising=False)
    assert scim_appliance.build_parser().parse_args(["serve"]).trusted_proxy == ""
    assert scim_appliance.Settings().trusted_proxy == ""
    monkeypatch.setenv("SCIM_APPLIANCE_TRUSTED_PROXY", "127.0.0.1")
    assert scim_appliance.build_parser().parse_args(["serve"]).trusted_proxy == "127.0.0.1"
    assert scim_appliance.build_parser().parse_args(
        ["serve", "--trusted-proxy", "10.9.9.9"]).trusted_proxy == "10.9.9.9"
