"""The SCIM router itself (section 9: make_scim_app, dispatch, scim_wsgi,
_scim_segments, _match_route), through HTTP.

What the router promises beyond any one handler: HEAD is GET without the
body (RFC 9110 §9.3.2), 204 and 304 carry no content (RFC 9110 §8.6, §15.3.5,
§15.4.5), 405 names the allowed methods (RFC 9110 §15.5.6), and every refusal,
including a path it cannot route or a bug in a handler, is a SCIM Error
(RFC 7644 §3.12).
"""

import pytest
import webob

import scim_appliance
from conftest import assert_scim_error, media_type, snapshot, stored_document, stored_members
from scim_appliance import URN_LIST, URN_USER

MISSING_ID = "6f1b1b7e-0000-4000-8000-000000000000"


@pytest.fixture
def user(client):
    return client.create_user("alice@example.com", displayName="Alice")


@pytest.fixture
def group(client, user):
    return client.create_group("Engineering", members=[{"value": user["id"]}])


def raw_request(client, path, method="GET", **kw):
    """A request for a full path (not under /scim), with the client's token."""
    return client.app.request(path, method=method, headers={"Authorization": "Bearer " + client.token},
                              expect_errors=True, **kw)


def sent_get(client, path):
    """(headers, body) exactly as the app sends them for GET /scim`path`: webtest's
    response adds a Content-Length once it reads a body, so go around it."""
    request = webob.Request.blank("/scim" + path, headers={"Authorization": "Bearer " + client.token})
    status, headers, content = request.call_application(client.app.app)
    try:
        return dict(headers), b"".join(content)
    finally:
        getattr(content, "close", lambda: None)()


# -- HEAD ------------------------------------------------------------------------

@pytest.mark.parametrize("path,streamed", [
    ("/Users/{user}", False), ("/Groups/{group}", True), ("/Users", False), ("/ServiceProviderConfig", False)])
def test_head_is_get_without_the_body(client, db, user, group, path, streamed):
    """RFC 9110 §9.3.2: HEAD answers as GET would, without content; a Content-Length,
    when sent, is the one GET would send (§8.6). A group's members are streamed, so
    neither GET nor HEAD knows its length."""
    path = path.format(user=user["id"], group=group["id"])
    before = snapshot(db)
    get_headers, get_body = sent_get(client, path)
    head = client.request("HEAD", path, status=200)
    assert head.body == b"" and get_body.startswith(b"{")
    assert head.headers["Content-Type"] == get_headers["Content-Type"] == scim_appliance.SCIM_MEDIA_TYPE
    assert head.headers.get("ETag") == get_headers.get("ETag")
    assert ("ETag" in get_headers) == path.startswith(("/Users/", "/Groups/"))
    if streamed:
        assert "Content-Length" not in get_headers and "Content-Length" not in head.headers
    else:
        assert head.headers["Content-Length"] == get_headers["Content-Length"] == str(len(get_body))
    assert snapshot(db) == before


def test_head_of_a_missing_user_is_404_without_a_body(client, db, user):
    """RFC 9110 §9.3.2: the 404 GET would send, headers only."""
    before = snapshot(db)
    get = client.get("/Users/" + MISSING_ID, status=404)
    assert_scim_error(get, 404)
    head = client.request("HEAD", "/Users/" + MISSING_ID, status=404)
    assert head.body == b"" and media_type(head) == "application/scim+json"
    assert head.headers["Content-Length"] == str(len(get.body))
    assert snapshot(db) == before


# -- 204 and 304 -------------------------------------------------------------------

