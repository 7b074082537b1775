"""The SCIM error contract (RFC 7644 §3.12) and hostile input, through HTTP.

Every refusal is an application/scim+json Error message; no bad request
stores anything or changes a stored resource.
"""

import dataclasses
import json

import pytest
import webob
import webtest

import scim_appliance
from conftest import (assert_scim_error, media_type, PUBLIC_URL, ScimClient, snapshot, stored_document,
                      stored_members)
from scim_appliance import URN_ENTERPRISE, URN_ERROR, URN_GROUP, URN_LIST, URN_PATCH, URN_USER

CUSTOM_URN = "urn:ietf:params:scim:schemas:extension:CustomExtension:2.0:User"


# -- helpers -------------------------------------------------------------------




def user_count(db):
    return db.execute("SELECT count(*) FROM users").fetchone()[0]


def nested_object(containers, leaf="leaf"):
    """`containers` nested JSON objects {"a": {"a": ... leaf}}."""
    value = leaf
    for _ in range(containers):
        value = {"a": value}
    return value


@pytest.fixture
def user(client):
    return client.create_user("alice@example.com", displayName="Alice",
                              emails=[{"value": "alice@example.com", "type": "work", "primary": True}])


@pytest.fixture
def group(client, user):
    return client.create_group("Engineering", members=[{"value": user["id"]}])


# -- 404 -----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/Nope", "/Users/x/y", "/Groups/a/b/c", "/Userz", "/Schemas/x/y"])
def test_unknown_route_is_scim_404(client, db, user, path):
    """RFC 7644 §3.12: 404 for an endpoint that does not exist, as a SCIM Error."""
    before = snapshot(db)
    for method in ("GET", "POST", "DELETE"):
        body = {"schemas": [URN_USER], "userName": "x"} if method == "POST" else None
        assert_scim_error(client.request(method, path, body, status="*"), 404)
    assert snapshot(db) == before


@pytest.mark.parametrize("endpoint,body,operations", [
    ("/Users", {"schemas": [URN_USER], "userName": "ghost@example.com"},
     [{"op": "replace", "path": "displayName", "value": "Ghost"}]),
    ("/Groups", {"schemas": [URN_GROUP], "displayName": "Ghosts"},
     [{"op": "replace", "path": "displayName", "value": "Ghosts"}]),
])
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_unknown_id_is_scim_404_and_creates_nothing(client, db, group, endpoint, body, operations, method):
    """RFC 7644 §3.12: "404 Not found: Specified resource ... does not exist"; PUT never upserts."""
    before = snapshot(db)
    missing = "/%s/6f1b1b7e-0000-4000-8000-000000000000" % endpoint.strip("/")
    if method == "PATCH":
        response = client.patch(missing, operations, status="*")
    else:
        response = client.request(method, missing, body if method == "PUT" else None, status="*")
    assert_scim_error(response, 404)
    assert snapshot(db) == before


# -- 405 -----------------------------------------------------------------------

@pytest.mark.parametrize("method,path,allowed", [
    ("DELETE", "/Users", {"GET", "POST"}),
    ("PUT", "/Users", {"GET", "POST"}),
    ("PATCH", "/Users", {"GET", "POST"}),
    ("DELETE", "/Groups", {"GET", "POST"}),
    ("PUT", "/Groups", {"GET", "POST"}),
    ("POST", "/Users/{user}", {"GET", "PUT", "PATCH", "DELETE"}),
    ("POST", "/Groups/{group}", {"GET", "PUT", "PATCH", "DELETE"}),
    ("GET", "/.search", {"POST"}),
])
def test_wrong_method_is_scim_405_with_allow(client, db, user, group, method, path, allowed):
    """RFC 7231 §6.5.5: 405 carries Allow; the body is still a SCIM Error (RFC 7644 §3.12)."""
    before = snapshot(db)
    path = path.format(user=user["id"], group=group["id"])
    body = {"schemas": [URN_USER], "userName": "x"} if method in ("POST", "PUT", "PATCH") else None
    response = client.request(method, path, body, status="*")
    assert_scim_error(response, 405)
    allow = {m.strip().upper() for m in response.headers["Allow"].split(",")}
    assert allowed <= allow
    assert method not in allow
    assert snapshot(db) == before


# -- 501 -----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/Me", "/Me/groups", "/Bulk", "/me", "/BULK"])
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_me_and_bulk_are_scim_501(client, db, user, path, method):
    """RFC 7644 §3.11 (/Me) and §3.7 (/Bulk) are optional: 501 Not Implemented, a SCIM Error."""
    before = snapshot(db)
    body = None
    if method in ("POST", "PUT", "PATCH"):
        body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": "q", "data": {"userName": "bulk@x"}}]}
    assert_scim_error(client.request(method, path, body, status="*"), 501)
    assert snapshot(db) == before


