"""The admin page (issue 5): first-run setup, login and sessions, throttling,
CSRF and Origin checks, security headers, escaping, tokens (show once,
revoke, rotate, expiry), the activity log and connection panel, static
files, and the separation of the admin and SCIM listeners.

The admin app runs under webtest beside conftest's SCIM client, sharing the
store and the activity log as `serve` does, so SCIM requests show up on the
admin pages (which flush the log before they read it)."""

import datetime
import functools
import html
import html.parser
import os
import re
import subprocess
import sys
import urllib.parse

import pytest
import webtest

import scim_appliance
from conftest import PUBLIC_URL, ROOT, ScimClient, assert_scim_error

SETUP_CODE = "ABCD-EFGH-JKLM"
PASSWORD = "correct horse battery staple"
# webtest sends "Host: localhost:80" over http; the page compares Origin with
# "<wsgi.url_scheme>://<Host>", so this is the page's own origin.
OWN_ORIGIN = "http://localhost:80"
COOKIE = scim_appliance.SESSION_COOKIE
USER = scim_appliance.URN_USER
FROM_PAGE = object()   # submit(): read the CSRF token from the page showing the form
FORM_PAGES = {"/setup": "/setup", "/login": "/login"}   # every other form is on /tokens (logout: on every page)


# -- fixtures -----------------------------------------------------------------

@pytest.fixture
def make_admin(store, settings, activity):
    """Build an admin TestApp on the shared store; `log` replaces the shared
    activity log, `environ` is webtest's extra_environ."""
    def make(log=None, setup_code=SETUP_CODE, **environ):
        app = scim_appliance.make_admin_app(store, settings, activity if log is None else log,
                                            setup_code=setup_code)
        return webtest.TestApp(app, extra_environ=environ)
    return make


@pytest.fixture
def admin(make_admin):
    """The admin page of a server started with no admin password (a setup code was printed)."""
    return make_admin()


@pytest.fixture
def password(store):
    scim_appliance.set_admin_password(store, PASSWORD)
    return PASSWORD


@pytest.fixture
def logged_in(admin, password):
    """The admin page, logged in."""
    assert_redirect(login(admin, password), "/")
    return admin


@pytest.fixture
def fake_clock(monkeypatch):
    """A settable clock for the admin app's sessions and login throttle
    (install before the app is made)."""
    now = [1000.0]

    def clock():
        return now[0]
    monkeypatch.setattr(scim_appliance, "AdminSessions",
                        functools.partial(scim_appliance.AdminSessions, clock=clock))
    monkeypatch.setattr(scim_appliance, "AuthThrottle",
                        functools.partial(scim_appliance.AuthThrottle, clock=clock))
    return now


# -- helpers --------------------------------------------------------------------

def csrf_of(page):
    """The CSRF token of the forms on `page` (one per session, on every form)."""
    tokens = set(re.findall(r'<input type="hidden" name="csrf" value="([^"]*)">', page.text))
    assert len(tokens) == 1 and "" not in tokens, tokens
    return tokens.pop()


def submit(app, path, fields, status, csrf=FROM_PAGE, origin=OWN_ORIGIN):
    """POST a form as the page's own form would: with the CSRF token from the
    page that shows it (or `csrf`; None = none) and an Origin header (None = none)."""
    if csrf is FROM_PAGE:
        csrf = csrf_of(app.get(FORM_PAGES.get(path, "/tokens")))
    data = dict(fields)
    if csrf is not None:
        data["csrf"] = csrf
    return app.post(path, data, headers={} if origin is None else {"Origin": origin}, status=status)


def login(app, password, status=303, **kw):
    return submit(app, "/login", {"password": password}, status, **kw)


def assert_redirect(response, path):
    assert response.status_int == 303, response.status
    assert urllib.parse.urlsplit(response.headers["Location"]).path == path


def shown_token(page):
    """The token a page reveals in <code id="new-token">, or None."""
    found = re.findall(r'<code id="new-token">([^<]*)</code>', page.text)
    assert len(found) <= 1
    return found[0] if found else None


def text(fragment):
    """The visible text of an HTML fragment, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", fragment)).split())


def text_of(page, element_id):
    match = re.search(r'<(\w+) id="%s"[^>]*>(.*?)</\1>' % re.escape(element_id), page.text, re.S)
    assert match, element_id
    return text(match.group(2))


def table(page, table_id):
    """The rows of <table id=...> as dicts keyed by the column headings."""
    match = re.search(r'<table id="%s">(.*?)</table>' % re.escape(table_id), page.text, re.S)
    assert match, table_id
    headings = [text(cell) for cell in re.findall(r"<th>(.*?)</th>", match.group(1), re.S)]
    body = match.group(1).split("</thead>", 1)[1]
    return [dict(zip(headings, (text(cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.S))))
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def token_row(page, name):
    rows = [row for row in table(page, "tokens") if row["Name"] == name]
    assert len(rows) == 1, table(page, "tokens")
    return rows[0]


def count(store, sql):
    with store.read() as tx:
        return tx.conn.execute(sql).fetchone()[0]


def stored_password_digest(store):
    with store.read() as tx:
        return tx.admin_password_digest()


class _Markup(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags = []          # (tag, {attribute: value})
        self.script_text = []   # text inside <script> elements
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.script_text.append(data)


def assert_safe_markup(page):
    """No inline script anywhere: the only scripts are files from /static,
    no element has an on* handler or a javascript: URL, and no <img> got in.
    Returns the page's tags."""
    parser = _Markup()
    parser.feed(page.text)
    parser.close()
    assert parser.script_text == []
    assert [attrs.get("src") for tag, attrs in parser.tags if tag == "script"] in ([], ["/static/admin.js"])
    assert [(tag, name) for tag, attrs in parser.tags for name in attrs if name.lower().startswith("on")] == []
    assert [value for _, attrs in parser.tags for value in attrs.values()
            if (value or "").strip().lower().startswith("javascript:")] == []
    assert [tag for tag, _ in parser.tags if tag == "img"] == []
    return parser.tags


def assert_security_headers(response):
    for name, value in scim_appliance.ADMIN_SECURITY_HEADERS:
        assert response.headers.getall(name) == [value], (response.request.path, name)


