"""Bearer tokens (R4; RFC 7644 §2, RFC 6750): who may call, and how tokens are kept."""

import glob
import hashlib
import json
import re

import pytest

import scim_appliance
from conftest import assert_scim_error, ScimClient, stored_document
from scim_appliance import URN_ERROR, URN_GROUP, URN_PATCH, URN_SEARCH, URN_USER


def assert_401(response):
    """RFC 7644 §3.12 Error body, RFC 6750 §3 challenge."""
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    return assert_scim_error(response, 401)


def snapshot(db):
    """Every row of every table, tokens included (a refused request must not touch last_used)."""
    return {table: [tuple(r) for r in db.execute("SELECT * FROM %s ORDER BY 1, 2" % table)]
            for table in ("users", "groups", "members", "tokens")}


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
    before = snapshot(db)
    header = BAD_CREDENTIALS[credential]
    headers = {} if header is None else {"Authorization": header.format(token=token, prefix=token[:-1])}
    response = anonymous.request(method, path.format(**resources), body, status="*", headers=headers)
    assert_401(response)
    assert "Resources" not in response.text and resources["user"] not in response.text
    assert snapshot(db) == before


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/Users", "/Users/{user}", "/Groups", "/Groups/{group}",
                                  "/Users/.search", "/Groups/.search", "/.search"])
def test_no_method_on_a_resource_endpoint_works_without_a_token(anonymous, db, resources, method, path):
    """Whatever the method, an anonymous request never succeeds and never writes.

    Routes that exist answer 401; a method the endpoint does not have may be a 405 instead."""
    before = snapshot(db)
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
    assert snapshot(db) == before


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


def test_last_used_is_recorded_on_first_use_and_throttled(store, client, db, token, monkeypatch):
    """last_used is written on first use, then at most every TOKEN_TOUCH_SECONDS, so reads stay reads."""
    assert token_row(db, "entra")["last_used"] is None
    client.get("/Users")
    first = token_row(db, "entra")["last_used"]
    assert first is not None and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first)
    # A sentinel shows whether later requests write again.
    sentinel = "2000-01-01T00:00:00.000Z"
    with store.write() as tx:
        tx.conn.execute("UPDATE tokens SET last_used = ? WHERE name = 'entra'", (sentinel,))
    client.get("/Users")
    client.create_user("busy@example.com")
    assert token_row(db, "entra")["last_used"] == sentinel
    # With the throttle at zero the next request writes: it is the throttle that held it back.
    monkeypatch.setattr(scim_appliance, "TOKEN_TOUCH_SECONDS", 0)
    client.get("/Users")
    assert token_row(db, "entra")["last_used"] > sentinel


def test_failed_authentication_does_not_touch_last_used(client, anonymous, db, token):
    client.get("/Users")
    used = token_row(db, "entra")["last_used"]
    anonymous.get("/Users", status=401, headers={"Authorization": "Bearer " + token + "x"})
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