# -- 415 -----------------------------------------------------------------------

UNSUPPORTED_BODIES = [
    ("text/plain", b'{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"plain@x"}'),
    ("text/plain; charset=utf-8", b'{"userName":"plain@x"}'),
    ("application/x-www-form-urlencoded", b"userName=form%40x&displayName=Form"),
    ("multipart/form-data; boundary=xyz",
     b'--xyz\r\nContent-Disposition: form-data; name="userName"\r\n\r\nform@x\r\n--xyz--\r\n'),
    ("application/xml", b"<User><userName>xml@x</userName></User>"),
]


@pytest.mark.parametrize("content_type,raw", UNSUPPORTED_BODIES)
@pytest.mark.parametrize("method,path", [
    ("POST", "/Users"), ("PUT", "/Users/{user}"), ("PATCH", "/Users/{user}"),
    ("POST", "/Groups"), ("PUT", "/Groups/{group}"), ("PATCH", "/Groups/{group}"),
    ("POST", "/Users/.search"), ("POST", "/.search"),
])
def test_unsupported_content_type_is_415_and_changes_nothing(client, db, user, group, content_type, raw,
                                                             method, path):
    """R3: bodies are application/scim+json (or application/json); anything else is refused."""
    before = snapshot(db)
    response = client.request(method, path.format(user=user["id"], group=group["id"]), raw=raw,
                              content_type=content_type, status="*")
    assert_scim_error(response, 415)
    assert snapshot(db) == before


# -- 413 -----------------------------------------------------------------------

@pytest.fixture
def small_client(store, settings, token):
    """A client of an app whose body limit is 1000 bytes."""
    app = scim_appliance.make_scim_app(store, dataclasses.replace(settings, max_body_bytes=1000))
    return ScimClient(webtest.TestApp(app), token)


def padded_user(user_name, size):
    """A User body whose JSON encoding (as ScimClient sends it) is exactly `size` bytes."""
    body = {"schemas": [URN_USER], "userName": user_name, "displayName": ""}
    body["displayName"] = "x" * (size - len(json.dumps(body).encode("utf-8")))
    assert len(json.dumps(body).encode("utf-8")) == size
    return body


def test_body_over_limit_is_413_and_app_keeps_serving(small_client, db):
    """Settings.max_body_bytes: a larger body gets a SCIM 413; the next request is served normally."""
    assert_scim_error(small_client.post("/Users", padded_user("big@example.com", 1001), status="*"), 413)
    assert user_count(db) == 0
    assert_scim_error(small_client.post("/Users", padded_user("huge@example.com", 50_000), status="*"), 413)
    assert user_count(db) == 0
    created = small_client.post("/Users", padded_user("fits@example.com", 1000)).json
    assert stored_document(db, "users", created["id"])["userName"] == "fits@example.com"
    assert small_client.get("/Users/" + created["id"]).json["userName"] == "fits@example.com"
    assert user_count(db) == 1


def test_put_and_patch_over_limit_are_413_and_leave_resource_unchanged(small_client, db):
    """A 413 on PUT/PATCH leaves the stored document and version untouched."""
    created = small_client.post("/Users", padded_user("limit@example.com", 200)).json
    before = snapshot(db)
    assert_scim_error(small_client.put("/Users/" + created["id"], padded_user("limit@example.com", 1500),
                                       status="*"), 413)
    assert_scim_error(small_client.patch("/Users/" + created["id"], [
        {"op": "replace", "path": "displayName", "value": "y" * 2000}], status="*"), 413)
    assert_scim_error(small_client.post("/Users/.search", {"filter": 'userName eq "%s"' % ("z" * 1200)},
                                        status="*"), 413)
    assert snapshot(db) == before
    replaced = small_client.put("/Users/" + created["id"], padded_user("limit@example.com", 300)).json
    assert replaced["meta"]["version"] == 'W/"2"'


# -- 400 invalidSyntax -----------------------------------------------------------

def deep_extension(containers):
    """A User body whose custom extension makes `containers` nested containers in all."""
    return json.dumps({"schemas": [URN_USER], "userName": "deep@example.com",
                       CUSTOM_URN: nested_object(containers - 1)}).encode("utf-8")


