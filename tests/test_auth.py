"""Bearer tokens (R4; RFC 7644 §2, RFC 6750): who may call, and how tokens are kept."""

import glob
import hashlib
import json
import math
import re
import secrets

import pytest
import webtest

import scim_appliance
from conftest import assert_scim_error, LiveServer, run_cli, ScimClient, snapshot, stored_document
from scim_appliance import URN_ERROR, URN_GROUP, URN_PATCH, URN_SEARCH, URN_USER


def assert_401(response):
    """RFC 7644 §3.12 Error body, RFC 6750 §3 challenge."""
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    return assert_scim_error(response, 401)


def token_row(db, name):
    return db.execute("SELECT * FROM tokens WHERE name = ? ORDER BY created DESC", (name,)).fetchone()


@pytest.fixture
def resources(client):
    user = client.create_user("alice@example.com", displayName="Alice")
    group = client.create_group("Staff", members=[{"value": user["id"]}])
    return {"user": user["id"], "group": group["id"]}


def new_client(client, token):
    """Another client of the same app with a different Authorization token."""
    return ScimClient(client.app, token)


# Every (method, path, body) that reaches a SCIM handler other than discovery.
PROTECTED = [
    ("GET", "/Users", None),
    ("GET", "/Users?filter=userName+eq+%22alice%40example.com%22", None),
    ("POST", "/Users", {"schemas": [URN_USER], "userName": "intruder@example.com"}),
    ("GET", "/Users/{user}", None),
    ("PUT", "/Users/{user}", {"schemas": [URN_USER], "userName": "owned@example.com"}),
    ("PATCH", "/Users/{user}", {"schemas": [URN_PATCH], "Operations": [
        {"op": "replace", "path": "active", "value": False}]}),
    ("DELETE", "/Users/{user}", None),
    ("GET", "/Groups", None),
    ("POST", "/Groups", {"schemas": [URN_GROUP], "displayName": "Intruders"}),
    ("GET", "/Groups/{group}", None),
    ("PUT", "/Groups/{group}", {"schemas": [URN_GROUP], "displayName": "Owned"}),
    ("PATCH", "/Groups/{group}", {"schemas": [URN_PATCH], "Operations": [
        {"op": "remove", "path": "members"}]}),
    ("DELETE", "/Groups/{group}", None),
    ("POST", "/Users/.search", {"schemas": [URN_SEARCH], "filter": 'userName sw "a"'}),
    ("POST", "/Groups/.search", {"schemas": [URN_SEARCH]}),
    ("POST", "/.search", {"schemas": [URN_SEARCH]}),
    ("GET", "", None),
    ("GET", "/Me", None),
    ("POST", "/Bulk", {"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": []}),
]

BAD_CREDENTIALS = {
    "missing": None,
    "wrong_token": "Bearer scimapp_" + "A" * 43,
    "garbage_token": "Bearer not-a-token",
    "empty_bearer": "Bearer ",
    "bearer_only": "Bearer",
    "basic": "Basic ZW50cmE6c2VjcmV0",
    "token_without_scheme": "{token}",
    "token_with_other_scheme": "Token {token}",
    "basic_with_token": "Basic {token}",
    "token_with_suffix": "Bearer {token}x",
    "token_prefix_only": "Bearer {prefix}",
}


@pytest.mark.parametrize("credential", sorted(BAD_CREDENTIALS))
@pytest.mark.parametrize("method,path,body", PROTECTED, ids=["%s %s" % (m, p or "/") for m, p, _ in PROTECTED])
def test_protected_endpoint_refuses_bad_credentials_and_changes_nothing(
        client, anonymous, db, token, resources, method, path, body, credential):
    """R4: "A wrong or missing token must be refused (RFC 7644 §3.12: 401)"; nothing happens."""
    before = snapshot(db, ("users", "groups", "members", "tokens"))
    header = BAD_CREDENTIALS[credential]
    headers = {} if header is None else {"Authorization": header.format(token=token, prefix=token[:-1])}
    response = anonymous.request(method, path.format(**resources), body, status="*", headers=headers)
    assert_401(response)
    assert "Resources" not in response.text and resources["user"] not in response.text
    assert snapshot(db, ("users", "groups", "members", "tokens")) == before


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/Users", "/Users/{user}", "/Groups", "/Groups/{group}",
                                  "/Users/.search", "/Groups/.search", "/.search"])
