"""The appliance behind a real nginx with TLS, configured by
`scim_appliance.py print-config nginx` (the configuration the README tells
admins to install), through a whole Entra-style conversation over https.

nginx is Debian's package (.ci/run installs it when missing); the
certificate is self-signed for localhost and trusted by this test only.
"""

import http.client
import json
import os
import socket
import ssl
import subprocess
import time

import pytest

from conftest import free_ports, LiveServer, NGINX, nginx_config, run_cli, self_signed_certificate
from scim_appliance import URN_GROUP, URN_PATCH, URN_USER

def wait_for_port(port, process, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "exited with %s" % process.returncode
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nothing listens on %d" % port)


@pytest.fixture
def proxied(tmp_path):
    """(https base URL, TLS context, the appliance, nginx's directory): the
    appliance on loopback, nginx in front of it on a free https port."""
    assert os.path.exists(NGINX), "the proxy test needs Debian's nginx: apt-get install nginx"
    cert, key = self_signed_certificate(tmp_path, "localhost")
    https_port, scim_port, admin_port = free_ports(3)
    public_url = "https://localhost:%d" % https_port
    db_path = str(tmp_path / "proxied.db")
    token = run_cli("token", "create", "--name", "entra", "--db", db_path).stdout.strip()
    appliance = LiveServer(db_path, ["--public-url", public_url, "--trusted-proxy", "127.0.0.1",
                                     "--admin-port", str(admin_port)], port=scim_port)
    appliance.token = token
    server_block = run_cli("print-config", "nginx", "--public-url", public_url, "--port", str(appliance.port),
                           "--admin-port", str(appliance.admin_port), "--https-port", str(https_port),
                           "--cert", cert, "--key", key, "--db", db_path).stdout
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    nginx = subprocess.Popen([NGINX, "-p", str(nginx_dir), "-c", nginx_config(nginx_dir, server_block)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(https_port, nginx)
        context = ssl.create_default_context(cafile=cert)
        yield public_url, context, appliance, nginx_dir
    finally:
        nginx.terminate()
        nginx.wait(timeout=15)
        appliance.stop()


def https(proxied, method, path, body=None, token=True, headers=None):
    """(status, headers, body) of one request through nginx: JSON parsed, other bytes as they are."""
    public_url, context, appliance, _ = proxied
    connection = http.client.HTTPSConnection(public_url.split("//")[1], context=context, timeout=30)
    all_headers = {"Content-Type": "application/scim+json"}
    if token:
        all_headers["Authorization"] = "Bearer " + appliance.token
    all_headers.update(headers or {})
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None, all_headers)
        response = connection.getresponse()
        data = response.read()
        is_json = "json" in (response.getheader("Content-Type") or "")
        return response.status, dict(response.getheaders()), (json.loads(data) if is_json else data or None)
    finally:
        connection.close()


SPOOFED = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http", "X-Forwarded-For": "203.0.113.9",
           "Forwarded": "for=203.0.113.9;host=evil.example;proto=http", "X-Forwarded-Port": "81"}


def test_an_entra_conversation_through_nginx_over_https(proxied):
    public_url = proxied[0]
    base = public_url + "/scim"
    # Test Connection: a user that does not exist.
    status, _, listing = https(proxied, "GET", '/scim/Users?filter=userName+eq+%22nobody%40contoso.example%22')
    assert status == 200 and listing["totalResults"] == 0
    # Create, with spoofed forwarding headers: the locations still carry the public URL.
    status, headers, user = https(proxied, "POST", "/scim/Users", {
        "schemas": [URN_USER], "userName": "proxied@contoso.example", "active": True,
        "name": {"givenName": "Pat", "familyName": "Roxy"}}, headers=SPOOFED)
    assert status == 201
    assert headers["Location"] == base + "/Users/" + user["id"] == user["meta"]["location"]
    status, _, listing = https(proxied, "GET", '/scim/Users?filter=userName+eq+%22PROXIED%40contoso.example%22',
                               headers=SPOOFED)
    assert status == 200 and [r["id"] for r in listing["Resources"]] == [user["id"]]
    assert listing["Resources"][0]["meta"]["location"] == base + "/Users/" + user["id"]
    # PATCH as Entra does, then read it back.
    status, _, patched = https(proxied, "PATCH", "/scim/Users/" + user["id"], {
        "schemas": [URN_PATCH], "Operations": [{"op": "Replace", "path": "active", "value": "False"},
                                               {"op": "Replace", "path": "name.familyName", "value": "Proxy"}]})
    assert status == 200 and patched["active"] is False and patched["name"]["familyName"] == "Proxy"
    # Group membership.
    status, headers, group = https(proxied, "POST", "/scim/Groups", {
        "schemas": [URN_GROUP], "displayName": "Proxied Group"}, headers=SPOOFED)
    assert status == 201 and headers["Location"] == base + "/Groups/" + group["id"]
    status, _, _ = https(proxied, "PATCH", "/scim/Groups/" + group["id"], {
        "schemas": [URN_PATCH], "Operations": [{"op": "Add", "path": "members", "value": [{"value": user["id"]}]}]})
    assert status == 204
    status, _, read = https(proxied, "GET", "/scim/Groups/" + group["id"])
    assert status == 200 and read["members"] == [{"value": user["id"], "$ref": base + "/Users/" + user["id"],
                                                  "type": "User"}]
    status, _, read = https(proxied, "GET", "/scim/Groups?excludedAttributes=members&filter=displayName+eq+"
                                            "%22Proxied+Group%22")
    assert status == 200 and read["Resources"][0]["meta"]["location"] == base + "/Groups/" + group["id"]
    status, _, _ = https(proxied, "PATCH", "/scim/Groups/" + group["id"], {
        "schemas": [URN_PATCH], "Operations": [{"op": "Remove", "path": 'members[value eq "%s"]' % user["id"]}]})
    assert status == 204
    # Delete.
    assert https(proxied, "DELETE", "/scim/Users/" + user["id"])[0] == 204
    assert https(proxied, "GET", "/scim/Users/" + user["id"])[0] == 404
    assert https(proxied, "GET", "/scim/Groups/" + group["id"])[2].get("members", []) == []
    # The health check is published, for monitoring; it needs no token and says one word.
    status, _, body = https(proxied, "GET", "/healthz", token=False)
    assert status == 200 and body == b"ok\n"


def test_the_admin_page_is_not_reachable_through_the_proxy(proxied):
    for path in ("/", "/login", "/setup", "/tokens", "/activity", "/static/admin.css", "/metrics",
                 "/scim/../login", "/%2e%2e/login", "/scim/../tokens"):
        status, _, body = https(proxied, "GET", path, token=False)
        # 404 from nginx's catch-all; 400 for a path that climbs above the root.
        assert status in (400, 404), path
        assert b"scim-appliance" not in (body or b"") and b"csrf" not in (body or b""), path
    status, _, _ = https(proxied, "POST", "/login", token=False)
    assert status == 404


def test_a_client_cannot_choose_the_address_the_appliance_sees(proxied):
    """The appliance believes X-Forwarded-For from nginx only, and nginx sets
    it to the real peer: a spoofed one ends up nowhere (here: the throttle's
    log line names 127.0.0.1, never 203.0.113.9)."""
    appliance = proxied[2]
    status, _, error = https(proxied, "GET", "/scim/Users", token=False,
                             headers={"Authorization": "Bearer wrong", **SPOOFED})
    assert status == 401 and error["status"] == "401"
    output = appliance.stop()
    assert "authentication failed from 127.0.0.1" in output
    assert "203.0.113.9" not in output