MALFORMED_BODIES = {
    "truncated": b'{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"t@x"',
    "truncated_string": b'{"userName":"t@x',
    "trailing_comma": b'{"userName":"t@x",}',
    "trailing_comma_in_array": b'{"userName":"t@x","emails":[{"value":"t@x"},]}',
    "single_quotes": b"{'userName': 't@x'}",
    "bare_word": b"hello",
    "unquoted_key": b'{userName:"t@x"}',
    "trailing_garbage": b'{"userName":"t@x"} {"userName":"u@x"}',
    "comment": b'{"userName":"t@x" /* hi */}',
    "empty": b"",
    "whitespace_only": b"  \r\n\t ",
    "array": b'[{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"t@x"}]',
    "string": b'"userName"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "nan": b'{"userName":"t@x","active":NaN}',
    "infinity": b'{"userName":"t@x","active":Infinity}',
    "minus_infinity": b'{"userName":"t@x","active":-Infinity}',
    "nan_in_array": b'{"userName":"t@x","emails":[NaN]}',
    "deep_arrays_10000": b"[" * 10000 + b"]" * 10000,
    "deep_objects_10000": b'{"a":' * 10000 + b"1" + b"}" * 10000,
    "deep_unclosed_10000": b"[" * 10000,
    "nesting_65": deep_extension(65),
    "nesting_65_arrays": b'{"userName":"d@x","' + CUSTOM_URN.encode() + b'":{"a":'
                         + b"[" * 63 + b"1" + b"]" * 63 + b"}}",
    "invalid_utf8": b'{"userName":"\xff\xfe@x"}',
    "overlong_utf8": b'{"userName":"\xc0\xafetc@x"}',
    "utf8_surrogate_bytes": b'{"userName":"\xed\xa0\x80@x"}',
    "latin1_text": '{"userName":"j\u00f6rg@x"}'.encode("latin-1"),
    "duplicate_key_case": b'{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],'
                          b'"userName":"a","USERNAME":"b"}',
    "duplicate_key_exact": b'{"userName":"a","userName":"b"}',
    "duplicate_nested_key": b'{"userName":"a","name":{"givenName":"A","GivenName":"B"}}',
}

# A PatchOp-shaped variant of the ambiguous-key case.
PATCH_SPECIFIC = {
    "duplicate_operations_key": b'{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],'
                                b'"Operations":[{"op":"replace","path":"displayName","value":"A"}],'
                                b'"operations":[{"op":"replace","path":"displayName","value":"B"}]}',
    "duplicate_op_value_key": b'{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],'
                              b'"Operations":[{"op":"replace","path":"displayName","value":"A","Value":"B"}]}',
    "operations_nan": b'{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],'
                      b'"Operations":[{"op":"replace","path":"active","value":NaN}]}',
}


def test_nesting_fixture_shapes():
    """The boundary bodies are what their names say (65 containers; 64 JSON levels allowed)."""
    def containers(value):
        if isinstance(value, dict):
            return 1 + max((containers(v) for v in value.values()), default=0)
        if isinstance(value, list):
            return 1 + max((containers(v) for v in value), default=0)
        return 0
    assert containers(json.loads(MALFORMED_BODIES["nesting_65"])) == 65
    assert containers(json.loads(MALFORMED_BODIES["nesting_65_arrays"])) == 65
    assert containers(json.loads(deep_extension(63))) == 63


@pytest.mark.parametrize("name", sorted(MALFORMED_BODIES))
def test_bad_body_on_post_is_invalid_syntax_and_stores_nothing(client, db, name):
    """RFC 7644 §3.12 invalidSyntax: strict UTF-8 JSON objects only; nothing is created."""
    for path in ("/Users", "/Groups"):
        before = snapshot(db)
        response = client.request("POST", path, raw=MALFORMED_BODIES[name], status="*")
        assert_scim_error(response, 400, "invalidSyntax")
        assert snapshot(db) == before
    assert user_count(db) == 0


@pytest.mark.parametrize("name", sorted(MALFORMED_BODIES))
@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_bad_body_on_put_or_patch_is_invalid_syntax_and_changes_nothing(client, db, user, group, name, method):
    """A PUT/PATCH with a bad body leaves document, version and members as they were."""
    for path in ("/Users/" + user["id"], "/Groups/" + group["id"]):
        before = snapshot(db)
        response = client.request(method, path, raw=MALFORMED_BODIES[name], status="*")
        assert_scim_error(response, 400, "invalidSyntax")
        assert snapshot(db) == before
    assert stored_document(db, "users", user["id"])["displayName"] == "Alice"
    assert stored_members(db, group["id"]) == {user["id"]}
    assert client.get("/Users/" + user["id"]).json["meta"]["version"] == 'W/"1"'


@pytest.mark.parametrize("name", sorted(PATCH_SPECIFIC))
def test_ambiguous_patch_body_is_invalid_syntax_and_changes_nothing(client, db, user, name):
    """Keys equal but for case (RFC 7643 §2.1: names are case-insensitive) are ambiguous."""
    before = snapshot(db)
    response = client.request("PATCH", "/Users/" + user["id"], raw=PATCH_SPECIFIC[name], status="*")
    assert_scim_error(response, 400, "invalidSyntax")
    assert snapshot(db) == before