def test_no_method_on_a_resource_endpoint_works_without_a_token(anonymous, db, resources, method, path):
    """Whatever the method, an anonymous request never succeeds and never writes.

    Routes that exist answer 401; a method the endpoint does not have may be a 405 instead."""
    before = snapshot(db, ("users", "groups", "members", "tokens"))
    body = {"schemas": [URN_USER], "userName": "x@example.com"} if method in ("POST", "PUT", "PATCH") else None
    response = anonymous.request(method, path.format(**resources), body, status="*")
    routed = {("GET", "/Users"), ("POST", "/Users"), ("GET", "/Groups"), ("POST", "/Groups"),
              ("POST", "/Users/.search"), ("POST", "/Groups/.search"), ("POST", "/.search")}
    routed |= {(m, p) for m in ("GET", "PUT", "PATCH", "DELETE") for p in ("/Users/{user}", "/Groups/{group}")}
    if (method, path) in routed:
        assert_401(response)
    else:
        assert response.status_int in (401, 405)
        assert json.loads(response.body)["schemas"] == [URN_ERROR]
    assert snapshot(db, ("users", "groups", "members", "tokens")) == before


def test_valid_token_is_accepted_with_any_case_of_the_scheme(client, db, token):
    """RFC 6750 §2.1 / RFC 7235 §2.1: the auth-scheme is case-insensitive."""
    for number, scheme in enumerate(("Bearer", "bearer", "BEARER", "BeArEr")):
        user_name = "scheme%d@example.com" % number
        response = client.app.post("/scim/Users", json.dumps({"schemas": [URN_USER], "userName": user_name}),
                                   headers={"Authorization": "%s %s" % (scheme, token),
                                            "Content-Type": "application/scim+json"})
        assert response.status_int == 201
        assert stored_document(db, "users", response.json["id"])["userName"] == user_name


def test_discovery_needs_no_token_even_a_bad_one_is_ignored(anonymous):
    """RFC 7644 §4: discovery endpoints may be served without authentication."""
    for path in ("/ServiceProviderConfig", "/ResourceTypes", "/Schemas", "/ResourceTypes/User",
                 "/Schemas/" + URN_USER):
        assert anonymous.get(path).json["schemas"]
        assert anonymous.get(path, headers={"Authorization": "Bearer wrong"}).status_int == 200


# -- tokens ------------------------------------------------------------------------

def test_create_token_shape_and_stored_digest(store, db):
    """A fresh 256-bit token with the scimapp_ prefix; only its SHA-256 hex digest is stored."""
    token = scim_appliance.create_token(store, "shape")
    assert token.startswith("scimapp_") and len(token) >= 40
    assert re.fullmatch(r"scimapp_[A-Za-z0-9_\-]+", token)
    row = token_row(db, "shape")
    assert row["digest"] == hashlib.sha256(token.encode("utf-8")).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", row["digest"])
    assert row["revoked"] is None and row["last_used"] is None and row["created"]
    assert token not in [value for value in tuple(row)]
    assert scim_appliance.create_token(store, "shape2") != token


def test_token_text_never_reaches_the_database_files(store, settings, client, token):
    """Whoever copies the database file (and its -wal/-shm) learns no usable token."""
    second = scim_appliance.create_token(store, "second")
    client.create_user("wal@example.com")          # a request: last_used gets written
    new_client(client, second).get("/Users")
    files = sorted(glob.glob(settings.db + "*"))
    assert settings.db in files and settings.db + "-wal" in files
    contents = b"".join(open(path, "rb").read() for path in files)
    for secret in (token, second):
        assert secret.encode() not in contents
        assert secret[len("scimapp_"):].encode() not in contents
        # Positive control: the digest is there, so these really are the files written to.
        assert hashlib.sha256(secret.encode()).hexdigest().encode() in contents