def set_password_by_cli(db_path, stdin):
    """`python scim_appliance.py admin set-password --db PATH`, the password on stdin
    (conftest's run_cli cannot pass stdin)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "scim_appliance.py"), "admin", "set-password",
                           "--db", db_path], input=stdin, capture_output=True, text=True, timeout=30, cwd=ROOT)


DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")   # utc_now()'s form


def utc_text(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_utc(value, form="%Y-%m-%dT%H:%M:%S.%fZ"):
    return datetime.datetime.strptime(value, form).replace(tzinfo=datetime.timezone.utc)


def cookie_attributes(set_cookie):
    """A Set-Cookie header's parts, lower-cased: ["name=value", "httponly", ...]."""
    return [part.strip().lower() for part in set_cookie.split(";")]


def latest_errors(page):
    """The overview's "Latest errors" items, as text."""
    return [text(item) for item in re.findall(r"<li>(.*?)</li>", page.text, re.S)]


# -- first start: the setup code ---------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/tokens", "/activity", "/login"])
def test_without_a_password_every_page_leads_to_setup(admin, path):
    assert_redirect(admin.get(path), "/setup")


def test_the_setup_page_asks_for_the_code_and_a_new_password(admin):
    page = admin.get("/setup", status=200)
    assert re.search(r'<input name="code"', page.text)
    assert page.text.count('type="password"') == 2
    assert 'minlength="%d"' % scim_appliance.MIN_ADMIN_PASSWORD in page.text
    assert page.headers["Set-Cookie"].startswith(COOKIE + "=")   # an anonymous session, for the form's CSRF token


@pytest.mark.parametrize("fields, status", [
    ({"code": "WRONG-CODE-1234", "password": PASSWORD, "confirm": PASSWORD}, 403),
    ({"code": "", "password": PASSWORD, "confirm": PASSWORD}, 403),
    ({"code": SETUP_CODE, "password": PASSWORD, "confirm": PASSWORD + "!"}, 400),
    ({"code": SETUP_CODE, "password": "short", "confirm": "short"}, 400),
], ids=["wrong-code", "no-code", "passwords-differ", "too-short"])
def test_setup_refusals_store_no_password(admin, store, fields, status):
    page = submit(admin, "/setup", fields, status)
    assert 'class="message error"' in page.text
    assert stored_password_digest(store) is None
    assert_redirect(admin.get("/"), "/setup")   # not logged in


def test_setup_with_the_code_sets_a_scrypt_password_and_logs_in(admin, store, settings):
    anonymous_cookie = admin.get("/setup").headers["Set-Cookie"]
    # The code is accepted as typed, in lower case and with spaces around it.
    response = submit(admin, "/setup", {"code": " abcd-efgh-jklm ", "password": PASSWORD, "confirm": PASSWORD}, 303)
    assert_redirect(response, "/")
    assert response.headers["Set-Cookie"] != anonymous_cookie
    assert admin.get("/", status=200).text.count("Log out") == 1
    digest = stored_password_digest(store)
    assert re.fullmatch(r"scrypt\$16384\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+", digest)
    assert scim_appliance.verify_password(PASSWORD, digest)
    assert not scim_appliance.verify_password(PASSWORD + "x", digest)
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(settings.db + suffix):
            with open(settings.db + suffix, "rb") as f:
                assert PASSWORD.encode() not in f.read()


def test_the_setup_code_works_once(admin, store):
    assert_redirect(submit(admin, "/setup", {"code": SETUP_CODE, "password": PASSWORD, "confirm": PASSWORD}, 303), "/")
    # With a password set, the setup page is the login page.
    stranger = webtest.TestApp(admin.app)
    assert_redirect(stranger.get("/setup"), "/login")
    csrf = csrf_of(stranger.get("/login"))
    assert_redirect(submit(stranger, "/setup", {"code": SETUP_CODE, "password": "x" * 20, "confirm": "x" * 20},
                           303, csrf=csrf), "/login")
    assert scim_appliance.check_admin_password(store, PASSWORD)
    # Even were the password gone, the used code sets no other.
    with store.write() as tx:
        tx.conn.execute("DELETE FROM admin")
    submit(stranger, "/setup", {"code": SETUP_CODE, "password": "y" * 20, "confirm": "y" * 20}, 403)
    assert stored_password_digest(store) is None


def test_a_server_started_with_a_password_accepts_no_setup_code(make_admin, store):
    app = make_admin(setup_code=None)
    submit(app, "/setup", {"code": SETUP_CODE, "password": PASSWORD, "confirm": PASSWORD}, 403)
    assert stored_password_digest(store) is None