@pytest.mark.parametrize("name", ["truncated", "bare_word", "nan", "deep_arrays_10000", "invalid_utf8",
                                  "duplicate_key_case", "empty", "array"])
@pytest.mark.parametrize("path", ["/Users/.search", "/Groups/.search", "/.search"])
def test_bad_body_on_search_is_invalid_syntax(client, user, name, path):
    """POST .search (RFC 7644 §3.4.3) parses its body as strictly as a create."""
    response = client.request("POST", path, raw=MALFORMED_BODIES[name], status="*")
    body = assert_scim_error(response, 400, "invalidSyntax")
    assert "Resources" not in body


def strict_json(raw):
    """Parse as RFC 8259 JSON: NaN/Infinity/-Infinity are not JSON."""
    def refuse(name):
        raise ValueError("%s is not JSON" % name)
    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1.5E+999"])
def test_numbers_overflowing_to_infinity_are_refused(client, db, user, number):
    """A number that decodes to ±Infinity is the same hazard as a literal Infinity: refused with
    400 and nothing stored, so no response can ever contain non-JSON `Infinity`."""
    before = snapshot(db)
    raw = ('{"schemas":["%s"],"userName":"big@example.com","%s":{"n":%s}}'
           % (URN_USER, CUSTOM_URN, number)).encode("utf-8")
    response = client.request("POST", "/Users", raw=raw, status="*")
    body = assert_scim_error(response, 400, "*")
    assert body["scimType"] in ("invalidSyntax", "invalidValue")
    assert snapshot(db) == before
    patch = ('{"schemas":["%s"],"Operations":[{"op":"add","path":"%s:n","value":%s}]}'
             % (URN_PATCH, CUSTOM_URN, number)).encode("utf-8")
    response = client.request("PATCH", "/Users/" + user["id"], raw=patch, status="*")
    assert response.status_int == 400, response.body
    strict_json(response.body)
    assert snapshot(db) == before


@pytest.mark.parametrize("raw", [
    b'{"userName": "x\\ud800"}',                     # a lone high surrogate
    b'{"userName": "a", "active": "\\udfff"}',        # one that lands in the error detail
    b'{"userName": "a", "\\ud800": 1}',               # in a key
])
def test_lone_surrogates_in_the_body_are_invalid_syntax(client, db, raw):
    """"\\ud800" is valid JSON text but no Unicode text: it can be neither stored nor sent."""
    before = db.execute("SELECT count(*) FROM users").fetchone()[0]
    assert_scim_error(client.request("POST", "/Users", raw=raw, status="*"), 400, "invalidSyntax")
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == before


def test_paired_surrogate_escapes_are_one_character(client, db):
    created = client.post("/Users", None, raw=b'{"userName": "smile\\ud83d\\ude00@example.com"}').json
    assert created["userName"] == "smile\U0001F600@example.com"
    assert stored_document(db, "users", created["id"])["userName"] == "smile\U0001F600@example.com"


def test_large_but_finite_numbers_round_trip_as_strict_json(client, db):
    """Big integers and ordinary decimals in a custom extension are kept and returned as valid JSON."""
    raw = ('{"schemas":["%s"],"userName":"num@example.com","%s":{"big":123456789012345678901234567890,'
           '"small":1e-300,"neg":-2.5}}' % (URN_USER, CUSTOM_URN)).encode("utf-8")
    response = client.request("POST", "/Users", raw=raw, status=201)
    assert strict_json(response.body)[CUSTOM_URN] == {"big": 123456789012345678901234567890,
                                                      "small": 1e-300, "neg": -2.5}
    assert stored_document(db, "users", response.json["id"])[CUSTOM_URN]["big"] == 123456789012345678901234567890
    assert strict_json(client.get("/Users/" + response.json["id"]).body)[CUSTOM_URN]["neg"] == -2.5


def test_nesting_within_limit_is_accepted_and_stored(client, db):
    """A document 63 containers deep (64 JSON levels with its leaf) is fine; the limit is for abuse."""
    response = client.request("POST", "/Users", raw=deep_extension(63), status=201)
    stored = stored_document(db, "users", response.json["id"])
    assert stored[CUSTOM_URN] == nested_object(62)
    assert response.json[CUSTOM_URN] == nested_object(62)