def test_revoked_token_is_refused_immediately(store, client, db, token):
    """`token revoke` takes effect on the next request, without a restart."""
    assert client.get("/Users").status_int == 200
    with store.write() as tx:
        assert tx.revoke_token("entra", scim_appliance.utc_now()) == 1
    assert token_row(db, "entra")["revoked"] is not None
    before = db.execute("SELECT count(*) FROM users").fetchone()[0]
    assert_401(client.get("/Users", status=401))
    assert_401(client.post("/Users", {"schemas": [URN_USER], "userName": "late@example.com"}, status=401))
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == before


def test_revoked_name_can_be_reissued_and_only_the_new_token_works(store, client, db, token):
    with store.write() as tx:
        tx.revoke_token("entra", scim_appliance.utc_now())
    fresh = scim_appliance.create_token(store, "entra")
    assert fresh != token
    assert_401(client.get("/Users", status=401))
    assert new_client(client, fresh).get("/Users").json["totalResults"] == 0
    assert db.execute("SELECT count(*) FROM tokens WHERE name = 'entra'").fetchone()[0] == 2


def test_two_live_tokens_both_work(store, client, db, token):
    """Rotation: a second token works alongside the first until the first is revoked."""
    second = scim_appliance.create_token(store, "rotation")
    first_user = client.create_user("first@example.com")
    second_user = new_client(client, second).create_user("second@example.com")
    assert stored_document(db, "users", first_user["id"])["userName"] == "first@example.com"
    assert stored_document(db, "users", second_user["id"])["userName"] == "second@example.com"
    with store.write() as tx:
        tx.revoke_token("entra", scim_appliance.utc_now())
    assert_401(client.get("/Users", status=401))
    assert new_client(client, second).get("/Users").json["totalResults"] == 2


@pytest.mark.parametrize("name", ["entra", " entra ", "entra\t"])
def test_duplicate_live_token_name_is_refused(store, db, token, name):
    """Token names identify tokens for `token revoke`: one live token per name."""
    with pytest.raises(ValueError):
        scim_appliance.create_token(store, name)
    assert db.execute("SELECT count(*) FROM tokens").fetchone()[0] == 1


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_bad_token_name_is_refused(store, db, name):
    with pytest.raises(ValueError):
        scim_appliance.create_token(store, name)
    assert db.execute("SELECT count(*) FROM tokens").fetchone()[0] == 0


def test_last_used_is_recorded_on_first_use_and_throttled(store, client, activity, db, token, monkeypatch):
    """last_used is noted on first use, then at most every TOKEN_TOUCH_SECONDS,
    and written by the activity log's flush: a read never writes on its own path."""
    assert token_row(db, "entra")["last_used"] is None
    client.get("/Users")
    assert token_row(db, "entra")["last_used"] is None   # the request itself wrote nothing
    activity.flush()
    first = token_row(db, "entra")["last_used"]
    assert first is not None and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first)
    # A sentinel shows whether later requests write again.
    sentinel = "2000-01-01T00:00:00.000Z"
    with store.write() as tx:
        tx.conn.execute("UPDATE tokens SET last_used = ? WHERE name = 'entra'", (sentinel,))
    client.get("/Users")
    client.create_user("busy@example.com")
    activity.flush()
    assert token_row(db, "entra")["last_used"] == sentinel
    # With the throttle at zero the next request is noted: it is the throttle that held it back.
    monkeypatch.setattr(scim_appliance, "TOKEN_TOUCH_SECONDS", 0)
    client.get("/Users")
    activity.flush()
    assert token_row(db, "entra")["last_used"] > sentinel


def test_failed_authentication_does_not_touch_last_used(client, anonymous, activity, db, token, monkeypatch):
    monkeypatch.setattr(scim_appliance, "TOKEN_TOUCH_SECONDS", 0)   # every use of the token is noted
    client.get("/Users")
    activity.flush()
    used = token_row(db, "entra")["last_used"]
    assert used is not None
    anonymous.get("/Users", status=401, headers={"Authorization": "Bearer " + token + "x"})
    activity.flush()
    assert token_row(db, "entra")["last_used"] == used


# -- constant-time matching ----------------------------------------------------------

@pytest.fixture
def compare_calls(monkeypatch):
    calls = []
    real = scim_appliance.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(scim_appliance.hmac, "compare_digest", counting)
    return calls