def test_set_password_from_the_cli_then_log_in(admin, store, settings):
    refused = set_password_by_cli(settings.db, "short\n")
    assert refused.returncode == 1 and "at least %d" % scim_appliance.MIN_ADMIN_PASSWORD in refused.stderr
    assert stored_password_digest(store) is None
    result = set_password_by_cli(settings.db, PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert_redirect(admin.get("/setup"), "/login")
    login(admin, PASSWORD + "x", status=403)
    assert_redirect(login(admin, PASSWORD), "/")
    assert admin.get("/", status=200)


# -- login, sessions, logout -------------------------------------------------------

def test_protected_pages_need_a_session(admin, password):
    for path in ("/", "/tokens", "/activity"):
        assert_redirect(admin.get(path), "/login")
    for path in ("/tokens", "/tokens/rotate", "/tokens/revoke"):
        assert_redirect(admin.post(path, {"name": "x", "csrf": "x"}, headers={"Origin": OWN_ORIGIN}), "/login")
    assert_redirect(admin.get("/setup"), "/login")


def test_a_wrong_password_is_refused(admin, password):
    page = login(admin, PASSWORD[:-1], status=403)
    assert "Wrong password." in page.text
    assert_redirect(admin.get("/"), "/login")


def test_login_issues_a_new_session_id(admin, password):
    before = admin.get("/login").headers["Set-Cookie"]
    planted = admin.cookies[COOKIE]
    response = login(admin, PASSWORD)
    assert_redirect(response, "/")
    cookie = response.headers["Set-Cookie"]
    assert cookie != before and admin.cookies[COOKIE] != planted
    assert len(admin.cookies[COOKIE]) >= 40   # 256 random bits, url-safe base64
    page = admin.get("/", status=200)
    # The id known before login (e.g. planted by an attacker) is worth nothing after it.
    admin.set_cookie(COOKIE, planted)
    assert_redirect(admin.get("/"), "/login")
    assert page.text.count("Log out") == 1


def test_the_session_cookie_is_httponly_and_samesite_strict_over_http(admin, password):
    for response in (admin.get("/login"), login(admin, PASSWORD)):
        attributes = cookie_attributes(response.headers["Set-Cookie"])
        assert attributes[0].startswith(COOKIE + "=")
        assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
        assert "secure" not in attributes


def test_the_session_cookie_is_secure_over_https(make_admin, password):
    app = make_admin(**{"wsgi.url_scheme": "https", "HTTPS": "on"})
    first = app.get("/login")
    response = login(app, PASSWORD, origin="https://localhost:80")
    assert_redirect(response, "/")
    for cookie in (first.headers["Set-Cookie"], response.headers["Set-Cookie"]):
        assert {"secure", "httponly", "samesite=strict"} <= set(cookie_attributes(cookie))
    # Over https the page's own origin is https://host; http://host is another.
    login(app, PASSWORD, status=403, origin=OWN_ORIGIN)


def test_logout_ends_the_session_on_the_server(logged_in):
    old = logged_in.cookies[COOKIE]
    response = submit(logged_in, "/logout", {}, 303)
    assert_redirect(response, "/login")
    assert re.match(COOKIE + r'=(""|);', response.headers["Set-Cookie"])   # the browser forgets it
    assert_redirect(logged_in.get("/"), "/login")
    logged_in.set_cookie(COOKIE, old)   # a copy of the cookie kept elsewhere
    assert_redirect(logged_in.get("/tokens"), "/login")


def test_a_session_ends_after_idle_time(fake_clock, make_admin, password):
    app = make_admin()
    assert_redirect(login(app, PASSWORD), "/")
    idle = scim_appliance.ADMIN_IDLE_SECONDS
    fake_clock[0] += idle - 1
    app.get("/", status=200)          # used: the idle time starts again
    fake_clock[0] += idle - 1
    app.get("/tokens", status=200)
    fake_clock[0] += idle + 1
    assert_redirect(app.get("/"), "/login")


def test_failed_logins_are_throttled(fake_clock, make_admin, password):
    app = make_admin()
    for _ in range(scim_appliance.AUTH_FAILURE_LIMIT):
        login(app, "not the password!", status=403)
    # Now even the right password waits until the oldest failure leaves the window.
    page = login(app, PASSWORD, status=429)
    retry = int(page.headers["Retry-After"])
    assert retry == scim_appliance.AUTH_FAILURE_WINDOW
    assert "try again in %d seconds" % retry in page.text
    assert_redirect(app.get("/"), "/login")
    fake_clock[0] += scim_appliance.AUTH_FAILURE_WINDOW - 10
    assert int(login(app, PASSWORD, status=429).headers["Retry-After"]) == 10
    fake_clock[0] += 10
    assert_redirect(login(app, PASSWORD), "/")


def test_wrong_setup_codes_are_throttled(fake_clock, make_admin, store):
    app = make_admin()
    for _ in range(scim_appliance.AUTH_FAILURE_LIMIT):
        submit(app, "/setup", {"code": "WRONG-CODE-0000", "password": PASSWORD, "confirm": PASSWORD}, 403)
    page = submit(app, "/setup", {"code": SETUP_CODE, "password": PASSWORD, "confirm": PASSWORD}, 429)
    assert int(page.headers["Retry-After"]) == scim_appliance.AUTH_FAILURE_WINDOW
    assert stored_password_digest(store) is None
    fake_clock[0] += scim_appliance.AUTH_FAILURE_WINDOW
    assert_redirect(submit(app, "/setup", {"code": SETUP_CODE, "password": PASSWORD, "confirm": PASSWORD}, 303), "/")


# -- forgery: CSRF token and Origin -------------------------------------------------

@pytest.mark.parametrize("csrf, origin", [
    (None, OWN_ORIGIN),
    ("", OWN_ORIGIN),
    ("forged-token", OWN_ORIGIN),
    (FROM_PAGE, "http://evil.example"),
    (FROM_PAGE, "https://localhost:80"),   # same host, other scheme: another origin
    (FROM_PAGE, "http://localhost:8080"),
], ids=["no-csrf", "empty-csrf", "wrong-csrf", "evil-origin", "other-scheme", "other-port"])
def test_a_forged_token_form_creates_nothing(logged_in, store, csrf, origin):
    before = count(store, "SELECT count(*) FROM tokens")
    page = submit(logged_in, "/tokens", {"name": "forged"}, 403, csrf=csrf, origin=origin)
    assert shown_token(page) is None
    assert count(store, "SELECT count(*) FROM tokens") == before
    assert_security_headers(page)


@pytest.mark.parametrize("origin", ["null", None], ids=["origin-null", "no-origin"])
def test_origin_null_or_absent_is_accepted_with_the_csrf_token(logged_in, store, origin):
    # The page sends Referrer-Policy: no-referrer, under which browsers send
    # "Origin: null" with the page's own form posts (Fetch §3.1); old browsers
    # send no Origin. The CSRF token alone decides then.
    page = submit(logged_in, "/tokens", {"name": "from-null"}, 201, origin=origin)
    assert shown_token(page).startswith(scim_appliance.TOKEN_PREFIX)
    assert count(store, "SELECT count(*) FROM tokens WHERE name = 'from-null'") == 1
    # ... and not without it.
    submit(logged_in, "/tokens", {"name": "forged"}, 403, csrf="forged-token", origin=origin)
    assert count(store, "SELECT count(*) FROM tokens WHERE name = 'forged'") == 0


def test_the_csrf_token_of_the_anonymous_session_is_void_after_login(admin, password, store):
    csrf = csrf_of(admin.get("/login"))
    assert_redirect(login(admin, PASSWORD, csrf=csrf), "/")
    submit(admin, "/tokens", {"name": "stale"}, 403, csrf=csrf)
    assert count(store, "SELECT count(*) FROM tokens") == 0


@pytest.mark.parametrize("csrf, origin", [("forged-token", OWN_ORIGIN), (FROM_PAGE, "http://evil.example")],
                         ids=["wrong-csrf", "evil-origin"])
def test_login_and_setup_forms_refuse_forgery(make_admin, store, csrf, origin):
    app = make_admin()
    submit(app, "/setup", {"code": SETUP_CODE, "password": PASSWORD, "confirm": PASSWORD}, 403,
           csrf=csrf, origin=origin)
    assert stored_password_digest(store) is None
    assert_redirect(submit(app, "/setup", {"code": SETUP_CODE, "password": PASSWORD, "confirm": PASSWORD}, 303), "/")
    other = webtest.TestApp(app.app)   # another browser, not logged in
    login(other, PASSWORD, status=403, csrf=csrf, origin=origin)
    assert_redirect(other.get("/"), "/login")
    # A form posted without any session at all.
    fresh = webtest.TestApp(app.app)
    fresh.post("/login", {"password": PASSWORD, "csrf": "x"}, headers={"Origin": OWN_ORIGIN}, status=403)
    assert COOKIE not in fresh.cookies


@pytest.mark.parametrize("csrf, origin", [("forged-token", OWN_ORIGIN), (FROM_PAGE, "http://evil.example")],
                         ids=["wrong-csrf", "evil-origin"])
def test_logout_revoke_and_rotate_forms_refuse_forgery(logged_in, client, store, csrf, origin):
    submit(logged_in, "/logout", {}, 403, csrf=csrf, origin=origin)
    logged_in.get("/", status=200)   # still logged in
    submit(logged_in, "/tokens/revoke", {"name": "entra"}, 403, csrf=csrf, origin=origin)
    submit(logged_in, "/tokens/rotate", {"name": "entra"}, 403, csrf=csrf, origin=origin)
    assert [(t["name"], t["status"]) for t in scim_appliance.list_tokens(store)] == [("entra", "active")]
    client.get("/Users", status=200)


# -- headers and markup ---------------------------------------------------------------

def test_the_security_headers_are_strict():
    headers = dict(scim_appliance.ADMIN_SECURITY_HEADERS)
    assert len(headers) == len(scim_appliance.ADMIN_SECURITY_HEADERS) == 5
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    directives = {part.split()[0]: part.split()[1:] for part in headers["Content-Security-Policy"].split(";")}
    assert directives["default-src"] == ["'none'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["form-action"] == ["'self'"]
    assert directives["base-uri"] == ["'none'"]
    policy = headers["Content-Security-Policy"]
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "*" not in policy


def test_every_admin_response_carries_the_security_headers(admin, store):
    responses = [
        admin.get("/"),                                     # redirect to setup
        admin.get("/setup"),                                # page
        submit(admin, "/setup", {"code": "WRONG", "password": "", "confirm": ""}, 403),
        admin.get("/no/such/page", status=404),
        admin.get("/logout", status=405),
        admin.get("/static/admin.css"),
        admin.get("/static/admin.js"),
        admin.get("/static/missing.css", status=404),
        admin.get("/static/../scim_appliance.py", status="*"),
        admin.get("/scim/Users", status=404),
        submit(admin, "/setup", {"code": SETUP_CODE, "password": PASSWORD, "confirm": PASSWORD}, 303),
        admin.get("/"),
        admin.get("/tokens"),
        submit(admin, "/tokens", {"name": "headers"}, 201),
        submit(admin, "/tokens", {"name": ""}, 400),
        submit(admin, "/tokens/rotate", {"name": "headers"}, 201),
        submit(admin, "/tokens/revoke", {"name": "headers"}, 200),
        admin.get("/activity?q=x&status=failed"),
        submit(admin, "/logout", {}, 303),
        admin.get("/login"),
        login(admin, "wrong password!", status=403),
    ]
    assert {r.status_int for r in responses} >= {200, 201, 303, 400, 403, 404, 405}
    for response in responses:
        assert_security_headers(response)


def test_pages_have_no_inline_script(logged_in, client):
    client.create_user("someone@example.com")
    pages = [logged_in.get(path) for path in ("/", "/tokens", "/activity")]
    pages.append(submit(logged_in, "/tokens", {"name": "markup"}, 201))
    pages.append(logged_in.get("/nope", status=404))
    pages.append(webtest.TestApp(logged_in.app).get("/login"))
    for page in pages:
        assert page.content_type == "text/html"
        tags = assert_safe_markup(page)
        assert ("link", {"rel": "stylesheet", "href": "/static/admin.css"}) in tags


def test_every_form_carries_the_csrf_token(logged_in, client):
    client.create_user("someone@example.com")
    for path in ("/", "/tokens"):
        page = logged_in.get(path)
        csrf = csrf_of(page)
        posts = re.findall(r'<form method="post"[^>]*>(.*?)</form>', page.text, re.S)
        assert posts
        assert all('<input type="hidden" name="csrf" value="%s">' % csrf in form for form in posts)


# -- escaping -------------------------------------------------------------------------

def test_token_names_are_escaped(logged_in, store):
    name = "<script>alert(1)</script>"
    page = submit(logged_in, "/tokens", {"name": name}, 201)
    for shown in (page, logged_in.get("/tokens"), submit(logged_in, "/tokens/revoke", {"name": name}, 200)):
        assert "<script>alert" not in shown.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown.text
        assert_safe_markup(shown)
        assert token_row(shown, name)["Name"] == name
    assert [t["status"] for t in scim_appliance.list_tokens(store)] == ["revoked"]


def test_user_names_in_the_log_and_overview_are_escaped(logged_in, client, store):
    evil = '<img src=x onerror=alert(1)>@x'
    user = client.create_user(evil)
    failed = client.patch("/Users/" + user["id"], [{"op": "replace", "path": "nosuch", "value": 1}], status=400)
    # A token name that is markup, used by a SCIM client.
    bad_name = '"><script>alert(2)</script>'
    other = ScimClient(client.app, scim_appliance.create_token(store, bad_name))
    other.patch("/Users/" + user["id"], [{"op": "replace", "path": "active", "value": False}], status=200)
    other.get("/Users/does-not-exist", status=404)
    for page in (logged_in.get("/activity"), logged_in.get("/activity?q=" + urllib.parse.quote(evil)),
                 logged_in.get("/"), logged_in.get("/tokens")):
        assert "<img" not in page.text and "<script>alert" not in page.text
        assert_safe_markup(page)
    page = logged_in.get("/activity?q=" + urllib.parse.quote(evil))
    assert "&lt;img src=x onerror=alert(1)&gt;@x" in page.text
    assert 'value="&lt;img src=x onerror=alert(1)&gt;@x"' in page.text   # the search box keeps the query
    rows = table(page, "activity")
    assert [(row["Token"], row["Change"], row["Status"]) for row in rows] == [
        (bad_name, "active → false", "200"), ("entra", "replace nosuch", "400"), ("entra", "created", "201")]
    assert all(row["Resource"] == "%s %s" % (evil, user["id"]) for row in rows)
    overview = logged_in.get("/")
    assert text_of(overview, "last-call").endswith("with token " + bad_name)
    # The latest errors name the user whose write failed.
    assert latest_errors(overview)[1].endswith(
        "PATCH User %s: 400 invalidPath %s" % (evil, failed.json["detail"]))


def test_a_refused_origin_is_escaped_in_the_error_page(logged_in, store):
    page = submit(logged_in, "/tokens", {"name": "x"}, 403, origin="http://<script>alert(1)</script>")
    assert "<script>alert" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert_safe_markup(page)
    assert count(store, "SELECT count(*) FROM tokens") == 0


# -- tokens ----------------------------------------------------------------------------

def test_a_generated_token_is_shown_once_and_works(logged_in, wsgi_app, store, settings):
    page = submit(logged_in, "/tokens", {"name": "entra-prod"}, 201)
    token = shown_token(page)
    assert token.startswith(scim_appliance.TOKEN_PREFIX) and len(token) >= 40
    assert 'data-copy="new-token"' in page.text and "shown only this once" in page.text
    assert text_of(page, "tenant-url") == settings.base_url == PUBLIC_URL + "/scim"
    assert 'data-copy="tenant-url"' in page.text
    # Never again: not on the list, not in the database.
    later = logged_in.get("/tokens")
    assert shown_token(later) is None and token not in later.text
    assert token not in logged_in.get("/").text
    with store.read() as tx:
        assert token not in repr(tx.conn.execute("SELECT * FROM tokens").fetchall())
    ScimClient(webtest.TestApp(wsgi_app), token).get("/Users", status=200)


def test_the_token_list_shows_name_hint_dates_and_status(logged_in, wsgi_app):
    token = shown_token(submit(logged_in, "/tokens", {"name": "entra-prod"}, 201))
    row = token_row(logged_in.get("/tokens"), "entra-prod")
    assert row["Starts with"] == scim_appliance.token_hint(token) + "…"
    assert row["Starts with"].startswith(token[:len(scim_appliance.TOKEN_PREFIX) + 4])
    created = parse_utc(row["Created"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 60
    assert (row["Last used"], row["Expires"], row["Status"]) == ("never", "never", "active")
    assert "Rotate" in row[""] and "Revoke" in row[""]
    ScimClient(webtest.TestApp(wsgi_app), token).get("/Users", status=200)
    used = token_row(logged_in.get("/tokens"), "entra-prod")["Last used"]
    assert used >= row["Created"] and DATETIME.fullmatch(used)


def test_an_expiring_token_stops_working_when_it_expires(logged_in, wsgi_app, store, monkeypatch):
    page = submit(logged_in, "/tokens", {"name": "temporary", "expires_days": "7"}, 201)
    token = shown_token(page)
    expires = token_row(logged_in.get("/tokens"), "temporary")["Expires"]
    in_a_week = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=7)
    stored = parse_utc(expires, "%Y-%m-%dT%H:%M:%SZ")
    assert abs((stored - in_a_week).total_seconds()) < 60
    assert [t["expires"] for t in scim_appliance.list_tokens(store) if t["name"] == "temporary"] == [expires]
    scim = ScimClient(webtest.TestApp(wsgi_app), token)
    scim.get("/Users", status=200)
    monkeypatch.setattr(scim_appliance, "utc_now", lambda: utc_text(stored + datetime.timedelta(seconds=1)))
    assert_scim_error(scim.get("/Users", status=401), 401)
    assert token_row(logged_in.get("/tokens"), "temporary")["Status"] == "expired"


def test_revoke_makes_a_token_fail_with_401(logged_in, client, store):
    client.get("/Users", status=200)
    page = submit(logged_in, "/tokens/revoke", {"name": "entra"}, 200)
    assert "Revoked “entra”" in page.text
    row = token_row(page, "entra")
    assert row["Status"] == "revoked" and "Rotate" not in row[""] and "Revoke" not in row[""]
    assert_scim_error(client.get("/Users", status=401), 401)
    # Revoked already, or never existed: 400, nothing changes.
    submit(logged_in, "/tokens/revoke", {"name": "entra"}, 400)
    submit(logged_in, "/tokens/revoke", {"name": "nobody"}, 400)
    assert [(t["name"], t["status"]) for t in scim_appliance.list_tokens(store)] == [("entra", "revoked")]


def test_rotate_shows_a_new_token_and_keeps_the_old_one_until_revoked(logged_in, client, store):
    page = submit(logged_in, "/tokens/rotate", {"name": "entra"}, 201)
    new = shown_token(page)
    assert new and new != client.token
    assert "New token “entra (rotated 2)”" in page.text
    assert "“entra” stays valid until you revoke it" in page.text
    assert shown_token(logged_in.get("/tokens")) is None
    rotated = ScimClient(client.app, new)
    client.get("/Users", status=200)      # the old one still works
    rotated.get("/Users", status=200)
    assert [(t["name"], t["status"]) for t in scim_appliance.list_tokens(store)] == [
        ("entra", "active"), ("entra (rotated 2)", "active")]
    submit(logged_in, "/tokens/revoke", {"name": "entra"}, 200)
    assert_scim_error(client.get("/Users", status=401), 401)
    rotated.get("/Users", status=200)
    # The next rotation counts on; a revoked or unknown name cannot be rotated.
    assert "New token “entra (rotated 3)”" in submit(logged_in, "/tokens/rotate", {"name": "entra (rotated 2)"},
                                                     201).text
    before = count(store, "SELECT count(*) FROM tokens")
    for name in ("entra", "nobody"):
        assert shown_token(submit(logged_in, "/tokens/rotate", {"name": name}, 400)) is None
    assert count(store, "SELECT count(*) FROM tokens") == before


@pytest.mark.parametrize("fields", [
    {"name": ""},
    {"name": "   "},
    {"name": "x" * 101},
    {"name": "entra"},                         # a live token has that name
    {"name": "ok", "expires_days": "0"},
    {"name": "ok", "expires_days": "3651"},
    {"name": "ok", "expires_days": "-1"},
    {"name": "ok", "expires_days": "1.5"},
    {"name": "ok", "expires_days": "soon"},
], ids=["empty", "blank", "too-long", "taken", "days-0", "days-3651", "days-negative", "days-fraction",
        "days-text"])
def test_invalid_token_forms_create_nothing(logged_in, token, store, fields):
    before = count(store, "SELECT count(*) FROM tokens")
    page = submit(logged_in, "/tokens", fields, 400)
    assert shown_token(page) is None
    assert 'class="message error"' in page.text
    assert count(store, "SELECT count(*) FROM tokens") == before


def test_the_longest_name_and_expiry_are_accepted(logged_in, store):
    submit(logged_in, "/tokens", {"name": "n" * 100, "expires_days": "3650"}, 201)
    assert [(t["name"], t["status"]) for t in scim_appliance.list_tokens(store)] == [("n" * 100, "active")]


# -- the activity log and the connection panel -------------------------------------------

@pytest.fixture
def provisioning(client):
    """What Entra might do: writes, reads and failures. Returns the ids and the
    SCIM errors answered."""
    alice = client.create_user("alice@example.com", active=True)
    client.patch("/Users/" + alice["id"], [{"op": "Replace", "path": "active", "value": "False"}], status=200)
    members = [client.create_user(name)["id"] for name in ("bob@example.com", "carol@example.com",
                                                            "dave@example.com")]
    group = client.create_group("Engineering")
    client.patch("/Groups/" + group["id"], [{"op": "Add", "path": "members",
                                            "value": [{"value": m} for m in members]}], status=204)
    client.get("/Users/" + alice["id"])                       # reads are not logged
    client.get("/Groups?filter=" + urllib.parse.quote('displayName eq "Engineering"'))
    client.delete("/Users/" + members[2])
    errors = {
        401: assert_scim_error(ScimClient(client.app, "scimapp_not-a-token").post(
            "/Users", {"schemas": [USER], "userName": "mallory@example.com"}, status=401), 401),
        404: assert_scim_error(client.get("/Users/no-such-id", status=404), 404),
        400: assert_scim_error(client.post("/Users", {"schemas": [USER], "userName": ""}, status=400), 400, "*"),
        409: assert_scim_error(client.post("/Users", {"schemas": [USER], "userName": "ALICE@example.com"},
                                           status=409), 409, "uniqueness"),
    }
    return {"alice": alice["id"], "members": members, "group": group["id"], "errors": errors}


def activity_rows(app, query=""):
    return [(row["Token"], row["Request"], row["Resource"], row["Change"], row["Status"], row["Detail"])
            for row in table(app.get("/activity" + query), "activity")]


def test_writes_and_failures_are_logged_and_reads_are_not(logged_in, provisioning):
    ids, errors = provisioning, provisioning["errors"]
    bob, carol, dave = ids["members"]
    assert activity_rows(logged_in) == [
        # A refused create still names who it was for, from the request.
        ("entra", "POST User", "ALICE@example.com", "create", "409", "uniqueness " + errors[409]["detail"]),
        ("entra", "POST User", "", "create", "400", "%s %s" % (errors[400]["scimType"], errors[400]["detail"])),
        ("entra", "GET User", "no-such-id", "", "404", errors[404]["detail"]),
        ("-", "POST User", "", "", "401", errors[401]["detail"]),
        ("entra", "DELETE User", "dave@example.com " + dave, "deleted", "204", ""),
        ("entra", "PATCH Group", "Engineering " + ids["group"], "+3 members", "204", ""),
        ("entra", "POST Group", "Engineering " + ids["group"], "created", "201", ""),
        ("entra", "POST User", "dave@example.com " + dave, "created", "201", ""),
        ("entra", "POST User", "carol@example.com " + carol, "created", "201", ""),
        ("entra", "POST User", "bob@example.com " + bob, "created", "201", ""),
        ("entra", "PATCH User", "alice@example.com " + ids["alice"], "active → false", "200", ""),
        ("entra", "POST User", "alice@example.com " + ids["alice"], "created", "201", ""),
    ]
    page = logged_in.get("/activity")
    assert "kept 30 days" in page.text
    times = [row["Time"] for row in table(page, "activity")]
    assert all(DATETIME.fullmatch(t) for t in times)
    assert times == sorted(times, reverse=True)


def test_the_activity_log_is_searchable_and_filterable(logged_in, provisioning):
    alice, group = provisioning["alice"], provisioning["group"]
    assert [(r[1], r[3], r[4]) for r in activity_rows(logged_in, "?q=ALICE")] == [
        ("POST User", "create", "409"), ("PATCH User", "active → false", "200"), ("POST User", "created", "201")]
    assert [(r[1], r[3]) for r in activity_rows(logged_in, "?q=engineer")] == [
        ("PATCH Group", "+3 members"), ("POST Group", "created")]
    assert [r[1] for r in activity_rows(logged_in, "?q=" + alice)] == ["PATCH User", "POST User"]
    assert [r[1] for r in activity_rows(logged_in, "?q=" + group)] == ["PATCH Group", "POST Group"]
    assert [r[4] for r in activity_rows(logged_in, "?status=failed")] == ["409", "400", "404", "401"]
    assert [r[4] for r in activity_rows(logged_in, "?status=ok")] == ["204", "204", "201", "201", "201", "201",
                                                                      "200", "201"]
    assert [r[1] for r in activity_rows(logged_in, "?status=ok&q=alice")] == ["PATCH User", "POST User"]
    assert [r[4] for r in activity_rows(logged_in, "?status=failed&q=alice")] == ["409"]
    assert len(activity_rows(logged_in, "?status=bogus")) == 12   # an unknown status filters nothing
    page = logged_in.get("/activity?q=nobody-at-all&status=failed")
    assert "Nothing recorded matches." in page.text
    assert re.search(r'<option value="failed" selected>', page.text)
    assert 'value="nobody-at-all"' in page.text


def test_the_overview_shows_the_connection_and_counts(logged_in, provisioning, settings):
    page = logged_in.get("/")
    last_call = text_of(page, "last-call")
    assert DATETIME.fullmatch(last_call.split()[0]) and last_call.split(" ", 1)[1] == "with token entra"
    # 14 requests (2 of them reads, 4 failed), all within the last minute or so.
    assert text_of(page, "last-hour") == "14 requests, 4 errors"
    assert text_of(page, "last-day") == "14 requests, 4 errors"
    assert text_of(page, "users") == "2 active, 1 inactive"
    assert text_of(page, "groups") == "1"
    assert text_of(page, "tenant-url") == settings.base_url
    errors = latest_errors(page)
    details = provisioning["errors"]
    assert len(errors) == 4
    assert errors[0].endswith("POST User ALICE@example.com: 409 uniqueness " + details[409]["detail"])
    assert errors[1].endswith("POST User : 400 %s %s" % (details[400]["scimType"], details[400]["detail"]))
    assert errors[2].endswith("GET User no-such-id: 404 " + details[404]["detail"])
    assert errors[3].endswith("POST User : 401 " + details[401]["detail"])


def test_the_overview_before_any_call(logged_in):
    page = logged_in.get("/")
    assert text_of(page, "last-call") == "never: no token has been used yet"
    assert text_of(page, "last-hour") == "0 requests, 0 errors"
    assert text_of(page, "users") == "0 active, 0 inactive"
    assert text_of(page, "groups") == "0"
    assert "<h3>Latest errors</h3>\n  <p>None.</p>" in page.text
    assert 'id="storage-alert"' not in page.text
    assert re.fullmatch(r"\d+ MB on the data volume", text_of(page, "free-space"))   # the fixture's store: no floor


def test_the_overview_says_when_writes_fail_and_a_token_that_cannot_be_saved_is_not_shown(logged_in, client,
                                                                                        store):
    """While SQLite refuses the appliance's writes (its connection made
    query-only), the overview names the cause, since when and how many
    writes were refused; generating a token answers 503 and shows none.
    The first write that commits ends it."""
    conn = store._connection()   # the admin app runs on this thread under webtest, as the SCIM client does
    conn.execute("PRAGMA query_only = ON")
    try:
        client.post("/Users", {"schemas": [USER], "userName": "ro@example.com"}, status=503)
        page = logged_in.get("/")
        alert = text_of(page, "storage-alert")
        assert alert.startswith("Writes are failing The database file is read-only"), alert
        assert re.search(r"Since \d{4}-\d\d-\d\dT[\d:.]+Z ?: \d+ writes refused\. Reads still work", alert)
        refused = submit(logged_in, "/tokens", {"name": "while-read-only"}, 503)
        assert shown_token(refused) is None
        assert "Not saved: the database file is read-only" in html.unescape(refused.text)
    finally:
        conn.execute("PRAGMA query_only = OFF")
    assert "while-read-only" not in store.read_once().token_names()
    assert shown_token(submit(logged_in, "/tokens", {"name": "after"}, 201))
    assert 'id="storage-alert"' not in logged_in.get("/").text


def test_the_activity_log_keeps_its_days_and_rows(make_admin, password, store):
    monotonic = [0.0]
    log = scim_appliance.ActivityLog(store, retention_days=7, max_rows=5, clock=lambda: monotonic[0])
    app = make_admin(log=log)
    assert_redirect(login(app, PASSWORD), "/")
    now = datetime.datetime.now(datetime.timezone.utc)

    def entry(age, name):
        return (utc_text(now - age), "entra", "PATCH", "User", name, name, "replace name", 200, None, None)
    with store.write() as tx:
        tx.insert_activity([entry(datetime.timedelta(days=9), "old-1"), entry(datetime.timedelta(days=8), "old-2"),
                            entry(datetime.timedelta(days=6, hours=23), "recent-1")])
        tx.add_request_counts({utc_text(now - datetime.timedelta(days=8))[:16]: (5, 1),
                               utc_text(now)[:16]: (2, 0)})
    page = app.get("/activity")   # flushes the log, and prunes on its first flush
    assert "kept 7 days" in page.text
    assert [row["Resource"] for row in table(page, "activity")] == ["recent-1 recent-1"]
    assert count(store, "SELECT count(*) FROM request_counts") == 1
    # More than max_rows: the oldest go, but only when the next prune is due.
    with store.write() as tx:
        tx.insert_activity([entry(datetime.timedelta(minutes=10 - k), "new-%d" % k) for k in range(6)])
    assert len(table(app.get("/activity"), "activity")) == 7
    monotonic[0] += scim_appliance.ACTIVITY_PRUNE_SECONDS
    assert [row["Resource"].split()[0] for row in table(app.get("/activity"), "activity")] == [
        "new-5", "new-4", "new-3", "new-2", "new-1"]
    assert count(store, "SELECT count(*) FROM activity") == 5


def test_the_activity_page_shows_at_most_its_page_of_rows(logged_in, store):
    now = utc_text(datetime.datetime.now(datetime.timezone.utc))
    rows = scim_appliance.ACTIVITY_PAGE_ROWS + 5
    with store.write() as tx:
        tx.insert_activity([(now, "entra", "DELETE", "User", "id-%d" % k, "u%d" % k, "deleted", 204, None, None)
                            for k in range(rows)])
    shown = table(logged_in.get("/activity"), "activity")
    assert len(shown) == scim_appliance.ACTIVITY_PAGE_ROWS
    assert shown[0]["Resource"] == "u%d id-%d" % (rows - 1, rows - 1)   # the newest


# -- static files --------------------------------------------------------------------------

@pytest.mark.parametrize("name, media_type", [("admin.css", "text/css"), ("admin.js", "text/javascript")])
def test_static_files_are_served(admin, name, media_type):
    response = admin.get("/static/" + name, status=200)
    with open(os.path.join(ROOT, "static", name), "rb") as f:
        assert response.body == f.read()
    assert response.content_type in (media_type, "application/javascript")
    assert_security_headers(response)


@pytest.mark.parametrize("path", [
    "/static/../scim_appliance.py",
    "/static/%2e%2e/scim_appliance.py",
    "/static/..%2fscim_appliance.py",
    "/static/%2e%2e%2fscim_appliance.py",
    "/static/../tests/conftest.py",
    "/static/./../scim_appliance.py",
    "/static//etc/passwd",
    "/static/" + "/".join([".."] * 8) + "/etc/passwd",
])
def test_static_cannot_be_left(logged_in, path):
    response = logged_in.get(path, status="*")
    assert response.status_int in (403, 404)
    assert b"make_admin_app" not in response.body and b"root:" not in response.body
    assert_security_headers(response)


def test_static_cannot_be_left_with_an_undecoded_path(admin):
    # The PATH_INFO a server that does not decode %2F would pass on.
    for raw in ("/static/..%2fscim_appliance.py", "/static/%2e%2e%2fscim_appliance.py"):
        request = webtest.TestRequest.blank("/")
        request.environ["PATH_INFO"] = raw
        response = admin.do_request(request, status="*")
        assert response.status_int in (403, 404), raw
        assert b"make_admin_app" not in response.body


# -- the two listeners are apart ---------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/scim/Users"), ("GET", "/scim/ServiceProviderConfig"), ("GET", "/scim"),
    ("POST", "/scim/Users"), ("GET", "/scim/Groups/x"),
])
def test_the_admin_listener_has_no_scim_paths(logged_in, token, method, path):
    response = logged_in.request(path, method=method, headers={"Authorization": "Bearer " + token},
                                 status=404, expect_errors=True)
    assert response.content_type == "text/html"
    assert b"urn:ietf:params:scim" not in response.body
    assert_security_headers(response)


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/login"), ("GET", "/setup"), ("GET", "/tokens"), ("GET", "/activity"),
    ("GET", "/static/admin.css"), ("GET", "/static/admin.js"), ("POST", "/login"), ("POST", "/tokens"),
    ("POST", "/logout"),
])
def test_the_scim_listener_has_no_admin_paths(client, store, method, path):
    response = client.app.request(path, method=method, headers={"Authorization": "Bearer " + client.token},
                                  status=404, expect_errors=True)
    assert_scim_error(response, 404)
    assert "Content-Security-Policy" not in response.headers
    assert count(store, "SELECT count(*) FROM tokens") == 1