def test_hostile_bodies_do_not_break_the_app(client, db):
    """After every kind of garbage, ordinary requests still work."""
    for raw in MALFORMED_BODIES.values():
        client.request("POST", "/Users", raw=raw, status=400)
    created = client.create_user("after@example.com")
    assert stored_document(db, "users", created["id"])["userName"] == "after@example.com"
    assert user_count(db) == 1


@pytest.mark.parametrize("content_length", ["abc", "1e3", "0x10", "-5"])
def test_unusable_content_length_is_a_scim_400(wsgi_app, token, db, content_length):
    """A Content-Length that is not a byte count never crashes the handler or stores anything."""
    request = webob.Request.blank("/scim/Users", method="POST",
                                  body=b'{"schemas":["%s"],"userName":"cl@example.com"}' % URN_USER.encode())
    request.environ["CONTENT_LENGTH"] = content_length
    request.headers["Authorization"] = "Bearer " + token
    request.headers["Content-Type"] = "application/scim+json"
    response = request.get_response(wsgi_app)
    assert response.status_int == 400
    body = json.loads(response.body)
    assert body["schemas"] == [URN_ERROR] and body["status"] == "400" and body["scimType"] == "invalidSyntax"
    assert user_count(db) == 0


# -- invalid UTF-8 in the URL ------------------------------------------------------

@pytest.mark.parametrize("path", ["/Users/%FF", "/Groups/%C0%AF", "/Users/%ED%A0%80", "/%FF"])
@pytest.mark.parametrize("method", ["GET", "DELETE", "PATCH"])
def test_invalid_utf8_in_path_is_scim_400(client, db, user, path, method):
    """A path that is not UTF-8 is a SCIM 400, never a crash or an HTML page."""
    before = snapshot(db)
    operations = {"schemas": [URN_PATCH], "Operations": [{"op": "replace", "path": "displayName",
                                                          "value": "x"}]}
    response = client.request(method, path, operations if method == "PATCH" else None, status="*")
    assert_scim_error(response, 400, "invalidSyntax")
    assert snapshot(db) == before


@pytest.mark.parametrize("query", [
    "filter=userName+eq+%22%FF%22",
    "filter=%C0%AF",
    "filter=userName+eq+%22a%22&attributes=%FF",
    "%FF=1",
])
def test_invalid_utf8_in_query_is_400_not_an_unfiltered_list(client, user, query):
    """Undecodable query text must not be read as "no filter" (which would list everyone)."""
    response = client.get("/Users?" + query, status="*")
    body = assert_scim_error(response, 400, "*")
    assert body["scimType"] in ("invalidFilter", "invalidSyntax", "invalidValue")
    assert "Resources" not in body and user["id"] not in response.text


def test_invalid_utf8_in_filter_is_invalid_filter(client, user):
    """RFC 7644 §3.12 invalidFilter: "The specified filter syntax was invalid"."""
    assert_scim_error(client.get('/Users?filter=userName+eq+%22%FF%22', status="*"), 400, "invalidFilter")


# -- 500 -----------------------------------------------------------------------

def explode(*args, **kwargs):
    raise RuntimeError("secret detail: /var/lib/scim/secret.db password=hunter2")


def assert_opaque_500(response):
    body = assert_scim_error(response, 500)
    for leak in ("secret detail", "hunter2", "Traceback", "RuntimeError", "scim_appliance.py", 'File "'):
        assert leak not in response.text
    return body


def test_unexpected_exception_is_opaque_500(client, user, monkeypatch, capsys):
    """RFC 7644 §3.12 500; the client learns nothing of the failure, the operator's log does."""
    monkeypatch.setattr(scim_appliance, "get_resource", explode)
    assert_opaque_500(client.get("/Users/" + user["id"], status="*"))
    assert "secret detail" in capsys.readouterr().err
    monkeypatch.undo()
    assert client.get("/Users/" + user["id"]).json["id"] == user["id"]


def test_exception_during_create_is_opaque_500_and_rolls_back(client, db, monkeypatch):
    """A failure inside the write transaction stores nothing."""
    monkeypatch.setattr(scim_appliance, "render_resource", explode)
    assert_opaque_500(client.post("/Users", {"schemas": [URN_USER], "userName": "boom@example.com"},
                                  status="*"))
    assert user_count(db) == 0


def test_exception_during_patch_is_opaque_500_and_changes_nothing(client, db, user, monkeypatch):
    """All or nothing (RFC 7644 §3.5.2) holds for server faults too."""
    before = snapshot(db)
    monkeypatch.setattr(scim_appliance, "render_resource", explode)
    assert_opaque_500(client.patch("/Users/" + user["id"], [
        {"op": "replace", "path": "displayName", "value": "Changed"}], status="*"))
    assert snapshot(db) == before