def test_match_token_compares_every_live_digest(compare_calls):
    """No early exit: the time taken says nothing about which token matched."""
    tokens = ["scimapp_" + letter * 43 for letter in "abc"]
    live = [("t%d" % i, scim_appliance.token_digest(t)) for i, t in enumerate(tokens)]
    assert scim_appliance.match_token(tokens[0], live) == live[0]
    assert len(compare_calls) == 3
    assert scim_appliance.match_token(tokens[2], live) == live[2]
    assert len(compare_calls) == 6
    assert scim_appliance.match_token("scimapp_nope", live) is None
    assert len(compare_calls) == 9
    assert all(len(a) == 64 and len(b) == 64 for a, b in compare_calls)


def test_request_authentication_uses_compare_digest_once_per_live_token(store, client, token, compare_calls):
    scim_appliance.create_token(store, "second")
    scim_appliance.create_token(store, "third")
    with store.write() as tx:
        tx.revoke_token("third", scim_appliance.utc_now())
    client.get("/Users")
    assert len(compare_calls) == 2
    assert_401(client.get("/Users", status=401, headers={"Authorization": "Bearer scimapp_wrong"}))
    assert len(compare_calls) == 4


@pytest.mark.parametrize("authorization", ["Bearer \xe9", "Bearer \xff\xfe", "\xe9 token"])
def test_non_utf8_bytes_in_the_authorization_header_are_401(anonymous, db, authorization):
    """Found by fuzzing: bottle's header decoding raised, so any anonymous client could cause a 500."""
    assert_401(anonymous.get("/Users", headers={"Authorization": authorization}, status=401))


# -- issue 3, item 13: every refused credential, on every protected route ------------

# Credential forms the BAD_CREDENTIALS matrix above does not already cover.
MALFORMED_CREDENTIALS = {
    "empty_header": "",                              # "Authorization:" with nothing after it
    "bearer_two_words": "Bearer a b",
    "token_scheme_other_secret": "Token x",
    "basic_user_password": "Basic dXNlcjpwYXNz",     # user:pass
    "token_then_extra_word": "Bearer {token} x",
    "no_space_after_scheme": "Bearer{token}",
    "tab_after_scheme": "Bearer\t{token}",           # RFC 6750 §2.1: "Bearer" 1*SP b64token
}

PROTECTED_IDS = ["%s %s" % (m, p or "/") for m, p, _ in PROTECTED]


@pytest.mark.parametrize("credential", sorted(MALFORMED_CREDENTIALS))
@pytest.mark.parametrize("method,path,body", PROTECTED, ids=PROTECTED_IDS)
def test_protected_endpoint_refuses_malformed_authorization_and_changes_nothing(
        anonymous, db, token, resources, method, path, body, credential):
    """Issue 3 item 13: empty and malformed Authorization headers are 401 with a Bearer challenge."""
    before = snapshot(db, ("users", "groups", "members", "tokens"))
    headers = {"Authorization": MALFORMED_CREDENTIALS[credential].format(token=token)}
    response = anonymous.request(method, path.format(**resources), body, status="*", headers=headers)
    assert_401(response)
    assert resources["user"] not in response.text
    assert snapshot(db, ("users", "groups", "members", "tokens")) == before


@pytest.mark.parametrize("method,path,body", PROTECTED, ids=PROTECTED_IDS)
def test_protected_endpoint_refuses_a_revoked_token_and_changes_nothing(
        store, client, db, token, resources, method, path, body):
    """Issue 3 item 13: a revoked token is 401 on every protected route, at once."""
    with store.write() as tx:
        assert tx.revoke_token("entra", scim_appliance.utc_now()) == 1
    before = snapshot(db, ("users", "groups", "members", "tokens"))
    response = client.request(method, path.format(**resources), body, status="*")
    assert_401(response)
    assert resources["user"] not in response.text
    assert snapshot(db, ("users", "groups", "members", "tokens")) == before


def with_query(path, name, value):
    return path + ("&" if "?" in path else "?") + "%s=%s" % (name, value)


