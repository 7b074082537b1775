"""HTTP framing and request-smuggling regressions (issue 3, item 16).

Raw bytes over a socket to ONE real server (waitress in a subprocess): each
ambiguous or oversized request is refused, nothing it carried is executed,
and afterwards the server still answers a normal authenticated request on a
new connection.

Every request below that would be answered on a kept-alive connection says
`Connection: close` (or is HTTP/1.0), so reading "until the server closes"
ends quickly whatever the server does; the read is bounded by a deadline.
"""

import json
import socket
import sqlite3
import time

import pytest

from conftest import LiveServer, http_json, run_cli
from scim_appliance import URN_SPC, URN_USER

READ_DEADLINE = 20   # seconds a raw exchange may take on a loaded machine


# -- fixtures and helpers -------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db_path = str(tmp_path_factory.mktemp("framing") / "framing.db")
    token = run_cli("token", "create", "--name", "entra", "--db", db_path).stdout.strip()
    live = LiveServer(db_path)
    live.token = token
    try:
        yield live
    finally:
        live.stop()


def exchange(server, data):
    """Send `data` on a new connection and read until the server closes it.

    Returns (received bytes, closed): `closed` is False only if the deadline
    passed with the connection still open. A reset after the server has
    answered (it closes with our excess bytes unread) counts as closed.
    """
    received = b""
    closed = False
    deadline = time.monotonic() + READ_DEADLINE
    with socket.create_connection(("127.0.0.1", server.port), timeout=READ_DEADLINE) as sock:
        try:
            sock.sendall(data)
        except OSError:   # refused mid-send (e.g. headers over the limit): read what was answered
            pass
        while time.monotonic() < deadline:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    return received, closed


def parse_responses(data):
    """Split the bytes read from one connection into [(version, status, headers, body)]."""
    responses = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        assert separator, "a truncated response: %r" % data[:300]
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ")[:2]
        assert version.startswith("HTTP/"), lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", len(rest)))
        responses.append((version, int(status), headers, rest[:length]))
        data = rest[length:]
    return responses


def the_response(server, data):
    """Exactly one response, after which the server closed the connection."""
    received, closed = exchange(server, data)
    responses = parse_responses(received)
    assert len(responses) == 1, [r[:2] for r in responses]
    assert closed, "the server kept the connection open"
    return responses[0]


def user_names(server):
    conn = sqlite3.connect("file:%s?mode=ro" % server.db_path, uri=True)
    try:
        return sorted(json.loads(row[0])["userName"] for row in conn.execute("SELECT document FROM users"))
    finally:
        conn.close()


def assert_still_serving(server):
    """A normal authenticated request on a new connection is answered."""
    status, _, body = http_json("GET", server.url + "/ServiceProviderConfig", token=server.token)
    assert status == 200
    assert body["schemas"] == [URN_SPC]


def user_body(user_name):
    return json.dumps({"schemas": [URN_USER], "userName": user_name}).encode("utf-8")


def chunked(payload):
    return b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"


def post_users(server, framing_headers, body, extra=b""):
    """A POST /scim/Users that would create a user if its body were read."""
    return (b"POST /scim/Users HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Authorization: Bearer " + server.token.encode("ascii") + b"\r\n"
            b"Content-Type: application/scim+json\r\n" + extra
            + b"".join(b"%s: %s\r\n" % pair for pair in framing_headers)
            + b"Connection: close\r\n\r\n" + body)


def get(server, target, version=b"HTTP/1.1", method=b"GET", headers=b""):
    return (method + b" " + target + b" " + version + b"\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Authorization: Bearer " + server.token.encode("ascii") + b"\r\n"
            + headers + b"Connection: close\r\n\r\n")


# -- ambiguous message framing is refused -----------------------------------------------

def _plus_length(body):
    return [(b"Content-Length", b"+%d" % len(body))]


def _two_lengths(body):
    return [(b"Content-Length", b"%d" % len(body)), (b"Content-Length", b"%d" % (len(body) + 5))]


def _listed_lengths(body):
    return [(b"Content-Length", b"%d, %d" % (len(body), len(body) + 5))]


def _hex_length(body):
    return [(b"Content-Length", b"0x%x" % len(body))]


@pytest.mark.parametrize("framing", [_plus_length, _two_lengths, _listed_lengths, _hex_length],
                         ids=["plus-sign", "two-different", "comma-list", "hexadecimal"])
def test_invalid_content_length_is_refused_and_nothing_is_created(server, framing):
    """Item 16: Content-Length: +N, two different Content-Length headers (RFC 9112 §6.3) → 400."""
    before = user_names(server)
    body = user_body("cl-%s@example.com" % framing.__name__.strip("_"))
    _, status, _, _ = the_response(server, post_users(server, framing(body), body))
    assert status == 400
    assert user_names(server) == before
    assert_still_serving(server)


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"chunked, gzip", b"identity, chunked"])
def test_unsupported_transfer_coding_is_refused_and_nothing_is_created(server, coding):
    """Item 16: Transfer-Encoding: gzip, chunked → refused (501, or 400), never executed."""
    before = user_names(server)
    body = user_body("te-%s@example.com" % coding.decode().replace(", ", "-"))
    _, status, _, _ = the_response(server, post_users(server, [(b"Transfer-Encoding", coding)], chunked(body)))
    assert status in (400, 501)
    assert user_names(server) == before
    assert_still_serving(server)