def test_exception_in_list_is_opaque_500(client, user, monkeypatch):
    monkeypatch.setattr(scim_appliance, "list_resources", explode)
    assert_opaque_500(client.get('/Users?filter=userName+eq+%22alice%40example.com%22', status="*"))


# -- media types and headers -----------------------------------------------------

@pytest.mark.parametrize("content_type", [
    "application/scim+json",
    "application/scim+json; charset=utf-8",
    "application/scim+json;charset=UTF-8",
    "application/json",
    "application/json; charset=utf-8",
    "Application/SCIM+JSON",
])
def test_scim_and_json_media_types_are_accepted(client, db, content_type):
    """R3: Entra sends application/scim+json; charset=utf-8; application/json is also accepted."""
    raw = json.dumps({"schemas": [URN_USER], "userName": "mt@example.com"}).encode("utf-8")
    response = client.request("POST", "/Users", raw=raw, content_type=content_type, status=201)
    assert media_type(response) == "application/scim+json"
    assert stored_document(db, "users", response.json["id"])["userName"] == "mt@example.com"
    patch = json.dumps({"schemas": [URN_PATCH], "Operations": [
        {"op": "replace", "path": "displayName", "value": "Media"}]}).encode("utf-8")
    response = client.request("PATCH", "/Users/" + response.json["id"], raw=patch,
                              content_type=content_type, status=200)
    assert media_type(response) == "application/scim+json"
    assert stored_document(db, "users", response.json["id"])["displayName"] == "Media"


def test_no_accept_or_user_agent_header_is_fine(store, settings, token, db):
    """R3: "GET requests carry no Accept"; Entra may omit User-Agent. Never require either."""
    app = scim_appliance.make_scim_app(store, settings)
    seen = []

    def strip_headers(environ, start_response):
        environ.pop("HTTP_ACCEPT", None)
        environ.pop("HTTP_USER_AGENT", None)
        seen.append(environ)
        return app(environ, start_response)

    bare = ScimClient(webtest.TestApp(strip_headers), token)
    listing = bare.get('/Users?filter=userName+eq+%227d420df3-9995-4831-a406-ecf8166f5f6a%22')
    assert listing.json["totalResults"] == 0 and media_type(listing) == "application/scim+json"
    created = bare.post("/Users", {"schemas": [URN_USER], "userName": "bare@example.com"})
    assert media_type(created) == "application/scim+json"
    assert stored_document(db, "users", created.json["id"])["userName"] == "bare@example.com"
    assert seen and all("HTTP_ACCEPT" not in e and "HTTP_USER_AGENT" not in e for e in seen)


def test_accept_application_json_still_gets_scim_json(client, user):
    """R3: "The header for all the responses should be of content-Type: application/scim+json"."""
    response = client.get("/Users/" + user["id"], headers={"Accept": "application/json"})
    assert media_type(response) == "application/scim+json"


def test_every_response_with_a_body_is_scim_json(client, anonymous, user, group):
    """R3: success, list, discovery and error responses all use application/scim+json."""
    responses = [
        client.get("/Users"),
        client.get("/Users/" + user["id"]),
        client.get("/Groups/" + group["id"]),
        client.post("/Users", {"schemas": [URN_USER], "userName": "bob@example.com"}),
        client.put("/Groups/" + group["id"], {"schemas": [URN_GROUP], "displayName": "Eng"}),
        client.patch("/Users/" + user["id"], [{"op": "replace", "path": "title", "value": "Dev"}], status=200),
        client.post("/.search", {"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"]}, status=200),
        anonymous.get("/ServiceProviderConfig"),
        anonymous.get("/Schemas"),
        anonymous.get("/ResourceTypes"),
        client.get("/Users/nope", status=404),
        anonymous.get("/Users", status=401),
        client.post("/Users", {"schemas": [URN_USER], "userName": "BOB@example.com"}, status=409),
    ]
    for response in responses:
        assert media_type(response) == "application/scim+json", response.request.path
        json.loads(response.body)
    # Bodiless answers carry no body at all.
    assert client.delete("/Users/" + user["id"]).body == b""


# -- Entra's URLs --------------------------------------------------------------------

def test_form_encoded_filter_from_test_connection(client, user):
    """R5/R11: GET /Users?filter=userName+eq+%22<guid>%22 → 200 and an empty ListResponse."""
    response = client.get("/Users?filter=userName+eq+%227d420df3-9995-4831-a406-ecf8166f5f6a%22")
    assert response.json == {"schemas": [URN_LIST], "totalResults": 0, "Resources": [],
                              "startIndex": 1, "itemsPerPage": 0}
    response = client.get("/Users?filter=userName+eq+%22x%22")
    assert response.json["totalResults"] == 0 and response.json["Resources"] == []