@pytest.mark.parametrize("parameter", ["access_token", "token", "bearer"])
@pytest.mark.parametrize("method,path,body", PROTECTED, ids=PROTECTED_IDS)
def test_valid_token_in_the_query_string_never_authenticates(
        anonymous, db, token, resources, method, path, body, parameter):
    """Issue 3 item 13 (RFC 6750 §2.3 is not supported): a URI query token is 401 and changes nothing."""
    before = snapshot(db, ("users", "groups", "members", "tokens"))
    response = anonymous.request(method, with_query(path.format(**resources), parameter, token), body,
                                 status="*")
    assert_401(response)
    assert resources["user"] not in response.text
    assert snapshot(db, ("users", "groups", "members", "tokens")) == before


def test_valid_token_in_a_form_body_never_authenticates(anonymous, db, token, resources):
    """RFC 6750 §2.2 (form-encoded body parameter) is not supported either: 401, nothing written."""
    before = snapshot(db, ("users", "groups", "members", "tokens"))
    response = anonymous.request("POST", "/Users", raw=("access_token=" + token).encode(), status="*",
                                 content_type="application/x-www-form-urlencoded")
    assert_401(response)
    assert snapshot(db, ("users", "groups", "members", "tokens")) == before


def test_query_string_token_beside_a_valid_header_changes_nothing_about_the_answer(client, db, token):
    """The query parameter is ignored, not an error: with a valid header the request is served."""
    created = client.post(with_query("/Users", "access_token", token),
                          {"schemas": [URN_USER], "userName": "query@example.com"}).json
    assert stored_document(db, "users", created["id"])["userName"] == "query@example.com"
    assert client.get(with_query("/Users", "access_token", "scimapp_wrong")).json["totalResults"] == 1


def test_plaintext_tokens_reach_neither_the_database_files_nor_the_server_output(tmp_path):
    """Issue 3 item 13: after real traffic (accepted, refused, query-string tokens) the token's text
    and a refused token-shaped secret appear nowhere in the .db/-wal/-shm bytes or in stdout+stderr."""
    db_path = str(tmp_path / "secret.db")
    token = run_cli("token", "create", "--name", "entra", "--db", db_path).stdout.strip()
    wrong = scim_appliance.TOKEN_PREFIX + secrets.token_urlsafe(32)
    assert wrong != token and len(wrong) == len(token)
    server = LiveServer(db_path)
    try:
        status, _, user = server.request("POST", "/Users", {"schemas": [URN_USER], "userName": "s@example.com"},
                                         token=token)
        assert status == 201
        status, _, group = server.request("POST", "/Groups", {"schemas": [URN_GROUP], "displayName": "S",
                                                              "members": [{"value": user["id"]}]}, token=token)
        assert status == 201
        assert server.request("GET", "/Users/" + user["id"], token=token)[0] == 200
        # Refused: a token-shaped wrong secret, the real token in the query string (with and without
        # a header), the real token with a suffix or under another scheme; fewer than the throttle limit.
        refused = [
            ("GET", "/Users", {"Authorization": "Bearer " + wrong}),
            ("POST", "/Users?access_token=" + token, {}),
            ("GET", "/Users?token=%s&bearer=%s" % (token, token), {"Authorization": "Bearer " + wrong}),
            ("GET", "/Groups/" + group["id"], {"Authorization": "Bearer " + token + "x"}),
            ("DELETE", "/Users/" + user["id"], {"Authorization": "Basic " + token}),
        ]
        assert len(refused) < scim_appliance.AUTH_FAILURE_LIMIT
        for method, path, headers in refused:
            body = {"schemas": [URN_USER], "userName": "q@example.com"} if method == "POST" else None
            status, response_headers, error = server.request(method, path, body, token="", headers=headers)
            assert status == 401, (method, path, error)
            assert response_headers["WWW-Authenticate"].startswith("Bearer")
        # Served: the real token in the header, beside one in the query string.
        assert server.request("GET", "/Users?access_token=" + token, token=token)[2]["totalResults"] == 1
        files = sorted(glob.glob(db_path + "*"))
        while_running = b"".join(open(path, "rb").read() for path in files)
    finally:
        output = server.stop()
    after_stop = b"".join(open(path, "rb").read() for path in sorted(glob.glob(db_path + "*")))
    assert db_path + "-wal" in files   # the log was there to be searched while the server ran
    # Positive controls: these are the files and the output that were written to.
    assert hashlib.sha256(token.encode()).hexdigest().encode() in while_running + after_stop
    assert user["id"].encode() in while_running + after_stop
    assert "authentication failed from 127.0.0.1" in output
    for secret in (token, wrong):
        for text in (secret, secret[len(scim_appliance.TOKEN_PREFIX):]):
            assert text.encode() not in while_running
            assert text.encode() not in after_stop
            assert text not in output