def _smuggled_get(server, bystander_id):
    return get(server, b"/scim/Users/" + bystander_id.encode("ascii"))


def _smuggled_post(server, bystander_id):
    body = user_body("smuggled@example.com")
    return post_users(server, [(b"Content-Length", b"%d" % len(body))], body)


@pytest.mark.parametrize("smuggled", [_smuggled_get, _smuggled_post], ids=["GET", "POST"])
def test_content_length_with_chunked_never_answers_a_smuggled_request(server, smuggled):
    """Item 16, the classic CL.TE: a front end that trusts Content-Length
    forwards the chunked terminator *and* a second request as one body. The
    server must not execute or answer that second request: RFC 9112 §6.1
    lets it reject the message or obey Transfer-Encoding alone, but it
    "MUST close the connection after responding to such a request"."""
    status, _, bystander = http_json("POST", server.url + "/Users",
                                     {"schemas": [URN_USER], "userName": "bystander-%s@example.com"
                                      % smuggled.__name__}, token=server.token)
    assert status == 201
    before = user_names(server)
    assert bystander["userName"] in before

    front = user_body("front-%s@example.com" % smuggled.__name__)
    body = chunked(front) + smuggled(server, bystander["id"])
    request = (b"POST /scim/Users HTTP/1.1\r\n"      # kept alive: no Connection: close here
               b"Host: 127.0.0.1\r\n"
               b"Authorization: Bearer " + server.token.encode("ascii") + b"\r\n"
               b"Content-Type: application/scim+json\r\n"
               b"Content-Length: %d\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" % len(body)) + body
    received, closed = exchange(server, request)
    responses = parse_responses(received)

    assert len(responses) <= 1, "a smuggled request was answered: %r" % [r[:2] for r in responses]
    assert closed, "the connection stayed open after a Content-Length + Transfer-Encoding request"
    statuses = [status for _, status, _, _ in responses]
    assert statuses in ([], [400], [201])
    # The front request ran at most once (only if it was answered 201); the smuggled one never.
    created = ["front-%s@example.com" % smuggled.__name__] if statuses == [201] else []
    assert user_names(server) == sorted(before + created)
    assert "smuggled@example.com" not in user_names(server)
    assert_still_serving(server)


# -- oversized requests ---------------------------------------------------------------

def _many_headers():
    return b"".join(b"X-Pad-%03d: %s\r\n" % (i, b"a" * 1000) for i in range(100))


def _one_big_header():
    return b"X-Pad: " + b"a" * 102400 + b"\r\n"


@pytest.mark.parametrize("headers", [_many_headers, _one_big_header], ids=["100x1KB", "1x100KB"])
def test_about_100_kb_of_headers_is_refused_and_the_server_keeps_serving(server, headers):
    """Item 16: ~100 KB of request headers → 431 (or 400), and the server keeps serving."""
    before = user_names(server)
    padding = headers()
    assert 100 * 1000 <= len(padding) <= 110 * 1024
    _, status, _, _ = the_response(server, get(server, b"/scim/ServiceProviderConfig", headers=padding))
    assert status in (431, 400)
    assert user_names(server) == before
    assert_still_serving(server)


@pytest.mark.parametrize("target", [
    b"/scim/Users/" + b"a" * 200000,
    b"/scim/Users?filter=userName+eq+%22" + b"a" * 200000 + b"%22",
], ids=["200KB-path", "200KB-query"])
def test_absurdly_long_url_gets_4xx_and_the_server_keeps_serving(server, target):
    """Item 16: a 200 KB request target → 4xx (never 5xx), and the server keeps serving."""
    before = user_names(server)
    _, status, _, _ = the_response(server, get(server, target))
    assert 400 <= status < 500
    assert user_names(server) == before
    assert_still_serving(server)


# -- malformed request lines ------------------------------------------------------------

@pytest.mark.parametrize("method, version, expected", [
    (b"G@T", b"HTTP/1.1", {400}),      # not a token (RFC 9110 §9.1)
    (b"get", b"HTTP/1.1", {400}),      # methods are case-sensitive
    (b"FOO", b"HTTP/1.1", {501}),      # a well-formed unknown method: not implemented (RFC 9110 §9.1)
    (b"GET", b"HTTP/1.10", {400}),     # not DIGIT "." DIGIT (RFC 9112 §2.3)
    (b"GET", b"FTP/1.1", {400}),
], ids=["G@T", "lowercase", "FOO", "HTTP-1.10", "FTP"])
def test_malformed_request_line_is_refused_without_crashing(server, method, version, expected):
    """Item 16: an invalid method or protocol → 4xx, and the server keeps serving."""
    before = user_names(server)
    _, status, _, _ = the_response(server, get(server, b"/scim/ServiceProviderConfig", version, method))
    assert status in expected
    assert user_names(server) == before
    assert_still_serving(server)


def test_unknown_major_version_is_answered_as_http_1_0_or_refused(server):
    """Item 16: HTTP/9.9 never crashes the server. RFC 9110 §6.2 leaves 505
    optional; waitress answers such a request as HTTP/1.0 and closes."""
    before = user_names(server)
    version, status, _, body = the_response(server, get(server, b"/scim/ServiceProviderConfig", b"HTTP/9.9"))
    assert version in ("HTTP/1.0", "HTTP/1.1")        # never claims to speak 9.9
    assert status in (200, 400, 505)
    if status == 200:
        assert json.loads(body)["schemas"] == [URN_SPC]
    assert user_names(server) == before
    assert_still_serving(server)