def test_plus_in_query_decodes_as_space(client):
    """R3: "+" is a space and %22 a quote in Entra's query strings; %2B is a literal plus."""
    spaced = client.create_user("jane doe@example.com")
    plus = client.create_user("jane+doe@example.com")
    found = client.get("/Users?filter=userName+eq+%22jane+doe%40example.com%22").json
    assert [r["id"] for r in found["Resources"]] == [spaced["id"]]
    found = client.get("/Users?filter=userName+eq+%22jane%2Bdoe%40example.com%22").json
    assert [r["id"] for r in found["Resources"]] == [plus["id"]]
    found = client.get("/Groups?filter=displayName+eq+%22No+Such+Group%22").json
    assert found["totalResults"] == 0


def test_tenant_url_flag_does_not_break_routing(client, db):
    """R46: ?aadOptscim062020 from the Tenant URL rides along on every request."""
    flag = "?aadOptscim062020"
    created = client.post("/Users" + flag, {"schemas": [URN_USER], "userName": "flag@example.com"}).json
    user_id = created["id"]
    assert stored_document(db, "users", user_id)["userName"] == "flag@example.com"
    assert created["meta"]["location"] == PUBLIC_URL + "/scim/Users/" + user_id
    assert client.get("/Users/%s%s" % (user_id, flag)).json["id"] == user_id
    found = client.get("/Users%s&filter=userName+eq+%%22flag%%40example.com%%22" % flag).json
    assert [r["id"] for r in found["Resources"]] == [user_id]
    found = client.get("/Users?filter=userName+eq+%22flag%40example.com%22&aadOptscim062020").json
    assert [r["id"] for r in found["Resources"]] == [user_id]
    client.patch("/Users/%s%s" % (user_id, flag), [{"op": "Replace", "path": "active", "value": False}],
                 status=200)
    assert stored_document(db, "users", user_id)["active"] is False
    client.put("/Users/%s%s" % (user_id, flag), {"schemas": [URN_USER], "userName": "flag@example.com",
                                                 "displayName": "Flag"})
    assert stored_document(db, "users", user_id)["displayName"] == "Flag"
    group = client.post("/Groups" + flag, {"schemas": [URN_GROUP], "displayName": "Flagged"}).json
    client.patch("/Groups/%s%s" % (group["id"], flag), [
        {"op": "Add", "path": "members", "value": [{"value": user_id}]}], status=204)
    assert stored_members(db, group["id"]) == {user_id}
    assert client.get("/ServiceProviderConfig" + flag).json["patch"]["supported"] is True
    assert client.get("" + flag).json["totalResults"] == 2
    client.delete("/Groups/%s%s" % (group["id"], flag))
    client.delete("/Users/%s%s" % (user_id, flag))
    assert stored_document(db, "users", user_id) is None
    assert stored_document(db, "groups", group["id"]) is None


# -- lenient paths ---------------------------------------------------------------------

def test_endpoint_names_are_case_insensitive(client, anonymous, db, user, group):
    """RFC 7644 §3.10 / R6 spirit: don't require case-sensitive structural names."""
    assert [r["id"] for r in client.get("/users").json["Resources"]] == [user["id"]]
    assert [r["id"] for r in client.get("/GROUPS").json["Resources"]] == [group["id"]]
    assert client.get("/USERS/" + user["id"]).json["id"] == user["id"]
    assert client.get("/groups/" + group["id"]).json["id"] == group["id"]
    created = client.post("/users", {"schemas": [URN_USER], "userName": "lower@example.com"}).json
    assert stored_document(db, "users", created["id"])["userName"] == "lower@example.com"
    assert created["meta"]["location"] == PUBLIC_URL + "/scim/Users/" + created["id"]
    client.patch("/gRoUpS/" + group["id"], [{"op": "add", "path": "members",
                                            "value": [{"value": created["id"]}]}], status=204)
    assert stored_members(db, group["id"]) == {user["id"], created["id"]}
    found = client.post("/users/.SEARCH", {"filter": 'userName eq "lower@example.com"'}, status=200).json
    assert [r["id"] for r in found["Resources"]] == [created["id"]]
    assert anonymous.get("/serviceproviderconfig").json["patch"]["supported"] is True
    assert anonymous.get("/schemas").json["totalResults"] == 3
    assert anonymous.get("/resourcetypes").json["totalResults"] == 2