@pytest.mark.parametrize("case", ["delete user", "delete group", "patch group", "304 user", "304 group"])
def test_204_and_304_carry_no_content_headers(client, db, user, group, case):
    """RFC 9110 §8.6: no Content-Length in a 204 or 304; §15.3.5/§15.4.5: no content, so no Content-Type."""
    if case == "delete user":
        response = client.delete("/Users/" + user["id"])
    elif case == "delete group":
        response = client.delete("/Groups/" + group["id"])
    elif case == "patch group":
        response = client.patch("/Groups/" + group["id"], [{"op": "replace", "path": "displayName",
                                                            "value": "Platform"}], status=204)
    else:
        path = "/%ss/%s" % (case.split()[1].title(), (user if "user" in case else group)["id"])
        response = client.get(path, headers={"If-None-Match": 'W/"1"'}, status=304)
        assert response.headers["ETag"] == 'W/"1"'
    assert response.body == b""
    assert "Content-Length" not in response.headers and "Content-Type" not in response.headers
    assert (stored_document(db, "users", user["id"]) is None) == (case == "delete user")
    assert (stored_document(db, "groups", group["id"]) is None) == (case == "delete group")
    if case in ("patch group", "304 group"):
        assert stored_document(db, "groups", group["id"])["displayName"] == (
            "Platform" if case == "patch group" else "Engineering")
        assert stored_members(db, group["id"]) == {user["id"]}


# -- 405 ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/Users/.search", {"POST"}),
    ("GET", "/Groups/.search", {"POST"}),
    ("HEAD", "/.search", {"POST"}),
    ("PUT", "/ServiceProviderConfig", {"GET", "HEAD"}),
    ("POST", "", {"GET", "HEAD"}),
    ("DELETE", "/Users", {"GET", "HEAD", "POST"}),
    ("OPTIONS", "/Users/{user}", {"GET", "HEAD", "PUT", "PATCH", "DELETE"}),
    ("OPTIONS", "/Groups", {"GET", "HEAD", "POST"}),
])
def test_405_allow_lists_exactly_the_routes_methods(client, db, user, group, method, path, allowed):
    """RFC 9110 §15.5.6: a 405 "MUST generate an Allow header field" listing the target's
    methods; HEAD is allowed wherever GET is (§9.3.2). OPTIONS is optional (§9.3.7) and not served."""
    before = snapshot(db)
    response = client.request(method, path.format(user=user["id"], group=group["id"]), status=405)
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed
    assert method not in allowed
    if method == "HEAD":
        assert response.body == b"" and media_type(response) == "application/scim+json"
    else:
        assert_scim_error(response, 405)
    assert snapshot(db) == before


# -- 404, 501 and path normalisation -------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/scimx/Users", "/other", "/SCIM/Users", "/Scim/ServiceProviderConfig",
                                  "/scim/Users/a/b", "/scim/Groups/a/b/c", "/scim/Unknown", "/scim/Users/x/.search"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unroutable_paths_are_scim_404(client, db, user, path, method):
    """RFC 7644 §3.12: a 404 SCIM Error, never an HTML page. Only /scim is served, and its
    first segment is matched case-sensitively (RFC 3986 §6.2.2.1: paths are case-sensitive);
    endpoint names after it are not (see below)."""
    before = snapshot(db)
    body = b'{"schemas":["%s"],"userName":"x"}' % URN_USER.encode() if method == "POST" else None
    kw = {"body": body, "content_type": "application/scim+json"} if body else {}
    assert_scim_error(raw_request(client, path, method, **kw), 404)
    assert snapshot(db) == before


@pytest.mark.parametrize("path,canonical", [
    ("/scim//Users", "/scim/Users"), ("/scim/Users/", "/scim/Users"), ("/scim/users", "/scim/Users"),
    ("/scim/USERS//", "/scim/Users"), ("//scim/Users", "/scim/Users"),
    ("/scim/serviceproviderconfigs", "/scim/ServiceProviderConfig"),
    ("/scim//users//{user}/", "/scim/Users/{user}"),
])
def test_empty_segments_and_endpoint_case_are_normalised(client, user, path, canonical):
    """A Tenant URL with a trailing slash makes Entra send /scim//Users; endpoint
    names are matched case-insensitively."""
    expected = client.app.request(canonical.format(user=user["id"]), headers={
        "Authorization": "Bearer " + client.token}).json
    response = raw_request(client, path.format(user=user["id"]))
    assert response.status_int == 200 and response.json == expected