def test_a_token_with_the_longest_name_can_be_rotated(logged_in, store):
    name = "n" * scim_appliance.MAX_TOKEN_NAME
    assert shown_token(submit(logged_in, "/tokens", {"name": name}, 201))
    page = submit(logged_in, "/tokens/rotate", {"name": name}, 201)
    assert shown_token(page)
    names = [t["name"] for t in scim_appliance.list_tokens(store)]
    rotated = name[:scim_appliance.MAX_TOKEN_NAME - len(" (rotated 2)")] + " (rotated 2)"
    assert names[-1] == rotated and len(rotated) == scim_appliance.MAX_TOKEN_NAME
    assert shown_token(submit(logged_in, "/tokens/rotate", {"name": rotated}, 201))
    assert scim_appliance.list_tokens(store)[-1]["name"].endswith(" (rotated 3)")


def test_anonymous_sessions_never_push_out_a_logged_in_one():
    """Anyone who reaches the port can open anonymous sessions (GET /login);
    past the limit those go first, never an admin's."""
    sessions = scim_appliance.AdminSessions(limit=5)
    admin_id, _ = sessions.new(logged_in=True)
    for _ in range(50):
        sessions.new()
    assert sessions.get(admin_id) is not None and sessions.get(admin_id).logged_in
    others = [sessions.new(logged_in=True)[0] for _ in range(4)]
    assert all(sessions.get(other) is not None for other in others)
    # Full of admins: a new visitor still gets a session; the oldest of all goes.
    newest_anonymous, _ = sessions.new()
    assert sessions.get(newest_anonymous) is not None and sessions.get(admin_id) is None
    assert all(sessions.get(other) is not None for other in others)


def test_the_background_beat_writes_counts_alone_once_a_minute(store):
    """The background thread writes request counts alone at most once a
    minute (each of its commits costs the serving connection its page cache);
    entries go out at once, and a page's own flush writes everything."""
    now = [0.0]
    log = scim_appliance.ActivityLog(store, clock=lambda: now[0])

    def stored_requests():
        return count(store, "SELECT coalesce(sum(requests), 0) FROM request_counts")
    log.record(200)
    log.flush(counts_due=False)
    assert stored_requests() == 1          # the first beat writes (nothing was written yet)
    log.record(200)
    now[0] += 30
    log.flush(counts_due=False)
    assert stored_requests() == 1          # counts alone wait
    log.record(201, ("entra", "POST", "User", "id-1", "u@example.com", "create", 201, None, None))
    log.flush(counts_due=False)
    assert stored_requests() == 3 and count(store, "SELECT count(*) FROM activity") == 1
    log.record(200)
    now[0] += 59
    log.flush(counts_due=False)
    assert stored_requests() == 3
    now[0] += 2
    log.flush(counts_due=False)
    assert stored_requests() == 4
    log.record(200)
    log.flush()                            # what the admin page calls
    assert stored_requests() == 5