# -- issue 3, item 14: failed authentication is throttled per client address ----------

def fake_throttle(limit=3, window=60):
    """An AuthThrottle on a clock the test moves by hand: (throttle, [now])."""
    now = [1000.0]
    return scim_appliance.AuthThrottle(limit=limit, window=window, clock=lambda: now[0]), now


def test_throttle_allows_until_the_limit_then_waits_for_the_oldest_failure():
    """retry_after is 0 below the limit, then the seconds until the oldest failure leaves the window."""
    throttle, now = fake_throttle()
    assert throttle.retry_after("192.0.2.1") == 0
    for number, at in enumerate((1000.0, 1010.0, 1020.0), 1):
        now[0] = at
        assert throttle.retry_after("192.0.2.1") == 0
        assert throttle.record_failure("192.0.2.1") == number
    assert throttle.retry_after("192.0.2.1") == 40          # 1000 + 60 - 1020
    now[0] = 1050.0
    assert throttle.retry_after("192.0.2.1") == 10
    now[0] = 1059.25
    assert throttle.retry_after("192.0.2.1") == 1           # rounded up: never "retry now" too early
    now[0] = 1060.0                                         # the first failure has left the window
    assert throttle.retry_after("192.0.2.1") == 0
    assert throttle.record_failure("192.0.2.1") == 3        # 1010, 1020, 1060
    assert throttle.retry_after("192.0.2.1") == 10          # until 1010 leaves
    now[0] = 1200.0
    assert throttle.retry_after("192.0.2.1") == 0
    assert throttle.record_failure("192.0.2.1") == 1        # the old failures are gone


@pytest.mark.parametrize("limit,window", [(1, 5), (3, 60), (10, 60)])
def test_throttle_retry_after_is_a_whole_positive_number_of_seconds(limit, window):
    throttle, now = fake_throttle(limit=limit, window=window)
    for _ in range(limit):
        throttle.record_failure("198.51.100.7")
        now[0] += 0.3
    wait = throttle.retry_after("198.51.100.7")
    assert isinstance(wait, int) and wait >= 1
    assert wait == max(1, math.ceil(1000.0 + window - now[0]))


def test_throttle_counts_each_address_on_its_own():
    throttle, now = fake_throttle()
    for _ in range(3):
        throttle.record_failure("192.0.2.1")
    assert throttle.retry_after("192.0.2.1") == 60
    assert throttle.retry_after("192.0.2.2") == 0
    assert throttle.retry_after("2001:db8::1") == 0
    assert throttle.record_failure("192.0.2.2") == 1
    assert throttle.record_failure("192.0.2.2") == 2
    assert throttle.retry_after("192.0.2.2") == 0
    assert throttle.retry_after("192.0.2.1") == 60