@pytest.mark.parametrize("path", ["/Users/.SEARCH", "/users/.Search", "/.SEARCH"])
def test_search_segment_is_case_insensitive(client, user, path):
    """RFC 7644 §3.4.3: POST .search, whatever the case of ".search"."""
    response = client.post(path, {"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
                                  "filter": 'userName eq "alice@example.com"'}, status=200)
    assert response.json["schemas"] == [URN_LIST]
    assert [r["id"] for r in response.json["Resources"]] == [user["id"]]


@pytest.mark.parametrize("path", ["/Me/anything/deeper", "/me/a/b/c/d"])
def test_everything_under_me_is_501(client, db, user, path):
    """RFC 7644 §3.11: /Me is optional; every path below it is 501, not 404."""
    before = snapshot(db)
    assert_scim_error(client.get(path, status=501), 501)
    assert snapshot(db) == before


@pytest.mark.parametrize("path", ["/scim/Users/%FF", "/scim/%C3", "/scim/Users/%E9t%E9"])
def test_a_path_that_is_not_utf8_is_400(client, db, user, path):
    """RFC 3986 §2.5 / RFC 7644 §3.12: the server passes PATH_INFO as latin-1 (PEP 3333);
    bytes that are not UTF-8 are a 400 invalidSyntax, never a 500 or a guess."""
    before = snapshot(db)
    assert_scim_error(raw_request(client, path), 400, "invalidSyntax")
    assert snapshot(db) == before


def test_a_utf8_path_is_decoded_and_routed(client, user):
    """The same PATH_INFO bytes, when they are UTF-8 ('é'), reach the handler: an unknown id is 404."""
    assert_scim_error(raw_request(client, "/scim/Users/%C3%A9t%C3%A9"), 404)


# -- 500 -----------------------------------------------------------------------------

def test_a_bug_in_a_handler_is_a_scim_500_that_reveals_nothing(client, db, user, monkeypatch, capsys):
    """RFC 7644 §3.12: 500 as a SCIM Error; the traceback goes to stderr, not to the client."""
    def broken(*args, **kwargs):
        raise RuntimeError("secret-detail")

    monkeypatch.setattr(scim_appliance, "list_resources", broken)
    before = snapshot(db)
    capsys.readouterr()
    response = client.get("/Users?filter=userName+eq+%22alice%40example.com%22", status=500)
    body = assert_scim_error(response, 500)
    assert b"secret-detail" not in response.body and b"Traceback" not in response.body
    assert b"RuntimeError" not in response.body and "broken" not in body["detail"]
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: secret-detail" in err
    # The router is still serving: the next request to another handler works.
    assert client.get("/Users/" + user["id"]).json["id"] == user["id"]
    assert snapshot(db) == before


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")   # webtest's lint: that is the point
@pytest.mark.parametrize("method", ["FOO", "PROPFIND", "get"])
def test_an_unrecognised_method_is_a_scim_501(client, db, user, method):
    """RFC 9110 §9.1: "An origin server that receives a request method that is
    unrecognized or not implemented SHOULD respond with the 501 (Not Implemented)
    status code." Methods are case-sensitive, so `get` is not GET."""
    before = snapshot(db)
    response = client.request(method, "/Users/" + user["id"], status=501)
    assert_scim_error(response, 501)
    assert "Allow" not in response.headers
    assert snapshot(db) == before


@pytest.mark.parametrize("path, route", [
    ("/scim", "/"), ("/scim/Users", "/Users"), ("/scim/users/", "/Users"), ("/scim/Users/abc", "/Users/{id}"),
    ("/scim/Groups/.search", "/Groups/.search"), ("/scim/.search", "/.search"),
    ("/scim/Schemas/urn:ietf:params:scim:schemas:core:2.0:User", "/Schemas/{id}"), ("/scim/Me/a/b", "/Me/..."),
    ("/scim/no-such-endpoint-4711", "other"), ("/scim/x/y", "other"), ("/elsewhere", "other"),
])
def test_metrics_name_routes_never_ids_or_made_up_paths(path, route):
    """Metric labels stay a small fixed set whatever paths clients send."""
    assert scim_appliance.route_label(scim_appliance._scim_segments(path)) == route