def test_trailing_slash_is_tolerated(client, anonymous, db, user):
    """Some clients append "/" to the Tenant URL path."""
    assert [r["id"] for r in client.get("/Users/").json["Resources"]] == [user["id"]]
    assert client.get("/Users/%s/" % user["id"]).json["id"] == user["id"]
    created = client.post("/Users/", {"schemas": [URN_USER], "userName": "slash@example.com"}).json
    assert stored_document(db, "users", created["id"])["userName"] == "slash@example.com"
    client.patch("/Users/%s/" % created["id"], [{"op": "replace", "path": "displayName", "value": "S"}],
                 status=200)
    assert stored_document(db, "users", created["id"])["displayName"] == "S"
    client.delete("/Users/%s/" % created["id"])
    assert stored_document(db, "users", created["id"]) is None
    assert anonymous.get("/ServiceProviderConfig/").json["schemas"] == [scim_appliance.URN_SPC]
    assert client.get("/Users/?filter=userName+eq+%22alice%40example.com%22").json["totalResults"] == 1


def test_tenant_url_with_a_trailing_slash_still_routes(client, db, user):
    """R1: the tutorial's Tenant URL is https://api.contoso.com/scim/ — appending
    /Users to it gives /scim//Users, which must reach the same endpoints."""
    assert [r["id"] for r in client.get("//Users").json["Resources"]] == [user["id"]]
    assert client.get("//Users/" + user["id"]).json["id"] == user["id"]
    created = client.post("//Users", {"schemas": [URN_USER], "userName": "double@example.com"}).json
    assert stored_document(db, "users", created["id"])["userName"] == "double@example.com"
    client.delete("//Users/" + created["id"])
    assert stored_document(db, "users", created["id"]) is None


# -- locations come from public_url only ----------------------------------------------

HOSTILE_HEADERS = {
    "Host": "evil.example:8443",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "http",
    "X-Forwarded-Port": "8443",
    "X-Forwarded-Prefix": "/evil",
    "X-Original-URL": "/evil/scim",
    "Forwarded": 'for=1.2.3.4;host=evil.example;proto=http',
}


def test_locations_ignore_host_and_forwarded_headers(client, anonymous, db):
    """meta.location and Location are built from public_url, never from request headers."""
    response = client.post("/Users", {"schemas": [URN_USER], "userName": "loc@example.com"},
                           headers=HOSTILE_HEADERS)
    user_id = response.json["id"]
    expected = "https://scim.example.com/scim/Users/" + user_id
    assert response.headers["Location"] == expected
    assert response.json["meta"]["location"] == expected
    group = client.post("/Groups", {"schemas": [URN_GROUP], "displayName": "Loc",
                                    "members": [{"value": user_id}]}, headers=HOSTILE_HEADERS)
    assert group.headers["Location"] == "https://scim.example.com/scim/Groups/" + group.json["id"]
    assert group.json["members"][0]["$ref"] == expected
    bodies = [
        response,
        group,
        client.get("/Users/" + user_id, headers=HOSTILE_HEADERS),
        client.get("/Users?filter=userName+eq+%22loc%40example.com%22", headers=HOSTILE_HEADERS),
        client.put("/Users/" + user_id, {"schemas": [URN_USER], "userName": "loc@example.com"},
                   headers=HOSTILE_HEADERS),
        client.patch("/Users/" + user_id, [{"op": "add", "path": URN_ENTERPRISE + ":manager",
                                            "value": user_id}], status=200, headers=HOSTILE_HEADERS),
        client.get("/Groups/" + group.json["id"], headers=HOSTILE_HEADERS),
        anonymous.get("/ServiceProviderConfig", headers=HOSTILE_HEADERS),
        anonymous.get("/ResourceTypes", headers=HOSTILE_HEADERS),
        anonymous.get("/Schemas", headers=HOSTILE_HEADERS),
    ]
    for body in bodies:
        assert "evil" not in body.text and "http://" not in body.text, body.request.path
    assert client.get("/Users/" + user_id).json["meta"]["location"] == expected
    assert bodies[5].json[URN_ENTERPRISE]["manager"]["$ref"] == expected
    assert stored_document(db, "users", user_id)[URN_ENTERPRISE]["manager"] == {"value": user_id}


@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
def test_non_utf8_bytes_in_entity_tag_headers_are_harmless(client, db, user, header):
    """Found by fuzzing: a latin-1 byte in If-Match / If-None-Match was a 500."""
    before = stored_document(db, "users", user["id"])
    response = client.get("/Users/" + user["id"], headers={header: 'W/"\xe9"'}, status="*")
    assert response.status_int == 200 and response.json["id"] == user["id"]
    response = client.patch("/Users/" + user["id"], [{"op": "replace", "path": "displayName", "value": "X"}],
                            headers={header: 'W/"\xff"'}, status="*")
    if header == "If-Match":
        assert_scim_error(response, 412)
        assert stored_document(db, "users", user["id"]) == before
    else:
        assert response.status_int == 200