def test_throttle_remembers_at_most_max_addresses_forgetting_the_least_recent(monkeypatch):
    """The memory bound: beyond MAX_ADDRESSES, the address that failed longest ago is forgotten."""
    monkeypatch.setattr(scim_appliance.AuthThrottle, "MAX_ADDRESSES", 4)
    throttle, now = fake_throttle()
    for _ in range(3):
        throttle.record_failure("10.0.0.1")
    for address in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
        for _ in range(3):
            throttle.record_failure(address)
    assert all(throttle.retry_after("10.0.0.%d" % n) == 60 for n in range(1, 5))
    throttle.record_failure("10.0.0.1")                      # now the most recent, not the oldest
    throttle.record_failure("10.0.0.5")
    assert throttle.retry_after("10.0.0.2") == 0             # forgotten
    assert throttle.retry_after("10.0.0.1") == 60            # kept
    for number in range(6, 200):
        throttle.record_failure("10.0.%d.%d" % (number // 250, number % 250))
    assert len(throttle._failures) == 4
    assert all(throttle.retry_after("10.0.0.%d" % n) == 0 for n in range(1, 6))


# -- throttling over HTTP ----------------------------------------------------------------

def client_from(wsgi_app, token, address):
    """A client of `wsgi_app` whose requests come from REMOTE_ADDR `address`."""
    return ScimClient(webtest.TestApp(wsgi_app, extra_environ={"REMOTE_ADDR": address}), token)


def assert_429(response):
    body = assert_scim_error(response, 429)
    assert re.fullmatch(r"[1-9][0-9]*", response.headers["Retry-After"])
    assert 1 <= int(response.headers["Retry-After"]) <= scim_appliance.AUTH_FAILURE_WINDOW
    return body


def fail_until_throttled(attacker):
    """AUTH_FAILURE_LIMIT refused requests of assorted kinds, each a 401."""
    kinds = [{}, {"Authorization": "Bearer scimapp_" + "B" * 43}, {"Authorization": "Basic dXNlcjpwYXNz"},
             {"Authorization": "Bearer"}]
    for number in range(scim_appliance.AUTH_FAILURE_LIMIT):
        assert_401(attacker.get("/Users", status="*", headers=kinds[number % len(kinds)]))


def test_limit_failures_from_one_address_get_429_and_other_addresses_still_get_401(
        wsgi_app, token, db, resources):
    """Issue 3 item 14: after AUTH_FAILURE_LIMIT failures → 429 + Retry-After; elsewhere still 401."""
    attacker = client_from(wsgi_app, None, "203.0.113.9")
    fail_until_throttled(attacker)
    before = snapshot(db, ("users", "groups", "members", "tokens"))
    assert_429(attacker.get("/Users", status="*"))
    assert_429(attacker.get("/Users/" + resources["user"], status="*",
                            headers={"Authorization": "Bearer scimapp_" + "C" * 43}))
    assert_429(attacker.post("/Users", {"schemas": [URN_USER], "userName": "in@example.com"}, status="*"))
    assert_429(attacker.delete("/Groups/" + resources["group"], status="*"))
    # A token in the query string still authenticates nothing: it is refused like any other.
    assert_429(attacker.get(with_query("/Users", "access_token", token), status="*"))
    assert snapshot(db, ("users", "groups", "members", "tokens")) == before
    neighbour = client_from(wsgi_app, None, "203.0.113.10")
    assert_401(neighbour.get("/Users", status="*"))
    assert_401(neighbour.delete("/Users/" + resources["user"], status="*"))
    assert snapshot(db, ("users", "groups", "members", "tokens")) == before


def test_a_valid_token_from_a_throttled_address_is_always_served(wsgi_app, token, db, resources):
    """Issue 3 item 14: the token is checked first, so Entra is never locked out by someone else."""
    fail_until_throttled(client_from(wsgi_app, None, "203.0.113.9"))
    entra = client_from(wsgi_app, token, "203.0.113.9")
    assert entra.get("/Users").json["totalResults"] == 1
    assert entra.get("/Users/" + resources["user"]).json["id"] == resources["user"]
    created = entra.create_user("after@example.com")
    assert stored_document(db, "users", created["id"])["userName"] == "after@example.com"
    entra.delete("/Groups/" + resources["group"])
    assert stored_document(db, "groups", resources["group"]) is None
    # Still throttled for requests without a valid token.
    assert_429(client_from(wsgi_app, None, "203.0.113.9").get("/Users", status="*"))


def test_429_writes_nothing_not_even_token_last_used(wsgi_app, token, db, resources):
    """A 429 is answered before anything is read or written."""
    attacker = client_from(wsgi_app, None, "203.0.113.9")
    fail_until_throttled(attacker)
    before = snapshot(db, ("users", "groups", "members", "tokens"))
    for method, path, body in PROTECTED:
        response = attacker.request(method, path.format(**resources), body, status="*",
                                    headers={"Authorization": "Bearer " + token + "x"})
        assert_429(response)
        assert resources["user"] not in response.text
    assert snapshot(db, ("users", "groups", "members", "tokens")) == before


def test_throttle_window_moves_on_and_retry_after_counts_down_over_http(store, settings, token, db, monkeypatch):
    """With the app's clock faked: Retry-After is exactly the time to the window's end, then 401 again."""
    now = [5000.0]
    real = scim_appliance.AuthThrottle
    monkeypatch.setattr(scim_appliance, "AuthThrottle", lambda: real(clock=lambda: now[0]))
    app = scim_appliance.make_scim_app(store, settings)
    attacker = client_from(app, None, "192.0.2.50")
    for _ in range(scim_appliance.AUTH_FAILURE_LIMIT):
        assert_401(attacker.get("/Users", status="*"))
    response = attacker.get("/Users", status="*")
    assert_429(response)
    assert response.headers["Retry-After"] == str(scim_appliance.AUTH_FAILURE_WINDOW)
    now[0] += 25
    assert attacker.get("/Users", status="*").headers["Retry-After"] == str(
        scim_appliance.AUTH_FAILURE_WINDOW - 25)
    now[0] = 5000.0 + scim_appliance.AUTH_FAILURE_WINDOW
    assert_401(attacker.get("/Users", status="*"))
    assert client_from(app, token, "192.0.2.50").get("/Users").json["totalResults"] == 0
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_first_and_limit_th_failure_are_logged_without_the_presented_secret(wsgi_app, token, capsys):
    """One line at the 1st and at the AUTH_FAILURE_LIMIT-th failure, naming the address, never the secret."""
    attacker = client_from(wsgi_app, None, "198.51.100.23")
    for _ in range(scim_appliance.AUTH_FAILURE_LIMIT + 2):
        attacker.get("/Users", status="*", headers={"Authorization": "Bearer " + token + "x"})
    lines = [line for line in capsys.readouterr().err.splitlines() if "authentication failed" in line]
    assert len(lines) == 2
    assert all(line.startswith("scim-appliance: authentication failed from 198.51.100.23") for line in lines)
    assert "429" in lines[1]
    assert token not in "\n".join(lines) and token[len("scimapp_"):] not in "\n".join(lines)


def test_token_check_reads_tokens_again_only_after_a_token_change(store, token, monkeypatch):
    """TokenCheck keeps the live tokens per thread. It reads them again at
    once after a commit in this process that changed them, sees another
    process's commit (a `token revoke`) within TOKEN_RECHECK_SECONDS, and
    never re-reads for commits that left the tokens alone (SCIM writes)."""
    reads = []
    original = scim_appliance.Transaction.live_tokens
    monkeypatch.setattr(scim_appliance.Transaction, "live_tokens",
                        lambda tx: reads.append(1) or original(tx))
    now = [1000.0]
    check = scim_appliance.TokenCheck(store, clock=lambda: now[0])
    assert check(token) == "entra" and len(reads) == 1
    scim_appliance.create_resource(store, scim_appliance.USER,
                                   {"schemas": [URN_USER], "userName": "w@example.com"}, "http://x/scim")
    assert check(token) == "entra" and check("wrong") is None and check(token) == "entra"
    assert len(reads) == 1               # a user written on this connection: no query
    reads.clear()
    now[0] += 5 * scim_appliance.TOKEN_RECHECK_SECONDS
    assert check(token) == "entra" and reads == []   # nothing committed by anyone else: no query
    other = scim_appliance.Store(store.path)      # another connection, as `token revoke` would be
    try:
        scim_appliance.revoke_token(other, "entra")
    finally:
        other.close()
    assert check(token) == "entra" and reads == []      # not looked at within the recheck interval
    now[0] += scim_appliance.TOKEN_RECHECK_SECONDS
    assert check(token) is None and len(reads) == 1      # then seen
    second = scim_appliance.create_token(store, "second")   # a commit in this process
    assert check(second) == "second" and len(reads) == 2     # seen at once
    with store.write() as tx:                                # a revocation in this process
        tx.revoke_token("second", scim_appliance.utc_now())
    assert check(second) is None and len(reads) == 3         # seen at once too
