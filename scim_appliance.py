#!/usr/bin/env python3
"""scim-appliance: an on-premises SCIM 2.0 server for Microsoft Entra ID and Okta.

One module, read top to bottom, lower layers first:

    1. Configuration      settings, limits, SCIM URNs
    2. Errors             ScimError: the one way anything below the HTTP layer fails
    3. Storage            SQLite schema, migrations, transactions; all SQL lives here
    4. Credentials        bearer tokens and password digests
    5. SCIM model         the attribute table for User, Enterprise User and Group
    6. Filter language    RFC 7644 §3.4.2.2: parse_filter, filter_to_sql, filter_matches
    7. PATCH engine       RFC 7644 §3.5.2 plus Entra's forms: parse_path, apply_patch (pure)
    8. Operations         create/replace/patch/delete/query: the only place a transaction opens
    9. SCIM HTTP          make_scim_app: a small WSGI router, thin handlers, one error exit
   10. Admin page         make_admin_app: tokens, activity, the connection panel
   11. Server and CLI     serve(), main(argv)

Specifications: RFC 7643 (schema), RFC 7644 (protocol), Microsoft's
"Develop and plan provisioning for a SCIM endpoint in Microsoft Entra ID",
and Okta's "SCIM 2.0 Protocol Reference" (developer.okta.com).
"""

import argparse
import base64
import bisect
import collections
import contextlib
import csv
import dataclasses
import datetime
import errno
import functools
import hashlib
import hmac
import http.client
import io
import itertools
import json
import logging
import math
import os
import re
import secrets
import signal
import sqlite3
import sys
import threading
import time
import traceback
import typing
import unicodedata
import urllib.parse
import uuid

import bottle


__version__ = "0.1.0"


# ============================================================================
# 1. Configuration
# ============================================================================

# Limits. Each is documented in the README and, where SCIM has a place for
# it, published in /ServiceProviderConfig.
MB = 1024 * 1024
MAX_BODY_BYTES = 1024 * 1024       # request bodies above this get 413
MAX_JSON_DEPTH = 64                # nesting deeper than any SCIM document needs
MAX_FILTER_LENGTH = 4096           # characters in a filter expression
MAX_FILTER_DEPTH = 16              # nested parentheses / not / value paths
MAX_FILTER_TERMS = 100             # comparisons in one filter
DEFAULT_PAGE_SIZE = 100            # resources per page when `count` is absent
MAX_PAGE_SIZE = 1000               # `count` above this is capped (RFC 7644 §3.4.2.4)
MAX_OPERATIONS = 1000              # operations in one PATCH request
MAX_MEMBERS = 100000               # members named in one request (POST, PUT or PATCH): a whole group push
MAX_GROUP_BODY_BYTES = 16 * MB     # a group's POST/PUT/PATCH body may be this large (100,000 members from Okta: ~9 MB)
STOP_CHECK_SECONDS = 0.5           # the event loop looks at the stop flag at least this often
SHUTDOWN_GRACE_SECONDS = 20        # after SIGTERM, requests already received may finish this long
QUEUE_WARNING_INTERVAL = 60        # waitress's "Task queue depth" warning: at most one a minute
MIN_ADMIN_PASSWORD = 12            # characters
MAX_TOKEN_NAME = 100               # characters
ADMIN_IDLE_SECONDS = 30 * 60       # an admin session ends after this long unused
ADMIN_MAX_SESSIONS = 1000          # sessions kept (logged in or not); the oldest go first
ACTIVITY_FLUSH_SECONDS = 1.0       # the activity log is written this often
ACTIVITY_COUNTS_SECONDS = 60       # request counts alone are written this often (pages flush them)
ACTIVITY_PRUNE_SECONDS = 600       # and pruned this often
ACTIVITY_MAX_PENDING = 100000      # entries held while the database cannot be written
ACTIVITY_PAGE_ROWS = 200           # rows the activity page shows
TOKEN_TOUCH_SECONDS = 60           # how often a token's last_used is written
TOKEN_RECHECK_SECONDS = 0.1        # a token revoked by another process fails within this
AUTH_FAILURE_LIMIT = 10            # failed authentications allowed per client address ...
AUTH_FAILURE_WINDOW = 60           # ... in this many seconds; then 429 until the window moves
WAL_SIZE_LIMIT = 16 * 1024 * 1024  # bytes the -wal file is cut back to after a checkpoint
MIN_LOCK_TIMEOUT = 0.5             # seconds; the least --lock-timeout
STORAGE_PROBE_WAIT = 0.5           # while writes fail, a one-row write is tried every second, waiting this long
FULL_HEADROOM_BYTES = MB           # after "disk full", writes count as healed once this much is free
ACTIVITY_WRITE_WAIT = 1.0          # the activity log's writes wait this long for the lock, then retry later
ADMIN_FLUSH_WAIT = 0.5             # the admin page waits this long to write the pending activity first
LOOP_WRITER_THREADS = 1            # with --threads 0, SCIM writes run on a thread of their own (2 measured slower)
DEFAULT_EVENTS_PAGE = 100          # events per /events answer when `limit` is absent ...
MAX_EVENTS_PAGE = 1000             # ... and at most
MAX_EVENTS_WAIT = 30               # seconds a long-poll of /events may wait for a new event
MAX_WAITING_POLLS = 256            # long-polls waiting at once, each on a feed thread; more queue
# Connections the SCIM listener keeps open (waitress's default is 100, and
# beyond it accepts no more): Entra's and Okta's, plus every waiting long-poll.
CONNECTION_LIMIT = 100 + MAX_WAITING_POLLS
FEED_CACHE_KB = 256                # a feed thread's SQLite page cache (each thread has a connection)
EVENTS_PRUNE_BATCH = 1000          # expired events are deleted this many per transaction
TOKEN_SCOPES = ("provision", "read")   # provision: the identity provider; read: the customer's software

URN_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
URN_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
URN_ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
URN_LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
URN_ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
URN_PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
URN_SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
URN_SPC = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
URN_RESOURCE_TYPE = "urn:ietf:params:scim:schemas:core:2.0:ResourceType"
URN_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Schema"

SCIM_MEDIA_TYPE = "application/scim+json"
ACCEPTED_MEDIA_TYPES = ("application/scim+json", "application/json")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything an operator can set; each field has a flag and a variable.

    The CLI table (SETTINGS_TABLE, section 10) maps each field to its
    `--flag` and `SCIM_APPLIANCE_*` environment variable.
    """

    db: str = "scim_appliance.db"          # SQLite file; created on first start
    host: str = "127.0.0.1"                # SCIM listener address
    port: int = 8080                       # SCIM listener port
    public_url: str = ""                   # e.g. https://scim.example.com; "" = http://host:port
    # 0: each read runs on waitress's event-loop thread, one at a time, and
    # each write on a writer thread of its own, where waiting for the write
    # lock or a slow fsync holds up no read (RequestDispatcher, section 11).
    # SQLite has one writer and the GIL
    # runs one thread's Python at a time, so worker threads add no
    # parallelism here; they add hand-offs. CPython's sqlite3 lets go of the
    # GIL around every sqlite3_step and waitress's worker around every
    # send(), and each time the event loop takes the GIL in between.
    # Measured with wrk on this machine (100,000 users, 16 connections):
    # a lookup took 0.55-0.62 ms of CPU and 7-8 context switches with one
    # worker thread, 0.31-0.32 ms and 0.1 switches on the event loop.
    # N > 0 runs reads on N waitress worker threads instead, and writes on N
    # more, which only helps where requests wait on a slow disk's fsync.
    threads: int = 0                       # 0: reads on the event loop; N: N worker threads
    max_body_bytes: int = MAX_BODY_BYTES   # larger request bodies get 413
    durability: str = "full"               # full: fsync every commit; normal: may lose the last
    #                                        commits on power loss (never on a process crash)
    trusted_proxy: str = ""                # address of the reverse proxy whose X-Forwarded-For
    #                                        is believed; "" = believe no one
    admin_host: str = "127.0.0.1"          # admin page listener: keep it on loopback (SSH tunnel)
    admin_port: int = 8081                 # admin page port
    activity_days: int = 30                # the activity log keeps this many days ...
    activity_max_rows: int = 100000        # ... and at most this many rows
    log_format: str = "plain"              # access log lines: plain or json
    log_file: str = ""                     # access log file; "" = stderr
    # A write waits at most this long for SQLite's write lock (another
    # process may hold it: Litestream's checkpoint, `backup`, `token`, an
    # sqlite3 shell), then gets 503 with Retry-After. Reads never wait for it.
    lock_timeout: float = 5.0              # seconds
    # Below this much free space on the database's volume, writes are refused
    # up front (503), before SQLite meets ENOSPC halfway through a commit or
    # a checkpoint; /healthz says "full".
    min_free_mb: int = 64                  # megabytes; 0: no floor
    events_days: int = 30                  # the change feed keeps events this many days

    @property
    def base_url(self):
        """The SCIM base URL, the Tenant URL an admin pastes into Entra."""
        origin = self.public_url or "http://%s:%d" % (_url_host(self.host), self.port)
        return origin.rstrip("/") + "/scim"


def _url_host(host):
    return "[%s]" % host if ":" in host and not host.startswith("[") else host


def validate_public_url(value):
    """A public URL is an absolute http(s) URL without query or fragment ("" = unset)."""
    if not value:
        return ""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("public URL must look like https://scim.example.com[/prefix]: %r" % value)
    return value.rstrip("/")


def durability_mode(value):
    """`full` or `normal`, as SQLite's `PRAGMA synchronous` takes them."""
    if value.lower() not in ("full", "normal"):
        raise ValueError("durability must be full or normal, not %r" % value)
    return value.lower()


def log_format(value):
    if value not in ("plain", "json"):
        raise ValueError("the log format is plain or json")
    return value


def seconds(value):
    """A non-negative number of seconds (a flag's or variable's text)."""
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a number of seconds, 0 or more: %r" % value)
    return number


def utc_now():
    """RFC 7643 §2.3.5 dateTime, UTC, millisecond precision."""
    return utc_text(time.time())


def utc_text(seconds):
    """utc_now's form of a Unix time."""
    return _utc_second(int(seconds)) + ".%03dZ" % (int(seconds * 1000) % 1000)


@functools.lru_cache(maxsize=8)
def _utc_second(second):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


# Compact, strict JSON (no NaN/Infinity), UTF-8 left as it is: how documents
# are stored and responses written. One encoder: json.dumps with options
# builds a new one on every call. Everything it is given was built from
# parsed JSON and plain values, so it can hold no cycle to look for.
COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                                check_circular=False)


def json_text(value):
    return COMPACT_JSON.encode(value)


def fold(text):
    """Case-insensitive comparison key: Unicode case folding, NFC-normalised.

    userName is caseExact false (RFC 7643 §4.1.1), and with full folding
    "ÄNNE@x" and "änne@x" are the same name.
    """
    return unicodedata.normalize("NFC", text.casefold())


# ============================================================================
# 2. Errors
# ============================================================================

class ScimError(Exception):
    """A failure the client is told about, as RFC 7644 §3.12 describes.

    "scimType: A SCIM detail error keyword" (invalidFilter, tooMany,
    uniqueness, mutability, invalidSyntax, invalidPath, noTarget,
    invalidValue, invalidVers, sensitive) is only meaningful for 400 and 409.
    """

    def __init__(self, status, scim_type=None, detail=None):
        super().__init__(detail or scim_type or str(status))
        self.status = status
        self.scim_type = scim_type
        self.detail = detail

    def to_json(self):
        body = {"schemas": [URN_ERROR], "status": str(self.status)}
        if self.scim_type:
            body["scimType"] = self.scim_type
        if self.detail:
            # A detail may quote the client's input; keep it encodable.
            body["detail"] = self.detail.encode("utf-8", "backslashreplace").decode("utf-8")
        return body


def not_found(resource_type, resource_id):
    return ScimError(404, None, "%s %s not found" % (resource_type, resource_id))


# What the storage can refuse, in words an admin understands, and the
# Retry-After sent with it. A write refused for any of them changed nothing.
STORAGE_FAULTS = {
    "full": ("the appliance's disk is full", 30),
    "read-only": ("the database file is read-only (its filesystem was remounted read-only, or its "
                  "permissions changed)", 30),
    "io-error": ("disk I/O error", 30),
    "locked": ("the database is locked by another process (a backup, Litestream, an sqlite3 shell)", 2),
    "corrupt": ("the database file is damaged", 300),
}


class StorageFault(ScimError):
    """The storage refused a read or write: 503 Service Unavailable.

    RFC 9110 §15.6.4: 503 "indicates that the server is currently unable to
    handle the request due to a temporary overload or scheduled maintenance,
    which will likely be alleviated after some delay. The server MAY send a
    Retry-After header field". 503 rather than WebDAV's 507 (RFC 4918
    §11.5) for a full disk too: every client and proxy knows 503 as "try
    again later", and Entra retries any 5xx the same way.
    """

    def __init__(self, kind, detail=None, writing=True):
        what, self.retry_after = STORAGE_FAULTS[kind]
        outcome = "nothing was changed" if writing else "the request could not be answered"
        super().__init__(503, None, detail or "%s: %s; retry later" % (what, outcome))
        self.kind = kind


# ============================================================================
# 3. Storage
# ============================================================================
#
# Each resource keeps its full SCIM document as JSON (so every attribute,
# including extension URNs Entra sends through custom mappings, round-trips),
# with plain columns for what is looked up or must be unique. Group
# membership is its own table, so adding or removing members costs the
# members changed, never the size of the group.

MIGRATIONS = [
    # 1: the first schema.
    [
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            user_name_key TEXT NOT NULL UNIQUE,   -- fold(user_name)
            external_id TEXT,
            display_name TEXT,
            active INTEGER,
            password_digest TEXT,
            created TEXT NOT NULL,
            last_modified TEXT NOT NULL,
            version INTEGER NOT NULL,
            document TEXT NOT NULL                -- JSON, without id/meta/password/groups
        )""",
        "CREATE INDEX users_external_id ON users(external_id)",
        """CREATE TABLE groups (
            id TEXT PRIMARY KEY,
            display_name TEXT NOT NULL,
            display_name_key TEXT NOT NULL UNIQUE, -- fold(display_name)
            external_id TEXT,
            created TEXT NOT NULL,
            last_modified TEXT NOT NULL,
            version INTEGER NOT NULL,
            document TEXT NOT NULL                 -- JSON, without id/meta/members
        )""",
        "CREATE INDEX groups_external_id ON groups(external_id)",
        """CREATE TABLE members (
            group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            member_id TEXT NOT NULL,
            member_type TEXT NOT NULL CHECK (member_type IN ('User', 'Group')),
            PRIMARY KEY (group_id, member_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX members_member_id ON members(member_id)",
        """CREATE TABLE tokens (
            name TEXT NOT NULL,
            digest TEXT NOT NULL UNIQUE,          -- sha256 of the token; the token is never stored
            created TEXT NOT NULL,
            last_used TEXT,
            revoked TEXT
        )""",
        "CREATE UNIQUE INDEX tokens_live_name ON tokens(name) WHERE revoked IS NULL",
    ],
    # 2: the admin page: token hints and expiry, the admin password, the
    # activity log and request counts per minute.
    [
        "ALTER TABLE tokens ADD COLUMN hint TEXT",      # the token's first characters, to recognise it
        "ALTER TABLE tokens ADD COLUMN expires TEXT",   # UTC dateTime; NULL: never
        """CREATE TABLE admin (
            id INTEGER PRIMARY KEY CHECK (id = 1),  -- one admin password
            password_digest TEXT NOT NULL,          -- scrypt; the password is never stored
            changed TEXT NOT NULL
        )""",
        """CREATE TABLE activity (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            token_name TEXT,                        -- NULL: the request did not authenticate
            method TEXT NOT NULL,
            resource_type TEXT,
            resource_id TEXT,
            resource_name TEXT,                     -- userName or displayName
            summary TEXT,                           -- e.g. "active -> false", "+3 members"
            status INTEGER NOT NULL,
            scim_type TEXT,
            detail TEXT
        )""",
        "CREATE INDEX activity_time ON activity(time)",
        """CREATE TABLE request_counts (
            minute TEXT PRIMARY KEY,                -- UTC, "2026-11-29T14:05"
            requests INTEGER NOT NULL,
            errors INTEGER NOT NULL                 -- answered with a status of 400 or more
        ) WITHOUT ROWID""",
    ],
    # 3: stable views for the customer's own software (README, "Data out"),
    # and the row the storage probe writes while writes fail (Store.probe).
    [
        """CREATE VIEW scim_users AS SELECT
            id,
            user_name,
            external_id,
            display_name,
            json_extract(document, '$.name.givenName') AS given_name,
            json_extract(document, '$.name.familyName') AS family_name,
            coalesce((SELECT json_extract(e.value, '$.value') FROM json_each(document, '$.emails') AS e
                      WHERE json_extract(e.value, '$.primary') = 1),
                     json_extract(document, '$.emails[0].value')) AS email,
            active,
            json_extract(document, '$."%(enterprise)s".employeeNumber') AS employee_number,
            json_extract(document, '$."%(enterprise)s".department') AS department,
            json_extract(document, '$."%(enterprise)s".manager.value') AS manager_id,
            created,
            last_modified
        FROM users""" % {"enterprise": URN_ENTERPRISE},
        """CREATE VIEW scim_groups AS SELECT
            id,
            display_name,
            external_id,
            created,
            last_modified
        FROM groups""",
        """CREATE VIEW scim_group_members AS SELECT
            group_id,
            member_id,
            member_type                             -- 'User' or 'Group'
        FROM members""",
        """CREATE TABLE health (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            checked TEXT NOT NULL
        )""",
    ],
    # 4: the change feed (GET /events, README "Following changes"): every
    # change's events, appended in the change's own transaction, and the
    # scope that lets a token read it.
    [
        """CREATE TABLE events (
            -- AUTOINCREMENT: a number is never handed out twice, even after
            -- the newest events were pruned (plain rowids reuse the highest).
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL,                 -- 128 random bits in hex; a cursor carries its start
            time TEXT NOT NULL,                     -- UTC dateTime of the commit
            type TEXT NOT NULL,                     -- user.created, group.member_added, ...
            event_uri TEXT NOT NULL,                -- RFC 9967, e.g. urn:ietf:params:scim:event:prov:create:full
            resource_type TEXT NOT NULL,            -- 'User' or 'Group'
            resource_id TEXT NOT NULL,
            external_id TEXT,
            version INTEGER NOT NULL,               -- the resource's meta.version after the change
            txn TEXT NOT NULL,                      -- shared by the events of one request (RFC 9967 txn)
            token_name TEXT,                        -- the token that made the change
            attributes TEXT,                        -- JSON: the paths an update changed (RFC 9967), or NULL
            data TEXT NOT NULL                      -- JSON: the resource, or a membership's group and member
        )""",
        # The event as GET /events gives it (but its cursor), composed from
        # the columns when it is read: each row stores its envelope once, so
        # a write of 1,000 memberships writes half the bytes.
        """CREATE VIEW scim_events AS SELECT
            seq,                                    -- the order of the changes' commits
            event_id,
            time,
            type,
            event_uri,
            resource_type,
            resource_id,
            external_id,
            version,
            txn,
            token_name,
            '{"id":"' || event_id || '","type":"' || type || '","timestamp":"' || time
                || '","event_uri":"' || event_uri || '","txn":"' || txn || '","token_name":' || json_quote(token_name)
                || ',"resource":{"type":"' || resource_type || '","id":' || json_quote(resource_id)
                || ',"externalId":' || json_quote(external_id) || ',"version":"W/\\"' || version || '\\""}'
                || coalesce(',"attributes":' || attributes, '') || ',"data":' || data || '}'
                AS event                            -- JSON: the event, as GET /events gives it
        FROM events""",
        "ALTER TABLE tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'provision' "
        "CHECK (scope IN ('provision', 'read'))",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


# The attributes each resource type keeps in a column of its own, for the
# filter translator: folded SCIM attribute path -> (SQL expression, folded).
# `folded` says the column holds fold(value), so a caseExact=false
# comparison binds fold(value) and can use the index.
SQL_COLUMNS = {
    "User": {
        "id": ("users.id", False),
        "username": ("users.user_name_key", True),
        "externalid": ("users.external_id", False),
        "active": ("users.active", False),
        "meta.created": ("users.created", False),
        "meta.lastmodified": ("users.last_modified", False),
    },
    "Group": {
        "id": ("groups.id", False),
        "displayname": ("groups.display_name_key", True),
        "externalid": ("groups.external_id", False),
        "meta.created": ("groups.created", False),
        "meta.lastmodified": ("groups.last_modified", False),
    },
}


class DatabaseError(Exception):
    """The database cannot be used (corrupt, too new, unwritable)."""


# SQLite's primary result codes for a storage fault (sqlite.org/rescode.html),
# and the words of their messages for Pythons before 3.11, which do not
# carry the code on the exception.
_FAULT_CODES = {13: "full", 10: "io-error", 8: "read-only", 5: "locked", 6: "locked", 11: "corrupt",
                26: "corrupt", 14: "io-error"}
_FAULT_WORDS = (("disk is full", "full"), ("disk i/o error", "io-error"), ("readonly", "read-only"),
                ("database is locked", "locked"), ("database table is locked", "locked"),
                ("malformed", "corrupt"), ("not a database", "corrupt"),
                ("unable to open database", "io-error"))


def storage_fault_kind(exc):
    """The STORAGE_FAULTS kind of an exception from sqlite3, or None when it
    is no storage fault (a constraint, a misuse: a bug)."""
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return None
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return _FAULT_CODES.get(code & 0xFF)
    text = str(exc).lower()
    return next((kind for words, kind in _FAULT_WORDS if words in text), None)


class StorageMonitor:
    """Whether the database takes writes, as the last real write found it,
    and the free space on its volume: what /healthz, /metrics and the admin
    page show while the storage fails.

    A write that fails for a storage reason sets the condition; the next
    write that commits clears it. Each change is logged once, however many
    requests meet it.
    """

    def __init__(self, path, min_free_bytes=0):
        self.directory = os.path.dirname(os.path.abspath(path))
        self.min_free_bytes = min_free_bytes
        self.condition = None                  # None, or the kind of fault the last write met
        self.detail = None                     # ... in the words it was answered with
        self.since = None                      # Unix time the condition began
        self.refused = 0                       # writes refused since
        self.errors = dict.fromkeys(STORAGE_FAULTS, 0)   # storage errors met, reads included
        self._lock = threading.Lock()

    def volume(self):
        """(free bytes for an unprivileged user, mounted read-only) of the
        database's volume; (None, False) when it cannot be asked."""
        try:
            figures = os.statvfs(self.directory)
        except OSError:
            return None, False
        return figures.f_bavail * figures.f_frsize, bool(figures.f_flag & os.ST_RDONLY)

    def read_only(self, path):
        """Whether the volume refuses writes: mounted read-only, or forced
        read-only by the kernel after an error (ext4's errors=remount-ro on
        Linux 6 leaves the mount flags alone but answers EROFS, which setting
        the file's times shows)."""
        if self.volume()[1]:
            return True
        try:
            os.utime(path)
        except OSError as exc:
            return exc.errno == errno.EROFS
        return False

    def check_space(self):
        """Refuse a write up front while the volume is below the floor."""
        if not self.min_free_bytes:
            return
        free, _ = self.volume()
        if free is not None and free < self.min_free_bytes:
            raise self.failed("full", "the appliance's disk is nearly full (%d MB free, below the %d MB "
                                      "floor of --min-free-mb): nothing was changed; retry later"
                              % (free // MB, self.min_free_bytes // MB))

    def failed(self, kind, detail=None, writing=True):
        """Count a storage error; a write's sets the condition. Returns the
        StorageFault to raise."""
        fault = StorageFault(kind, detail, writing)
        with self._lock:
            self.errors[kind] += 1
            if not writing:
                return fault
            changed = kind != self.condition
            if changed:
                self.condition, self.detail, self.since, self.refused = kind, fault.detail, time.time(), 0
            self.refused += 1
        if changed:
            print("scim-appliance: writes are failing: %s" % fault.detail, file=sys.stderr)
        return fault

    def succeeded(self):
        """A write committed: the storage takes writes again, unless the
        disk was full and still is (space_is_back)."""
        if self.condition is None:   # the usual case, without the lock
            return
        if self.condition == "full" and not self.space_is_back():
            return
        with self._lock:
            if self.condition is None:
                return
            since, refused = self.since, self.refused
            self.condition = self.detail = self.since = None
        print("scim-appliance: writes succeed again, after %.1f s and %d refused" % (time.time() - since, refused),
              file=sys.stderr)

    def space_is_back(self):
        """After a full disk: whether FULL_HEADROOM_BYTES are free again
        (above the floor). Until then a small write can still succeed in
        pages SQLite's WAL already holds while real ones fail, so one
        success proves nothing."""
        free, _ = self.volume()
        return free is None or free >= max(self.min_free_bytes, FULL_HEADROOM_BYTES)

    def health(self, volume=None):
        """None while writes should succeed, else a one-word reason: the
        condition the last write met, or what the volume shows now."""
        condition = self.condition
        if condition is not None:
            return condition
        free, read_only = volume or self.volume()
        if read_only:
            return "read-only"
        if free is not None and free < self.min_free_bytes:
            return "full"
        return None

    def snapshot(self):
        """What the admin page and /metrics show, as a dict."""
        volume = self.volume()
        with self._lock:
            figures = dict(condition=self.condition, detail=self.detail, since=self.since, refused=self.refused,
                           errors=dict(self.errors))
        figures.update(health=self.health(volume), free_bytes=volume[0], min_free_bytes=self.min_free_bytes)
        return figures


class EventHead:
    """The newest event's sequence number, as this process committed it,
    and a place to wait for the next one (a long-poll of GET /events).

    Only this process appends events (the CLI writes tokens, never
    resources), so the head it keeps is the database's. `advance` runs right
    after a COMMIT that appended events; `wait_past` sleeps on a condition
    variable until the head passes a sequence number, the deadline comes, or
    `release` lets every waiter go at shutdown. It also counts the events
    appended per second, for /metrics and the overview.
    """

    def __init__(self, head=0, clock=time.monotonic):
        self.head = head
        self.clock = clock
        self.released = False
        self._changed = threading.Condition()
        self._per_second = collections.deque(maxlen=61)   # [second, events], the last minute

    def advance(self, head, count):
        with self._changed:
            self.head = max(self.head, head)
            second = int(self.clock())
            if self._per_second and self._per_second[-1][0] == second:
                self._per_second[-1][1] += count
            else:
                self._per_second.append([second, count])
            self._changed.notify_all()

    def reset(self, head):
        """After a restore: the head is the restored database's."""
        with self._changed:
            self.head = head
            self._changed.notify_all()

    def wait_past(self, seq, timeout):
        """Wait until the head is past `seq` (True), or `timeout` seconds
        pass or the server stops (False)."""
        deadline = self.clock() + timeout
        with self._changed:
            while self.head <= seq and not self.released:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return self.head > seq

    def release(self):
        """Let every waiting long-poll answer now (the server is stopping)."""
        with self._changed:
            self.released = True
            self._changed.notify_all()

    def per_second(self):
        """Events appended per second, averaged over the last minute."""
        with self._changed:
            since = int(self.clock()) - 60
            return sum(count for second, count in self._per_second if second >= since) / 60.0


class Store:
    """The SQLite database: one connection per thread, explicit transactions.

    Every write is `BEGIN IMMEDIATE ... COMMIT`: the write lock is taken
    before anything is read, so a read-modify-write never loses an update
    made by another thread in between (design.md §2).

    Every transaction ends, whatever fails: SQLite may leave a transaction
    open when a statement or COMMIT fails with SQLITE_FULL, SQLITE_IOERR or
    SQLITE_BUSY ("Response To Errors Within A Transaction",
    sqlite.org/lang_transaction.html), and a connection left inside one
    would refuse every later BEGIN. So a failure is followed by ROLLBACK
    while `in_transaction`, and a connection whose ROLLBACK fails too is
    discarded (the thread opens a new one). Storage errors leave as
    StorageFault (503), recorded in `monitor`.
    """

    def __init__(self, path, synchronous="FULL", lock_timeout=Settings.lock_timeout, min_free_bytes=0):
        self.path = path
        self.synchronous = synchronous
        self.lock_timeout = lock_timeout
        self.monitor = StorageMonitor(path, min_free_bytes)
        self._local = threading.local()
        self._connections = []
        self._lock = threading.Lock()
        # Writers in this process queue here, woken the moment the lock is
        # free; SQLite's own busy handler (for other processes) polls with
        # sleeps of up to 100 ms, which made queued writes take up to a second.
        self._write_lock = threading.Lock()
        # Moves on after every commit in this process that changed the
        # tokens table, so TokenCheck sees it on the next request.
        self.token_generation = 0
        self.event_head = EventHead()
        self._check_integrity()
        try:
            self._enable_wal()
            self.migrate()
            self.refresh_event_head()
        except sqlite3.DatabaseError as exc:   # not a database, unreadable, unwritable
            self.close()
            raise DatabaseError("%s is not a usable SQLite database: %s" % (path, exc)) from exc
        except StorageFault as exc:
            self.close()
            raise DatabaseError("cannot carry %s forward to schema version %d: %s"
                                % (path, SCHEMA_VERSION, exc.detail)) from exc
        except DatabaseError:
            self.close()
            raise

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves; Python's
            # implicit transactions lose updates under concurrency (design.md).
            # timeout: a writer waits its turn for the lock, within reason.
            conn = sqlite3.connect(self.path, timeout=self.lock_timeout, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA synchronous=%s" % self.synchronous)
                # The WAL grows past its usual 4 MB only while checkpoints
                # cannot finish (a long reader, a full disk); once one does,
                # the file is cut back to this size.
                conn.execute("PRAGMA journal_size_limit=%d" % WAL_SIZE_LIMIT)
            except sqlite3.Error:
                conn.close()
                raise
            conn.create_function("scim_fold", 1, _sql_fold, deterministic=True)
            self._local.conn = conn
            self._local.busy_ms = int(self.lock_timeout * 1000)
            self._local.small_cache = False
            with self._lock:
                self._connections.append(conn)
        return conn

    def use_small_cache(self):
        """This thread reads seldom and little (a feed thread: there may be
        MAX_WAITING_POLLS of them): its connection keeps a page cache of
        FEED_CACHE_KB, not SQLite's 2 MB, which 200 threads would make 400 MB."""
        if not getattr(self._local, "small_cache", False):
            self._connection().execute("PRAGMA cache_size=-%d" % FEED_CACHE_KB)
            self._local.small_cache = True

    def _discard(self, conn):
        """Close `conn` and forget it: this thread's next call opens a new one."""
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        try:
            conn.close()
        except sqlite3.Error:
            pass

    @contextlib.contextmanager
    def _ending(self, conn):
        """Whatever the block raises, `conn` leaves it outside a transaction:
        rolled back, or discarded when even ROLLBACK fails."""
        try:
            yield
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._discard(conn)
            raise

    @contextlib.contextmanager
    def _transaction(self, conn, begin, writing):
        """`begin` ... COMMIT on `conn`, ended whatever fails (_ending); a
        storage error leaves as the StorageFault `monitor` made of it."""
        try:
            with self._ending(conn):
                conn.execute(begin)
                tx = Transaction(conn)
                yield tx
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            fault = self.fault_from(exc, writing)
            if fault is None:
                raise
            raise fault from exc

    def fault_from(self, exc, writing=False):
        """The StorageFault for a storage error from sqlite3 (counted in
        `monitor`; a write's also sets its condition), or None."""
        kind = storage_fault_kind(exc)
        if kind is None:
            return None
        if kind == "io-error" and self.monitor.read_only(self.path):
            kind = "read-only"   # SQLite reports EROFS from write() as an I/O error
        return self.monitor.failed(kind, self._locked_detail() if kind == "locked" else None, writing)

    def _check_integrity(self):
        """Refuse a damaged file before anything writes to it.

        `PRAGMA quick_check` on a read-only connection: a file that fails it
        is left exactly as it was, for the admin to restore from a backup.
        """
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return
        try:
            conn = _open_read_only(self.path)
            try:
                result = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            result = [str(exc)]
        if result != ["ok"]:
            raise DatabaseError("%s fails SQLite's integrity check (%s); it was left untouched: "
                                "restore it from a backup" % (self.path, "; ".join(result[:3])))

    def _enable_wal(self, patience=30.0):
        """Switch the file to WAL once (the mode is stored in the file).

        The switch needs the database to itself, and SQLite answers "locked"
        at once rather than waiting when another connection (a second process
        opening the same new file) is in the way: try again until `patience`
        runs out.
        """
        conn = self._connection()
        deadline = time.monotonic() + patience
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if mode.lower() != "wal":
            raise DatabaseError("cannot switch %s to WAL mode (got %s)" % (self.path, mode))

    def close(self):
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def read_once(self):
        """For a single SELECT: SQLite runs one statement atomically, so it
        needs no BEGIN/COMMIT around it (two fewer calls into SQLite)."""
        return Transaction(self._connection())

    @contextlib.contextmanager
    def read(self):
        """A consistent snapshot for several SELECTs (WAL: never blocks writers)."""
        with self._transaction(self._connection(), "BEGIN", writing=False) as tx:
            yield tx

    @contextlib.contextmanager
    def write(self, wait=None):
        """One write transaction: committed if the block ends, rolled back if it raises.

        It waits at most `wait` seconds (default: lock_timeout) for the write
        lock: first for this process's writers ahead of it, then for
        SQLite's, which another process may hold. Then StorageFault
        "locked"; below the free-space floor, StorageFault "full" at once.
        """
        if getattr(self._local, "writing", False):
            raise RuntimeError("Store.write() inside Store.write(): the write lock is not reentrant")
        wait = self.lock_timeout if wait is None else wait
        self.monitor.check_space()
        deadline = time.monotonic() + wait
        if not self._write_lock.acquire(timeout=wait):
            raise self.monitor.failed("locked", self._locked_detail())
        self._local.writing = True
        try:
            conn = self._writing_connection(wait, deadline - time.monotonic())
            with self._transaction(conn, "BEGIN IMMEDIATE", writing=True) as tx:
                yield tx
            if tx.tokens_changed:
                self.token_generation += 1
            if tx.events_appended:
                self.event_head.advance(tx.last_event_seq, tx.events_appended)
        finally:
            self._local.writing = False
            self._write_lock.release()
        self.monitor.succeeded()

    def _writing_connection(self, wait, remaining):
        """This thread's connection, its busy handler set to wait `wait`
        seconds for SQLite's lock, or what is left of them after queueing
        behind this process's writers."""
        milliseconds = int(1000 * (wait if remaining > wait - 0.05 else max(0.0, remaining)))
        try:
            conn = self._connection()
            if self._local.busy_ms != milliseconds:
                conn.execute("PRAGMA busy_timeout=%d" % milliseconds)
                self._local.busy_ms = milliseconds
        except sqlite3.Error as exc:   # a new connection, on a volume that fails
            fault = self.fault_from(exc, writing=True)
            if fault is None:
                raise
            raise fault from exc
        return conn

    def refresh_event_head(self):
        """Read the newest event's number from the file (at start, after a restore)."""
        self.event_head.reset(self.read_once().event_bounds()[1])

    def _locked_detail(self):
        return ("the database is locked by another process (a backup, Litestream, an sqlite3 shell) for "
                "longer than %g s: nothing was changed; retry later" % self.lock_timeout)

    def probe(self):
        """While writes fail, try a one-row write (on the activity log's
        thread, every ACTIVITY_FLUSH_SECONDS), so that the condition clears
        as soon as the fault ends even when no client writes; after a full
        disk, once space is back. Then the WAL that grew while checkpoints
        failed is folded back (PASSIVE: it never waits)."""
        condition = self.monitor.condition
        if condition is None or condition == "full" and not self.monitor.space_is_back():
            return
        try:
            with self.write(wait=STORAGE_PROBE_WAIT) as tx:
                tx.touch_health(utc_now())
            conn = self._connection()
            with self._ending(conn):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except (StorageFault, sqlite3.Error):
            pass

    def backup_to(self, destination):
        """VACUUM INTO `destination`: a compact, consistent copy."""
        conn = self._connection()
        with self._ending(conn):
            conn.execute("VACUUM INTO ?", (destination,))

    def restore_from(self, source):
        """Overwrite this database with `source`'s pages through SQLite's
        backup API: one transaction, through the WAL, so no reader ever
        sees half of it and no stale -wal file can be replayed over it."""
        conn = self._connection()
        with self._write_lock, self._ending(conn), contextlib.closing(_open_read_only(source)) as backup:
            backup.backup(conn)
        self.token_generation += 1   # other threads' token caches are stale

    def checkpoint(self):
        """Copy the WAL into the database file and truncate it (at shutdown,
        so the .db file alone is complete)."""
        conn = self._connection()
        with self._ending(conn):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def migrate(self):
        """Carry the database forward to SCHEMA_VERSION, one transaction per step.

        `executescript` would commit behind our back, so statements run one
        at a time; `PRAGMA user_version` is transactional and is bumped in the
        migration's own transaction (design.md §2). A database already at
        SCHEMA_VERSION is only read: it opens on a full or read-only disk.
        """
        if self.read_once().schema_version() == SCHEMA_VERSION:
            return
        while True:
            with self.write() as tx:
                # Read under the write lock: another process (`token create`
                # while `serve` starts) may have migrated in the meantime.
                version = tx.schema_version()
                if version > SCHEMA_VERSION:
                    raise DatabaseError("%s has schema version %d; this scim-appliance knows up to %d"
                                        % (self.path, version, SCHEMA_VERSION))
                if version == SCHEMA_VERSION:
                    return
                for statement in MIGRATIONS[version]:
                    tx.conn.execute(statement)
                tx.conn.execute("PRAGMA user_version=%d" % (version + 1))


def _open_read_only(path):
    """A read-only connection: nothing done through it can change the file."""
    return sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)), uri=True, timeout=30)


def _sql_fold(value):
    return fold(value) if isinstance(value, str) else value


class Transaction:
    """The SQL for resources, members and tokens, run on one open transaction."""

    def __init__(self, conn):
        self.conn = conn
        self.tokens_changed = False   # the set of live tokens changed (Store.write reads it)
        self.events_appended = 0      # events this transaction appended (Store.write reads it) ...
        self.last_event_seq = 0       # ... and the sequence number of the last

    # -- users and groups ---------------------------------------------------

    def insert_resource(self, table, row):
        names = ", ".join(row)
        marks = ", ".join("?" * len(row))
        try:
            self.conn.execute("INSERT INTO %s (%s) VALUES (%s)" % (table, names, marks),
                              tuple(row.values()))
        except sqlite3.IntegrityError as exc:
            raise _conflict_from(exc) from exc

    def update_resource(self, table, current, row):
        """Store `row`'s columns over those of `current`, the row as read."""
        # Only the columns whose value changed are assigned: SQLite rewrites
        # an index's entries whenever an UPDATE assigns one of its columns,
        # even to the value it has, and every page that touches is written
        # to the WAL at commit. Never `SET id`: with foreign keys on,
        # assigning a parent key (even its own value) makes SQLite check
        # every members row of the group, so a group PATCH would cost the
        # size of the group.
        columns = [name for name in row if name != "id" and row[name] != current.get(name)]
        if not columns:
            return
        assignments = ", ".join("%s = ?" % name for name in columns)
        try:
            self.conn.execute("UPDATE %s SET %s WHERE id = ?" % (table, assignments),
                              tuple(row[name] for name in columns) + (current["id"],))
        except sqlite3.IntegrityError as exc:
            raise _conflict_from(exc) from exc

    def get_resource(self, table, resource_id, with_groups=False):
        """The row of one user or group (None if there is none); `with_groups`
        as for `select`."""
        rows = self.select(table, "%s.id = ?" % table, [resource_id], "%s.rowid" % table, 1, 0,
                           with_groups=with_groups)
        return rows[0] if rows else None

    def password_digest_of(self, user_id):
        row = self.conn.execute("SELECT password_digest FROM users WHERE id = ?", (user_id,)).fetchone()
        return row[0] if row else None

    def delete_resource(self, table, resource_id):
        """Delete a user or group and every membership that names it; returns
        the groups it was in (groups_containing), their versions moved on."""
        now = utc_now()
        # The groups that lose a member change too: their version moves on.
        self.conn.execute(
            "UPDATE groups SET version = version + 1, last_modified = ? "
            "WHERE id IN (SELECT group_id FROM members WHERE member_id = ?)", (now, resource_id))
        parents = self.groups_containing(resource_id)
        self.conn.execute("DELETE FROM members WHERE member_id = ?", (resource_id,))
        self.conn.execute("DELETE FROM %s WHERE id = ?" % table, (resource_id,))
        return parents

    def count(self, table, where, params):
        sql = "SELECT count(*) FROM %s WHERE %s" % (table, where)
        return self.conn.execute(sql, params).fetchone()[0]

    def select(self, table, where, params, order_by, limit, offset, with_groups=False):
        """A page of rows. With `with_groups` (users), each row also carries
        "groups": [(group_id, display_name), ...], fetched in the same statement."""
        groups = ""
        if with_groups:   # User.groups: [[group id, displayName], ...] as JSON
            groups = (", (SELECT json_group_array(json_array(id, display_name)) FROM "
                      "(SELECT g.id, g.display_name FROM members m JOIN groups g ON g.id = m.group_id "
                      "WHERE m.member_id = %s.id ORDER BY g.display_name_key)) AS groups_json" % table)
        sql = "SELECT %s.*%s FROM %s WHERE %s ORDER BY %s LIMIT ? OFFSET ?" % (
            table, groups, table, where, order_by)
        cursor = self.conn.execute(sql, tuple(params) + (limit, offset))
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor]
        if with_groups:
            for row in rows:
                pairs = row.pop("groups_json")
                row["groups"] = [tuple(pair) for pair in json.loads(pairs)] if pairs != "[]" else []
        return rows

    # -- members ------------------------------------------------------------

    def member_types(self, member_ids):
        """{id: 'User' | 'Group'} for those of `member_ids` that exist."""
        found = {}
        for chunk, marks in _chunks(member_ids):
            for (member_id,) in self.conn.execute(
                    "SELECT id FROM users WHERE id IN (%s)" % marks, chunk):
                found[member_id] = "User"
            for (member_id,) in self.conn.execute(
                    "SELECT id FROM groups WHERE id IN (%s)" % marks, chunk):
                found[member_id] = "Group"
        return found

    def members_among(self, group_id, member_ids):
        """Those of `member_ids` that are members of the group already."""
        found = set()
        for chunk, marks in _chunks(member_ids):
            found.update(member_id for (member_id,) in self.conn.execute(
                "SELECT member_id FROM members WHERE group_id = ? AND member_id IN (%s)" % marks,
                [group_id] + chunk))
        return found

    def add_members(self, group_id, typed_ids):
        """Insert (member_id, member_type) pairs that are not members yet."""
        self.conn.executemany(
            "INSERT INTO members (group_id, member_id, member_type) VALUES (?, ?, ?)",
            ((group_id, member_id, member_type) for member_id, member_type in typed_ids))

    # Each removal returns the (member_id, member_type) pairs it removed:
    # the change feed's group.member_removed events.

    def remove_members(self, group_id, member_ids):
        removed = []
        for chunk, marks in _chunks(member_ids):
            removed += self.conn.execute(
                "DELETE FROM members WHERE group_id = ? AND member_id IN (%s) RETURNING member_id, member_type"
                % marks, [group_id] + chunk).fetchall()
        return removed

    def remove_members_where(self, group_id, where, params):
        """Remove the members matching a filter translated for the members table."""
        return self.conn.execute("DELETE FROM members WHERE group_id = ? AND (%s) RETURNING member_id, member_type"
                                 % where, (group_id,) + tuple(params)).fetchall()

    def clear_members(self, group_id):
        return self.conn.execute("DELETE FROM members WHERE group_id = ? RETURNING member_id, member_type",
                                 (group_id,)).fetchall()

    def groups_containing(self, member_id):
        """The rows (id, display_name, external_id, version) of the groups `member_id` is in."""
        return self.conn.execute("SELECT g.id, g.display_name, g.external_id, g.version FROM members m "
                                 "JOIN groups g ON g.id = m.group_id WHERE m.member_id = ?", (member_id,)).fetchall()

    def member_types_of(self, group_id):
        """{member id: 'User' | 'Group'} of a group's members."""
        return dict(self.conn.execute("SELECT member_id, member_type FROM members WHERE group_id = ?",
                                      (group_id,)))

    def group_members(self, group_id):
        """Every member of a group with its display name, in a stable order."""
        return [member for batch in self.group_member_batches(group_id) for member in batch]

    def group_member_batches(self, group_id, size=1000):
        """The members as group_members gives them, `size` at a time, so a
        100,000-member group is never all in memory at once."""
        cursor = self.conn.execute(
            "SELECT m.member_id, m.member_type, coalesce(u.display_name, g.display_name) "
            "FROM members m "
            "LEFT JOIN users u ON m.member_type = 'User' AND u.id = m.member_id "
            "LEFT JOIN groups g ON m.member_type = 'Group' AND g.id = m.member_id "
            "WHERE m.group_id = ? ORDER BY m.member_id", (group_id,))
        while True:
            batch = cursor.fetchmany(size)
            if not batch:
                return
            yield batch

    def groups_of(self, member_ids):
        """{member_id: [(group_id, display_name), ...]} for User.groups."""
        result = {member_id: [] for member_id in member_ids}
        for chunk, marks in _chunks(member_ids):
            for member_id, group_id, display_name in self.conn.execute(
                    "SELECT m.member_id, g.id, g.display_name FROM members m "
                    "JOIN groups g ON g.id = m.group_id WHERE m.member_id IN (%s) "
                    "ORDER BY g.display_name_key" % marks, chunk):
                result[member_id].append((group_id, display_name))
        return result

    # -- tokens -------------------------------------------------------------

    def insert_token(self, name, digest, created, hint=None, expires=None, scope="provision"):
        try:
            self.conn.execute("INSERT INTO tokens (name, digest, created, hint, expires, scope) "
                              "VALUES (?, ?, ?, ?, ?, ?)", (name, digest, created, hint, expires, scope))
        except sqlite3.IntegrityError as exc:
            raise ValueError("a token named %r already exists" % name) from exc
        self.tokens_changed = True

    def data_version(self):
        """Changes whenever another connection (another thread, or another
        process such as `token revoke`) has committed: a cheap "has anything
        changed since?". This connection's own commits do not move it."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def live_tokens(self):
        """(name, digest, expires, scope) of every token that has not been revoked."""
        return self.conn.execute(
            "SELECT name, digest, expires, scope FROM tokens WHERE revoked IS NULL").fetchall()

    def list_tokens(self):
        """Every token, oldest first, as dicts (never the token itself: it is not stored)."""
        cursor = self.conn.execute(
            "SELECT name, hint, created, last_used, expires, revoked, scope FROM tokens ORDER BY created, rowid")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def token_names(self):
        """{name: scope} of the live tokens."""
        return dict(self.conn.execute("SELECT name, scope FROM tokens WHERE revoked IS NULL"))

    def last_token_use(self):
        """(last_used, name) of the most recently used token, or None."""
        return self.conn.execute("SELECT last_used, name FROM tokens WHERE last_used IS NOT NULL "
                                 "ORDER BY last_used DESC LIMIT 1").fetchone()

    def revoke_token(self, name, now):
        revoked = self.conn.execute("UPDATE tokens SET revoked = ? WHERE name = ? AND revoked IS NULL",
                                    (now, name)).rowcount
        self.tokens_changed = self.tokens_changed or revoked > 0
        return revoked

    def touch_token(self, digest, now):
        self.conn.execute("UPDATE tokens SET last_used = ? WHERE digest = ?", (now, digest))

    # -- the change feed ------------------------------------------------------

    EVENT_COLUMNS = ("event_id", "time", "type", "event_uri", "resource_type", "resource_id", "external_id",
                     "version", "txn", "token_name", "attributes", "data")

    INSERT_EVENT = "INSERT INTO events (%s) VALUES (%s)" % (", ".join(EVENT_COLUMNS),
                                                            ", ".join("?" * len(EVENT_COLUMNS)))

    def append_events(self, events):
        """Append event rows (tuples in EVENT_COLUMNS order), numbered in commit order."""
        if len(events) == 1:   # most writes: one statement, and its rowid comes with it
            self.last_event_seq = self.conn.execute(self.INSERT_EVENT, events[0]).lastrowid
        else:
            self.conn.executemany(self.INSERT_EVENT, events)
            self.last_event_seq = self.conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        self.events_appended += len(events)

    def append_member_events(self, columns, group_display, members):
        """Append a group.member_added or _removed event per (member id,
        member type) pair in `members`, numbered in their order: `columns`
        are EVENT_COLUMNS from time to token_name, the same for all. One
        statement: SQLite makes each event's id and data, a thousand in a
        millisecond, where Python took five."""
        self.conn.execute(
            "WITH batch(position, event_id, member_id, member_type) AS MATERIALIZED ("
            "  SELECT key, lower(hex(randomblob(16))), json_extract(value, '$[0]'), json_extract(value, '$[1]')"
            "  FROM json_each(?)) "
            "INSERT INTO events (%s) SELECT event_id, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, "
            "json_object('group', json_object('value', ?, 'display', ?), "
            "            'member', json_object('value', member_id, 'type', member_type)) "
            "FROM batch ORDER BY position" % ", ".join(self.EVENT_COLUMNS),
            (json_text(members),) + tuple(columns) + (columns[4], group_display))
        self.last_event_seq = self.conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        self.events_appended += len(members)

    def event_bounds(self):
        """(oldest, newest) sequence numbers kept; (0, 0) before the first event."""
        # Two subqueries: SQLite reads min() or max() of a rowid from one end
        # of the table only when it is a query's sole aggregate; together
        # they scan every event.
        oldest, newest = self.conn.execute(
            "SELECT (SELECT min(seq) FROM events), (SELECT max(seq) FROM events)").fetchone()
        return oldest or 0, newest or 0

    def event_id_at(self, seq):
        """The id of event `seq`, or None if it is not kept."""
        row = self.conn.execute("SELECT event_id FROM events WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row else None

    def event_time_at(self, seq):
        row = self.conn.execute("SELECT time FROM events WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row else None

    def events_after(self, seq, limit):
        """[(seq, event_id, event JSON)] of the first `limit` events after `seq`."""
        return self.conn.execute("SELECT seq, event_id, event FROM scim_events WHERE seq > ? ORDER BY seq LIMIT ?",
                                 (seq, limit)).fetchall()

    def prune_events(self, before, batch):
        """Delete up to `batch` of the oldest events, those older than `before`
        (a UTC dateTime) and never the newest: what is left always starts
        where the deleted part ended, with no gap, and the newest event
        stays to vouch for the head's cursor. Returns how many went."""
        rows = self.conn.execute("SELECT seq, time FROM events ORDER BY seq LIMIT ?", (batch + 1,)).fetchall()
        last = None
        for seq, time_text in rows[:min(batch, len(rows) - 1)]:   # the newest never goes
            if time_text >= before:
                break
            last = seq
        if last is None:
            return 0
        return self.conn.execute("DELETE FROM events WHERE seq <= ?", (last,)).rowcount

    # -- health, backups and data out ------------------------------------------

    def touch_health(self, now):
        """A one-row write: shows the database takes writes again (Store.probe)."""
        self.conn.execute("INSERT INTO health (id, checked) VALUES (1, ?) "
                          "ON CONFLICT (id) DO UPDATE SET checked = excluded.checked", (now,))

    def view_rows(self, view, size=1000):
        """(column names, batches of rows) of one of the stable views, `size`
        rows at a time: an export of 100,000 users never holds them all."""
        cursor = self.conn.execute("SELECT * FROM %s" % view)   # in storage order: no sort to hold
        names = [d[0] for d in cursor.description]

        def batches():
            while True:
                batch = cursor.fetchmany(size)
                if not batch:
                    return
                yield batch
        return names, batches()

    def all_rows(self, table, size=1000):
        """Every row of `users` or `groups` (as `select` gives them), `size` at a time."""
        cursor = self.conn.execute("SELECT * FROM %s ORDER BY rowid" % table)
        names = [d[0] for d in cursor.description]
        while True:
            batch = cursor.fetchmany(size)
            if not batch:
                return
            yield [dict(zip(names, row)) for row in batch]

    def schema_version(self):
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def integrity_problems(self):
        """PRAGMA integrity_check's findings; [] when the file is sound."""
        found = [row[0] for row in self.conn.execute("PRAGMA integrity_check")]
        return [] if found == ["ok"] else found

    # -- the admin password --------------------------------------------------

    def admin_password_digest(self):
        row = self.conn.execute("SELECT password_digest FROM admin WHERE id = 1").fetchone()
        return row[0] if row else None

    def set_admin_password_digest(self, digest, now):
        self.conn.execute("INSERT INTO admin (id, password_digest, changed) VALUES (1, ?, ?) "
                          "ON CONFLICT (id) DO UPDATE SET password_digest = excluded.password_digest, "
                          "changed = excluded.changed", (digest, now))

    # -- the activity log and request counts ------------------------------------

    ACTIVITY_COLUMNS = ("time", "token_name", "method", "resource_type", "resource_id", "resource_name",
                        "summary", "status", "scim_type", "detail")

    def insert_activity(self, entries):
        """Append activity rows: tuples in ACTIVITY_COLUMNS order."""
        self.conn.executemany("INSERT INTO activity (%s) VALUES (%s)" % (
            ", ".join(self.ACTIVITY_COLUMNS), ", ".join("?" * len(self.ACTIVITY_COLUMNS))), entries)

    def add_request_counts(self, counts):
        """counts: {minute: (requests, errors)}, added to what is stored."""
        self.conn.executemany(
            "INSERT INTO request_counts (minute, requests, errors) VALUES (?, ?, ?) "
            "ON CONFLICT (minute) DO UPDATE SET requests = requests + excluded.requests, "
            "errors = errors + excluded.errors",
            [(minute, requests, errors) for minute, (requests, errors) in counts.items()])

    def prune_activity(self, before, keep_rows):
        """Delete activity older than `before`, then all but the newest `keep_rows`,
        and request counts older than `before`."""
        removed = self.conn.execute("DELETE FROM activity WHERE time < ?", (before,)).rowcount
        removed += self.conn.execute(
            "DELETE FROM activity WHERE id <= (SELECT id FROM activity ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (keep_rows,)).rowcount
        self.conn.execute("DELETE FROM request_counts WHERE minute < ?", (before[:16],))
        return removed

    def search_activity(self, text=None, failed=None, limit=200):
        """The newest activity rows (dicts), optionally those naming `text`
        (a user or group name or id, case-insensitively) and only failed
        (status >= 400) or only successful ones."""
        where, params = [], []
        if text:
            where.append("(instr(lower(coalesce(resource_name, '')), ?) > 0 OR resource_id = ?)")
            params += [text.lower(), text]
        if failed is not None:
            where.append("status >= 400" if failed else "status < 400")
        cursor = self.conn.execute(
            "SELECT %s FROM activity %s ORDER BY id DESC LIMIT ?" % (
                ", ".join(self.ACTIVITY_COLUMNS), "WHERE " + " AND ".join(where) if where else ""),
            params + [limit])
        return [dict(zip(self.ACTIVITY_COLUMNS, row)) for row in cursor]

    def request_totals(self, since):
        """(requests, errors) counted from the minute of `since` (a UTC dateTime) on."""
        return tuple(self.conn.execute("SELECT coalesce(sum(requests), 0), coalesce(sum(errors), 0) "
                                       "FROM request_counts WHERE minute >= ?", (since[:16],)).fetchone())

    def resource_names(self, table, ids):
        """{id: userName or displayName} of those `ids` that exist."""
        column = "user_name" if table == "users" else "display_name"
        found = {}
        for chunk, marks in _chunks(ids):
            found.update(self.conn.execute("SELECT id, %s FROM %s WHERE id IN (%s)" % (column, table, marks),
                                           chunk).fetchall())
        return found

    def resource_counts(self):
        """{"active_users", "inactive_users", "groups"}; a user without `active` counts as active."""
        active, inactive = self.conn.execute(
            "SELECT count(*) - count(CASE WHEN active = 0 THEN 1 END), count(CASE WHEN active = 0 THEN 1 END) "
            "FROM users").fetchone()
        groups = self.conn.execute("SELECT count(*) FROM groups").fetchone()[0]
        return {"active_users": active, "inactive_users": inactive, "groups": groups}


def _chunks(ids, size=500):
    """(chunk, "?, ?, ...") pairs for `WHERE id IN (...)` within SQLite's
    limit on parameters per statement."""
    ids = list(ids)
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        yield chunk, ", ".join("?" * len(chunk))


def _conflict_from(exc):
    """The 409 for a UNIQUE constraint a write ran into (any other integrity
    error is a bug and is re-raised as it is)."""
    if "user_name_key" in str(exc):
        return ScimError(409, "uniqueness", "userName is already taken (compared case-insensitively)")
    if "display_name_key" in str(exc):
        return ScimError(409, "uniqueness", "a group with this displayName already exists")
    if "PRIMARY KEY" in str(exc) or ".id" in str(exc):
        return ScimError(409, "uniqueness", "a resource with this id already exists")
    raise exc


def new_resource_id():
    """A new resource id: a UUIDv7 (RFC 9562 §5.7), 48 bits of Unix time in
    milliseconds, then 74 random bits.

    RFC 7643 §3.1 leaves the id to the service provider. Time-ordered ids
    give "improved database index locality" (RFC 9562 §6.2): a new user's
    id lands at the end of the id index instead of on a random page, and
    members added in the order they were created are inserted side by side
    in the members table, so each commit writes a few pages, not one or two
    per row. The random part keeps ids unguessable; creation time is no
    secret (meta.created shows it).
    """
    value = (time.time_ns() // 1000000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76      # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62      # variant 10 (RFC 9562 §4.1)
    return str(uuid.UUID(int=value))


# ============================================================================
# 4. Credentials
# ============================================================================

TOKEN_PREFIX = "scimapp_"


def generate_token():
    """A new bearer token: 256 bits from `secrets`, with a recognisable prefix
    so secret scanners and admins can tell what it is."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token):
    """What is stored for a token: its SHA-256. A 256-bit random secret needs
    no salt or stretching; the digest is useless to whoever reads the file."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_hint(token):
    """What the admin page shows of a token: its prefix and 4 characters of
    the secret (24 of its 256 bits), enough to tell tokens apart."""
    return token[:len(TOKEN_PREFIX) + 4]


def match_token(presented, live_tokens):
    """The (name, digest, expires) row of the live token equal to `presented`, or None.

    Every digest is compared with hmac.compare_digest, and the loop does not
    stop at the first match, so the time taken says nothing about the tokens.
    """
    digest = token_digest(presented)
    found = None
    for row in live_tokens:
        if hmac.compare_digest(digest, row[1]):
            found = row
    return found


def password_digest(password):
    """A salted scrypt hash, for User.password (writeOnly, RFC 7643 §4.1.1)
    and the admin password; the password itself is never stored."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2 ** 14, r=8, p=1, maxmem=2 ** 26)
    return "scrypt$16384$8$1$%s$%s" % (base64.b64encode(salt).decode(), base64.b64encode(key).decode())


def verify_password(password, digest):
    """Whether `password` hashes to `digest` (from password_digest), compared in constant time."""
    try:
        scheme, n, r, p, salt, key = digest.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                p=int(p), maxmem=2 ** 26, dklen=len(expected))
    except (ValueError, TypeError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(actual, expected)


def generate_setup_code():
    """The one-time code printed at first start, to prove the first visitor
    of the admin page can read the server's console: 60 random bits."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"   # no 0/O or 1/I to misread
    code = "".join(secrets.choice(alphabet) for _ in range(12))
    return "-".join(code[k:k + 4] for k in range(0, 12, 4))


# ============================================================================
# 5. SCIM model
# ============================================================================
#
# One declarative table of attributes (RFC 7643 §2.2 characteristics) drives
# input validation, filter and PATCH path resolution, projection and the
# /Schemas endpoint. Nothing else describes the schema.

@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    type: str = "string"            # string boolean decimal integer dateTime reference complex binary
    multi_valued: bool = False
    required: bool = False
    case_exact: bool = False
    mutability: str = "readWrite"   # readOnly readWrite immutable writeOnly
    returned: str = "default"       # always never default request
    uniqueness: str = "none"        # none server global
    description: str = ""
    sub_attributes: tuple = ()
    canonical_values: tuple = ()
    reference_types: tuple = ()

    def sub(self, name):
        """The sub-attribute called `name` (case-insensitive, RFC 7643 §2.1), or None."""
        return self._subs_by_key.get(name.lower())

    @functools.cached_property
    def _subs_by_key(self):
        return _by_folded_name(self.sub_attributes)

    def to_json(self):
        """The attribute's definition as RFC 7643 §7 publishes it."""
        body = {
            "name": self.name, "type": self.type, "multiValued": self.multi_valued,
            "description": self.description, "required": self.required,
            "caseExact": self.case_exact, "mutability": self.mutability,
            "returned": self.returned, "uniqueness": self.uniqueness,
        }
        if self.canonical_values:
            body["canonicalValues"] = list(self.canonical_values)
        if self.reference_types:
            body["referenceTypes"] = list(self.reference_types)
        if self.sub_attributes:
            body["subAttributes"] = [sub.to_json() for sub in self.sub_attributes]
        return body


@dataclasses.dataclass(frozen=True)
class Schema:
    id: str
    name: str
    description: str
    attributes: tuple

    def attribute(self, name):
        """The attribute called `name` (case-insensitive), or None."""
        return self._attributes_by_key.get(name.lower())

    @functools.cached_property
    def _attributes_by_key(self):
        return _by_folded_name(self.attributes)


def _by_folded_name(attributes):
    """{lower-cased name: attribute}: the lookup table of a schema or a
    complex attribute (every request resolves names through it)."""
    return {attribute.name.lower(): attribute for attribute in reversed(attributes)}


def _multi(name, description, types=(), value_type="string", value_required=False,
           mutability="readWrite", extra=()):
    """The usual shape of a multi-valued complex attribute: value, display, type, primary."""
    return Attribute(name, "complex", multi_valued=True, description=description,
                     mutability=mutability, sub_attributes=(
                         Attribute("value", value_type, required=value_required,
                                   reference_types=("external",) if value_type == "reference" else (),
                                   description="The attribute's significant value."),
                         Attribute("display", description="A human-readable name, primarily used "
                                   "for display purposes."),
                         Attribute("type", canonical_values=types,
                                   description="A label indicating the attribute's function."),
                         Attribute("primary", "boolean", description="Indicates the 'primary' or "
                                   "preferred attribute value for this attribute."),
                     ) + tuple(extra))


# Attributes every resource has (RFC 7643 §3.1). `id` and `meta` are the
# server's; `externalId` is the client's (Entra maps objectId or mailNickname).
COMMON_ATTRIBUTES = (
    Attribute("id", case_exact=True, mutability="readOnly", returned="always",
              uniqueness="server", description="Unique identifier for the resource, "
              "assigned by the service provider."),
    Attribute("externalId", case_exact=True, description="An identifier for the resource as "
              "defined by the provisioning client."),
    Attribute("meta", "complex", mutability="readOnly", description="Resource metadata.",
              sub_attributes=(
                  Attribute("resourceType", case_exact=True, mutability="readOnly",
                            description="The name of the resource type of the resource."),
                  Attribute("created", "dateTime", mutability="readOnly",
                            description="When the resource was added to the service provider."),
                  Attribute("lastModified", "dateTime", mutability="readOnly",
                            description="When the resource was last modified."),
                  Attribute("location", "reference", case_exact=True, mutability="readOnly",
                            reference_types=("uri",), description="The URI of the resource."),
                  Attribute("version", case_exact=True, mutability="readOnly",
                            description="The version of the resource, a weak entity tag."),
              )),
)
COMMON_ATTRIBUTES_BY_KEY = _by_folded_name(COMMON_ATTRIBUTES)

USER_SCHEMA = Schema(URN_USER, "User", "User Account", (
    Attribute("userName", required=True, uniqueness="server",
              description="Unique identifier for the User, typically used by the user to "
              "directly authenticate to the service provider. Compared case-insensitively."),
    Attribute("name", "complex", description="The components of the user's real name.",
              sub_attributes=tuple(
                  Attribute(sub, description=text) for sub, text in (
                      ("formatted", "The full name, formatted for display."),
                      ("familyName", "The family name of the User."),
                      ("givenName", "The given name of the User."),
                      ("middleName", "The middle name(s) of the User."),
                      ("honorificPrefix", "The honorific prefix(es) of the User."),
                      ("honorificSuffix", "The honorific suffix(es) of the User.")))),
    Attribute("displayName", description="The name of the User, suitable for display to end-users."),
    Attribute("nickName", description="The casual way to address the user in real life."),
    Attribute("profileUrl", "reference", reference_types=("external",),
              description="A fully qualified URL pointing to a page representing the User's "
              "online profile."),
    Attribute("title", description="The user's title, such as \"Vice President\"."),
    Attribute("userType", description="Used to identify the relationship between the "
              "organization and the user."),
    Attribute("preferredLanguage", description="The User's preferred written or spoken language."),
    Attribute("locale", description="Used to indicate the User's default location."),
    Attribute("timezone", description="The User's time zone in the 'Olson' time zone database format."),
    Attribute("active", "boolean", description="A Boolean value indicating the User's "
              "administrative status."),
    Attribute("password", mutability="writeOnly", returned="never",
              description="The User's cleartext password. Write-only: never returned, "
              "stored only as a salted hash."),
    _multi("emails", "Email addresses for the user.", ("work", "home", "other")),
    _multi("phoneNumbers", "Phone numbers for the User.",
           ("work", "home", "mobile", "fax", "pager", "other")),
    _multi("ims", "Instant messaging addresses for the User.",
           ("aim", "gtalk", "icq", "xmpp", "msn", "skype", "qq", "yahoo")),
    _multi("photos", "URLs of photos of the User.", ("photo", "thumbnail"), value_type="reference"),
    Attribute("addresses", "complex", multi_valued=True,
              description="A physical mailing address for this User.", sub_attributes=tuple(
                  Attribute(sub, description=text) for sub, text in (
                      ("formatted", "The full mailing address, formatted for display."),
                      ("streetAddress", "The full street address component."),
                      ("locality", "The city or locality component."),
                      ("region", "The state or region component."),
                      ("postalCode", "The zip code or postal code component."),
                      ("country", "The country name component."))) + (
                  Attribute("type", canonical_values=("work", "home", "other"),
                            description="A label indicating the attribute's function."),
                  Attribute("primary", "boolean", description="Indicates the 'primary' or "
                            "preferred attribute value for this attribute."))),
    Attribute("groups", "complex", multi_valued=True, mutability="readOnly",
              description="A list of groups to which the user belongs. Read-only: "
              "computed from group memberships.", sub_attributes=(
                  Attribute("value", mutability="readOnly", description="The identifier of the User's group."),
                  Attribute("$ref", "reference", mutability="readOnly",
                            reference_types=("User", "Group"),
                            description="The URI of the corresponding 'Group' resource."),
                  Attribute("display", mutability="readOnly", description="The group's displayName."),
                  Attribute("type", mutability="readOnly", canonical_values=("direct", "indirect"),
                            description="How the membership was derived."))),
    _multi("entitlements", "A list of entitlements for the User."),
    _multi("roles", "A list of roles for the User."),
    _multi("x509Certificates", "A list of certificates issued to the User.", value_type="binary"),
))

ENTERPRISE_USER_SCHEMA = Schema(URN_ENTERPRISE, "EnterpriseUser", "Enterprise User", (
    Attribute("employeeNumber", description="Numeric or alphanumeric identifier assigned to a "
              "person, typically based on order of hire or association with an organization."),
    Attribute("costCenter", description="Identifies the name of a cost center."),
    Attribute("organization", description="Identifies the name of an organization."),
    Attribute("division", description="Identifies the name of a division."),
    Attribute("department", description="Identifies the name of a department."),
    Attribute("manager", "complex", description="The User's manager. Entra sends the manager's "
              "id as a plain string; it is returned as {\"value\": id}.", sub_attributes=(
                  Attribute("value", case_exact=True, description="The id of the SCIM resource "
                            "representing the User's manager."),
                  Attribute("$ref", "reference", reference_types=("User",),
                            description="The URI of the SCIM resource representing the User's manager."),
                  Attribute("displayName", mutability="readOnly",
                            description="The displayName of the User's manager."))),
))

GROUP_SCHEMA = Schema(URN_GROUP, "Group", "Group", (
    Attribute("displayName", required=True, uniqueness="server",
              description="A human-readable name for the Group. Unique (compared "
              "case-insensitively), as Microsoft Entra ID requires."),
    Attribute("members", "complex", multi_valued=True, description="A list of members of the Group.",
              sub_attributes=(
                  Attribute("value", case_exact=True, mutability="immutable",
                            description="Identifier of the member of this Group."),
                  Attribute("$ref", "reference", mutability="immutable", reference_types=("User", "Group"),
                            description="The URI corresponding to a SCIM resource that is a member "
                            "of this Group."),
                  Attribute("display", mutability="readOnly",
                            description="The member's displayName."),
                  Attribute("type", mutability="immutable", canonical_values=("User", "Group"),
                            description="A label indicating the type of resource, e.g., 'User' or 'Group'."))),
))


@dataclasses.dataclass(frozen=True)
class ResourceType:
    name: str
    endpoint: str
    table: str
    schema: Schema
    extensions: tuple          # (Schema, required)
    description: str

    @functools.cached_property
    def schemas(self):
        return (self.schema,) + tuple(ext for ext, _ in self.extensions)

    def schema_by_urn(self, urn):
        return self._schemas_by_key.get(urn.lower())

    @functools.cached_property
    def _schemas_by_key(self):
        return {schema.id.lower(): schema for schema in self.schemas}


USER = ResourceType("User", "/Users", "users", USER_SCHEMA, ((ENTERPRISE_USER_SCHEMA, False),),
                    "User Account")
GROUP = ResourceType("Group", "/Groups", "groups", GROUP_SCHEMA, (), "Group")
RESOURCE_TYPES = {"User": USER, "Group": GROUP}
ALL_SCHEMAS = (USER_SCHEMA, ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA)


@dataclasses.dataclass(frozen=True)
class AttributePath:
    """A resolved attribute reference: schema, attribute and optional sub-attribute.

    `schema` is None for a custom extension Entra sent that we have no
    schema for; then `attribute` is a synthetic string attribute.
    """

    urn: str                  # the schema URN the attribute lives in
    attribute: Attribute
    sub_attribute: Attribute = None
    core: bool = True         # lives at the top level of the document (not in an extension object)

    @property
    def target(self):
        return self.sub_attribute or self.attribute

    @property
    def key(self):
        """Folded dotted name, e.g. 'name.givenname' or 'urn:...:user:manager.value'."""
        name = self.attribute.name.lower()
        if not self.core:
            name = self.urn.lower() + ":" + name
        if self.sub_attribute:
            name += "." + self.sub_attribute.name.lower()
        return name


ATTRIBUTE_NAME = re.compile(r"^\$?[A-Za-z][\w\-]*$", re.ASCII)   # RFC 7643 §2.1 ATTRNAME


def split_attribute_path(text):
    """'urn:...:User:name.givenName' → ('urn:...:User', 'name', 'givenName').

    RFC 7644 §3.10: "attrPath = [URI ":"] ATTRNAME *1subAttr". Attribute
    names hold no ':', so the URI is everything before the last one.
    """
    urn = None
    if ":" in text:
        urn, _, text = text.rpartition(":")
    name, _, sub = text.partition(".")
    if not ATTRIBUTE_NAME.match(name) or (sub and not ATTRIBUTE_NAME.match(sub)) or "." in sub:
        return None
    return urn, name, sub or None


def resolve_path(resource_type, text):
    """An attribute path as written ('name.givenName', 'urn:...:User:manager')
    resolved against `resource_type`, custom extensions allowed; None if unknown."""
    return _resolve_path(resource_type.name, text)


# Every filter, PATCH operation and projection resolves its paths, and the
# answer depends on nothing else: a few hundred of them are kept. (Keyed by
# the type's name: hashing the ResourceType itself hashes its whole schema.)
@functools.lru_cache(maxsize=512)
def _resolve_path(type_name, text):
    parts = split_attribute_path(text)
    return parts and resolve_attribute(RESOURCE_TYPES[type_name], *parts, custom_ok=True)


def resolve_attribute(resource_type, urn, name, sub=None, custom_ok=False):
    """Bind a parsed attribute name to the model; None when it names nothing.

    An unqualified name is looked up in the core schema first, then in the
    extensions (Entra sends `manager` unqualified, [TUT Example 5]). With
    `custom_ok`, an unknown extension URN (Entra's custom mappings, e.g.
    urn:ietf:params:scim:schemas:extension:CustomExtension:2.0:User:costCode)
    resolves to a free-form attribute kept in that extension's object.
    """
    if urn is not None:
        schema = resource_type.schema_by_urn(urn)
        if schema is None:
            # "urn:...:enterprise:2.0:User" names a schema, not attribute
            # "User" of a custom "urn:...:enterprise:2.0".
            if custom_ok and sub is None and is_custom_extension(resource_type, urn) \
                    and resource_type.schema_by_urn(urn + ":" + name) is None:
                return AttributePath(urn, Attribute(name, case_exact=False), None, core=False)
            return None
        candidates = [schema]
    else:
        candidates = resource_type.schemas
    for schema in candidates:
        attribute = schema.attribute(name)
        if attribute is None:
            attribute = COMMON_ATTRIBUTES_BY_KEY.get(name.lower()) if schema is resource_type.schema else None
        if attribute is None:
            continue
        sub_attribute = None
        if sub is not None:
            sub_attribute = attribute.sub(sub)
            if sub_attribute is None:
                return None
        return AttributePath(schema.id, attribute, sub_attribute, core=schema is resource_type.schema)
    return None


# -- input values ------------------------------------------------------------
#
# RFC 7643 §2.3 data types. Values are stored as they were sent (R33): a
# phone number or a userName keeps its exact text. Entra's deviations are
# accepted here, once, for every way a value can arrive: booleans as
# "True"/"False" (R18), the manager as a plain id string or a one-element
# list (R25, R27), nulls meaning "unassigned" (RFC 7643 §2.5, R7).

# "\ud800" alone is valid JSON text but no Unicode text: it cannot be stored or sent as UTF-8.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$", re.ASCII)


def invalid_value(where, expected, value, attribute=None):
    """400 invalidValue naming what was expected. A writeOnly value (a
    password) is never repeated: Entra copies error details into its logs."""
    if attribute is not None and attribute.mutability == "writeOnly":
        return ScimError(400, "invalidValue", "%s must be %s" % (where, expected))
    shown = json.dumps(value, ensure_ascii=True)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ScimError(400, "invalidValue", "%s must be %s, got %s" % (where, expected, shown))


def coerce_value(attribute, value, where):
    """Validate one attribute value and return it in stored form (None = unassigned)."""
    if value is None:
        return None
    if attribute.multi_valued:
        values = value if isinstance(value, list) else [value]
        result = [v for v in (coerce_single(attribute, item, where) for item in values) if v is not None]
        if attribute.type == "complex" and sum(1 for v in result if v.get("primary") is True) > 1:
            raise ScimError(400, "invalidValue", "%s: the primary attribute value 'true' must appear "
                            "no more than once (RFC 7643 §2.4)" % where)
        return result or None
    if isinstance(value, list) and attribute.type == "complex" and len(value) == 1:
        value = value[0]   # Entra's manager as [{"value": id, "$ref": ...}] (R27)
    return coerce_single(attribute, value, where)


def coerce_single(attribute, value, where):
    if value is None:
        return None
    kind = attribute.type
    if kind == "complex":
        if isinstance(value, str) and attribute.sub("value"):
            value = {"value": value}   # manager as a plain id string (R25)
        if not isinstance(value, dict):
            raise invalid_value(where, "an object", value, attribute)
        result = {}
        for key, item in value.items():
            sub = attribute.sub(key)
            if sub is None or sub.mutability == "readOnly":
                continue   # e.g. "$ref": null or "display" on a member: not the client's to set
            item = coerce_single(sub, item, "%s.%s" % (where, sub.name))
            if item is not None:
                result[sub.name] = item
        return result or None
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"   # Entra's "True"/"False" (R18)
        raise invalid_value(where, "a boolean", value, attribute)
    if kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise invalid_value(where, "an integer", value, attribute)
    if kind == "decimal":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise invalid_value(where, "a number", value, attribute)
    if not isinstance(value, str):
        raise invalid_value(where, "a string", value, attribute)
    if kind == "dateTime" and not DATE_TIME.match(value):
        raise invalid_value(where, "an xsd:dateTime such as 2008-01-23T04:56:22Z", value, attribute)
    if kind == "binary":
        try:
            base64.b64decode(value, validate=True)
        except ValueError:
            raise invalid_value(where, "base64-encoded binary", value, attribute) from None
    return value


def coerce_custom(value, where):
    """A value under a custom extension URN we have no schema for: any JSON
    but nulls, which mean unassigned."""
    if isinstance(value, dict):
        result = {k: coerce_custom(v, where) for k, v in value.items() if v is not None}
        return {k: v for k, v in result.items() if v is not None} or None
    if isinstance(value, list):
        items = (coerce_custom(v, where) for v in value)
        return [item for item in items if item is not None] or None
    return value


def coerce_members(value):
    """Group members as sent in POST, PUT or PATCH ({"value": id, "type"?,
    ...} each) as (id, type or None) pairs: all the members table keeps. A
    member without an id is an error, not something to drop. Each member is
    checked as a whole and only its pair kept, so that 100,000 members are
    never 100,000 more dicts."""
    attribute = GROUP_SCHEMA.attribute("members")
    values = value if isinstance(value, list) else [value]
    if len(values) > MAX_MEMBERS:
        raise ScimError(400, "tooMany", "at most %d members in one request" % MAX_MEMBERS)
    members = []
    for item in values:
        if isinstance(item, str):
            item = {"value": item}
        member = coerce_single(attribute, item, "members")
        if not member or not isinstance(member.get("value"), str) or not member["value"]:
            raise ScimError(400, "invalidValue", "each member needs a \"value\" with the member's id")
        if member.get("type") not in (None, "User", "Group"):
            raise ScimError(400, "invalidValue", "member type must be User or Group")
        members.append((member["value"], member.get("type")))
    return members


# An extension URN we keep without a schema: letters, digits, '.', '-', '_'
# between colons. Nothing else, so such a URN is safe inside a JSON path.
CUSTOM_URN = re.compile(r"^urn(:[\w.\-]+)+$", re.IGNORECASE | re.ASCII)


def is_custom_extension(resource_type, urn):
    """Whether `urn` may name an extension we have no schema for: a URN that
    is neither a known schema, nor an attribute of one, nor reserved."""
    return (CUSTOM_URN.match(urn) is not None and resource_type.schema_by_urn(urn) is None
            and resource_type.schema_by_urn(urn.rpartition(":")[0]) is None
            and not urn.lower().startswith(("urn:ietf:params:scim:schemas:core:", "urn:ietf:params:scim:api:")))


def canonical_document(resource_type, body):
    """A POST or PUT body as the stored document: known attributes under their
    canonical names, extension objects under their URN, readOnly attributes
    and nulls dropped. Unknown core attributes are ignored (R34); unknown
    extension URNs are kept (Entra's custom mappings)."""
    if not isinstance(body, dict):
        raise ScimError(400, "invalidSyntax", "the request body must be a JSON object")
    document = {}
    for key, value in body.items():
        if not isinstance(key, str) or key.lower() in ("schemas", "id", "meta"):
            continue   # the server's: schemas are derived, id and meta assigned
        schema = resource_type.schema_by_urn(key)
        if schema is not None and schema is not resource_type.schema:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise invalid_value(key, "an object", value)
            extension = {}
            for name, item in value.items():
                attribute = schema.attribute(name)
                if attribute is None or attribute.mutability == "readOnly":
                    continue
                item = coerce_value(attribute, item, "%s:%s" % (schema.id, attribute.name))
                if item is not None:
                    extension[attribute.name] = item
            if extension:
                document[schema.id] = extension
            continue
        if is_custom_extension(resource_type, key) and isinstance(value, dict):
            kept = coerce_custom(value, key)
            if kept:
                document[key] = kept
            continue
        path = resolve_path(resource_type, key)
        if path is None or path.attribute.mutability == "readOnly":
            continue
        if path.sub_attribute is not None:
            continue   # dotted keys belong to PATCH; a POST body nests them
        if resource_type is GROUP and path.attribute.name == "members":
            item = coerce_members(value) if value is not None else None
        elif path.core or resource_type.schema_by_urn(path.urn) is not None:
            item = coerce_value(path.attribute, value, path.attribute.name)
        else:
            item = coerce_custom(value, key)   # a custom extension's attribute: any JSON
        if item is None:
            continue
        if path.core:
            document[path.attribute.name] = item
        else:
            document.setdefault(path.urn, {})[path.attribute.name] = item
    return document


def check_own_id(resource_id, value):
    """A client may send a resource's id back, never change it.

    RFC 7643 §3.1: "id" is "issued by the service provider" and "MUST NOT
    be specified by the client"; the schema makes it readOnly. Okta sends
    it anyway, unchanged: in its PUT of a user it just read, and in the
    path-less PATCH that renames a group ("Update a specific Group name").
    That is accepted, in PUT and PATCH alike; a different id is refused as
    RFC 7644 §3.5.1 refuses a changed immutable value: "the input value(s)
    MUST match, or HTTP status code 400 SHOULD be returned with a "scimType"
    error code of "mutability"."""
    if value != resource_id:
        raise ScimError(400, "mutability", "id is read-only: %s is not this resource's id" % json.dumps(value))


def own_id_in_body(resource_id, body):
    """check_own_id for the "id" of a PUT body, if it has one."""
    if isinstance(body, dict):
        for key, value in body.items():
            if isinstance(key, str) and key.lower() == "id":
                check_own_id(resource_id, value)


def check_required(resource_type, document):
    """RFC 7643 §2.2: required attributes; userName and displayName must be non-empty."""
    for attribute in resource_type.schema.attributes:
        if attribute.required:
            value = document.get(attribute.name)
            if not isinstance(value, str) or not value.strip():
                raise ScimError(400, "invalidValue", "%s is required" % attribute.name)


# -- output ------------------------------------------------------------------

def resource_location(base_url, resource_type, resource_id):
    return "%s%s/%s" % (base_url, resource_type.endpoint, urllib.parse.quote(resource_id, safe=""))


def opaque_tag(version):
    """The entity tag of a resource version, without the weak prefix."""
    return '"%d"' % version


def weak_etag(version):
    """meta.version and the ETag header (RFC 7644 §3.14: weak validators)."""
    return "W/" + opaque_tag(version)


def render_resource(resource_type, row, base_url, members=None, groups=None, document=None):
    """The SCIM representation of a stored row, every attribute in schema order.

    `members` (Group) and `groups` (User) come from the members table when the
    response needs them; None leaves them out. `document` is the row's
    document already parsed (a write has it in hand); the resource shares
    its values.
    """
    if document is None:
        document = json.loads(row["document"])
    schemas = [resource_type.schema.id]
    resource = {"schemas": schemas, "id": row["id"]}
    if "externalId" in document:
        resource["externalId"] = document["externalId"]
    for attribute in resource_type.schema.attributes:
        if attribute.name in document and attribute.returned != "never":
            resource[attribute.name] = document[attribute.name]
    if resource_type is USER and groups:
        resource["groups"] = [
            {"value": group_id, "$ref": resource_location(base_url, GROUP, group_id),
             "display": display_name, "type": "direct"} for group_id, display_name in groups]
    if resource_type is GROUP and members is not None:
        resource["members"] = [_render_member(base_url, member) for member in members]
    for key, value in document.items():
        if key.lower().startswith("urn:"):
            schemas.append(key)
            resource[key] = value
    manager = resource.get(URN_ENTERPRISE, {}).get("manager")
    if manager and "value" in manager and "$ref" not in manager:
        manager["$ref"] = resource_location(base_url, USER, manager["value"])
    resource["meta"] = {
        "resourceType": resource_type.name,
        "created": row["created"],
        "lastModified": row["last_modified"],
        "location": resource_location(base_url, resource_type, row["id"]),
        "version": weak_etag(row["version"]),
    }
    return resource


def _render_member(base_url, member):
    member_id, member_type, display = member
    rendered = {"value": member_id, "$ref": resource_location(base_url, RESOURCE_TYPES[member_type],
                                                            member_id), "type": member_type}
    if display is not None:
        rendered["display"] = display
    return rendered


class Projection:
    """RFC 7644 §3.4.2.5 `attributes` / `excludedAttributes` for one response.

    Keys are folded dotted names: 'username', 'name.givenname',
    'urn:...:enterprise:2.0:user:manager'. "Attributes with 'returned'
    set to 'always' ... are always returned" (id, schemas).
    """

    ALWAYS = ("schemas", "id")

    def __init__(self, resource_type, attributes=None, excluded=None):
        self.resource_type = resource_type
        self.attributes = self._keys(attributes)
        self.excluded = self._keys(excluded) if not self.attributes else set()

    def _keys(self, names):
        """Folded keys for the names given; names that match nothing are ignored."""
        keys = set()
        for name in (name.strip() for name in names or ()):
            schema = self.resource_type.schema_by_urn(name)
            if not name or schema is self.resource_type.schema:
                continue   # the whole core schema narrows nothing
            if schema is not None or is_custom_extension(self.resource_type, name):
                keys.add(name.lower())   # a whole extension
                continue
            path = resolve_path(self.resource_type, name)
            if path is not None:
                keys.add(path.key)
        return keys

    def wants(self, top_level):
        """Whether the response needs attribute `top_level` at all (members, groups)."""
        key = top_level.lower()
        if self.attributes:
            return any(k == key or k.startswith(key + ".") for k in self.attributes)
        return key not in self.excluded

    def apply(self, resource):
        if not self.attributes and not self.excluded:
            return resource
        result = {"schemas": None}
        for name, value in resource.items():
            key = name.lower()
            if key in self.ALWAYS:
                result[name] = value
            elif isinstance(value, dict) and key.startswith("urn:"):
                inner = self._filter_object(key + ":", key, value)
                if inner:
                    result[name] = inner
            else:
                kept = self._filter_attribute(key, value)
                if kept is not None:
                    result[name] = kept
        # `schemas` names the extensions the projected resource still holds.
        result["schemas"] = [urn for urn in resource["schemas"]
                             if urn == self.resource_type.schema.id or urn in result]
        return result

    def _filter_object(self, prefix, whole, value):
        if self.attributes and whole in self.attributes:
            return value
        if whole in self.excluded:
            return None
        result = {}
        for name, item in value.items():
            kept = self._filter_attribute(prefix + name.lower(), item)
            if kept is not None:
                result[name] = kept
        return result

    def apply_to(self, name, value):
        """The projection of one top-level attribute's value (None: left out)."""
        return self._filter_attribute(name.lower(), value)

    def _filter_attribute(self, key, value):
        if self.attributes:
            if key in self.attributes:
                return value
            subs = {k[len(key) + 1:] for k in self.attributes if k.startswith(key + ".")}
            if not subs:
                return None
            return self._pick(value, lambda sub: sub.lower() in subs)
        if key in self.excluded:
            return None
        subs = {k[len(key) + 1:] for k in self.excluded if k.startswith(key + ".")}
        if not subs:
            return value
        return self._pick(value, lambda sub: sub.lower() not in subs)

    @staticmethod
    def _pick(value, keep):
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if keep(k)} or None
        if isinstance(value, list):
            picked = [{k: v for k, v in item.items() if keep(k)} if isinstance(item, dict) else item
                      for item in value]
            return [p for p in picked if p] or None
        return value


# ============================================================================
# 6. Filter language
# ============================================================================
#
# RFC 7644 §3.4.2.2:
#
#   FILTER    = attrExp / logExp / valuePath / *1"not" "(" FILTER ")"
#   valuePath = attrPath "[" valFilter "]"
#   valFilter = attrExp / logExp / *1"not" "(" valFilter ")"
#   attrExp   = (attrPath SP "pr") / (attrPath SP compareOp SP compValue)
#   logExp    = FILTER SP ("and" / "or") SP FILTER
#   compValue = false / null / true / number / string
#   compareOp = "eq" / "ne" / "co" / "sw" / "ew" / "gt" / "lt" / "ge" / "le"
#
# "The operators and/or/not ... are listed in order of precedence: not,
# and, or"; "Filters MUST be evaluated using the following order of
# operations, in order of precedence: 1. Grouping operators 2. Logical
# operators 3. Attribute operators". ABNF literals are case-insensitive, so
# `EQ`, `And` and `True` are all accepted. Beyond the grammar, Entra's
# `emails[type eq "work"].value eq "x"` (R12) is a value path with a
# sub-attribute comparison.
#
# The tree: ("or", [nodes]), ("and", [nodes]), ("not", node),
# ("cmp", path, op, value), ("pr", path), ("has", path, node, sub, op, value)
# where `path` is the attribute text as written and `sub`/`op`/`value` of a
# value path are None unless a comparison follows the brackets.

COMPARE_OPERATORS = ("eq", "ne", "co", "sw", "ew", "gt", "lt", "ge", "le")

# Characters of a word (attribute path, operator, and/or/not) and of a
# string outside escapes; the one-comparison shortcut below uses them too.
_WORD_CHAR = r"[\w$:.\-]"
_PLAIN_STRING_CHAR = r'[^"\\\x00-\x1f]'

_FILTER_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:%s|\\.)*")
  | (?P<punct>[()\[\]])
  | (?P<number>-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?)(?![\w.:$])
  | (?P<word>%s+)
""" % (_PLAIN_STRING_CHAR, _WORD_CHAR), re.VERBOSE | re.ASCII)   # ASCII: "١" is a digit to \d, but not to JSON


def invalid_filter(detail):
    return ScimError(400, "invalidFilter", detail)


def _tokenize_filter(text):
    tokens = []
    position = 0
    while position < len(text):
        match = _FILTER_TOKEN.match(text, position)
        if match is None:
            if text[position] == '"':
                raise invalid_filter("unterminated string at character %d" % (position + 1))
            raise invalid_filter("unexpected character %r at position %d" % (text[position], position + 1))
        kind = match.lastgroup
        if kind != "space":
            value = match.group()
            if kind == "string":
                # The pattern admits no control character and no bare quote,
                # so a string without a backslash is its own content.
                try:
                    value = json.loads(value) if "\\" in value else value[1:-1]
                except ValueError:
                    raise invalid_filter("invalid string at position %d" % (position + 1)) from None
                if LONE_SURROGATE.search(value):
                    raise invalid_filter("unpaired surrogate escape in the string at position %d"
                                         % (position + 1))
            elif kind == "number":
                value = json.loads(value)   # the pattern is JSON's number grammar
            tokens.append((kind, value, position + 1))
        position = match.end()
    return tokens


class _FilterParser:
    def __init__(self, text):
        if len(text) > MAX_FILTER_LENGTH:
            raise invalid_filter("filter is longer than %d characters" % MAX_FILTER_LENGTH)
        self.tokens = _tokenize_filter(text)
        self.position = 0
        self.terms = 0

    def parse(self):
        if not self.tokens:
            raise invalid_filter("empty filter")
        node = self.or_expression(0, False)
        if self.position < len(self.tokens):
            raise invalid_filter("unexpected %s at position %d" % self._describe(self.tokens[self.position]))
        return node

    def _describe(self, token):
        return (json.dumps(token[1]) if token[0] == "string" else str(token[1])), token[2]

    def peek_word(self):
        if self.position < len(self.tokens) and self.tokens[self.position][0] == "word":
            return self.tokens[self.position][1].lower()
        return None

    def next(self, what):
        if self.position >= len(self.tokens):
            raise invalid_filter("filter ends where %s was expected" % what)
        token = self.tokens[self.position]
        self.position += 1
        return token

    def expect(self, punct):
        token = self.next("'%s'" % punct)
        if token[:2] != ("punct", punct):
            raise invalid_filter("expected '%s' at position %d, found %s"
                                 % (punct, token[2], self._describe(token)[0]))

    def or_expression(self, depth, nested):
        items = [self.and_expression(depth, nested)]
        while self.peek_word() == "or":
            self.position += 1
            items.append(self.and_expression(depth, nested))
        return items[0] if len(items) == 1 else ("or", items)

    def and_expression(self, depth, nested):
        items = [self.unary(depth, nested)]
        while self.peek_word() == "and":
            self.position += 1
            items.append(self.unary(depth, nested))
        return items[0] if len(items) == 1 else ("and", items)

    def unary(self, depth, nested):
        if depth > MAX_FILTER_DEPTH:
            raise invalid_filter("filter is nested deeper than %d levels" % MAX_FILTER_DEPTH)
        if self.peek_word() == "not":
            self.position += 1
            self.expect("(")
            node = self.or_expression(depth + 1, nested)
            self.expect(")")
            return ("not", node)
        token = self.next("an attribute")
        if token[:2] == ("punct", "("):
            node = self.or_expression(depth + 1, nested)
            self.expect(")")
            return node
        if token[0] != "word" or token[1].lower() in ("and", "or") or token[1].startswith("."):
            raise invalid_filter("expected an attribute at position %d, found %s" % (token[2], self._describe(token)[0]))
        return self.attribute_expression(token[1], depth, nested)

    def attribute_expression(self, path, depth, nested):
        self.terms += 1
        if self.terms > MAX_FILTER_TERMS:
            raise invalid_filter("filter has more than %d comparisons" % MAX_FILTER_TERMS)
        if self.position < len(self.tokens) and self.tokens[self.position][:2] == ("punct", "["):
            if nested:
                raise invalid_filter("value paths cannot be nested")
            self.position += 1
            inner = self.or_expression(depth + 1, True)
            self.expect("]")
            word = self.peek_word()
            if word and word.startswith("."):
                sub = self.next("a sub-attribute")[1][1:]
                operator, value = self.operator_and_value()
                return ("has", path, inner, sub, operator, value)
            return ("has", path, inner, None, None, None)
        operator, value = self.operator_and_value()
        if operator == "pr":
            return ("pr", path)
        return ("cmp", path, operator, value)

    def operator_and_value(self):
        token = self.next("an operator")
        operator = token[1].lower() if token[0] == "word" else None
        if operator == "pr":
            return "pr", None
        if operator not in COMPARE_OPERATORS:
            raise invalid_filter("unknown operator %s at position %d" % self._describe(token))
        token = self.next("a value")
        if token[0] in ("string", "number"):
            return operator, token[1]
        if token[0] == "word" and token[1].lower() in ("true", "false", "null"):
            return operator, {"true": True, "false": False, "null": None}[token[1].lower()]
        raise invalid_filter("expected a quoted string, number, true, false or null at position %d, found %s"
                             % (token[2], self._describe(token)[0]))


# Nearly every filter Entra sends is one comparison with a plain string:
# userName eq "...", externalId eq "...", displayName eq "..." (R10, R12).
# One match of this pattern gives such a filter the tree the grammar gives
# it, at a quarter of the cost (tests/test_properties.py checks that the two
# agree); anything else, or anything odd, goes through the grammar.
_ONE_COMPARISON = re.compile(r'\s*([A-Za-z]%s*)\s+(\w+)\s+"(%s*)"\s*' % (_WORD_CHAR, _PLAIN_STRING_CHAR),
                             re.ASCII)


def parse_filter(text):
    """Parse a filter expression into a tree; ScimError(400, invalidFilter) if it is not one."""
    match = _ONE_COMPARISON.fullmatch(text)
    if match is not None and len(text) <= MAX_FILTER_LENGTH:
        path, operator, value = match.groups()
        operator = operator.lower()
        if operator in COMPARE_OPERATORS and path.lower() not in ("and", "or", "not") \
                and not LONE_SURROGATE.search(value):
            return ("cmp", path, operator, value)
    return _FilterParser(text).parse()


# -- filters as SQL ----------------------------------------------------------
#
# A filter becomes one WHERE clause; nothing is scanned in Python. Strings
# with caseExact=false compare as fold(value) (an indexed column holds it
# already for userName and group displayName). co/sw/ew use instr/substr,
# never LIKE, so `%` and `_` in a value are just characters.

@dataclasses.dataclass(frozen=True)
class _SqlScope:
    """Where attribute names in a (sub-)filter are looked up.

    kind: 'resource' (a users/groups row), 'element' (one item of a JSON
    multi-valued attribute, alias.value), 'members' (a members row), or
    'groups' (a User.groups membership joined to its group).
    """

    kind: str
    resource_type: ResourceType = None
    attribute: Attribute = None
    alias: str = ""


def filter_to_sql(tree, resource_type):
    """A WHERE clause and its parameters for `tree` (None: every resource)."""
    if tree is None:
        return "1", []
    scope = _SqlScope("resource", resource_type, alias=resource_type.table)
    return _node_sql(tree, scope, [0])


def member_filter_to_sql(tree):
    """A WHERE clause over rows of the members table, for members[...] in PATCH."""
    return _node_sql(tree, _SqlScope("members", GROUP, GROUP_SCHEMA.attribute("members"),
                                     alias="members"), [0])


def _node_sql(node, scope, counter):
    kind = node[0]
    if kind in ("and", "or"):
        parts = [_node_sql(child, scope, counter) for child in node[1]]
        sql = (" %s " % kind.upper()).join("(%s)" % part[0] for part in parts)
        return sql, [p for part in parts for p in part[1]]
    if kind == "not":
        sql, params = _node_sql(node[1], scope, counter)
        # NULL (an absent attribute) means "no match" at the leaves; under
        # NOT it must turn into a match, so collapse it first.
        return "NOT coalesce((%s), 0)" % sql, params
    if scope.kind != "resource":
        return _scoped_sql(node, scope, counter)
    path = _resolve_filter_path(node[1], scope.resource_type)
    attribute = path.attribute
    if attribute.multi_valued:
        return _multi_valued_sql(node, path, scope, counter)
    if kind == "has":
        if attribute.type != "complex":
            raise invalid_filter("%s is not a complex attribute" % node[1])
        # A value path on a single-valued complex attribute (manager[value eq "x"]).
        inner_scope = _object_scope(path, scope)
        conditions = [_node_sql(node[2], inner_scope, counter)]
        if node[3] is not None:
            conditions.append(_scoped_sql(_sub_comparison(node), inner_scope, counter))
        return (" AND ".join("(%s)" % c[0] for c in conditions),
                [p for c in conditions for p in c[1]])
    target = path.target
    if target.type == "complex":
        if kind == "pr":
            expr = _json_expr(scope, path)
            return "(%s IS NOT NULL AND %s NOT IN ('{}', '[]'))" % (expr, expr), []
        value_sub = target.sub("value")
        if value_sub is None:
            raise invalid_filter("%s is complex: compare one of its sub-attributes" % node[1])
        path = dataclasses.replace(path, sub_attribute=value_sub)
        target = value_sub
    column = SQL_COLUMNS[scope.resource_type.name].get(path.key)
    if column is not None:
        expr, folded = column
    elif path.key == "meta.resourcetype":
        expr, folded = "'%s'" % scope.resource_type.name, False
    elif path.attribute.name == "meta" or path.attribute.mutability == "writeOnly":
        raise invalid_filter("filtering on %s is not supported" % node[1])
    else:
        expr, folded = _json_expr(scope, path), False
    return _compare_sql(node, expr, target, folded)


def _sub_comparison(node):
    """The comparison after a value path: emails[type eq "work"].value eq "x"."""
    _, _, _, sub, operator, value = node
    return ("pr", sub) if operator == "pr" else ("cmp", sub, operator, value)


def _object_scope(path, scope):
    return _SqlScope("element", scope.resource_type, path.attribute,
                     alias="json_extract(%s.document, %s)" % (
                         scope.alias, _sql_string(_json_path(path.urn, path.attribute.name, None, path.core))))


def _resolve_filter_path(text, resource_type):
    path = resolve_path(resource_type, text)
    if path is None:
        raise invalid_filter("unknown attribute %r for %s" % (text, resource_type.name))
    return path


def _json_path(urn, name, sub, core):
    """A JSON path into a stored document. Its parts are schema names, names
    matching ATTRIBUTE_NAME and URNs matching CUSTOM_URN, none of which can
    hold a quote; filter values never appear in SQL text, only as parameters."""
    path = "$" if core else '$."%s"' % urn
    path += '."%s"' % name
    if sub:
        path += '."%s"' % sub
    return path


def _sql_string(text):
    return "'%s'" % text.replace("'", "''")


def _json_expr(scope, path):
    sub = path.sub_attribute.name if path.sub_attribute else None
    return "json_extract(%s.document, %s)" % (
        scope.alias, _sql_string(_json_path(path.urn, path.attribute.name, sub, path.core)))


def _multi_valued_sql(node, path, scope, counter):
    """EXISTS over the items of a multi-valued attribute: JSON array, members or groups."""
    counter[0] += 1
    alias = "v%d" % counter[0]
    attribute = path.attribute
    if scope.resource_type is GROUP and attribute.name == "members":
        source = "members %s" % alias
        link = "%s.group_id = %s.id" % (alias, scope.alias)
        inner_scope = _SqlScope("members", scope.resource_type, attribute, alias=alias)
    elif scope.resource_type is USER and attribute.name == "groups":
        source = "members %s JOIN groups %s_g ON %s_g.id = %s.group_id" % (alias, alias, alias, alias)
        link = "%s.member_id = %s.id" % (alias, scope.alias)
        inner_scope = _SqlScope("groups", scope.resource_type, attribute, alias=alias)
    else:
        source = "json_each(%s.document, %s) %s" % (
            scope.alias, _sql_string(_json_path(path.urn, attribute.name, None, path.core)), alias)
        link = "1"
        inner_scope = _SqlScope("element", scope.resource_type, attribute, alias=alias + ".value")
    conditions = [(link, [])]
    kind = node[0]
    if kind == "has":
        conditions.append(_node_sql(node[2], inner_scope, counter))
        if node[3] is not None:
            conditions.append(_scoped_sql(_sub_comparison(node), inner_scope, counter))
    elif kind != "pr" or path.sub_attribute is not None:
        sub = path.sub_attribute.name if path.sub_attribute else "value"
        if attribute.sub(sub) is None:
            raise invalid_filter("%s has no value sub-attribute to compare" % attribute.name)
        sub_node = ("pr", sub) if kind == "pr" else ("cmp", sub, node[2], node[3])
        conditions.append(_scoped_sql(sub_node, inner_scope, counter))
    sql = "EXISTS (SELECT 1 FROM %s WHERE %s)" % (
        source, " AND ".join("(%s)" % c[0] for c in conditions))
    return sql, [p for c in conditions for p in c[1]]


def _scoped_sql(node, scope, counter):
    """A comparison on a sub-attribute of one item (JSON element, member or group)."""
    if node[0] == "has":
        raise invalid_filter("value paths cannot be nested")
    name = node[1]
    sub = scope.attribute.sub(name.rpartition(":")[2])
    if sub is None:
        raise invalid_filter("unknown attribute %r in %s" % (name, scope.attribute.name))
    folded = False
    if scope.kind == "members":
        expr = {"value": "%s.member_id" % scope.alias, "type": "%s.member_type" % scope.alias,
                "display": "(SELECT coalesce((SELECT display_name FROM users WHERE id = {a}.member_id), "
                           "(SELECT display_name FROM groups WHERE id = {a}.member_id)))"
                           .format(a=scope.alias)}.get(sub.name)
    elif scope.kind == "groups":
        expr = {"value": "%s.group_id" % scope.alias, "display": "%s_g.display_name" % scope.alias,
                "type": "'direct'"}.get(sub.name)
    else:
        expr = "json_extract(%s, %s)" % (scope.alias, _sql_string('$."%s"' % sub.name))
    if expr is None:
        raise invalid_filter("filtering on %s.%s is not supported" % (scope.attribute.name, sub.name))
    return _compare_sql(node, expr, sub, folded)


def _compare_sql(node, expr, attribute, folded):
    if node[0] == "pr":
        if attribute.type in ("string", "reference", "binary", "dateTime"):
            return "(%s IS NOT NULL AND %s <> '')" % (expr, expr), []
        return "%s IS NOT NULL" % expr, []
    _, name, operator, value = node
    if value is None:
        if operator == "eq":
            return "%s IS NULL" % expr, []
        if operator == "ne":
            return "%s IS NOT NULL" % expr, []
        raise invalid_filter("null can only be compared with eq or ne")
    value = _filter_operand(name, attribute, operator, value)
    if attribute.type in ("string", "reference") and not attribute.case_exact:
        value = fold(value)
        if not folded:
            expr = "scim_fold(%s)" % expr
    if attribute.type == "dateTime" and operator in ("eq", "ne", "gt", "ge", "lt", "le"):
        # "DateTime ... a chronological comparison" (RFC 7644 §3.4.2.2):
        # the same instant written with an offset or fewer digits is equal.
        if not DATE_TIME.match(value):
            raise invalid_filter("%s is a dateTime: compare it with e.g. \"2011-05-13T04:42:34Z\"" % name)
        expr, value = "julianday(%s)" % expr, _utc_text(value)
        symbol = {"eq": "=", "ne": "IS NOT", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}[operator]
        return "%s %s julianday(?)" % (expr, symbol), [value]
    if operator == "eq":
        return "%s = ?" % expr, [value]
    if operator == "ne":
        return "%s IS NOT ?" % expr, [value]
    if operator == "co":
        return "instr(%s, ?) > 0" % expr, [value]
    if operator == "sw":
        return "instr(%s, ?) = 1" % expr, [value]
    if operator == "ew":
        return ("(length({x}) >= length(?) AND substr({x}, length({x}) - length(?) + 1) = ?)"
                .format(x=expr), [value, value, value])
    symbol = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[operator]
    return "%s %s ?" % (expr, symbol), [value]


def _utc_text(value):
    """An xsd:dateTime as UTC text SQLite's julianday() reads, to the microsecond."""
    instant = _instant(value)
    if instant is None:
        raise invalid_filter("%s is not a date and time" % json.dumps(value))
    return instant.strftime("%Y-%m-%dT%H:%M:%S.%f")


def _instant(value):
    """An xsd:dateTime (already checked against DATE_TIME) as an aware UTC
    datetime, or None when the fields name no real instant."""
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    head, dot, rest = text.partition(".")
    if dot:   # fromisoformat before 3.11 takes only 3 or 6 fraction digits
        digits = re.match(r"\d+", rest).group()
        text = head + "." + (digits + "000000")[:6] + rest[len(digits):]
    try:
        return datetime.datetime.fromisoformat(text).astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):   # 2020-13-45T00:00:00Z; 9999-12-31T23:59:59-01:00
        return None


def _filter_operand(name, attribute, operator, value):
    """Check a comparison against the attribute's type (RFC 7644 §3.4.2.2)."""
    kind = attribute.type
    if kind == "boolean":
        # "Boolean and Binary attributes SHALL cause a failed response (HTTP
        # 400 Bad Request and scimType of invalidFilter)" for gt/ge/lt/le.
        if operator not in ("eq", "ne"):
            raise invalid_filter("%s is boolean: only eq, ne and pr apply" % name)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise invalid_filter("%s is boolean: compare it with true or false" % name)
        return 1 if value else 0
    if kind == "binary" and operator not in ("eq", "ne"):
        raise invalid_filter("%s is binary: only eq, ne and pr apply" % name)
    if kind in ("integer", "decimal"):
        if operator in ("co", "sw", "ew"):
            raise invalid_filter("%s is numeric: %s does not apply" % (name, operator))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid_filter("%s is numeric: compare it with a number" % name)
        return value
    if isinstance(value, bool):
        raise invalid_filter("%s is a %s: compare it with a quoted string" % (name, kind))
    return value if isinstance(value, str) else json.dumps(value)


# -- filters in Python -------------------------------------------------------
#
# PATCH value paths (emails[type eq "work"]) select items of a document that
# is already in memory; the same tree is evaluated here with the same rules.

def filter_matches(node, item, attribute):
    """Whether `item` (one value of complex attribute `attribute`) matches `node`."""
    kind = node[0]
    if kind == "and":
        return all(filter_matches(child, item, attribute) for child in node[1])
    if kind == "or":
        return any(filter_matches(child, item, attribute) for child in node[1])
    if kind == "not":
        return not filter_matches(node[1], item, attribute)
    if kind == "has":
        raise invalid_filter("value paths cannot be nested")
    name = node[1].rpartition(":")[2]
    sub = attribute.sub(name)
    if sub is None:
        raise ScimError(400, "invalidPath", "unknown attribute %r in %s" % (node[1], attribute.name))
    actual = item.get(sub.name) if isinstance(item, dict) else None
    if kind == "pr":
        return actual not in (None, "", [], {})
    operator, value = node[2], node[3]
    if value is None:
        if operator in ("eq", "ne"):
            return (actual is None) == (operator == "eq")
        raise invalid_filter("null can only be compared with eq or ne")
    value = _filter_operand(node[1], sub, operator, value)
    if sub.type == "boolean":
        actual = None if actual is None else (1 if actual else 0)
    if actual is None:
        return operator == "ne"
    if sub.type in ("string", "reference") and not sub.case_exact and isinstance(actual, str):
        actual, value = fold(actual), fold(value)
    if sub.type == "dateTime" and operator not in ("co", "sw", "ew"):
        if not DATE_TIME.match(value) or not isinstance(actual, str) or not DATE_TIME.match(actual):
            return False
        actual, value = _instant(actual), _instant(value)
        if actual is None or value is None:
            return False
    try:
        if operator == "eq":
            return actual == value
        if operator == "ne":
            return actual != value
        if operator == "co":
            return value in actual
        if operator == "sw":
            return actual.startswith(value)
        if operator == "ew":
            return actual.endswith(value)
        return {"gt": actual > value, "ge": actual >= value,
                "lt": actual < value, "le": actual <= value}[operator]
    except TypeError:
        return False


def sort_to_sql(resource_type, sort_by, descending):
    """The ORDER BY clause for `sortBy`/`sortOrder`; without sortBy, the
    order resources were created in, so that pages are stable."""
    order = "%s.rowid" % resource_type.table
    if not sort_by:
        return order
    expr = _sort_expression(resource_type, sort_by)
    direction = "DESC" if descending else "ASC"
    # "if there is no data for the specified "sortBy" value, they are ...
    # ordered last if ascending and first if descending" (RFC 7644 §3.4.2.3).
    return "(%s IS NULL) %s, %s %s, %s" % (expr, direction, expr, direction, order)


def _sort_expression(resource_type, sort_by):
    """The SQL value to sort by for `sortBy` (RFC 7644 §3.4.2.3)."""
    path = resolve_path(resource_type, sort_by)
    if path is None or path.attribute.mutability == "writeOnly":
        raise ScimError(400, "invalidValue", "cannot sort by %r" % sort_by)
    table = resource_type.table
    attribute, target = path.attribute, path.target
    if attribute.multi_valued:
        # "If the attribute is multi-valued, resources are sorted by the value
        # of the primary attribute ... if any, or else the first value".
        sub = path.sub_attribute.name if path.sub_attribute else "value"
        if attribute.name in ("members", "groups") or attribute.sub(sub) is None:
            raise ScimError(400, "invalidValue", "cannot sort by %r" % sort_by)
        expr = ("(SELECT json_extract(s.value, %s) FROM json_each(%s.document, %s) s "
                "ORDER BY coalesce(json_extract(s.value, '$.primary'), 0) DESC, s.key LIMIT 1)"
                % (_sql_string('$."%s"' % sub), table,
                   _sql_string(_json_path(path.urn, attribute.name, None, path.core))))
        target = attribute.sub(sub)
    elif target.type == "complex":
        raise ScimError(400, "invalidValue", "cannot sort by complex attribute %r" % sort_by)
    else:
        column = SQL_COLUMNS[resource_type.name].get(path.key)
        expr = column[0] if column else _json_expr(_SqlScope("resource", resource_type, alias=table), path)
        if column and column[1]:
            return expr
    if target.type in ("string", "reference") and not target.case_exact:
        expr = "scim_fold(%s)" % expr
    return expr


# ============================================================================
# 7. PATCH engine
# ============================================================================
#
# RFC 7644 §3.5.2: "PATH = attrPath / valuePath [subAttr]", operations add,
# replace and remove, applied in order, all or nothing. Pure: a document in,
# a new document out. Group members never live in the document: member
# operations come back as a list of changes for the members table, so a
# PATCH costs the members it names, not the size of the group.
#
# Entra's forms (entra-requirements.md) accepted alongside the RFC's:
# op names in any case (R6); "True"/"False" for booleans (R18, in
# coerce_value); path-less values whose keys are themselves paths,
# `name.givenName` or URN-qualified (R23); Add on single-valued attributes
# (R21); `emails[type eq "work"].value` creating the entry when absent
# (R29); manager as a plain id, an array, or removed by value (R25-R27);
# members removed by `path: members` with a value list, or by
# `members[value eq "…"]` (R40).

PATCH_OPERATIONS = ("add", "replace", "remove")


class PatchOperation(typing.NamedTuple):
    """One operation of a PatchOp request, checked for shape."""

    op: str               # "add", "replace" or "remove", lower-cased
    path: str             # None when the request has no path
    value: object
    has_value: bool       # "value" was present (a null value is not an absent one)


@dataclasses.dataclass(frozen=True)
class PatchPath:
    """A parsed PATCH path: the attribute, an optional value filter, and the
    sub-attribute after the filter (`emails[type eq "work"].value`)."""

    path: AttributePath
    value_filter: tuple = None
    filter_sub: Attribute = None


def invalid_path(detail):
    return ScimError(400, "invalidPath", detail)


def parse_path(resource_type, text):
    """Parse a PATCH `path`; ScimError(400, invalidPath) when it names nothing we have."""
    value_filter = None
    filter_sub = None
    filter_sub_name = None
    attribute_text = text.strip()
    if "[" in attribute_text:
        attribute_text, _, rest = attribute_text.partition("[")
        inner, bracket, after = rest.rpartition("]")
        if not bracket:
            raise invalid_path("unbalanced '[' in path %r" % text)
        try:
            value_filter = parse_filter(inner)
        except ScimError as exc:
            raise invalid_path("invalid filter in path %r: %s" % (text, exc.detail)) from None
        if after and not after.startswith("."):
            raise invalid_path("unexpected %r after ']' in path %r" % (after, text))
        filter_sub_name = after[1:] or None
    path = resolve_path(resource_type, attribute_text)
    if path is None:
        raise invalid_path("no attribute %r in %s" % (attribute_text, resource_type.name))
    if value_filter is not None:
        if path.sub_attribute is not None or path.attribute.type != "complex":
            raise invalid_path("a value filter needs a complex attribute: %r" % text)
        if filter_sub_name:
            filter_sub = path.attribute.sub(filter_sub_name)
            if filter_sub is None:
                raise invalid_path("no sub-attribute %r in %s" % (filter_sub_name, path.attribute.name))
    return PatchPath(path, value_filter, filter_sub)


def read_patch_request(body):
    """The operations of a PatchOp body (RFC 7644 §3.5.2), checked for shape."""
    if not isinstance(body, dict):
        raise ScimError(400, "invalidSyntax", "the request body must be a JSON object")
    operations = next((v for k, v in body.items() if k.lower() == "operations"), None)
    if not isinstance(operations, list) or not operations:
        raise ScimError(400, "invalidSyntax", "a PatchOp request needs a non-empty \"Operations\" array")
    if len(operations) > MAX_OPERATIONS:
        raise ScimError(400, "tooMany", "more than %d operations in one PATCH" % MAX_OPERATIONS)
    result = []
    for number, operation in enumerate(operations, 1):
        if not isinstance(operation, dict):
            raise ScimError(400, "invalidSyntax", "operation %d is not an object" % number)
        fields = {k.lower(): v for k, v in operation.items()}
        op = fields.get("op")
        if not isinstance(op, str) or op.lower() not in PATCH_OPERATIONS:
            raise ScimError(400, "invalidSyntax", "operation %d: op must be add, replace or remove, got %s"
                            % (number, json.dumps(op)))
        path = fields.get("path")
        if path is not None and not isinstance(path, str):
            raise ScimError(400, "invalidPath", "operation %d: path must be a string" % number)
        result.append(PatchOperation(op.lower(), path or None, fields.get("value"), "value" in fields))
    return result


def apply_patch(resource_type, document, operations, resource_id=None):
    """Apply parsed operations to a copy of `document`, the resource called
    `resource_id`.

    Returns (new_document, member_changes); member_changes is a list of
    ("add", [(id, type)]), ("remove", [ids]), ("remove_where", tree) and
    ("clear",) for the members table, in request order.
    """
    document = _copy_json(document)
    member_changes = []
    for number, (op, path_text, value, has_value) in enumerate(operations, 1):
        try:
            if path_text is not None and path_text.lower() == "id" and op != "remove":
                check_own_id(resource_id, value)   # the resource's own id, sent back: nothing to do
                continue
            urn = path_text and _extension_urn(resource_type, document, path_text, value)
            if urn:
                # The path is a whole extension ("urn:...:enterprise:2.0:User").
                if op == "remove":
                    document.pop(next((k for k in document if k.lower() == urn.lower()), urn), None)
                elif isinstance(value, dict):
                    _apply_to_extension(resource_type, document, op, urn, value, member_changes)
                else:
                    raise ScimError(400, "invalidValue", "%s of an extension needs an object value" % op)
                continue
            if path_text is not None:
                _apply_at_path(resource_type, document, op, path_text, value, has_value, member_changes)
                continue
            # "If omitted, the target location is assumed to be the resource
            # itself. The "value" parameter contains a set of attributes".
            if op == "remove":
                raise ScimError(400, "noTarget", "remove needs a path")
            if not isinstance(value, dict):
                raise ScimError(400, "invalidValue", "%s without a path needs an object value" % op)
            for key, item in value.items():
                if key.lower() in ("schemas", "meta"):
                    continue   # the server's, echoed back from a GET
                if key.lower() == "id":
                    check_own_id(resource_id, item)   # Okta's group rename sends it
                    continue
                if _extension_urn(resource_type, document, key, item) and isinstance(item, dict):
                    _apply_to_extension(resource_type, document, op, key, item, member_changes)
                else:
                    _apply_at_path(resource_type, document, op, key, item, True, member_changes)
        except ScimError as exc:
            exc.detail = "operation %d (%s%s): %s" % (number, op, " " + path_text if path_text else "",
                                                       exc.detail)
            raise
    check_required(resource_type, document)
    named = sum(len(change[1]) for change in member_changes if change[0] in ("add", "remove"))
    if named > MAX_MEMBERS:
        raise ScimError(400, "tooMany", "at most %d members in one request" % MAX_MEMBERS)
    return document, member_changes


def _copy_json(value):
    """A deep copy of a JSON value (copy.deepcopy, with its memo, is 3x slower)."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value


def _extension_urn(resource_type, document, text, value):
    """`text` if it names a whole extension: a known extension schema, or a
    custom one the document holds or `value` is an object for; else None."""
    schema = resource_type.schema_by_urn(text)
    if schema is not None and schema is not resource_type.schema:
        return schema.id
    if is_custom_extension(resource_type, text) and (
            isinstance(value, dict) or any(k.lower() == text.lower() for k in document)):
        return text
    return None


def _apply_to_extension(resource_type, document, op, urn, value, member_changes):
    """add/replace on an extension object: each of its attributes in turn."""
    for name, item in value.items():
        if name.lower() != "schemas":
            _apply_at_path(resource_type, document, op, "%s:%s" % (urn, name), item, True, member_changes)


def _apply_at_path(resource_type, document, op, path_text, value, has_value, member_changes):
    patch_path = parse_path(resource_type, path_text)
    path = patch_path.path
    attribute = path.attribute
    for target in (attribute, path.sub_attribute, patch_path.filter_sub):
        if target is not None and target.mutability == "readOnly":
            raise ScimError(400, "mutability", "%s is read-only" % path_text)
    if resource_type is GROUP and attribute.name == "members":
        _apply_members(op, patch_path, value, has_value, member_changes)
        return
    if op != "remove" and not has_value:
        raise ScimError(400, "invalidValue", "%s needs a value" % op)
    # An extension object lives under its URN, matched case-insensitively.
    urn = None if path.core else next((k for k in document if k.lower() == path.urn.lower()), path.urn)
    container = document if path.core else document.setdefault(urn, {})
    if not path.core and resource_type.schema_by_urn(urn) is None:
        # A custom extension's attribute keeps the name it was first stored under.
        key = next((k for k in container if k.lower() == attribute.name.lower()), attribute.name)
        _apply_custom(op, container, key, value, path_text)
        if not container:
            document.pop(urn, None)
        return
    key = attribute.name
    if attribute.multi_valued:
        _apply_multi_valued(op, container, key, patch_path, value, has_value)
    elif attribute.type == "complex":
        _apply_complex(op, container, key, patch_path, value, has_value)
    else:
        if op == "remove":
            container.pop(key, None)
        else:
            _set_or_drop(container, key, coerce_value(attribute, value, path_text))
    if not path.core and not container:
        document.pop(urn, None)


def _set_or_drop(container, key, value):
    if value is None:
        container.pop(key, None)   # null is "unassigned" (RFC 7643 §2.5)
    else:
        container[key] = value


def _apply_custom(op, container, key, value, where):
    if op == "remove":
        container.pop(key, None)
    else:
        _set_or_drop(container, key, coerce_custom(value, where))


def _apply_complex(op, container, key, patch_path, value, has_value):
    """A single-valued complex attribute: name, or the enterprise manager."""
    attribute = patch_path.path.attribute
    current = container.get(key)
    sub = patch_path.path.sub_attribute or patch_path.filter_sub
    if patch_path.value_filter is not None:
        # manager[value eq "id"]: acts only when the current value matches.
        if current is None or not filter_matches(patch_path.value_filter, current, attribute):
            if op == "remove":
                return
            raise ScimError(400, "noTarget", "no %s matches the filter" % attribute.name)
    if sub is not None:
        current = dict(current or {})
        if op == "remove":
            current.pop(sub.name, None)
        else:
            _set_or_drop(current, sub.name, coerce_value(sub, value, "%s.%s" % (attribute.name, sub.name)))
        _set_or_drop(container, key, current or None)
        return
    if op == "remove":
        if has_value and value is not None and current is not None:
            # Remove-with-value clears the manager only if it is that manager.
            wanted = coerce_value(attribute, value, attribute.name) or {}
            if wanted.get("value") is not None and wanted.get("value") != current.get("value"):
                return
        container.pop(key, None)
        return
    new = coerce_value(attribute, value, attribute.name)
    if new is None:
        container.pop(key, None)
    elif current is None or "value" in new:
        # An object with its own `value` (a manager) is a new reference, not
        # a change to the old one's sub-attributes.
        container[key] = new
    else:
        # "Sub-attributes that are not specified in the value parameter are
        # left unchanged" (RFC 7644 §3.5.2.3).
        merged = dict(current)
        merged.update(new)
        container[key] = merged


def _apply_multi_valued(op, container, key, patch_path, value, has_value):
    attribute = patch_path.path.attribute
    items = list(container.get(key) or [])
    sub = patch_path.path.sub_attribute or patch_path.filter_sub
    value_filter = patch_path.value_filter
    where = attribute.name
    if value_filter is None and sub is None:
        if op == "remove":
            if has_value and value is not None:
                # Entra removes listed values: {"op":"Remove","path":"emails","value":[...]}.
                unwanted = coerce_value(attribute, value, where) or []
                keys = [_item_identity(item) for item in unwanted]
                items = [item for item in items if _item_identity(item) not in keys]
            else:
                items = []
        else:
            new_items = coerce_value(attribute, value, where) or []
            if op == "replace":
                items = new_items
            else:
                # "If the target location specifies a multi-valued attribute,
                # a new value is added to the attribute"; an identical value
                # is not added twice.
                items = items + [item for item in new_items if item not in items]
            _one_primary(items, [items.index(item) for item in new_items])
        _set_or_drop(container, key, items or None)
        return
    matched = [i for i, item in enumerate(items)
               if value_filter is None or filter_matches(value_filter, item, attribute)]
    if op == "remove":
        emptied = set(matched)
        if sub is not None:
            emptied = set()
            for i in matched:
                if has_value and value is not None and items[i].get(sub.name) != value:
                    continue   # a Remove carrying a value removes only that value (R29)
                items[i] = {k: v for k, v in items[i].items() if k != sub.name}
                # An entry that lost its value (a bare {"type": "work"}) is no entry.
                if not items[i] or (sub.name == "value" and attribute.sub("value") is not None):
                    emptied.add(i)
        items = [item for i, item in enumerate(items) if i not in emptied]
        _set_or_drop(container, key, items or None)
        return
    if sub is not None:
        new_sub = coerce_value(sub, value, "%s.%s" % (where, sub.name))
        if not matched:
            seed = _filter_seed(value_filter, attribute)
            if seed is None:
                raise ScimError(400, "noTarget", "no %s value matches the filter" % where)
            # Entra's Add/Replace on emails[type eq "work"].value for a user
            # without a work e-mail creates it (R29).
            items.append(seed)
            matched = [len(items) - 1]
        for i in matched:
            items[i] = dict(items[i])
            _set_or_drop(items[i], sub.name, new_sub)
    else:
        new_item = coerce_single(attribute, value, where)
        if new_item is None:
            raise ScimError(400, "invalidValue", "%s needs an object value" % op)
        if not matched:
            seed = _filter_seed(value_filter, attribute)
            if seed is None:
                raise ScimError(400, "noTarget", "no %s value matches the filter" % where)
            items.append(seed)
            matched = [len(items) - 1]
        for i in matched:
            if op == "replace" and value_filter is not None:
                # "all matching record values SHALL be replaced".
                items[i] = dict(new_item)
            else:
                items[i] = dict(items[i], **new_item)
    _one_primary(items, matched)
    _set_or_drop(container, key, [item for item in items if item] or None)


def _item_identity(item):
    return item.get("value", item) if isinstance(item, dict) else item


def _filter_seed(value_filter, attribute):
    """The item a filter of eq-comparisons describes ({"type": "work"}; {}
    for no filter), or None when the filter cannot be built from."""
    if value_filter is None:
        return {}
    terms = value_filter[1] if value_filter[0] == "and" else [value_filter]
    seed = {}
    for term in terms:
        if term[0] != "cmp" or term[2] != "eq" or term[3] is None:
            return None
        sub = attribute.sub(term[1].rpartition(":")[2])
        if sub is None:
            raise invalid_path("unknown attribute %r in %s" % (term[1], attribute.name))
        seed[sub.name] = coerce_single(sub, term[3], "%s.%s" % (attribute.name, sub.name))
    return seed


def _one_primary(items, touched):
    """RFC 7644 §3.5.2: setting "primary" to true on one value "SHALL cause
    the server to automatically set 'primary' to 'false' for any other values".

    `touched` are the positions this operation wrote; the last of them that
    is primary stays primary.
    """
    chosen = next((i for i in reversed(touched) if isinstance(items[i], dict)
                   and items[i].get("primary") is True), None)
    if chosen is None:
        return
    for i, item in enumerate(items):
        if i != chosen and isinstance(item, dict) and item.get("primary") is True:
            items[i] = dict(item, primary=False)


def _apply_members(op, patch_path, value, has_value, member_changes):
    """Group membership: changes for the members table, never a list in memory."""
    attribute = patch_path.path.attribute
    if patch_path.path.sub_attribute is not None or patch_path.filter_sub is not None:
        raise invalid_path("members can only be changed as a whole value, not %s.%s" % (
            attribute.name, (patch_path.path.sub_attribute or patch_path.filter_sub).name))
    if patch_path.value_filter is not None:
        if op == "add":
            raise invalid_path("add takes no filter on members; use path \"members\"")
        member_changes.append(("remove_where", patch_path.value_filter))
        if op == "remove":
            return
    elif op == "remove":
        if has_value and value is not None:
            # Entra: {"op":"Remove","path":"members","value":[{"value":"id"}]}
            # removes only the listed members (R40), never all of them.
            member_changes.append(("remove", [member_id for member_id, _ in coerce_members(value)]))
        else:
            member_changes.append(("clear",))
        return
    elif op == "replace":
        member_changes.append(("clear",))
    if not has_value:
        raise ScimError(400, "invalidValue", "%s needs a value" % op)
    member_changes.append(("add", coerce_members(value)))



# ============================================================================
# 8. Operations
# ============================================================================
#
# One function per SCIM operation. Bodies are parsed and validated before a
# transaction begins; inside `store.write()` there is only read, apply,
# write. This is the only section that opens transactions.

class ListQuery(typing.NamedTuple):   # made on every lookup: a tuple is made fastest
    """The query parameters of RFC 7644 §3.4.2 (GET) or a SearchRequest (POST)."""

    filter: str = None
    sort_by: str = None
    descending: bool = False
    start_index: int = 1
    count: int = DEFAULT_PAGE_SIZE
    attributes: tuple = ()
    excluded: tuple = ()


def _row_for(resource_type, resource_id, document, now, version, created=None, password=None):
    """The columns of a users/groups row for `document`."""
    row = {"id": resource_id}
    if resource_type is USER:
        row.update(user_name=document["userName"], user_name_key=fold(document["userName"]),
                   display_name=document.get("displayName"),
                   active=None if "active" not in document else int(document["active"]))
        if password is not None:
            row["password_digest"] = password
    else:
        row.update(display_name=document["displayName"], display_name_key=fold(document["displayName"]))
    row.update(external_id=document.get("externalId"), last_modified=now, version=version,
               document=json_text(document))
    if created is not None:
        row["created"] = created
    return row


def _take_password(document):
    """Pop User.password from a document and return its digest (None if absent)."""
    password = document.pop("password", None)
    return None if password is None else password_digest(password)


def _take_members(resource_type, document):
    if resource_type is not GROUP:
        return None
    return document.pop("members", None) or []


def _check_if_match(if_match, row):
    """RFC 7644 §3.14: a stale If-Match gets 412 Precondition Failed.

    `if_match` is the set of opaque tags the client named ("*" for any), or
    None when it sent no If-Match.
    """
    if if_match is not None and "*" not in if_match and opaque_tag(row["version"]) not in if_match:
        raise ScimError(412, None, "the resource has changed: version is now %s" % weak_etag(row["version"]))


def _load(tx, resource_type, resource_id, projection=None):
    """The stored row, with "groups" when `projection` shows User.groups; else 404."""
    with_groups = resource_type is USER and projection is not None and projection.wants("groups")
    row = tx.get_resource(resource_type.table, resource_id, with_groups=with_groups)
    if row is None:
        raise not_found(resource_type.name, resource_id)
    return row


def _add_members(tx, group_id, members, change, new_group=False):
    """Add (id, type) members, noting in `change` (a MembershipChange) those
    that were not members yet; every one must exist, or nothing is added.
    A `new_group` has no members to look for."""
    if not members:
        return
    found = tx.member_types({member_id for member_id, _ in members})
    missing = sorted({member_id for member_id, _ in members if member_id not in found})
    if missing:
        raise ScimError(400, "invalidValue", "no user or group with id %s" % ", ".join(
            json.dumps(m) for m in missing[:10]))
    for member_id, member_type in members:
        if member_type is not None and member_type != found[member_id]:
            raise ScimError(400, "invalidValue", "%s is a %s, not a %s" % (
                member_id, found[member_id], member_type))
        if member_id == group_id:
            raise ScimError(400, "invalidValue", "a group cannot be a member of itself")
    present = set() if new_group else tx.members_among(group_id, list(found))
    added = {member_id: found[member_id] for member_id, _ in members if member_id not in present}
    tx.add_members(group_id, added.items())
    change.add(added.items())


def _replace_members(tx, group_id, members, change):
    """Make the group's members exactly the (id, type) pairs `members`,
    writing only the difference. Okta pushes a group's whole membership
    again (PUT, or PATCH replace of "members"); when one member of 100,000
    changed, one row is written."""
    wanted = {}
    for member_id, member_type in members:
        wanted.setdefault(member_id, member_type)
    current = tx.member_types_of(group_id)
    for member_id, member_type in wanted.items():
        if member_type not in (None, current.get(member_id, member_type)):
            raise ScimError(400, "invalidValue", "%s is a %s, not a %s" % (member_id, current[member_id], member_type))
    gone = [member_id for member_id in current if member_id not in wanted]
    if gone:
        change.remove(tx.remove_members(group_id, gone))
    _add_members(tx, group_id, [(member_id, member_type) for member_id, member_type in wanted.items()
                                if member_id not in current], change, new_group=True)


def _apply_member_changes(tx, group_id, changes):
    """Apply apply_patch's member changes; returns the MembershipChange. A
    "clear" followed by an "add" (a replace of "members", or a remove of all
    of them and an add) is one _replace_members."""
    change = MembershipChange()
    clearing = False
    for kind, *argument in changes:
        if clearing and kind == "add":
            _replace_members(tx, group_id, argument[0], change)
        else:
            if clearing:
                change.remove(tx.clear_members(group_id))
            if kind == "add":
                _add_members(tx, group_id, argument[0], change)
            elif kind == "remove":
                change.remove(tx.remove_members(group_id, argument[0]))
            elif kind == "remove_where":
                where, params = member_filter_to_sql(argument[0])
                change.remove(tx.remove_members_where(group_id, where, params))
        clearing = kind == "clear"
    if clearing:
        change.remove(tx.clear_members(group_id))
    return change


def _render_loaded(tx, resource_type, row, base_url, projection, document=None):
    """Render one row, loading members or groups only when the response shows
    them and the row does not carry them already."""
    members = None
    groups = row.get("groups")
    if resource_type is GROUP and projection.wants("members"):
        members = tx.group_members(row["id"])
    if resource_type is USER and groups is None and projection.wants("groups"):
        groups = tx.groups_of([row["id"]])[row["id"]]
    return projection.apply(render_resource(resource_type, row, base_url, members, groups, document))


# -- the change feed's events ------------------------------------------------
#
# Every write appends its events in its own transaction (ChangeEvents), so
# the feed's order is the commits' order, no reader sees an event of a change
# that was rolled back, and none misses one that was committed. The names
# are those directory-sync services use; beside each, the event URI of RFC
# 9967 ("SCIM Profile for Security Event Tokens").

EVENT_URI_PREFIX = "urn:ietf:params:scim:event:prov:"
# The URI of the request's own kind of change, for the events that do not
# have one of their own (updates and membership changes).
OPERATION_EVENT_URIS = {"create": "create:full", "put": "put:full", "patch": "patch:full", "delete": "patch:full"}
EVENT_URIS = {   # event type -> RFC 9967 event URI (after the prefix); None: the operation's
    "user.created": "create:full", "group.created": "create:full",
    "user.updated": None, "group.updated": None,
    "user.deactivated": "deactivate", "user.reactivated": "activate",
    "user.deleted": "delete", "group.deleted": "delete",
    "group.member_added": None, "group.member_removed": None,
}


class ChangeEvents:
    """The events of one write (one request: one transaction, one RFC 9967
    `txn`), appended by `append` inside that transaction.

    Representations are those GET returns, without a user's `groups` or a
    group's `members`: membership changes are events of their own, one per
    member, so a 100,000-member group is never copied into an event.
    """

    def __init__(self, tx, base_url, token_name, operation):
        self.tx = tx
        self.base_url = base_url
        self.token_name = token_name
        self.operation = operation
        self.txn = self.time = None   # set by the first event: a write that changes nothing makes none
        self.rows = []

    def resource(self, event_type, resource_type, row, document=None, attributes=None, representation=None):
        """A user.* or group.* event carrying the resource as it is now (as
        it was, for a delete): `representation`, or rendered from `row`
        without a user's groups or a group's members."""
        if representation is None:
            representation = render_resource(resource_type, row, self.base_url, document=document)
        self._add(event_type, resource_type, row["id"], representation.get("externalId"), row["version"],
                  representation, attributes)

    def membership(self, group, added=(), removed=()):
        """group.member_added/removed events, one per member; `group` is the
        row (id, display_name, external_id, version) after the change.
        A PATCH of 1,000 members makes 1,000 events that differ only in their
        ids and the member's: the storage fills them in, in one statement
        (Transaction.append_member_events)."""
        group_id, display_name, external_id, version = group
        for event_type, members in (("group.member_added", added), ("group.member_removed", removed)):
            if members:
                self._start()
                self.rows.append(MemberEvents((self.time, event_type, self._uri(event_type), GROUP.name, group_id,
                                               external_id, version, self.txn, self.token_name),
                                              display_name, list(members)))

    def _uri(self, event_type):
        return EVENT_URI_PREFIX + (EVENT_URIS[event_type] or OPERATION_EVENT_URIS[self.operation])

    def _start(self):
        if self.txn is None:   # the first event of the write
            self.txn, self.time = new_event_id(), utc_now()

    def _add(self, event_type, resource_type, resource_id, external_id, version, data, attributes=None):
        self._start()
        self.rows.append((new_event_id(), self.time, event_type, self._uri(event_type), resource_type.name,
                          resource_id, external_id, version, self.txn, self.token_name,
                          None if attributes is None else json_text(attributes), json_text(data)))

    def append(self):
        """Append the events, in the order they were made."""
        for is_batch, rows in itertools.groupby(self.rows, lambda row: isinstance(row, MemberEvents)):
            if is_batch:
                for batch in rows:
                    self.tx.append_member_events(*batch)
            else:
                self.tx.append_events(list(rows))


class MemberEvents(typing.NamedTuple):
    """Membership events of one kind for one group (ChangeEvents.membership)."""
    columns: tuple     # EVENT_COLUMNS from time to token_name, the same for all
    group_display: str  # the group's displayName, in each event's data
    members: list      # (member id, member type) pairs


def new_event_id():
    """128 random bits as 32 hex digits: an event's id, or a request's txn."""
    return os.urandom(16).hex()


def changed_attributes(before, after):
    """RFC 9967 `attributes`: the paths of the attributes whose values a
    change made different, in the document's order. A complex attribute
    (`name`) or an extension's object names its sub-attributes
    (`name.givenName`, `urn:...:enterprise:2.0:User:department`); a
    multi-valued one (`emails`) is named whole."""
    paths = []
    for key in list(after) + [key for key in before if key not in after]:
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if isinstance(old, dict) or isinstance(new, dict):
            old, new = old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}
            separator = ":" if key.lower().startswith("urn:") else "."
            paths += [key + separator + sub for sub in list(new) + [sub for sub in old if sub not in new]
                      if old.get(sub) != new.get(sub)]
        else:
            paths.append(key)
    return paths


def is_active(document):
    """A user without `active` counts as active (as the scim_users view does)."""
    return document.get("active") is not False


def record_update(events, resource_type, row, before, after, password_changed=False):
    """The event of a PUT or PATCH that changed `before` into `after`, with
    the changed attributes: user.deactivated or user.reactivated when
    `active` changed (whatever form the provider used: the PATCH engine has
    made `"False"` a boolean), else user.updated or group.updated. One
    event per resource and request: a deactivation that also renames the
    user is one user.deactivated whose `attributes` name both."""
    attributes = changed_attributes(before, after) + (["password"] if password_changed else [])
    event_type = resource_type.name.lower() + ".updated"
    if resource_type is USER and is_active(before) != is_active(after):
        event_type = "user.reactivated" if is_active(after) else "user.deactivated"
    if attributes:
        events.resource(event_type, resource_type, row, after, attributes)


class MembershipChange:
    """The members a write added and removed, netted: a member removed and
    added back in one PATCH changed nothing and makes no event."""

    def __init__(self):
        self._net = {}   # member id -> ("added" | "removed", member type)

    def add(self, pairs, how="added"):
        undo = "removed" if how == "added" else "added"
        for member_id, member_type in pairs:
            if self._net.get(member_id, (None,))[0] == undo:
                del self._net[member_id]
            else:
                self._net[member_id] = (how, member_type)

    def remove(self, pairs):
        self.add(pairs, "removed")

    def __bool__(self):
        return bool(self._net)

    def split(self):
        """([added (id, type)], [removed (id, type)])."""
        added = [(member_id, member_type) for member_id, (how, member_type) in self._net.items() if how == "added"]
        removed = [(member_id, member_type) for member_id, (how, member_type) in self._net.items()
                   if how == "removed"]
        return added, removed


class ResourceBody(typing.NamedTuple):
    """A POST or PUT body, read and checked (read_resource_body)."""
    document: dict     # the stored document (canonical_document)
    members: list      # a group's members as (id, type) pairs; None for a user
    password: str      # the password as sent (User.password, writeOnly), or None


def read_resource_body(resource_type, body, resource_id=None):
    """A POST/PUT body as a ResourceBody, checked before any transaction
    begins. For a PUT, `resource_id` is the resource's, and an id in the
    body must be it (check_own_id).

    The HTTP layer calls it before create_resource or replace_resource, so
    that the parsed JSON is gone before the write: a 100,000-member group's
    is 35 MB of Python objects, its ResourceBody 6 MB."""
    if resource_id is not None:
        own_id_in_body(resource_id, body)
    document = canonical_document(resource_type, body)
    check_required(resource_type, document)
    members = _take_members(resource_type, document)
    password = document.pop("password", None) if resource_type is USER else None
    return ResourceBody(document, members, password)


def _resource_body(resource_type, body, resource_id=None):
    """`body` as a ResourceBody: read now, unless the caller has read it."""
    return body if isinstance(body, ResourceBody) else read_resource_body(resource_type, body, resource_id)


def _group_identity(row):
    """What a membership event names of its group: (id, display_name, external_id, version)."""
    return row["id"], row["display_name"], row["external_id"], row["version"]


def create_resource(store, resource_type, body, base_url, projection=None, token_name=None):
    """POST: a new user or group (RFC 7644 §3.3), from the client's JSON
    `body` or its ResourceBody. Returns the resource. `token_name` made the
    change (the feed's events say so)."""
    document, members, password = _resource_body(resource_type, body)
    password = None if password is None else password_digest(password)   # scrypt: before the write lock
    resource_id = new_resource_id()
    now = utc_now()
    row = _row_for(resource_type, resource_id, document, now, 1, created=now, password=password)
    with store.write() as tx:
        tx.insert_resource(resource_type.table, row)
        # Rendered from what was just written: a new user is in no group
        # yet, a group's members are rendered (or streamed) by themselves.
        resource = render_resource(resource_type, row, base_url, document=document)
        events = ChangeEvents(tx, base_url, token_name, "create")
        events.resource(resource_type.name.lower() + ".created", resource_type, row, representation=resource)
        if members:
            change = MembershipChange()
            _add_members(tx, resource_id, members, change, new_group=True)
            events.membership(_group_identity(row), *change.split())
        events.append()
        projection = projection or Projection(resource_type)
        if resource_type is GROUP and projection.wants("members"):
            return _render_loaded(tx, resource_type, row, base_url, projection, document)
        return projection.apply(resource)


def get_resource(store, resource_type, resource_id, base_url, projection):
    if resource_type is USER or not projection.wants("members"):
        tx = store.read_once()   # one statement: the row, with its groups
        return _render_loaded(tx, resource_type, _load(tx, resource_type, resource_id, projection),
                              base_url, projection)
    with store.read() as tx:     # the row and its members, from one snapshot
        return _render_loaded(tx, resource_type, _load(tx, resource_type, resource_id), base_url, projection)


# What a write of a group renders when its response then streams the members.
WITHOUT_MEMBERS = Projection(GROUP, excluded=("members",))


class GroupWithMembers:
    """GET of a group whose members the response shows, as JSON in pieces.

    A 100,000-member group is 14 MB of JSON; built whole it took ~100 MB of
    Python objects per request. Here the members are read and rendered a
    thousand at a time, all from one read snapshot that stays open until the
    last piece is sent (or the response is dropped: `close`).
    """

    def __init__(self, store, resource_id, base_url, projection):
        self._snapshot = store.read()
        tx = self._snapshot.__enter__()
        try:
            self.resource, self._pieces = group_json_pieces(tx, _load(tx, GROUP, resource_id), base_url,
                                                            projection)
        except BaseException:
            self.close()
            raise

    def __iter__(self):
        try:
            yield from self._pieces
        finally:
            self.close()

    def close(self):
        if self._snapshot is not None:
            snapshot, self._snapshot = self._snapshot, None
            snapshot.__exit__(None, None, None)


def group_json_pieces(tx, row, base_url, projection):
    """(the group's resource without members, its JSON in pieces with the
    members read `tx.group_member_batches` at a time)."""
    resource = render_resource(GROUP, row, base_url, members=())
    marker = uuid.uuid4().hex   # stands where the members go, then is cut out
    resource["members"] = [marker]
    resource = projection.apply(resource)
    prefix, suffix = json_bytes(resource).split(json_bytes([marker]))

    def pieces():
        yield prefix + b"["
        separator = b""
        for batch in tx.group_member_batches(row["id"]):
            members = projection.apply_to("members", [_render_member(base_url, member) for member in batch])
            if members:
                yield separator + json_bytes(members)[1:-1]
                separator = b","
        yield b"]" + suffix
    return resource, pieces()


def replace_resource(store, resource_type, resource_id, body, base_url, if_match=None, projection=None,
                     token_name=None):
    """PUT (RFC 7644 §3.5.1): the body (the client's JSON, or its
    ResourceBody) replaces every client-writable attribute; readOnly
    attributes in it are ignored, but for an id that is not the resource's
    (check_own_id). A group's members become exactly the listed ones. A
    user's password is kept unless the body sets one. A PUT that changes
    nothing (Okta pushes unchanged users and groups again) keeps the
    version and makes no event."""
    document, members, password = _resource_body(resource_type, body, resource_id)
    password = _put_password(store, resource_id, password)
    projection = projection or Projection(resource_type)
    with store.write() as tx:
        current = _load(tx, resource_type, resource_id, projection)
        _check_if_match(if_match, current)
        if password is not None and password == current.get("password_digest"):
            password = None   # the password it has: Okta's PUT sends it every time
        change = MembershipChange()
        if resource_type is GROUP:
            _replace_members(tx, resource_id, members, change)
        current = _store_change(tx, resource_type, current, json.loads(current["document"]), document, password,
                                change, ChangeEvents(tx, base_url, token_name, "put"))
        # Rendered from what was just written; a user's groups are unchanged.
        return _render_loaded(tx, resource_type, current, base_url, projection, document)


def _put_password(store, resource_id, password):
    """The digest to store for a PUT's password (None for none): the stored
    one when the password is the one the user has, so that replace_resource
    sees no change, else a new one. Both cost a scrypt, before the write lock."""
    if password is None:
        return None
    stored = store.read_once().password_digest_of(resource_id)
    return stored if stored and verify_password(password, stored) else password_digest(password)


def _store_change(tx, resource_type, current, before, document, password, change, events):
    """Write a PUT's or PATCH's result `document` over `current` (the row as
    read, its document parsed: `before`) and append its events, unless
    nothing changed: then the version stays (Entra and Okta resend unchanged
    values). Returns the row as stored now."""
    if document == before and password is None and not change:
        return current
    row = _row_for(resource_type, current["id"], document, utc_now(), current["version"] + 1, password=password)
    tx.update_resource(resource_type.table, current, row)
    stored = dict(current, **row)   # a user's groups are unchanged
    record_update(events, resource_type, stored, before, document, password is not None)
    if change:
        events.membership(_group_identity(stored), *change.split())
    events.append()
    return stored


def patch_resource(store, resource_type, resource_id, operations, base_url, if_match=None, projection=None,
                   token_name=None):
    """PATCH (RFC 7644 §3.5.2): all `operations` (from read_patch_request) apply or none do.

    Returns the resource (projected) when `projection` is given, else None:
    a group PATCH answers 204 unless the client asked for attributes, so it
    never reads the member list.
    """
    with store.write() as tx:
        current = _load(tx, resource_type, resource_id, projection)
        _check_if_match(if_match, current)
        before = json.loads(current["document"])
        document, member_changes = apply_patch(resource_type, before, operations, resource_id)
        password = _take_password(document) if resource_type is USER else None
        change = _apply_member_changes(tx, resource_id, member_changes) if member_changes else MembershipChange()
        current = _store_change(tx, resource_type, current, before, document, password, change,
                                ChangeEvents(tx, base_url, token_name, "patch"))
        if projection is None:
            return None
        return _render_loaded(tx, resource_type, current, base_url, projection, document)


def delete_resource(store, resource_type, resource_id, base_url, if_match=None, token_name=None):
    """DELETE (RFC 7644 §3.6); the resource also leaves every group it was
    in. Its events: group.member_removed for each of those groups, then
    user.deleted or group.deleted carrying the last representation (a
    tombstone; a deleted group's own members make no events). Returns the
    userName or displayName it had."""
    with store.write() as tx:
        row = _load(tx, resource_type, resource_id)
        _check_if_match(if_match, row)
        events = ChangeEvents(tx, base_url, token_name, "delete")
        for group in tx.delete_resource(resource_type.table, resource_id):
            events.membership(group, removed=[(resource_id, resource_type.name)])
        events.resource(resource_type.name.lower() + ".deleted", resource_type, row)
        events.append()
    return row["user_name"] if resource_type is USER else row["display_name"]


def list_resources(store, resource_types, query, base_url):
    """GET with a filter, or POST .search (RFC 7644 §3.4.2, §3.4.3): a ListResponse.

    With several resource types (a query at the root), each contributes the
    resources its attributes can match, users first.
    """
    tree = parse_filter(query.filter) if query.filter is not None else None
    plans = []
    first_error = None
    for resource_type in resource_types:
        try:
            where, params = filter_to_sql(tree, resource_type)
            order = sort_to_sql(resource_type, query.sort_by, query.descending)
        except ScimError as exc:
            if len(resource_types) == 1:
                raise
            first_error = first_error or exc
            continue
        plans.append((resource_type, where, params, order))
    if not plans:
        raise first_error
    if len(plans) == 1 and query.start_index == 1 and query.count > 0:
        # Entra's lookups: one type, first page. One SELECT, read without a
        # transaction; only a full page needs a second statement (the count),
        # and then both run again in one snapshot below.
        resource_type, where, params, order = plans[0]
        projection = Projection(resource_type, query.attributes, query.excluded)
        rows = store.read_once().select(resource_type.table, where, params, order, query.count, 0,
                                        with_groups=resource_type is USER and projection.wants("groups"))
        if len(rows) < query.count and (resource_type is USER or not projection.wants("members")):
            resources = _render_page(store.read_once(), resource_type, rows, base_url, projection)
            return _list_response(resources, len(resources), query.start_index)
    resources = []
    total = 0
    offset = query.start_index - 1
    with store.read() as tx:
        for resource_type, where, params, order in plans:
            wanted = query.count - len(resources)
            rows = []
            if wanted > 0:
                projection = Projection(resource_type, query.attributes, query.excluded)
                rows = tx.select(resource_type.table, where, params, order, wanted, offset,
                                 with_groups=resource_type is USER and projection.wants("groups"))
                resources.extend(_render_page(tx, resource_type, rows, base_url, projection))
            # A short first page is the whole result (Entra's lookups: 0 or 1
            # row): only otherwise is a count needed.
            if offset == 0 and len(rows) < wanted:
                matching = len(rows)
            else:
                matching = tx.count(resource_type.table, where, params)
            offset = max(0, offset - matching)
            total += matching
    return _list_response(resources, total, query.start_index)


def _list_response(resources, total, start_index):
    """RFC 7644 §3.4.2: every list response carries all five keys."""
    return {"schemas": [URN_LIST], "totalResults": total, "Resources": resources,
            "startIndex": start_index, "itemsPerPage": len(resources)}


def _render_page(tx, resource_type, rows, base_url, projection):
    page = []
    for row in rows:
        members = tx.group_members(row["id"]) if resource_type is GROUP and projection.wants("members") else None
        page.append(projection.apply(render_resource(resource_type, row, base_url, members,
                                                     row.get("groups"))))
    return page


# -- tokens --------------------------------------------------------------------

def create_token(store, name, expires=None, scope="provision"):
    """A new bearer token named `name`, valid until `expires` (a UTC
    dateTime; None: until revoked). The token itself is returned once and
    never stored. Its `scope` (TOKEN_SCOPES): "provision", for the
    identity provider, writes under /scim and cannot read the feed; "read",
    for the customer's software, reads /scim and the feed and writes
    nothing."""
    if not name or not name.strip() or len(name) > MAX_TOKEN_NAME:
        raise ValueError("a token name must be 1 to %d characters" % MAX_TOKEN_NAME)
    if scope not in TOKEN_SCOPES:
        raise ValueError("a token's scope is one of %s" % ", ".join(TOKEN_SCOPES))
    token = generate_token()
    with store.write() as tx:
        tx.insert_token(name.strip(), token_digest(token), utc_now(), token_hint(token), expires, scope)
    return token


def rotate_token(store, name):
    """A new token beside the live token `name`, which stays valid until it
    is revoked, so Entra can be switched over without a failed cycle.
    The new token has the old one's scope. Returns (new name, token)."""
    with store.read() as tx:
        taken = tx.token_names()
    if name not in taken:
        raise ValueError("no active token named %r" % name)
    base = re.sub(r" \(rotated \d+\)$", "", name)
    number = 2
    while True:
        suffix = " (rotated %d)" % number
        new_name = base[:MAX_TOKEN_NAME - len(suffix)] + suffix
        if new_name not in taken:
            break
        number += 1
    return new_name, create_token(store, new_name, scope=taken[name])


def list_tokens(store):
    """Every token as a dict (name, hint, created, last_used, expires,
    revoked, status), oldest first."""
    now = utc_now()
    with store.read() as tx:
        tokens = tx.list_tokens()
    for token in tokens:
        token["status"] = ("revoked" if token["revoked"] else
                           "expired" if token["expires"] and token["expires"] <= now else "active")
    return tokens


def has_live_token(store):
    with store.read() as tx:
        return bool(tx.live_tokens())


def revoke_token(store, name):
    """Revoke the live token called `name`; ValueError if there is none."""
    with store.write() as tx:
        if not tx.revoke_token(name, utc_now()):
            raise ValueError("no active token named %r" % name)


# -- the change feed -------------------------------------------------------------
#
# GET /events reads the events table in sequence order. A cursor names the
# last event a consumer has seen: its sequence number and the start of its
# random id. Sequence numbers alone would be handed out again after a
# `restore` from an older backup (or from a replica that was behind), and a
# consumer would silently skip the new events under numbers it has seen; an
# id that no longer matches, or a number beyond the head, is answered 410
# instead, as is a cursor whose event has been pruned (Kubernetes answers a
# resourceVersion older than it keeps the same way).

class FeedPage(typing.NamedTuple):
    after: int         # the sequence number read after
    events: list       # each event's JSON text, its cursor first
    next_cursor: str   # the cursor to read after next
    has_more: bool     # more events follow at once


def event_cursor(seq, event_id):
    """The cursor naming event `seq` whose id is `event_id`."""
    return "%d.%s" % (seq, event_id.replace("-", "")[:12])


def parse_cursor(text):
    """(seq, id tag) of a cursor; "0" is before the first event. 400 if it is none of ours."""
    match = re.fullmatch(r"(0)|([1-9][0-9]{0,17})\.([0-9a-f]{12})", text or "")
    if match is None:
        raise ScimError(400, "invalidValue", "%r is not a cursor of this feed: use next_cursor from an "
                                             "answer, or GET /events/head" % (text or "")[:40])
    return (0, None) if match.group(1) else (int(match.group(2)), match.group(3))


def feed_gone(why):
    """410 Gone for a cursor the feed cannot continue from."""
    return ScimError(410, None, "%s. Start again: GET /events/head, list every user and group (GET /scim/Users "
                                "and /scim/Groups, or `export`), then follow the feed from that head" % why)


def _resolve_cursor(tx, cursor):
    """The sequence number to read after, for a parsed cursor (None: from the oldest event kept)."""
    oldest, newest = tx.event_bounds()
    if cursor is None:
        return oldest - 1 if oldest else newest
    seq, tag = cursor
    if seq == 0:
        if oldest > 1:
            raise feed_gone("The events after this cursor are older than the feed keeps (--events-days)")
        return 0
    if seq > newest:
        raise feed_gone("This cursor is beyond the newest event: the database was restored from an older copy")
    event_id = tx.event_id_at(seq)
    if event_id is None:
        raise feed_gone("This cursor's event is older than the feed keeps (--events-days)")
    if event_cursor(seq, event_id) != "%d.%s" % (seq, tag):
        raise feed_gone("This cursor names an event of another history: the database was restored from a copy")
    return seq


def read_events(store, cursor, limit):
    """A FeedPage of up to `limit` events after `cursor` (parse_cursor's; None: from the oldest kept)."""
    with store.read() as tx:
        after = _resolve_cursor(tx, cursor)
        rows = tx.events_after(after, limit + 1)
    page = rows[:limit]
    events = ['{"cursor":"%s",%s' % (event_cursor(seq, event_id), body[1:]) for seq, event_id, body in page]
    if page:
        next_cursor = event_cursor(page[-1][0], page[-1][1])
    else:   # nothing after the cursor (or no event at all): it stays
        next_cursor = "0" if cursor is None or cursor[0] == 0 else "%d.%s" % cursor
    return FeedPage(after, events, next_cursor, len(rows) > limit)


def follow_events(store, cursor, limit, wait, parked=contextlib.nullcontext):
    """read_events; when there is nothing yet, wait up to `wait` seconds for
    the next commit that appends events (a long-poll), then read again.
    The wait runs inside `parked()` (the HTTP layer's parked_connection)."""
    page = read_events(store, cursor, limit)
    if page.events or wait <= 0:
        return page
    with parked():
        arrived = store.event_head.wait_past(page.after, wait)
    return read_events(store, cursor, limit) if arrived else page


def head_cursor(store, tx=None):
    """The cursor of the newest event ("0" before the first), seen by `tx`
    (a read snapshot) or now."""
    tx = tx or store.read_once()
    newest = tx.event_bounds()[1]
    event_id = tx.event_id_at(newest) if newest else None
    return event_cursor(newest, event_id) if event_id else "0"


def feed_figures(store):
    """The feed for /metrics and the overview: head and oldest sequence
    numbers kept, the oldest event's time, events per second (last minute)."""
    with store.read() as tx:
        oldest, newest = tx.event_bounds()
        oldest_time = tx.event_time_at(oldest) if oldest else None
    return {"head": newest, "oldest": oldest, "oldest_time": oldest_time,
            "per_second": store.event_head.per_second()}


def prune_events(store, days, wait):
    """Delete events older than `days`, EVENTS_PRUNE_BATCH per transaction so
    that no write waits long behind the pruning. Returns how many went."""
    before = (datetime.datetime.now(datetime.timezone.utc)
              - datetime.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S")
    removed = 0
    while True:
        with store.write(wait) as tx:
            batch = tx.prune_events(before, EVENTS_PRUNE_BATCH)
        removed += batch
        if batch < EVENTS_PRUNE_BATCH:
            return removed


class EventRetention:
    """Deletes the feed's events older than `days`, every
    ACTIVITY_PRUNE_SECONDS: a beat of the activity log's thread."""

    def __init__(self, store, days, clock=time.monotonic):
        self.store = store
        self.days = days
        self.clock = clock
        self._next = 0.0

    def __call__(self):
        if self.clock() < self._next:
            return
        self._next = self.clock() + ACTIVITY_PRUNE_SECONDS
        try:
            prune_events(self.store, self.days, ACTIVITY_WRITE_WAIT)
        except StorageFault:
            self._next = 0.0   # the storage monitor has said why; tried again at the next beat


# -- backups and data out -------------------------------------------------------

EXPORT_FORMATS = ("json", "ndjson", "csv")


def export_resources(store, resource_type, form, out, base_url):
    """Write every user or group to `out` (a binary file), from one read
    snapshot, a thousand at a time (memory does not grow with the
    directory): csv as the stable view's columns (scim_users, scim_groups),
    json (an array) and ndjson (one per line) as SCIM resources, users with
    their groups, groups with their members. Returns the feed's cursor at
    that snapshot: following the feed from it (GET /events?after=) misses
    no change and repeats none the export holds."""
    with store.read() as tx:
        cursor = head_cursor(store, tx)
        if form == "csv":
            names, batches = tx.view_rows("scim_users" if resource_type is USER else "scim_groups")
            text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
            writer = csv.writer(text)
            writer.writerow(names)
            for batch in batches:
                writer.writerows(batch)
            text.detach()
            return cursor
        opening, separator, closing = (b"[\n", b",\n", b"\n]\n") if form == "json" else (b"", b"\n", b"\n")
        out.write(opening)
        first = True
        for rows in tx.all_rows(resource_type.table):
            groups = tx.groups_of([row["id"] for row in rows]) if resource_type is USER else None
            for row in rows:
                if not first:
                    out.write(separator)
                first = False
                if resource_type is USER:
                    out.write(json_bytes(render_resource(USER, row, base_url, None, groups[row["id"]])))
                else:
                    for piece in group_json_pieces(tx, row, base_url, Projection(GROUP))[1]:
                        out.write(piece)
        out.write(closing if not first or form == "json" else b"")
    return cursor


def backup_database(store, destination):
    """A consistent copy of the whole database while it is in use: VACUUM
    INTO reads it in one transaction (writers go on; the copy is what was
    committed when it began). `destination` must not exist yet."""
    if os.path.exists(destination):
        raise ValueError("%s exists already; a backup never overwrites a file" % destination)
    store.backup_to(destination)
    with contextlib.closing(_open_read_only(destination)) as copy:
        problems = Transaction(copy).integrity_problems()
    if problems:
        raise DatabaseError("the backup in %s fails SQLite's integrity check: %s"
                            % (destination, "; ".join(problems[:3])))


def check_database(path):
    """(schema version, integrity findings) of a database file, read-only;
    DatabaseError if it is no database or newer than this program."""
    if not os.path.exists(path):
        raise DatabaseError("%s does not exist" % path)
    try:
        with contextlib.closing(_open_read_only(path)) as conn:
            tx = Transaction(conn)
            version = tx.schema_version()
            problems = tx.integrity_problems()
    except sqlite3.DatabaseError as exc:
        raise DatabaseError("%s is not a usable SQLite database: %s" % (path, exc)) from exc
    if version > SCHEMA_VERSION:
        raise DatabaseError("%s has schema version %d; this scim-appliance knows up to %d"
                            % (path, version, SCHEMA_VERSION))
    return version, problems


def check_backup(source):
    """Refuse, before anything is touched, a file that cannot be restored:
    no database, damaged, not the appliance's, or from a newer version."""
    version, problems = check_database(source)
    if problems:
        raise DatabaseError("%s fails SQLite's integrity check: %s" % (source, "; ".join(problems[:3])))
    if version == 0:
        raise DatabaseError("%s is not a scim-appliance database" % source)


def restore_database(store, source):
    """Replace the database's whole content with a backup's, in one
    transaction, then carry it forward to this version's schema. The
    caller holds the server lock: no server is using the database."""
    check_backup(source)
    store.restore_from(source)
    store.migrate()
    store.refresh_event_head()


def set_admin_password(store, password):
    """Set (or change) the admin page's password."""
    if not isinstance(password, str) or len(password) < MIN_ADMIN_PASSWORD:
        raise ValueError("the admin password must be at least %d characters" % MIN_ADMIN_PASSWORD)
    digest = password_digest(password)   # scrypt before the write lock is taken
    with store.write() as tx:
        tx.set_admin_password_digest(digest, utc_now())


def has_admin_password(store):
    return store.read_once().admin_password_digest() is not None


def check_admin_password(store, password):
    digest = store.read_once().admin_password_digest()
    return digest is not None and verify_password(password, digest)


def provisioning_status(store, now=None):
    """What the admin page's overview shows: counts of users and groups,
    the last token use, requests and errors in the last hour and day, the
    last few failed requests, and whether the storage takes writes."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    hour_ago = (now - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    day_ago = (now - datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    with store.read() as tx:
        status = tx.resource_counts()
        status["last_use"] = tx.last_token_use()
        status["last_hour"] = tx.request_totals(hour_ago)
        status["last_day"] = tx.request_totals(day_ago)
        status["recent_errors"] = tx.search_activity(failed=True, limit=5)
    status["storage"] = store.monitor.snapshot()
    return status


def database_figures(store):
    """For /metrics: user and group counts, each live token's last use, the
    size of the database files, and the storage's condition."""
    with store.read() as tx:
        figures = tx.resource_counts()
        figures["last_used"] = [(token["name"], token["last_used"]) for token in tx.list_tokens()
                                if token["last_used"] and not token["revoked"]]
    figures["bytes"] = {part: os.path.getsize(store.path + suffix) for part, suffix in (("db", ""), ("wal", "-wal"))
                        if os.path.exists(store.path + suffix)}
    figures["storage"] = store.monitor.snapshot()
    return figures


def search_activity(store, text=None, failed=None, limit=ACTIVITY_PAGE_ROWS):
    with store.read() as tx:
        return tx.search_activity(text, failed, limit)


class ActivityLog:
    """What the admin page shows of Entra's work: every write and every
    failed request, the number of requests and errors per minute, and each
    token's last use.

    The SCIM layer calls `record` once per request: a list append under a
    lock, so nothing on a request's path waits for the database. `flush`
    writes whatever is pending in one transaction: every
    ACTIVITY_FLUSH_SECONDS from a background thread, and before the admin
    page reads. If the process dies, at most the last second of the log is
    lost; SCIM data never is (it was committed before the response). Rows
    older than `retention_days`, and beyond the newest `max_rows`, are
    pruned every ACTIVITY_PRUNE_SECONDS.

    While the database cannot be written, what is pending is kept for the
    next try, up to ACTIVITY_MAX_PENDING entries; older ones are dropped and
    counted in `dropped`. A failed flush never reaches a SCIM request.
    """

    def __init__(self, store, retention_days=30, max_rows=100000, clock=time.monotonic, beat=()):
        self.store = store
        # More work for the background thread, every ACTIVITY_FLUSH_SECONDS
        # and at `stop`: the access log's writes, the storage probe.
        self.beat = list(beat)
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.clock = clock
        self._pending = collections.deque(maxlen=ACTIVITY_MAX_PENDING)
        self._counts = {}      # minute -> [requests, errors]
        self._token_uses = {}  # token digest -> Unix time of its latest use
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._next_prune = None
        self._next_counts = 0.0
        self._stop = threading.Event()
        self._thread = None
        self.dropped = 0

    def record(self, status, entry=None):
        """Count one request; `entry` (ACTIVITY_COLUMNS, without the time)
        also goes in the log."""
        now = time.time()   # turned into text when written: record is on every request's path
        with self._lock:
            counts = self._counts.setdefault(int(now // 60), [0, 0])
            counts[0] += 1
            counts[1] += status >= 400
            if entry is not None:
                if len(self._pending) == ACTIVITY_MAX_PENDING:   # unwritable for long: the oldest goes
                    self.dropped += 1
                self._pending.append((now,) + tuple(entry))

    def _keep(self, entries):
        """Put `entries` back before those recorded since, keeping the
        newest ACTIVITY_MAX_PENDING. Called with _lock held."""
        merged = entries + list(self._pending)
        excess = max(0, len(merged) - ACTIVITY_MAX_PENDING)
        self.dropped += excess
        self._pending = collections.deque(merged[excess:], maxlen=ACTIVITY_MAX_PENDING)

    def record_token_use(self, digest):
        """A token authenticated a request: its last_used is written with the next flush."""
        with self._lock:
            self._token_uses[digest] = time.time()

    def flush(self, counts_due=True, wait=None):
        """Write what is pending; prune when it is time. With `counts_due`
        false (the background beat), counts alone wait for a minute: every
        commit from this thread's connection makes the serving thread's
        connection drop its page cache, and a read-only stream of Entra
        lookups would otherwise pay for that every second.

        Waits at most `wait` seconds for the write lock (default: the
        store's lock_timeout). True when everything pending is written;
        False when the storage refused it (it is kept for the next flush)
        or the lock was not free in time.
        """
        wait = self.store.lock_timeout if wait is None else wait
        if not self._flush_lock.acquire(timeout=wait):
            return False
        try:
            with self._lock:
                if (not self._pending and not self._token_uses and not counts_due
                        and self.clock() < self._next_counts):
                    return True
                pending = list(self._pending)
                self._pending.clear()
                counts, self._counts = self._counts, {}
                uses, self._token_uses = self._token_uses, {}
            self._next_counts = self.clock() + ACTIVITY_COUNTS_SECONDS
            try:
                if pending or counts or uses:
                    self._write(pending, counts, uses, wait)
            except StorageFault:
                self._put_back(pending, counts, uses)
                return False
            if self._next_prune is None or self.clock() >= self._next_prune:
                try:
                    self._prune(wait)
                except StorageFault:
                    return False   # tried again at the next flush
            return True
        finally:
            self._flush_lock.release()

    def _put_back(self, pending, counts, uses):
        """Keep what a failed flush took, for the next one."""
        with self._lock:
            self._keep(pending)
            for minute, (requests, errors) in counts.items():
                merged = self._counts.setdefault(minute, [0, 0])
                merged[0] += requests
                merged[1] += errors
            for digest, used in uses.items():
                self._token_uses[digest] = max(used, self._token_uses.get(digest, used))

    def _write(self, pending, counts, uses, wait):
        rows = [(utc_text(row[0]),) + row[1:] for row in pending]
        minutes = {utc_text(minute * 60)[:16]: tuple(figures) for minute, figures in counts.items()}
        # Names the request did not carry (a group PATCH answers 204): the
        # resource's current name, where it still exists.
        unnamed = {}
        for _, _, _, resource_type, resource_id, resource_name, *_ in rows:
            if resource_type in RESOURCE_TYPES and resource_id and not resource_name:
                unnamed.setdefault(RESOURCE_TYPES[resource_type].table, set()).add(resource_id)
        with self.store.write(wait) as tx:
            names = {}
            for table, ids in unnamed.items():
                names.update(tx.resource_names(table, ids))
            tx.insert_activity([row if row[5] or row[4] not in names else row[:5] + (names[row[4]],) + row[6:]
                                for row in rows])
            tx.add_request_counts(minutes)
            for digest, used in uses.items():
                tx.touch_token(digest, utc_text(used))

    def _prune(self, wait):
        before = (datetime.datetime.now(datetime.timezone.utc)
                  - datetime.timedelta(days=self.retention_days)).strftime("%Y-%m-%dT%H:%M:%S")
        with self.store.write(wait) as tx:
            tx.prune_activity(before, self.max_rows)
        self._next_prune = self.clock() + ACTIVITY_PRUNE_SECONDS

    def start(self):
        """Flush from a background thread until `stop`. A storage fault is
        not reported here: the store's monitor logs each change of condition."""
        def run():
            while not self._stop.wait(ACTIVITY_FLUSH_SECONDS):
                self._run_beat()
                try:
                    self.flush(counts_due=False, wait=ACTIVITY_WRITE_WAIT)
                except sqlite3.Error as exc:   # not a storage fault: a bug
                    print("scim-appliance: activity log not written: %s" % exc, file=sys.stderr)
        self._thread = threading.Thread(target=run, name="activity-log", daemon=True)
        self._thread.start()

    def _run_beat(self):
        for task in self.beat:
            task()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._run_beat()
        try:
            if not self.flush():
                print("scim-appliance: activity log not written at shutdown: %s"
                      % (self.store.monitor.detail or "the database was busy"), file=sys.stderr)
        except sqlite3.Error as exc:
            print("scim-appliance: activity log not written: %s" % exc, file=sys.stderr)


class TokenCheck:
    """Authenticates bearer tokens.

    Each thread keeps the live tokens it last read. It reads them again at
    once when a commit in this process changed them (Store.token_generation),
    and — asking SQLite whether another connection has committed (`token
    create`/`revoke` run in another process) — at most every
    TOKEN_RECHECK_SECONDS. So a revocation takes effect within a tenth of a
    second, and most requests make no call into SQLite for their token at
    all (each such call costs a GIL hand-off).

    A token's use is handed to `on_use(digest)` (ActivityLog.record_token_use)
    at most once a minute: last_used is written off the request's path, so
    reads stay reads and never wait for the write lock.
    """

    def __init__(self, store, on_use=None, clock=time.monotonic):
        self.store = store
        self.on_use = on_use
        self.clock = clock
        self._touched = {}
        self._lock = threading.Lock()
        self._cache = threading.local()   # per thread, as connections are

    def __call__(self, presented):
        """The token's name, or None if `presented` is not a live token."""
        found = self.check(presented)
        return found and found[0]

    def check(self, presented):
        """(name, scope) of the token, or None if `presented` is not a live token."""
        cache = self._cache
        now = self.clock()
        generation = self.store.token_generation
        stale = getattr(cache, "generation", None) != generation
        if stale or now - cache.checked >= TOKEN_RECHECK_SECONDS:
            tx = self.store.read_once()
            version = tx.data_version()
            if stale or version != cache.version:
                cache.tokens = tx.live_tokens()
                cache.version = version
            cache.checked, cache.generation = now, generation
        found = match_token(presented, cache.tokens)
        if found is None:
            return None
        name, digest, expires, scope = found
        if expires is not None and expires <= utc_now():
            return None
        if self.on_use is not None:
            now = time.monotonic()
            with self._lock:
                due = now - self._touched.get(digest, -TOKEN_TOUCH_SECONDS) >= TOKEN_TOUCH_SECONDS
                if due:
                    self._touched[digest] = now
            if due:
                self.on_use(digest)
        return name, scope


# ============================================================================
# 9. SCIM HTTP
# ============================================================================
#
# A WSGI application of our own: the SCIM URL space is a dozen paths, and
# routing them with a dictionary costs a few microseconds where bottle's
# router, request and response objects cost about 40 per request (a third
# of a whole lookup). Handlers are a few lines: read the request, call
# section 8, return a Response. Every failure leaves through
# `error_response`, as a SCIM Error (RFC 7644 §3.12), never as HTML.

_RESOURCE_SEGMENTS = {name.lower(): name for name in (
    "Users", "Groups", "ServiceProviderConfig", "Schemas", "ResourceTypes", "Me", "Bulk", ".search")}
_RESOURCE_SEGMENTS["serviceproviderconfigs"] = "ServiceProviderConfig"

STATUS_LINES = {code: "%d %s" % (code, phrase) for code, phrase in http.client.responses.items()}

# RFC 9110 §9 and RFC 5789 (PATCH): the methods this server recognises.
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))

# RFC 9110 §8.6 and §15.4.5: 204 and 304 carry no content, so no
# Content-Length or Content-Type either.
_NO_CONTENT = (204, 304)


class Response(typing.NamedTuple):
    """A handler's answer: the body is bytes, or an iterable of bytes with a
    close() that the server calls when it is done with it (PEP 3333, WSGI)."""
    status: int
    headers: list
    body: object = b""


def json_bytes(value):
    return json_text(value).encode("utf-8")


def scim_response(status, body=None, headers=None):
    headers = list((headers or {}).items())
    if body is None:
        return Response(status, headers)
    return Response(status, [("Content-Type", SCIM_MEDIA_TYPE)] + headers, json_bytes(body))


def error_response(error):
    headers = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="scim"'   # RFC 6750 §3
    if getattr(error, "retry_after", None):
        headers["Retry-After"] = str(error.retry_after)
    if getattr(error, "allow", None):
        headers["Allow"] = ", ".join(error.allow)             # RFC 9110 §15.5.6
    return scim_response(error.status, error.to_json(), headers)


# What a request leaves in its environ for the activity log.
TOKEN_NAME_KEY = "scim_appliance.token_name"
TOKEN_SCOPE_KEY = "scim_appliance.token_scope"
ACTIVITY_KEY = "scim_appliance.activity"   # {"id", "name", "summary"}
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


# The change feed, beside /scim on the SCIM listener (it is no SCIM resource).
FEED_PATH = "/events"
FEED_HEAD_PATH = "/events/head"
FEED_PATHS = (FEED_PATH, FEED_HEAD_PATH)


def is_feed_request(method, path):
    """Whether a request reads the change feed: serve() runs it on a feed
    thread, where a long-poll's wait holds up nothing else."""
    return path.rstrip("/") == FEED_PATH


def feed_response(body):
    return Response(200, [("Content-Type", "application/json"), ("Cache-Control", "no-store")], body)


# Where the server (section 11) puts the request's waitress channel.
CHANNEL_KEY = "scim_appliance.channel"


@contextlib.contextmanager
def parked_connection(environ):
    """Take the request's connection out of waitress's socket map while its
    long-poll waits, and put it back (waking the event loop) when it is done.

    The event loop asks every connection in the map, on every pass, whether
    it wants to read or write: 200 waiting long-polls made each pass ~40 us
    longer, a tenth of a lookup. A connection whose request is in service
    has nothing to read or write until its answer is ready, so leaving it
    out costs nothing; its answer is written after it is back.
    """
    channel = environ.get(CHANNEL_KEY)
    if channel is None:   # not under waitress (webtest)
        yield
        return
    socket_map, fileno = channel._map, channel._fileno
    socket_map.pop(fileno, None)
    try:
        yield
    finally:
        if channel._fileno == fileno:   # still open
            socket_map[fileno] = channel
        channel.server.pull_trigger()


def is_write_request(method, path):
    """Whether a request may write (a POST .search only reads): serve() runs
    it on a writer thread, where waiting for the write lock holds up no read."""
    return method in WRITE_METHODS and not path.rstrip("/").lower().endswith("/.search")


def note_activity(environ, resource_type, resource=None, summary=None):
    """Tell the activity log what a write did: its summary, and the
    resource's id and name once they are known."""
    facts = environ.setdefault(ACTIVITY_KEY, {})
    if summary is not None:
        facts["summary"] = summary
    if resource is not None:
        facts["id"] = resource.get("id")
        facts["name"] = resource.get("userName" if resource_type is USER else "displayName")


def activity_entry(environ, segments, status, error):
    """The activity-log entry (ACTIVITY_COLUMNS after the time) for a
    request: every write and every failure; None for a successful read."""
    method = environ.get("REQUEST_METHOD", "")
    if method not in WRITE_METHODS and status < 400:
        return None
    facts = environ.get(ACTIVITY_KEY, {})
    resource_type = resource_id = None
    if segments and segments[0] in ("Users", "Groups"):
        resource_type = "User" if segments[0] == "Users" else "Group"
        if len(segments) == 2 and segments[1] != ".search":
            resource_id = segments[1]
    return (environ.get(TOKEN_NAME_KEY), method[:16], resource_type, facts.get("id") or resource_id,
            facts.get("name"), facts.get("summary"), status,
            error.scim_type if error is not None else None, error.detail if error is not None else None)


def summarize_patch(operations):
    """A PATCH in a few words for the activity log: "active → false",
    "+3 members", "replace name.familyName". Attribute values other than
    `active` are left out: the log names what changed, not to what."""
    parts = []
    for op in operations:
        if op.path is None and isinstance(op.value, dict):
            parts.extend(_summarize_change(op.op, key, value, True) for key, value in op.value.items()
                         if key.lower() != "schemas")
        else:
            parts.append(_summarize_change(op.op, op.path or "", op.value, op.has_value))
    return ", ".join(parts)[:300]


def _summarize_change(op, path, value, has_value):
    name = path.split(":")[-1] if path.lower().startswith("urn:") else path
    if name.lower().startswith("members"):
        count = len(value) if isinstance(value, list) else int(bool(value))
        plural = "" if count == 1 else "s"
        if op == "add":
            return "+%d member%s" % (count, plural)
        if op == "remove":
            if "[" in name:
                return "-1 member"
            return "-%d member%s" % (count, plural) if has_value and count else "all members removed"
        return "members replaced (%d)" % count
    if name.lower() == "active" and op != "remove":
        return "active → %s" % str(value).lower()
    if op == "remove":
        return "%s removed" % name
    return "%s %s" % (op, name)


def route_label(segments):
    """The route a request took, for metrics: /Users/{id}, never an id; any
    path that is no endpoint is "other", so labels stay few whatever
    clients send."""
    if segments is None or (segments and segments[0] not in _RESOURCE_SEGMENTS.values()):
        return "other"
    if not segments:
        return "/"
    if len(segments) == 1 or segments[1:] == (".search",):
        return "/" + "/".join(segments)
    return "/%s/%s" % (segments[0], "{id}" if len(segments) == 2 else "...")


def logged_path(path_info, query):
    """The request path (PATH_INFO, as the server passed it) with the query's
    parameter names but not their values: a filter names the user it looks
    for, and that stays out of logs."""
    path = path_info.encode("latin-1", "replace").decode("utf-8", "replace")
    if not query:
        return path
    names = [part.split("=", 1)[0] for part in query.split("&") if part]
    return path + "?" + "&".join(names)


class RequestMetrics:
    """Counters for /metrics (Prometheus text format): requests by method,
    route and status, and a histogram of how long the SCIM layer took."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = {}                           # (method, route, status) -> count
        self.buckets = [0] * (len(self.BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0
        self.started = time.time()

    def record(self, method, route, status, seconds):
        slot = bisect.bisect_left(self.BUCKETS, seconds)   # the first bucket with seconds <= bound
        key = (method if method in HTTP_METHODS else "other", route, status)
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            self.buckets[slot] += 1
            self.duration_sum += seconds

    def snapshot(self):
        with self._lock:
            return dict(self.requests), list(self.buckets), self.duration_sum


class AccessLog:
    """One line per SCIM request: time, client, method, path (query values
    left out), status, milliseconds, token name (never the token).

    `plain` or `json` lines, to stderr (a text stream) or a file opened
    unbuffered in binary append mode. Lines are buffered and written at most
    every ACTIVITY_FLUSH_SECONDS (and at shutdown), so a request never waits
    for the log's disk or pipe. Lines that cannot be written (a full disk)
    are dropped and counted in `dropped`; that is said once when it starts
    and once when the log is written again.
    """

    def __init__(self, form="plain", stream=None):
        self.form = form
        self.stream = stream or sys.stderr
        self._lines = []
        self._lock = threading.Lock()
        self.dropped = 0
        self._failing = False
        self._torn = False   # the last write stopped within a line

    def record(self, environ, status, seconds):
        entry = (time.time(), environ.get("REMOTE_ADDR", "-"), environ.get("REQUEST_METHOD", "-"),
                 environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""), status, seconds,
                 environ.get(TOKEN_NAME_KEY))
        with self._lock:
            self._lines.append(entry)   # formatted when written, off the request's path

    def format(self, entry):
        moment, client, method, path_info, query, status, seconds, token = entry
        path = logged_path(path_info, query)
        if self.form == "json":
            return json.dumps({"time": utc_text(moment), "client": client, "method": method, "path": path,
                               "status": status, "duration_ms": round(seconds * 1000, 2), "token": token},
                              ensure_ascii=False) + "\n"
        # The path is as the server decoded it: quotes and control characters
        # escaped so that one line stays one line.
        return '%s %s "%s %s" %d %.1fms token=%s\n' % (
            utc_text(moment), client, method, _escaped(path), status, seconds * 1000,
            '"%s"' % _escaped(token) if token else "-")

    def flush(self):
        with self._lock:
            lines, self._lines = self._lines, []
        if not lines:
            return
        text = "".join(self.format(entry) for entry in lines)
        try:
            if isinstance(self.stream, io.TextIOBase):
                self.stream.write(text)
                self.stream.flush()
            else:
                self._write_bytes(text.encode("utf-8"))
        except (OSError, ValueError) as exc:   # a full disk must not take the server down
            self.dropped += len(lines)
            if not self._failing:
                self._failing = True
                print("scim-appliance: access log not written (%s): its lines are dropped until it can be "
                      "written again" % exc, file=sys.__stderr__)
            return
        if self._failing:
            self._failing = False
            print("scim-appliance: access log written again (%d lines dropped so far)" % self.dropped,
                  file=sys.__stderr__)

    def _write_bytes(self, data):
        """All of `data` to the unbuffered file, in as few writes as it takes;
        after a write that stopped within a line, the next one starts on a
        line of its own."""
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                view = view[self.stream.write(view):]
        finally:
            self._torn = bool(view) and (len(view) < len(data) or self._torn)


# What JSON escapes in a string (json.dumps, ensure_ascii=False).
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _escaped(text):
    """`text` as inside a JSON string: quotes, backslashes and control
    characters escaped (most log text has none, and is kept as it is)."""
    if _JSON_ESCAPED.search(text) is None:
        return text
    return json.dumps(text, ensure_ascii=False)[1:-1]


def request_header(environ, name):
    """A request header as the server passed it (latin-1 text), or None."""
    return environ.get("HTTP_" + name.upper().replace("-", "_"))


class AuthThrottle:
    """Failed authentications per client address, in a sliding window.

    After AUTH_FAILURE_LIMIT failures within AUTH_FAILURE_WINDOW seconds, a
    request from that address without a valid token gets 429 and
    Retry-After until the oldest failure leaves the window. A request with
    a valid token is never refused: the token is checked first. The client
    address is waitress's REMOTE_ADDR, which is the X-Forwarded-For address
    only when the request came from the configured --trusted-proxy.
    """

    MAX_ADDRESSES = 10000   # memory bound: the oldest addresses are forgotten first

    def __init__(self, limit=AUTH_FAILURE_LIMIT, window=AUTH_FAILURE_WINDOW, clock=time.monotonic):
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures = {}   # address -> [monotonic times], oldest first; dicts keep insertion order
        self._lock = threading.Lock()

    def retry_after(self, address):
        """Seconds until `address` may try again (0: it may now)."""
        with self._lock:
            recent = self._recent(address)
            if len(recent) < self.limit:
                return 0
            return max(1, math.ceil(recent[0] + self.window - self.clock()))

    def record_failure(self, address):
        """Count one failure; returns how many `address` has in the window."""
        with self._lock:
            recent = self._recent(address)
            recent.append(self.clock())
            self._failures.pop(address, None)
            self._failures[address] = recent   # most recently failing last
            while len(self._failures) > self.MAX_ADDRESSES:
                del self._failures[next(iter(self._failures))]
            return len(recent)

    def _recent(self, address):
        horizon = self.clock() - self.window
        return [t for t in self._failures.get(address, ()) if t > horizon]


def entity_tags(header):
    """An If-Match / If-None-Match header as a set of opaque tags ("*" kept),
    weak prefixes dropped (RFC 7232 §3.1: a comma-separated list); None if absent."""
    if header is None:
        return None
    return {tag.strip()[2:] if tag.strip().startswith("W/") else tag.strip() for tag in header.split(",")}


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def _object_without_duplicates(pairs):
    """JSON object hook: two keys equal but for case are ambiguous, since SCIM
    attribute names are case-insensitive (RFC 7643 §2.1)."""
    seen = set()
    for key, _ in pairs:
        folded = key.lower()
        if folded in seen:
            raise ValueError("duplicate key %r" % key)
        seen.add(folded)
    return dict(pairs)


def _check_json(value, text):
    """Raise ScimError unless `value` (parsed from `text`) nests at most
    MAX_JSON_DEPTH objects and arrays and no string or key in it holds a
    lone surrogate.

    Most bodies are cleared from the text alone: nesting cannot be deeper
    than the number of brackets, and a surrogate can only come from a \\u
    escape (the text itself is strict UTF-8).
    """
    if text.count("{") + text.count("[") <= MAX_JSON_DEPTH and "\\u" not in text:
        return
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            if LONE_SURROGATE.search(item):
                raise ScimError(400, "invalidSyntax", "the request body holds an unpaired surrogate escape")
        elif isinstance(item, (dict, list)):
            if level > MAX_JSON_DEPTH:
                raise ScimError(400, "invalidSyntax", "the request body is nested deeper than %d levels"
                                % MAX_JSON_DEPTH)
            if isinstance(item, dict):
                stack.extend((k, level) for k in item)
                stack.extend((v, level + 1) for v in item.values())
            else:
                stack.extend((v, level + 1) for v in item)


def _finite_float(text):
    number = float(text)
    if not math.isfinite(number):   # 1e400 parses to inf without parse_constant seeing it
        raise ValueError("number %s is out of range" % text)
    return number


def parse_json_body(raw):
    """Bytes → JSON value, or ScimError(400, invalidSyntax) for anything not
    strict, reasonably shallow UTF-8 JSON (NaN and Infinity included)."""
    if not raw.strip():
        raise ScimError(400, "invalidSyntax", "the request body is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ScimError(400, "invalidSyntax", "the request body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           object_pairs_hook=_object_without_duplicates)
    except RecursionError:
        raise ScimError(400, "invalidSyntax", "the request body is nested too deeply") from None
    except ValueError as exc:
        raise ScimError(400, "invalidSyntax", "the request body is not valid JSON: %s" % exc) from None
    _check_json(value, text)
    return value


def read_request_body(environ, limit):
    """The request's JSON body, read from wsgi.input with our own size limit."""
    media_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if media_type and media_type not in ACCEPTED_MEDIA_TYPES:
        raise ScimError(415, None, "send the body as application/scim+json or application/json")
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ScimError(400, "invalidSyntax", "invalid Content-Length") from None
    if length > limit:
        raise ScimError(413, None, "the request body is larger than %d bytes" % limit)
    raw = environ["wsgi.input"].read(length) if length > 0 else b""
    return parse_json_body(raw)


def read_query(environ):
    """Query parameters, decoded as strict UTF-8 ('+' is a space, as Entra sends).

    Parameter names are matched case-insensitively; invalid UTF-8 is an
    error, never "no filter" (which would return every resource). Split as
    urllib.parse.parse_qsl(keep_blank_values=True) splits (fields on "&", a
    field without "=" has the empty value), at half its cost: every lookup
    comes through here.
    """
    params = {}
    for field in environ.get("QUERY_STRING", "").split("&"):
        if field:
            name, _, value = field.partition("=")
            params[_query_text(name).lower()] = _query_text(value)
    return params


def _query_text(text):
    text = text.replace("+", " ")
    if "%" not in text:
        return text
    try:
        return urllib.parse.unquote_to_bytes(text).decode("utf-8")
    except UnicodeError:
        raise ScimError(400, "invalidFilter", "the query string is not valid UTF-8") from None


def _integer_parameter(value, name, default):
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ScimError(400, "invalidValue", "%s must be an integer" % name)
    try:
        return int(value)
    except ValueError:
        raise ScimError(400, "invalidValue", "%s must be an integer, got %r" % (name, value)) from None


def _name_list(value, name):
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ScimError(400, "invalidValue", "%s must be a list of attribute names" % name)


def make_list_query(params):
    """A ListQuery from query parameters or a SearchRequest body (keys lower-cased).

    RFC 7644 §3.4.2.4: "A value less than 1 SHALL be interpreted as 1" for
    startIndex; for count "A negative value SHALL be interpreted as 0";
    above MAX_PAGE_SIZE it is capped.
    """
    filter_text = params.get("filter")
    if filter_text is not None and not isinstance(filter_text, str):
        raise ScimError(400, "invalidFilter", "filter must be a string")
    sort_by = params.get("sortby")
    if sort_by is not None and (not isinstance(sort_by, str) or not sort_by.strip()):
        raise ScimError(400, "invalidValue", "sortBy must name an attribute")
    sort_order = params.get("sortorder") or "ascending"
    if not isinstance(sort_order, str) or sort_order.lower() not in ("ascending", "descending"):
        raise ScimError(400, "invalidValue", "sortOrder must be ascending or descending")
    start_index = _integer_parameter(params.get("startindex"), "startIndex", 1)
    count = _integer_parameter(params.get("count"), "count", DEFAULT_PAGE_SIZE)
    return ListQuery(filter=filter_text, sort_by=sort_by, descending=sort_order.lower() == "descending",
                     start_index=min(max(start_index, 1), 2 ** 62),
                     count=min(max(count, 0), MAX_PAGE_SIZE),
                     attributes=_name_list(params.get("attributes"), "attributes"),
                     excluded=_name_list(params.get("excludedattributes"), "excludedAttributes"))


def discovery_documents(base_url):
    """The bodies of /ServiceProviderConfig, /ResourceTypes and /Schemas (RFC 7643 §5-7)."""
    config = {
        "schemas": [URN_SPC],
        "patch": {"supported": True},
        "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": True, "maxResults": MAX_PAGE_SIZE},
        "changePassword": {"supported": True},
        "sort": {"supported": True},
        "etag": {"supported": True},
        "authenticationSchemes": [{
            "type": "oauthbearertoken", "name": "OAuth Bearer Token", "primary": True,
            "description": "Authentication with a bearer token made on the appliance "
                           "(`scim_appliance.py token create`)."}],
        "meta": {"resourceType": "ServiceProviderConfig", "location": base_url + "/ServiceProviderConfig"},
    }
    resource_types = [{
        "schemas": [URN_RESOURCE_TYPE], "id": rt.name, "name": rt.name, "endpoint": rt.endpoint,
        "description": rt.description, "schema": rt.schema.id,
        "schemaExtensions": [{"schema": ext.id, "required": required} for ext, required in rt.extensions],
        "meta": {"resourceType": "ResourceType", "location": base_url + "/ResourceTypes/" + rt.name},
    } for rt in RESOURCE_TYPES.values()]
    schemas = [{
        "schemas": [URN_SCHEMA], "id": schema.id, "name": schema.name, "description": schema.description,
        "attributes": [attribute.to_json() for attribute in schema.attributes],
        "meta": {"resourceType": "Schema", "location": base_url + "/Schemas/" + schema.id},
    } for schema in ALL_SCHEMAS]
    return config, resource_types, schemas


def _by_id(documents, wanted, what):
    """The discovery document whose id is `wanted` (case-insensitively), else 404."""
    for document in documents:
        if document["id"].lower() == wanted.lower():
            return document
    raise ScimError(404, None, "no %s %s" % (what, wanted))


def _list_of(resources):
    return {"schemas": [URN_LIST], "totalResults": len(resources), "Resources": resources,
            "startIndex": 1, "itemsPerPage": len(resources)}


def make_scim_app(store, settings, activity=None, metrics=None, access_log=None):
    """The SCIM service as a WSGI application, mounted at /scim. Each
    request is counted in `activity` (an ActivityLog), which describes every
    write and every failure, in `metrics` (RequestMetrics), and gets a line
    in `access_log` (AccessLog)."""
    base_url = settings.base_url
    check_token = TokenCheck(store, activity.record_token_use if activity is not None else None)
    throttle = AuthThrottle()
    config, resource_types, schemas = discovery_documents(base_url)
    routes = {}   # path pattern (segments after /scim; "*" is one segment, "**" the rest) -> {method: route}

    def scim_route(pattern, methods, authenticated=True):
        """Register a handler(environ, *wildcards) for `methods` on `pattern`;
        with `authenticated` it runs only with a valid bearer token."""
        def decorate(handler):
            for method in methods.split():
                routes.setdefault(tuple(pattern.split("/")[1:]), {})[method] = (handler, authenticated)
            return handler
        return decorate

    def authenticate(environ):
        scheme, _, token = (request_header(environ, "Authorization") or "").partition(" ")
        found = check_token.check(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if found is not None:
            environ[TOKEN_NAME_KEY], environ[TOKEN_SCOPE_KEY] = found
            return
        # Only the header authenticates: a token in the query string (RFC
        # 6750 §2.3) would end up in proxy logs, so it is never looked at.
        address = environ.get("REMOTE_ADDR", "")
        wait = throttle.retry_after(address)
        if wait:
            error = ScimError(429, None, "too many failed authentications from this address; "
                                         "retry after %d seconds" % wait)
            error.retry_after = wait
            raise error
        failures = throttle.record_failure(address)
        if failures in (1, throttle.limit):
            print("scim-appliance: authentication failed from %s (%d in %d s%s)" % (
                address, failures, throttle.window,
                "; further attempts get 429" if failures == throttle.limit else ""), file=sys.stderr)
        if scheme.lower() != "bearer" or not token.strip():
            raise ScimError(401, None, "send Authorization: Bearer <token>")
        raise ScimError(401, None, "the bearer token is not valid")

    def body(environ, resource_type=None):
        """The JSON body; a group's may name MAX_MEMBERS members (Okta's
        custom integrations PUT a group's whole membership), so its limit is
        MAX_GROUP_BODY_BYTES when that is the larger."""
        limit = settings.max_body_bytes
        if resource_type is GROUP:
            limit = max(limit, MAX_GROUP_BODY_BYTES)
        return read_request_body(environ, limit)

    def if_match(environ):
        return entity_tags(request_header(environ, "If-Match"))

    def resource_response(status, resource, extra=None):
        headers = dict(extra or {})
        version = resource.get("meta", {}).get("version")
        if version:
            headers["ETag"] = version
        return scim_response(status, resource, headers)

    def streams_members(resource_type, projection):
        """Whether the response is a group with its members (group_with_members)."""
        return resource_type is GROUP and projection.wants("members")

    def group_with_members(status, group_id, projection, extra=()):
        """A group's response with its members, streamed from one read
        snapshot (GroupWithMembers): a 100,000-member group is never a list
        in memory, after a GET, a POST or a PUT alike."""
        streamed = GroupWithMembers(store, group_id, base_url, projection)
        etag = streamed.resource.get("meta", {}).get("version")
        headers = [("Content-Type", SCIM_MEDIA_TYPE)] + ([("ETag", etag)] if etag else []) + list(extra)
        return Response(status, headers, streamed)

    def projection_of(resource_type, params):
        return Projection(resource_type, _name_list(params.get("attributes"), "attributes"),
                          _name_list(params.get("excludedattributes"), "excludedAttributes"))

    # -- discovery (RFC 7644 §4; no authentication) --

    @scim_route("/ServiceProviderConfig", "GET", authenticated=False)
    def service_provider_config(environ):
        return scim_response(200, config)

    @scim_route("/ResourceTypes", "GET", authenticated=False)
    def list_resource_types(environ):
        return scim_response(200, _list_of(resource_types))

    @scim_route("/ResourceTypes/*", "GET", authenticated=False)
    def get_resource_type(environ, name):
        return scim_response(200, _by_id(resource_types, name, "resource type"))

    @scim_route("/Schemas", "GET", authenticated=False)
    def list_schemas(environ):
        return scim_response(200, _list_of(schemas))

    @scim_route("/Schemas/*", "GET", authenticated=False)
    def get_schema(environ, urn):
        return scim_response(200, _by_id(schemas, urn, "schema"))

    # -- users and groups (RFC 7644 §3.3-3.6) --

    for resource_type in RESOURCE_TYPES.values():
        endpoint = resource_type.endpoint

        @scim_route(endpoint, "POST")
        def create(environ, resource_type=resource_type):
            # RFC 7644 §3.9: attributes/excludedAttributes apply to "any
            # operation that returns a resource".
            request = body(environ, resource_type)
            if isinstance(request, dict):   # so that a refused create still names who it was for
                note_activity(environ, resource_type, {key: value for key, value in request.items()
                                                       if key in ("userName", "displayName")}, "create")
            content = read_resource_body(resource_type, request)
            del request   # the parsed JSON goes before the write
            projection = projection_of(resource_type, read_query(environ))
            streamed = streams_members(resource_type, projection)
            resource = create_resource(store, resource_type, content, base_url,
                                       WITHOUT_MEMBERS if streamed else projection, environ[TOKEN_NAME_KEY])
            note_activity(environ, resource_type, resource, "created")
            location = resource_location(base_url, resource_type, resource["id"])
            if streamed:
                return group_with_members(201, resource["id"], projection, [("Location", location)])
            return resource_response(201, resource, {"Location": location})

        @scim_route(endpoint, "GET")
        def search_by_get(environ, resource_type=resource_type):
            query = make_list_query(read_query(environ))
            return scim_response(200, list_resources(store, [resource_type], query, base_url))

        @scim_route(endpoint + "/.search", "POST")
        def search_by_post(environ, resource_type=resource_type):
            query = _search_request(body(environ))
            return scim_response(200, list_resources(store, [resource_type], query, base_url))

        @scim_route(endpoint + "/*", "GET")
        def read(environ, resource_id, resource_type=resource_type):
            projection = projection_of(resource_type, read_query(environ))
            if streams_members(resource_type, projection):
                response = group_with_members(200, resource_id, projection)
            else:
                response = resource_response(200, get_resource(store, resource_type, resource_id, base_url,
                                                               projection))
            etag = dict(response.headers).get("ETag")
            none_match = entity_tags(request_header(environ, "If-None-Match"))
            if etag and none_match is not None and ("*" in none_match or etag[2:] in none_match):
                if not isinstance(response.body, bytes):
                    response.body.close()
                return scim_response(304, None, {"ETag": etag})
            return response

        @scim_route(endpoint + "/*", "PUT")
        def replace(environ, resource_id, resource_type=resource_type):
            note_activity(environ, resource_type, None, "replace")
            projection = projection_of(resource_type, read_query(environ))
            streamed = streams_members(resource_type, projection)
            content = read_resource_body(resource_type, body(environ, resource_type), resource_id)
            resource = replace_resource(store, resource_type, resource_id, content, base_url, if_match(environ),
                                        WITHOUT_MEMBERS if streamed else projection, environ[TOKEN_NAME_KEY])
            note_activity(environ, resource_type, resource, "replaced")
            if streamed:
                return group_with_members(200, resource_id, projection)
            return resource_response(200, resource)

        @scim_route(endpoint + "/*", "PATCH")
        def patch(environ, resource_id, resource_type=resource_type):
            params = read_query(environ)
            # Users answer 200 with the resource, as the SCIM Validator
            # expects (R16); a group answers 204 unless attributes were asked
            # for, so it never reads its members (R37, "Returning a body with
            # a list of all the members isn't advisable").
            wants_body = resource_type is USER or "attributes" in params or "excludedattributes" in params
            operations = read_patch_request(body(environ, resource_type))
            if activity is not None:
                note_activity(environ, resource_type, None, summarize_patch(operations))
            resource = patch_resource(store, resource_type, resource_id, operations, base_url,
                                      if_match(environ),
                                      projection_of(resource_type, params) if wants_body else None,
                                      environ[TOKEN_NAME_KEY])
            note_activity(environ, resource_type, resource)
            if resource is None:
                return scim_response(204)
            return resource_response(200, resource)

        @scim_route(endpoint + "/*", "DELETE")
        def delete(environ, resource_id, resource_type=resource_type):
            note_activity(environ, resource_type, None, "delete")
            name = delete_resource(store, resource_type, resource_id, base_url, if_match(environ),
                                   environ[TOKEN_NAME_KEY])
            note_activity(environ, resource_type, None, "deleted")
            environ[ACTIVITY_KEY]["name"] = name
            return scim_response(204)

    @scim_route("/.search", "POST")
    def search_everything(environ):
        return scim_response(200, list_resources(store, list(RESOURCE_TYPES.values()),
                                                 _search_request(body(environ)), base_url))

    @scim_route("", "GET")
    def query_everything(environ):
        return scim_response(200, list_resources(store, list(RESOURCE_TYPES.values()),
                                                 make_list_query(read_query(environ)), base_url))

    for unsupported in ("/Me", "/Me/**", "/Bulk"):
        @scim_route(unsupported, "GET POST PUT PATCH DELETE")
        def not_implemented(environ, *_):
            raise ScimError(501, None, "this endpoint is not implemented by scim-appliance")

    def dispatch(environ, segments):
        """The Response to one request: route it, authenticate it, run it."""
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in HTTP_METHODS:
            # RFC 9110 §9.1: "An origin server that receives a request method
            # that is unrecognized or not implemented SHOULD respond with the
            # 501 (Not Implemented) status code."
            raise ScimError(501, None, "the method %s is not implemented" % method)
        methods, wildcards = _match_route(routes, segments)
        if methods is None:
            raise ScimError(404, None, "no such endpoint")
        route = methods.get("GET" if method == "HEAD" else method)
        if route is None:
            error = ScimError(405, None, "method not allowed here")
            error.allow = sorted(methods) + (["HEAD"] if "GET" in methods else [])
            raise error
        handler, authenticated = route
        if authenticated:
            authenticate(environ)
            if environ[TOKEN_SCOPE_KEY] == "read" and is_write_request(method, environ.get("PATH_INFO", "")):
                raise ScimError(403, None, "this token may only read (scope read): it cannot change users or "
                                           "groups")
        return handler(environ, *wildcards)

    def feed(environ, path):
        """GET /events and /events/head: the change feed, for read tokens
        only (an identity provider has no business reading it). A long-poll
        runs on a feed thread of its own (RequestDispatcher), never on the
        event loop."""
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            error = ScimError(405, None, "the change feed is read with GET")
            error.allow = ["GET", "HEAD"]
            raise error
        store.use_small_cache()
        authenticate(environ)
        if environ[TOKEN_SCOPE_KEY] != "read":
            raise ScimError(403, None, "the change feed is read with a read token (token create --scope read); "
                                       "a provisioning token cannot read it")
        if path == FEED_HEAD_PATH:
            return feed_response(b'{"cursor":"%s"}' % head_cursor(store).encode())
        params = read_query(environ)
        cursor = parse_cursor(params["after"]) if "after" in params else None
        limit = _integer_parameter(params.get("limit"), "limit", DEFAULT_EVENTS_PAGE)
        wait = _integer_parameter(params.get("wait"), "wait", 0)
        if not 1 <= limit <= MAX_EVENTS_PAGE or not 0 <= wait <= MAX_EVENTS_WAIT:
            raise ScimError(400, "invalidValue", "limit is 1 to %d, wait 0 to %d seconds"
                            % (MAX_EVENTS_PAGE, MAX_EVENTS_WAIT))
        page = follow_events(store, cursor, limit, wait, lambda: parked_connection(environ))
        return feed_response(('{"events":[%s],"next_cursor":"%s","has_more":%s}' % (
            ",".join(page.events), page.next_cursor, "true" if page.has_more else "false")).encode("utf-8"))

    def health(environ):
        """GET /healthz, for the proxy and monitoring: 200 "ok" when the
        database answers a read and takes writes; else 503 and one word: a
        STORAGE_FAULTS kind, or "unreadable". It writes nothing and never waits: whether writes
        succeed is what the last real write found (StorageMonitor), and the
        volume's free space and read-only flag are asked of the kernel."""
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return Response(405, [("Allow", "GET, HEAD")])
        reason = store.monitor.health()
        if reason is None:
            try:
                store.read_once().schema_version()
            except sqlite3.Error as exc:
                fault = store.fault_from(exc)
                reason = fault.kind if fault is not None else "unreadable"
        return Response(200 if reason is None else 503,
                        [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")],
                        (reason or "ok").encode() + b"\n")

    def respond(environ):
        """dispatch's Response, or the SCIM error it failed with; counted and
        described in the activity log."""
        if environ.get("PATH_INFO") == "/healthz":   # outside /scim, not counted: probes are not Entra
            return health(environ)
        started = time.monotonic()
        error = None
        segments = None
        label = "other"
        try:
            path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
            if path.rstrip("/") in FEED_PATHS:
                label = path.rstrip("/")
                response = feed(environ, label)
            else:
                segments = _scim_segments(path)
                label = route_label(segments)
                response = dispatch(environ, segments)
        except UnicodeError:
            error = ScimError(400, "invalidSyntax", "the path is not valid UTF-8")
        except ScimError as exc:
            error = exc
        except sqlite3.Error as exc:   # a read the storage refused (writes raise StorageFault)
            error = store.fault_from(exc)
            if error is None:
                traceback.print_exc(file=sys.stderr)
                error = ScimError(500, None, "internal server error")
        except Exception:   # a bug: log it, tell the client nothing about it
            traceback.print_exc(file=sys.stderr)
            error = ScimError(500, None, "internal server error")
        if error is not None:
            response = error_response(error)
        if activity is not None:
            activity.record(response.status, activity_entry(environ, segments, response.status, error))
        seconds = time.monotonic() - started
        if metrics is not None:
            metrics.record(environ.get("REQUEST_METHOD", ""), label, response.status, seconds)
        if access_log is not None:
            access_log.record(environ, response.status, seconds)
        return response

    def scim_wsgi(environ, start_response):
        status, headers, content = respond(environ)
        bodiless = environ.get("REQUEST_METHOD") == "HEAD" or status in _NO_CONTENT
        if isinstance(content, bytes):
            if status not in _NO_CONTENT:
                headers.append(("Content-Length", str(len(content))))
            content = [] if bodiless else [content]
        elif bodiless:
            content.close()
            content = []
        start_response(STATUS_LINES[status], headers)
        return content

    return scim_wsgi


def _scim_segments(path):
    """The path's segments after /scim (None for a path outside /scim),
    normalised: empty segments dropped — a Tenant URL entered with a
    trailing slash (Microsoft's own example, https://api.contoso.com/scim/)
    makes requests for /scim//Users — and endpoint names matched
    case-insensitively."""
    segments = [segment for segment in path.split("/") if segment]
    if not segments or segments[0] != "scim":
        return None
    segments = segments[1:]
    if segments:
        segments[0] = _RESOURCE_SEGMENTS.get(segments[0].lower(), segments[0])
        if len(segments) > 1 and segments[1].lower() == ".search":
            segments[1] = ".search"
    return tuple(segments)


def _match_route(routes, segments):
    """({method: route}, wildcard values) of the pattern `segments` match, or (None, ())."""
    if segments is None:
        return None, ()
    methods = routes.get(segments)
    if methods is not None:
        return methods, ()
    if len(segments) == 2 and (segments[0], "*") in routes:
        return routes[(segments[0], "*")], (segments[1],)
    if len(segments) >= 2 and (segments[0], "**") in routes:
        return routes[(segments[0], "**")], ("/".join(segments[1:]),)
    return None, ()


def _search_request(body):
    """POST .search (RFC 7644 §3.4.3): the SearchRequest's parameters."""
    if not isinstance(body, dict):
        raise ScimError(400, "invalidSyntax", "a SearchRequest must be a JSON object")
    return make_list_query({key.lower(): value for key, value in body.items()})


# ============================================================================
# 10. Admin page
# ============================================================================
#
# A small bottle app on its own loopback listener (--admin-host/--admin-port):
# behind a reverse proxy on the same VM every proxied request comes from
# 127.0.0.1, so "only from localhost" by address would protect nothing; a
# listener the proxy never forwards to does (design.md §3). Pages are
# rendered on the server with bottle's SimpleTemplate, which escapes every
# {{value}}; the CSS and the one script (copy buttons) are files in static/,
# so the Content-Security-Policy allows no inline script at all.
#
# Forgery: every form carries the session's CSRF token, the session cookie is
# SameSite=Strict, and a POST whose Origin names another origin is refused.
# The page's own policy is Referrer-Policy: no-referrer, under which browsers
# send "Origin: null" with its own form posts (Fetch §3.1), so "null" and a
# missing Origin are accepted only with the right CSRF token.

STATIC_DIR = next((path for path in (
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "static"),
    os.path.join(sys.prefix, "share", "scim-appliance", "static")) if os.path.isdir(path)),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "static"))

ADMIN_SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]
SESSION_COOKIE = "scim_admin_session"


class AdminSession:
    """One browser's session: anonymous until its password or setup code is
    accepted. Only a digest of its id is kept as the key."""

    def __init__(self):
        self.csrf = secrets.token_urlsafe(32)
        self.logged_in = False
        self.last_seen = time.monotonic()


class AdminSessions:
    """Server-side sessions, in memory: a restart logs everyone out."""

    def __init__(self, idle=ADMIN_IDLE_SECONDS, limit=ADMIN_MAX_SESSIONS, clock=time.monotonic):
        self.idle = idle
        self.limit = limit
        self.clock = clock
        self._sessions = {}   # sha256(id) -> AdminSession, least recently used first
        self._lock = threading.Lock()

    @staticmethod
    def _key(session_id):
        return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()

    def get(self, session_id):
        """The live session for a cookie value, or None (unknown, or idle too long)."""
        if not session_id:
            return None
        key = self._key(session_id)
        with self._lock:
            session = self._sessions.pop(key, None)
            if session is None or self.clock() - session.last_seen > self.idle:
                return None
            session.last_seen = self.clock()
            self._sessions[key] = session
            return session

    def new(self, logged_in=False):
        """(id, session): a fresh session under a fresh random id."""
        session_id = secrets.token_urlsafe(32)
        session = AdminSession()
        session.logged_in = logged_in
        session.last_seen = self.clock()
        key = self._key(session_id)
        with self._lock:
            # Over the limit, the oldest anonymous session goes first: anyone
            # who reaches the port can open those, so they must never push
            # out a logged-in admin. Only when none is left, the oldest of all.
            while len(self._sessions) >= self.limit:
                victim = next((old for old, other in self._sessions.items() if not other.logged_in),
                              next(iter(self._sessions)))
                del self._sessions[victim]
            self._sessions[key] = session
        return session_id, session

    def end(self, session_id):
        with self._lock:
            self._sessions.pop(self._key(session_id or ""), None)


def _template(source):
    return bottle.SimpleTemplate(source, noescape=False)


ADMIN_LAYOUT = _template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · scim-appliance</title>
<link rel="stylesheet" href="/static/admin.css">
<script src="/static/admin.js" defer></script>
</head>
<body>
<header>
  <span class="brand">scim-appliance</span>
  % if logged_in:
  <nav>
    <a href="/"{{!' aria-current="page"' if page == 'overview' else ''}}>Overview</a>
    <a href="/tokens"{{!' aria-current="page"' if page == 'tokens' else ''}}>Tokens</a>
    <a href="/activity"{{!' aria-current="page"' if page == 'activity' else ''}}>Activity</a>
    <form method="post" action="/logout" class="inline">
      <input type="hidden" name="csrf" value="{{csrf}}">
      <button type="submit" class="link">Log out</button>
    </form>
  </nav>
  % end
</header>
<main>
<h1>{{title}}</h1>
% if message:
<p class="message {{message_kind}}" role="status">{{message}}</p>
% end
{{!body}}
</main>
</body>
</html>
""")

ADMIN_PAGES = {
    "setup": _template("""<p>No admin password is set yet. Enter the setup code the server printed when it
started (in its console or log), and choose the password for this page.</p>
<form method="post" action="/setup" class="stack">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <label>Setup code <input name="code" autocomplete="off" required></label>
  <label>New password <input type="password" name="password" autocomplete="new-password"
         minlength="{{min_length}}" required></label>
  <label>Repeat it <input type="password" name="confirm" autocomplete="new-password"
         minlength="{{min_length}}" required></label>
  <button type="submit">Set password</button>
</form>
"""),
    "login": _template("""<form method="post" action="/login" class="stack">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <label>Password <input type="password" name="password" autocomplete="current-password" required
         autofocus></label>
  <button type="submit">Log in</button>
</form>
"""),
    "overview": _template("""% if storage['health']:
<section id="storage-alert" class="card alert" role="alert">
  <h2>Writes are failing</h2>
  % if storage['condition']:
  <p>{{storage['detail']}}</p>
  <p>Since <time>{{storage['since_text']}}</time>: {{storage['refused']}} writes refused. Reads still work;
     writes succeed again by themselves once the cause is gone.</p>
  % elif storage['health'] == 'full':
  <p>The data volume is below the free-space floor of {{storage['floor_mb']}} MB: writes are refused
     until space is freed.</p>
  % else:
  <p>The data volume is mounted read-only: writes will fail until it is writable again.</p>
  % end
</section>
% end
<section class="card">
  <h2>Connect Microsoft Entra ID</h2>
  <p>In the enterprise application's <em>Provisioning</em> page, set <em>Tenant URL</em> to</p>
  <p class="copyable"><code id="tenant-url">{{tenant_url}}</code>
     <button type="button" data-copy="tenant-url">Copy</button></p>
  <p>and <em>Secret Token</em> to a token from the <a href="/tokens">Tokens</a> page.</p>
</section>
<section class="card" id="connection">
  <h2>Is provisioning working?</h2>
  <dl class="figures">
    <dt>Last call</dt>
    % if last_use:
    <dd id="last-call"><time>{{last_use[0]}}</time> with token <strong>{{last_use[1]}}</strong></dd>
    % else:
    <dd id="last-call">never: no token has been used yet</dd>
    % end
    <dt>Last hour</dt><dd id="last-hour">{{last_hour[0]}} requests, {{last_hour[1]}} errors</dd>
    <dt>Last day</dt><dd id="last-day">{{last_day[0]}} requests, {{last_day[1]}} errors</dd>
    <dt>Users</dt><dd id="users">{{active_users}} active, {{inactive_users}} inactive</dd>
    <dt>Groups</dt><dd id="groups">{{groups}}</dd>
    <dt>Free space</dt><dd id="free-space">{{storage['free_text']}} on the data volume</dd>
    <dt>Change feed</dt>
    % if feed['head']:
    <dd id="feed">head at event {{feed['head']}}; oldest kept: {{feed['oldest']}},
        <time>{{feed['oldest_time']}}</time></dd>
    % else:
    <dd id="feed">no change recorded yet</dd>
    % end
  </dl>
  <h3>Latest errors</h3>
  % if recent_errors:
  <ul class="errors">
    % for entry in recent_errors:
    <li><time>{{entry['time']}}</time> {{entry['method']}} {{entry['resource_type'] or ''}}
        {{entry['resource_name'] or entry['resource_id'] or ''}}: <strong>{{entry['status']}}</strong>
        {{entry['scim_type'] or ''}} {{entry['detail'] or ''}}</li>
    % end
  </ul>
  % else:
  <p>None.</p>
  % end
</section>
"""),
    "tokens": _template("""% if new_token:
<section class="card reveal" id="new-token-card">
  <h2>New token “{{new_token_name}}”</h2>
  <p><strong>Copy it now: it is shown only this once</strong> and cannot be read back later.</p>
  <p class="copyable"><code id="new-token">{{new_token}}</code>
     <button type="button" data-copy="new-token">Copy token</button></p>
  <p>Tenant URL: <code id="tenant-url">{{tenant_url}}</code>
     <button type="button" data-copy="tenant-url">Copy</button></p>
  % if rotated_from:
  <p>“{{rotated_from}}” stays valid until you revoke it: switch Entra to the new token, then revoke the old one.</p>
  % end
</section>
% end
<section class="card">
  <h2>Generate a token</h2>
  <form method="post" action="/tokens" class="row">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <label>Name <input name="name" maxlength="{{max_name}}" required placeholder="entra"></label>
    <label>Expires after <input type="number" name="expires_days" min="1" max="3650" placeholder="never">
      days</label>
    <label>Scope <select name="scope">
      <option value="provision" selected>provision: for Entra ID or Okta</option>
      <option value="read">read: for your own software (users, groups and the change feed)</option>
    </select></label>
    <button type="submit">Generate SCIM token</button>
  </form>
</section>
<section class="card">
  <h2>Tokens</h2>
  <table id="tokens">
    <thead><tr><th>Name</th><th>Starts with</th><th>Scope</th><th>Created</th><th>Last used</th><th>Expires</th>
      <th>Status</th><th></th></tr></thead>
    <tbody>
    % for token in tokens:
      <tr class="{{token['status']}}">
        <td>{{token['name']}}</td><td><code>{{token['hint'] or '-'}}…</code></td><td>{{token['scope']}}</td>
        <td><time>{{token['created']}}</time></td><td>{{token['last_used'] or 'never'}}</td>
        <td>{{token['expires'] or 'never'}}</td><td>{{token['status']}}</td>
        <td>
        % if token['status'] == 'active':
          <form method="post" action="/tokens/rotate" class="inline">
            <input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="name" value="{{token['name']}}">
            <button type="submit">Rotate</button></form>
          <form method="post" action="/tokens/revoke" class="inline">
            <input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="name" value="{{token['name']}}">
            <button type="submit" class="danger">Revoke</button></form>
        % end
        </td>
      </tr>
    % end
    </tbody>
  </table>
</section>
"""),
    "activity": _template("""<form method="get" action="/activity" class="row">
  <label>User or group <input name="q" value="{{query}}" placeholder="name or id"></label>
  <label>Status <select name="status">
    % for value, label in (("", "all"), ("ok", "succeeded"), ("failed", "failed")):
    <option value="{{value}}"{{!' selected' if status == value else ''}}>{{label}}</option>
    % end
  </select></label>
  <button type="submit">Search</button>
</form>
<p>Every write and every failed request; kept {{retention_days}} days.</p>
<table id="activity">
  <thead><tr><th>Time</th><th>Token</th><th>Request</th><th>Resource</th><th>Change</th><th>Status</th>
    <th>Detail</th></tr></thead>
  <tbody>
  % for entry in entries:
    <tr class="{{'failed' if entry['status'] >= 400 else 'ok'}}">
      <td><time>{{entry['time']}}</time></td><td>{{entry['token_name'] or '-'}}</td>
      <td>{{entry['method']}} {{entry['resource_type'] or ''}}</td>
      <td>{{entry['resource_name'] or ''}} <small>{{entry['resource_id'] or ''}}</small></td>
      <td>{{entry['summary'] or ''}}</td><td>{{entry['status']}}</td>
      <td>{{entry['scim_type'] or ''}} {{entry['detail'] or ''}}</td>
    </tr>
  % end
  </tbody>
</table>
% if not entries:
<p>Nothing recorded{{' matches' if query or status else ''}}.</p>
% end
"""),
    "error": _template("""<p>{{text}}</p>
<p><a href="/">Back to the overview</a></p>
"""),
}


def _storage_view(storage):
    """StorageMonitor.snapshot() with what the overview shows of it as text."""
    free = "unknown" if storage["free_bytes"] is None else "%d MB" % (storage["free_bytes"] // MB)
    floor = storage["min_free_bytes"] // MB
    detail = storage["detail"] or ""
    return dict(storage, detail=detail[:1].upper() + detail[1:], floor_mb=floor,
                since_text=utc_text(storage["since"]) if storage["since"] else "",
                free_text=free + (" (writes stop below %d MB)" % floor if floor else ""))


def _label(value):
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return '"%s"' % str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(metrics, store, now=None, dropped=None):
    """/metrics in the Prometheus text exposition format (version 0.0.4).
    `dropped`: {log name: entries dropped} of the activity and access logs."""
    now = time.time() if now is None else now
    requests, buckets, duration_sum = metrics.snapshot()
    lines = ["# HELP scim_requests_total SCIM requests answered, by method, route and status.",
             "# TYPE scim_requests_total counter"]
    for (method, route, status), count in sorted(requests.items()):
        lines.append("scim_requests_total{method=%s,route=%s,status=%s} %d"
                     % (_label(method), _label(route), _label(status), count))
    lines += ["# HELP scim_request_duration_seconds Time the SCIM layer took to answer a request.",
              "# TYPE scim_request_duration_seconds histogram"]
    cumulative = 0
    for bound, count in zip(list(RequestMetrics.BUCKETS) + ["+Inf"], buckets):
        cumulative += count
        lines.append("scim_request_duration_seconds_bucket{le=%s} %d" % (_label(bound), cumulative))
    lines += ["scim_request_duration_seconds_sum %.6f" % duration_sum,
              "scim_request_duration_seconds_count %d" % cumulative]
    figures = database_figures(store)
    lines += ["# HELP scim_users Users stored, by active.", "# TYPE scim_users gauge",
              "scim_users{active=\"true\"} %d" % figures["active_users"],
              "scim_users{active=\"false\"} %d" % figures["inactive_users"],
              "# HELP scim_groups Groups stored.", "# TYPE scim_groups gauge",
              "scim_groups %d" % figures["groups"],
              "# HELP scim_token_last_used_age_seconds Seconds since each live token was last used "
              "(recorded at most once a minute).",
              "# TYPE scim_token_last_used_age_seconds gauge"]
    for name, last_used in figures["last_used"]:
        used = datetime.datetime.strptime(last_used, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
        lines.append("scim_token_last_used_age_seconds{token=%s} %.3f" % (_label(name), now - used.timestamp()))
    lines += ["# HELP scim_database_bytes Size of the database files.", "# TYPE scim_database_bytes gauge"]
    for part, size in sorted(figures["bytes"].items()):
        lines.append("scim_database_bytes{file=%s} %d" % (_label(part), size))
    storage = figures["storage"]
    lines += ["# HELP scim_storage_writable 1 while the database takes writes, 0 while /healthz says why not.",
              "# TYPE scim_storage_writable gauge",
              "scim_storage_writable %d" % (storage["health"] is None),
              "# HELP scim_storage_errors_total Storage errors met by reads and writes, by kind.",
              "# TYPE scim_storage_errors_total counter"]
    for kind, count in sorted(storage["errors"].items()):
        lines.append("scim_storage_errors_total{kind=%s} %d" % (_label(kind), count))
    if storage["free_bytes"] is not None:
        lines += ["# HELP scim_data_volume_free_bytes Free bytes on the database's volume.",
                  "# TYPE scim_data_volume_free_bytes gauge",
                  "scim_data_volume_free_bytes %d" % storage["free_bytes"]]
    lines += ["# HELP scim_log_lines_dropped_total Log entries that could not be written and were dropped.",
              "# TYPE scim_log_lines_dropped_total counter"]
    for log, dropped in sorted((dropped or {}).items()):
        lines.append("scim_log_lines_dropped_total{log=%s} %d" % (_label(log), dropped))
    feed = feed_figures(store)
    lines += ["# HELP scim_events_head_sequence Sequence number of the newest event in the change feed.",
              "# TYPE scim_events_head_sequence gauge",
              "scim_events_head_sequence %d" % feed["head"],
              "# HELP scim_events_oldest_sequence Sequence number of the oldest event the feed keeps "
              "(0: none yet).",
              "# TYPE scim_events_oldest_sequence gauge",
              "scim_events_oldest_sequence %d" % feed["oldest"],
              "# HELP scim_events_per_second Events appended per second, averaged over the last minute.",
              "# TYPE scim_events_per_second gauge",
              "scim_events_per_second %.3f" % feed["per_second"]]
    lines += ["# HELP scim_process_start_time_seconds When the server started (Unix time).",
              "# TYPE scim_process_start_time_seconds gauge",
              "scim_process_start_time_seconds %.3f" % metrics.started]
    return "\n".join(lines) + "\n"


def make_admin_app(store, settings, activity, setup_code=None, metrics=None, access_log=None):
    """The admin page as a WSGI application. `setup_code` is the one-time
    code printed at start when no admin password existed; `metrics` (the
    SCIM app's RequestMetrics) are served at /metrics, with the lines the
    activity log and `access_log` dropped."""
    app = bottle.Bottle()
    app.config["catchall"] = False
    sessions = AdminSessions()
    throttle = AuthThrottle()
    setup = {"digest": token_digest(setup_code) if setup_code else None}
    tenant_url = settings.base_url

    def render(page, title, session, http_status=200, message=None, message_kind="info", **values):
        body = ADMIN_PAGES[page].render(csrf=session.csrf if session else "", **values)
        bottle.response.status = http_status
        bottle.response.content_type = "text/html; charset=utf-8"
        return ADMIN_LAYOUT.render(title=title, body=body, page=page, csrf=session.csrf if session else "",
                                   logged_in=bool(session and session.logged_in), message=message,
                                   message_kind=message_kind)

    def set_session_cookie(session_id):
        bottle.response.set_cookie(SESSION_COOKIE, session_id, path="/", httponly=True, samesite="Strict",
                                   secure=bottle.request.environ.get("wsgi.url_scheme") == "https")

    def current_session(create=False):
        """This browser's session; with `create`, a new anonymous one when it has none."""
        session = sessions.get(bottle.request.get_cookie(SESSION_COOKIE))
        if session is None and create:
            session_id, session = sessions.new()
            set_session_cookie(session_id)
        return session

    def check_form(session):
        """Refuse a forged POST: another origin, or no valid CSRF token."""
        origin = bottle.request.environ.get("HTTP_ORIGIN")
        host = bottle.request.environ.get("HTTP_HOST", "")
        scheme = bottle.request.environ.get("wsgi.url_scheme", "http")
        if origin is not None and origin != "null" and origin != "%s://%s" % (scheme, host):
            raise bottle.HTTPError(403, "This form was sent from another site (Origin %s)." % origin)
        sent = bottle.request.forms.getunicode("csrf") or ""
        if session is None or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise bottle.HTTPError(403, "This form has expired or was not sent by this page: "
                                        "reload the page and try again.")

    def logged_in_session():
        session = current_session()
        if session is None or not session.logged_in:
            bottle.redirect("/setup" if not has_admin_password(store) else "/login", 303)
        return session

    def throttled():
        address = bottle.request.environ.get("REMOTE_ADDR", "")
        wait = throttle.retry_after(address)
        if wait:
            bottle.response.set_header("Retry-After", str(wait))
        return wait

    # -- getting in --

    @app.get("/setup")
    def setup_form():
        if has_admin_password(store):
            bottle.redirect("/login", 303)
        return render("setup", "First-time setup", current_session(create=True),
                      min_length=MIN_ADMIN_PASSWORD)

    @app.post("/setup")
    def setup_submit():
        session = current_session()
        check_form(session)
        if has_admin_password(store):
            bottle.redirect("/login", 303)
        wait = throttled()
        if wait:
            return render("setup", "First-time setup", session, 429, "Too many wrong attempts: "
                          "try again in %d seconds." % wait, "error", min_length=MIN_ADMIN_PASSWORD)
        form = bottle.request.forms
        code = (form.getunicode("code") or "").strip().upper()
        password, confirm = form.getunicode("password") or "", form.getunicode("confirm") or ""
        if setup["digest"] is None or not hmac.compare_digest(token_digest(code), setup["digest"]):
            throttle.record_failure(bottle.request.environ.get("REMOTE_ADDR", ""))
            return render("setup", "First-time setup", session, 403, "That is not the setup code "
                          "this server printed.", "error", min_length=MIN_ADMIN_PASSWORD)
        if password != confirm:
            return render("setup", "First-time setup", session, 400, "The two passwords differ.", "error",
                          min_length=MIN_ADMIN_PASSWORD)
        try:
            set_admin_password(store, password)
        except ValueError as exc:
            return render("setup", "First-time setup", session, 400, str(exc), "error",
                          min_length=MIN_ADMIN_PASSWORD)
        except StorageFault as exc:
            return render("setup", "First-time setup", session, 503, "Not saved: %s." % exc.detail, "error",
                          min_length=MIN_ADMIN_PASSWORD)
        setup["digest"] = None   # used up
        return log_in()

    @app.get("/login")
    def login_form():
        if not has_admin_password(store):
            bottle.redirect("/setup", 303)
        return render("login", "Log in", current_session(create=True))

    @app.post("/login")
    def login_submit():
        session = current_session()
        check_form(session)
        wait = throttled()
        if wait:
            return render("login", "Log in", session, 429,
                          "Too many failed logins: try again in %d seconds." % wait, "error")
        if not check_admin_password(store, bottle.request.forms.getunicode("password") or ""):
            throttle.record_failure(bottle.request.environ.get("REMOTE_ADDR", ""))
            return render("login", "Log in", session, 403, "Wrong password.", "error")
        return log_in()

    def log_in():
        # A new id at login, so an id planted before it is worth nothing.
        sessions.end(bottle.request.get_cookie(SESSION_COOKIE))
        session_id, _ = sessions.new(logged_in=True)
        set_session_cookie(session_id)
        bottle.redirect("/", 303)

    @app.post("/logout")
    def logout():
        check_form(current_session())
        sessions.end(bottle.request.get_cookie(SESSION_COOKIE))
        bottle.response.delete_cookie(SESSION_COOKIE, path="/")
        bottle.redirect("/login", 303)

    # -- the pages --

    @app.get("/")
    def overview():
        session = logged_in_session()
        activity.flush(wait=ADMIN_FLUSH_WAIT)
        status = provisioning_status(store)
        status["storage"] = _storage_view(status["storage"])
        return render("overview", "Overview", session, tenant_url=tenant_url, feed=feed_figures(store), **status)

    def tokens_page(session, http_status=200, message=None, kind="info", **shown):
        values = dict(new_token=None, new_token_name=None, rotated_from=None)
        values.update(shown)
        return render("tokens", "Tokens", session, http_status, message, kind, tokens=list_tokens(store),
                      tenant_url=tenant_url, max_name=MAX_TOKEN_NAME, **values)

    @app.get("/tokens")
    def tokens():
        session = logged_in_session()
        activity.flush(wait=ADMIN_FLUSH_WAIT)   # the tokens' latest uses
        return tokens_page(session)

    def token_form(action):
        """A POST of the tokens page: `action(form)` returns tokens_page's
        keyword arguments; a ValueError it raises is shown as a 400, a
        storage fault as a 503."""
        session = logged_in_session()
        check_form(session)
        try:
            return tokens_page(session, **action(bottle.request.forms))
        except ValueError as exc:
            return tokens_page(session, 400, str(exc), "error")
        except StorageFault as exc:
            return tokens_page(session, 503, "Not saved: %s." % exc.detail, "error")

    @app.post("/tokens")
    def generate():
        def action(form):
            name = (form.getunicode("name") or "").strip()
            days = (form.getunicode("expires_days") or "").strip()
            expires = None
            if days:
                if not days.isdigit() or not 1 <= int(days) <= 3650:
                    raise ValueError("the expiry must be a whole number of days from 1 to 3650")
                expires = (datetime.datetime.now(datetime.timezone.utc)
                           + datetime.timedelta(days=int(days))).strftime("%Y-%m-%dT%H:%M:%SZ")
            scope = form.getunicode("scope") or "provision"
            return dict(http_status=201, new_token=create_token(store, name, expires, scope), new_token_name=name)
        return token_form(action)

    @app.post("/tokens/rotate")
    def rotate():
        def action(form):
            name = form.getunicode("name") or ""
            new_name, token = rotate_token(store, name)
            return dict(http_status=201, new_token=token, new_token_name=new_name, rotated_from=name)
        return token_form(action)

    @app.post("/tokens/revoke")
    def revoke():
        def action(form):
            name = form.getunicode("name") or ""
            revoke_token(store, name)
            return dict(message="Revoked “%s”: requests with it now get 401." % name)
        return token_form(action)

    @app.get("/activity")
    def activity_page():
        session = logged_in_session()
        activity.flush(wait=ADMIN_FLUSH_WAIT)
        query = (bottle.request.query.getunicode("q") or "").strip()
        status = bottle.request.query.getunicode("status") or ""
        failed = {"ok": False, "failed": True}.get(status)
        return render("activity", "Activity", session, query=query, status=status if failed is not None else "",
                      entries=search_activity(store, query or None, failed),
                      retention_days=activity.retention_days)

    @app.get("/metrics")
    def prometheus():
        # For a Prometheus on this machine: the listener is loopback only,
        # and what it shows is counts, never names of users or tokens' secrets.
        if metrics is None:
            raise bottle.HTTPError(404, "There is no such page here.")
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        activity.flush(wait=ADMIN_FLUSH_WAIT)   # the tokens' latest uses
        dropped = {"activity": activity.dropped}
        if access_log is not None:
            dropped["access"] = access_log.dropped
        return prometheus_text(metrics, store, dropped=dropped)

    @app.get("/static/<path:path>")
    def static(path):
        return bottle.static_file(path, root=STATIC_DIR)

    def error_page(error):
        bottle.response.content_type = "text/html; charset=utf-8"
        text = error.body if isinstance(error.body, str) and error.body else {
            404: "There is no such page here.", 405: "That method is not allowed here."}.get(
            error.status_code, "The request failed.")
        return ADMIN_LAYOUT.render(title=error.status_line.split(" ", 1)[-1], body=ADMIN_PAGES["error"].render(
            text=text), page="error", csrf="", logged_in=False, message=None, message_kind="")

    app.default_error_handler = error_page

    def admin_wsgi(environ, start_response):
        """The app, with the security headers on every response it sends."""
        def with_headers(status, headers, exc_info=None):
            names = {name.lower() for name, _ in ADMIN_SECURITY_HEADERS}
            headers = [(n, v) for n, v in headers if n.lower() not in names] + ADMIN_SECURITY_HEADERS
            return start_response(status, headers, exc_info)
        return app(environ, with_headers)

    return admin_wsgi


# ============================================================================
# 11. Server and CLI
# ============================================================================

# (Settings field, flag, environment variable, type, help) for `serve`.
SETTINGS_TABLE = (
    ("db", "--db", "SCIM_APPLIANCE_DB", str, "SQLite database file (created if missing)"),
    ("host", "--host", "SCIM_APPLIANCE_HOST", str, "address the SCIM listener binds to"),
    ("port", "--port", "SCIM_APPLIANCE_PORT", int, "port of the SCIM listener"),
    ("public_url", "--public-url", "SCIM_APPLIANCE_PUBLIC_URL", validate_public_url,
     "URL clients reach the appliance at, e.g. https://scim.example.com; meta.location and "
     "Location are built from it, never from request headers (default http://HOST:PORT)"),
    ("threads", "--threads", "SCIM_APPLIANCE_THREADS", int,
     "0: SCIM reads run one at a time on the event loop (fastest), writes on a thread of their own; "
     "N: reads on N worker threads, writes on N more"),
    ("max_body_bytes", "--max-body-bytes", "SCIM_APPLIANCE_MAX_BODY_BYTES", int,
     "largest accepted request body in bytes"),
    ("durability", "--durability", "SCIM_APPLIANCE_DURABILITY", durability_mode,
     "full: every acknowledged write survives a crash and a power loss; normal: it survives "
     "a crash of the process, but a power loss may undo the last commits"),
    ("trusted_proxy", "--trusted-proxy", "SCIM_APPLIANCE_TRUSTED_PROXY", str,
     "address of the reverse proxy (e.g. 127.0.0.1) whose X-Forwarded-For names the client; "
     "from anyone else forwarded headers are removed"),
    ("admin_host", "--admin-host", "SCIM_APPLIANCE_ADMIN_HOST", str,
     "address the admin page listens on; keep it on loopback and reach it over an SSH tunnel"),
    ("admin_port", "--admin-port", "SCIM_APPLIANCE_ADMIN_PORT", int, "port of the admin page"),
    ("activity_days", "--activity-days", "SCIM_APPLIANCE_ACTIVITY_DAYS", int,
     "days the activity log keeps"),
    ("activity_max_rows", "--activity-max-rows", "SCIM_APPLIANCE_ACTIVITY_MAX_ROWS", int,
     "rows the activity log keeps at most"),
    ("log_format", "--log-format", "SCIM_APPLIANCE_LOG_FORMAT", log_format,
     "access log lines: plain or json (one object per line)"),
    ("log_file", "--log-file", "SCIM_APPLIANCE_LOG_FILE", str, "append the access log to this file "
                                                                 "(default: stderr)"),
    ("lock_timeout", "--lock-timeout", "SCIM_APPLIANCE_LOCK_TIMEOUT", seconds,
     "seconds a write waits for the database's write lock (another process may hold it: a backup, "
     "Litestream, an sqlite3 shell) before it is answered 503 with Retry-After; reads never wait for it"),
    ("min_free_mb", "--min-free-mb", "SCIM_APPLIANCE_MIN_FREE_MB", int,
     "below this many megabytes free on the database's volume, writes are refused with 503 and "
     "/healthz says full; 0: no floor"),
    ("events_days", "--events-days", "SCIM_APPLIANCE_EVENTS_DAYS", int,
     "days the change feed (GET /events, the scim_events view) keeps events; a consumer whose cursor "
     "is older gets 410 and starts again from a fresh listing"),
)


def _add_setting(parser, field):
    _, flag, variable, kind, text = next(row for row in SETTINGS_TABLE if row[0] == field)
    default = getattr(Settings, field)
    raw = os.environ.get(variable)
    if raw is not None:
        try:
            default = kind(raw)
        except ValueError as exc:
            parser.error("%s=%r: %s" % (variable, raw, exc))
    parser.add_argument(flag, dest=field, type=kind, default=default,
                        help="%s [env %s; default %s]" % (text, variable, _shown_default(getattr(Settings, field))))


def _shown_default(value):
    return "none" if value in ("", None) else value


def _positive(value, name, least=1):
    if value < least:
        raise ValueError("%s must be at least %g" % (name, least))
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="scim_appliance.py",
        description="An on-premises SCIM 2.0 server for Microsoft Entra ID and Okta provisioning. "
                    "Without a command, runs `serve` with its defaults.",
        epilog="Every serve option can also be set with the environment variable shown beside it.")
    parser.add_argument("--version", action="version", version="scim-appliance " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_parser = commands.add_parser("serve", help="run the SCIM server")
    for field, *_ in SETTINGS_TABLE:
        _add_setting(serve_parser, field)
    token = commands.add_parser("token", help="manage bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = token_commands.add_parser("create", help="make a token; prints it once on stdout")
    create.add_argument("--name", required=True, help="what the token is for, e.g. entra")
    create.add_argument("--scope", choices=TOKEN_SCOPES, default="provision",
                        help="provision (default): for the identity provider, writes users and groups; read: "
                             "for your own software, reads them and the change feed (GET /events), writes nothing")
    listing = token_commands.add_parser("list", help="show tokens (never the tokens themselves)")
    revoke = token_commands.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("name")
    backup = commands.add_parser("backup", help="copy the database, consistently, while the server runs")
    backup.add_argument("destination", help="the new file (must not exist)")
    restore = commands.add_parser("restore", help="replace the database with a backup (the server must be "
                                                  "stopped)")
    restore.add_argument("source", help="a file made by `backup`")
    check = commands.add_parser("check", help="check the database's integrity and schema version "
                                              "(read-only; exit status 1 on a problem)")
    export = commands.add_parser("export", help="write every user or group to stdout or a file")
    export.add_argument("what", choices=("users", "groups"))
    export.add_argument("--format", choices=EXPORT_FORMATS, default="json",
                        help="json (an array of SCIM resources), ndjson (one per line) or csv (the columns "
                             "of the scim_users / scim_groups view); default json")
    export.add_argument("--output", help="file to write (default stdout)")
    _add_setting(export, "public_url")
    for sub in (backup, restore, check, export):
        _add_setting(sub, "db")
    config = commands.add_parser("print-config", help="print a ready, commented nginx or Caddy "
                                                      "configuration, or systemd unit")
    config.add_argument("kind", choices=sorted(CONFIG_TEMPLATES))
    for field in ("public_url", "db", "host", "port", "admin_host", "admin_port"):
        _add_setting(config, field)
    config.add_argument("--user", default="scim-appliance", help="the service's system user (systemd)")
    config.add_argument("--https-port", type=int, default=443, help="the port nginx listens on for HTTPS")
    config.add_argument("--cert", help="TLS certificate chain for nginx (default /etc/ssl/certs/HOST.pem)")
    config.add_argument("--key", help="its private key (default /etc/ssl/private/HOST.key)")
    admin = commands.add_parser("admin", help="manage the admin page")
    admin_commands = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    set_password = admin_commands.add_parser(
        "set-password", help="set the admin page's password (asked for twice on a terminal, "
                             "else read from the first line of stdin)")
    for sub in (create, listing, revoke, set_password):
        _add_setting(sub, "db")
    return parser


def read_new_password(stdin=None):
    """The new admin password: typed twice, unechoed, on a terminal; else the
    first line of stdin (for scripts), never an argument (ps would show it)."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        import getpass
        password = getpass.getpass("New admin password: ")
        if getpass.getpass("Repeat it: ") != password:
            raise ValueError("the two passwords differ")
        return password
    return stdin.readline().rstrip("\r\n")


MAX_HEADER_BYTES = 64 * 1024   # request line + headers; more gets 431 (a 4096-character filter fits)


def _strict_channel_class():
    """waitress's HTTP channel, refusing a request with both Content-Length
    and Transfer-Encoding.

    RFC 9112 §6.1: such a message "might indicate an attempt to perform
    request smuggling ... or response splitting"; a server "MUST close the
    connection after responding". waitress 3.0.2 obeys Transfer-Encoding and
    keeps the connection open, so bytes a front proxy counted as body would
    be answered as a second request. Refusing it with 400 closes the
    connection, and nothing reaches the application.
    """
    import waitress.channel
    import waitress.parser
    import waitress.task

    class StrictRequestParser(waitress.parser.HTTPRequestParser):
        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            if self.chunked and "CONTENT_LENGTH" in self.headers:
                raise waitress.parser.ParsingError("Content-Length and Transfer-Encoding together")

    class ChannelTask(waitress.task.WSGITask):
        """Puts the channel in the environ, for parked_connection."""

        def get_environment(self):
            environ = super().get_environment()
            environ[CHANNEL_KEY] = self.channel
            return environ

    class StrictChannel(waitress.channel.HTTPChannel):
        parser_class = StrictRequestParser
        task_class = ChannelTask

    return StrictChannel


_SILENT_LOG = logging.getLogger("scim-appliance.silent")
_SILENT_LOG.disabled = True


class RequestDispatcher:
    """waitress's task dispatcher, in three lanes: reads on the event loop's
    own thread (`threads` 0) or on `threads` worker threads; and, with
    `writers`, requests that `is_write(method, path)` says may write on
    `writers` threads of their own.

    waitress hands a channel with a complete request to `add_task` (the
    request and its body are already read in full) and a thread calls
    `channel.service()`, which runs the application and writes the
    response. On the event loop, serve() calls `run_pending` after each pass
    of the loop instead: `add_task` is called with the channel's lock held,
    so it only queues. No GIL hand-off between threads remains on a read's
    path (see Settings.threads for what they cost).

    Writes get threads of their own because a write may wait: for SQLite's
    write lock, which another process can hold for seconds (Litestream, a
    backup, an sqlite3 shell), and for fsync on a slow disk. On the loop's
    thread, or on the readers' threads, that wait would hold up every read
    and /healthz behind it; on a writer thread it holds up only the writes,
    which would wait for the same lock anyway.

    A task on the loop's thread must never wait for the loop: waitress's
    write_soon blocks once a response has more than `outbuf_high_watermark`
    bytes unsent, until the loop sends some, so create_waitress_server sets
    that mark out of reach; unsent bytes beyond `outbuf_overflow` wait in a
    temporary file.
    """

    def __init__(self, threads=0, writers=0, is_write=None, is_feed=None):
        import waitress.task
        self.queue = collections.deque()   # what the loop runs
        self.is_write = is_write
        self.is_feed = is_feed
        self.readers = self.writers = self.feed = None
        if is_feed is not None:
            # Long-polls of the change feed wait up to MAX_EVENTS_WAIT seconds
            # each, asleep on a condition variable: a lane of their own that
            # grows to the number waiting at once, up to MAX_WAITING_POLLS.
            self.feed = waitress.task.ThreadedTaskDispatcher()
            self.feed.queue_logger = _SILENT_LOG
        if threads:
            self.readers = waitress.task.ThreadedTaskDispatcher()
            self.readers.set_thread_count(threads)
        if writers:
            self.writers = waitress.task.ThreadedTaskDispatcher()
            self.writers.set_thread_count(writers)
            # Writes queue for their lane by design (SQLite has one writer):
            # waitress's "Task queue depth" warning would say so all day.
            self.writers.queue_logger = _SILENT_LOG

    def set_thread_count(self, count):
        pass   # waitress passes its `threads` setting; the lanes were sized in __init__

    def add_task(self, channel):
        request = channel.requests[0]   # the one channel.service() runs next
        if self.writers is not None and not request.error and self.is_write(request.command, request.path):
            self.writers.add_task(channel)
        elif self.feed is not None and not request.error and self.is_feed(request.command, request.path):
            self._add_feed_task(channel)
        elif self.readers is not None:
            self.readers.add_task(channel)
        else:
            self.queue.append(channel)

    def _add_feed_task(self, channel):
        """Queue a feed request, first adding a thread when every one is busy."""
        lane = self.feed
        with lane.lock:
            running = len(lane.threads) - lane.stop_count
            busy = lane.active_count + len(lane.queue)
        if busy >= running and running < MAX_WAITING_POLLS:
            lane.set_thread_count(running + 1)
        lane.add_task(channel)

    def run_pending(self):
        """Service every request queued for the loop; True if there were any."""
        ran = bool(self.queue)
        while self.queue:
            channel = self.queue.popleft()
            try:
                channel.service()   # catches the application's errors itself (a 500)
            except Exception:
                traceback.print_exc(file=sys.stderr)
        return ran

    def shutdown(self, cancel_pending=True, timeout=5):
        self.queue.clear()   # called after _drain, which ran everything received
        for lane in self._lanes():
            lane.shutdown(cancel_pending, timeout)
        return True

    def _lanes(self):
        return [lane for lane in (self.readers, self.writers, self.feed) if lane is not None]

    @property
    def threads(self):
        """The lanes' worker threads still running (waitress's own dispatcher has the same set)."""
        return set().union(*(lane.threads for lane in self._lanes()))


def create_waitress_server(app, threads, writers=0, is_write=None, is_feed=None, **options):
    """A waitress server for `app` and the function the event loop calls
    after each pass: with `threads` 0 reads run on the loop's thread, else
    on that many worker threads; with `writers`, what `is_write` picks runs
    on that many threads of its own, and what `is_feed` picks on threads of
    its own (RequestDispatcher). Returns (server, run_pending)."""
    import waitress.server
    dispatcher = RequestDispatcher(threads, writers, is_write, is_feed)
    if threads == 0:
        options.update(outbuf_high_watermark=2 ** 62)   # a task on the loop's thread never waits for the loop
    server = waitress.server.create_server(app, threads=max(1, threads), _dispatcher=dispatcher, **options)
    return server, dispatcher.run_pending


def run_event_loop(server, run_pending, stopping, timeout=STOP_CHECK_SECONDS):
    """waitress's event loop for `server` (and every listener sharing its
    socket map), running what it queued after each pass (run_pending, from
    create_waitress_server), until the threading.Event `stopping` is set;
    it is looked at least every `timeout` seconds."""
    import waitress.wasyncore
    while not stopping.is_set():
        waitress.wasyncore.loop(timeout=timeout, map=server._map, use_poll=server.adj.asyncore_use_poll,
                                count=1)
        run_pending()


class RateLimitedLog(logging.Filter):
    """Lets one record through per `interval` seconds and counts the rest.

    Waitress warns "Task queue depth is N" for every request that waits for
    a worker; with one worker under Entra's bursts that is every request,
    megabytes of log a minute saying one thing.
    """

    def __init__(self, interval=QUEUE_WARNING_INTERVAL, clock=time.monotonic):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.suppressed = 0
        self._next = None
        self._lock = threading.Lock()

    def filter(self, record):
        with self._lock:
            now = self.clock()
            if self._next is not None and now < self._next:
                self.suppressed += 1
                return False
            self._next = now + self.interval
            if self.suppressed:
                record.msg = "%s (and %d more such warnings in the last %d s)" % (
                    record.getMessage(), self.suppressed, self.interval)
                record.args = ()
                self.suppressed = 0
            return True


def serve(settings, out=sys.stdout):
    """Run the SCIM listener and the admin page until SIGTERM or Ctrl-C."""
    import waitress.server

    # SIGTERM and Ctrl-C only raise a flag, from the first moment: the event
    # loop below looks at it between events, so a stop never lands in the
    # middle of waitress's bookkeeping, and never before the cleanup is armed.
    stopping = threading.Event()
    previous = {number: signal.signal(number, lambda signum, frame: stopping.set())
                for number in (signal.SIGTERM, signal.SIGINT)}

    queue_log = logging.getLogger("waitress.queue")
    if not any(isinstance(f, RateLimitedLog) for f in queue_log.filters):
        queue_log.addFilter(RateLimitedLog())

    lock = ServerLock(settings.db)
    try:
        locked = lock.acquire()
    except OSError as exc:
        raise SystemExit("scim-appliance: cannot use %s: %s" % (settings.db, exc.strerror or exc))
    if not locked:
        raise SystemExit("scim-appliance: another scim-appliance is serving %s" % settings.db)
    try:
        store = Store(settings.db, synchronous=settings.durability.upper(), lock_timeout=settings.lock_timeout,
                      min_free_bytes=settings.min_free_mb * MB)
    except BaseException:
        lock.release()
        raise
    try:
        # Unbuffered: a write that fails (a full disk) leaves nothing behind to write twice.
        log_stream = open(settings.log_file, "ab", buffering=0) if settings.log_file else sys.stderr
    except OSError as exc:
        store.close()
        lock.release()
        raise SystemExit("scim-appliance: cannot write the log file %s: %s" % (settings.log_file,
                                                                             exc.strerror or exc))
    access_log = AccessLog(settings.log_format, log_stream)
    metrics = RequestMetrics()
    activity = ActivityLog(store, settings.activity_days, settings.activity_max_rows,
                           beat=[access_log.flush, store.probe, EventRetention(store, settings.events_days)])
    setup_code = None if has_admin_password(store) else generate_setup_code()
    app = make_scim_app(store, settings, activity, metrics, access_log)
    admin_app = make_admin_app(store, settings, activity, setup_code, metrics, access_log)
    proxy = {}
    if settings.trusted_proxy:
        # waitress rewrites REMOTE_ADDR from X-Forwarded-For, but only for
        # requests whose peer is this proxy; everyone else's are removed.
        proxy = dict(trusted_proxy=settings.trusted_proxy, trusted_proxy_count=1,
                     trusted_proxy_headers={"x-forwarded-for"})
    servers = []
    try:
        listening = (settings.host, settings.port)
        server, run_pending = create_waitress_server(
            app, settings.threads, writers=settings.threads or LOOP_WRITER_THREADS, is_write=is_write_request,
            is_feed=is_feed_request,
            host=settings.host, port=settings.port, connection_limit=CONNECTION_LIMIT,
            ident="scim-appliance", clear_untrusted_proxy_headers=True,
            # Our own limit answers with a SCIM 413; waitress's is a backstop.
            max_request_body_size=max(settings.max_body_bytes, MAX_GROUP_BODY_BYTES) * 2,
            max_request_header_size=MAX_HEADER_BYTES, **proxy)
        server.channel_class = _strict_channel_class()
        servers.append(server)
        # The admin page: the same event loop (socket map), its own worker
        # thread, so a login's scrypt never holds up Entra.
        listening = (settings.admin_host, settings.admin_port)
        admin = waitress.server.create_server(
            admin_app, map=server._map, host=settings.admin_host, port=settings.admin_port, threads=1,
            ident="scim-appliance-admin", clear_untrusted_proxy_headers=True,
            max_request_body_size=64 * 1024, max_request_header_size=MAX_HEADER_BYTES)
        admin.channel_class = _strict_channel_class()
        servers.append(admin)
    except OSError as exc:
        for opened in servers:
            opened.close()
            opened.task_dispatcher.shutdown(timeout=5)
        store.close()
        lock.release()
        raise SystemExit("scim-appliance: cannot listen on %s:%d: %s" % (listening[0], listening[1],
                                                                         exc.strerror or exc))
    if settings.port == 0:   # an ephemeral port: report the one we got
        settings = dataclasses.replace(settings, port=server.effective_port)
    admin_port = int(admin.effective_port)
    print("Admin page: http://%s:%d/ (from another machine: ssh -L %d:127.0.0.1:%d <this host>)"
          % (_url_host(settings.admin_host), admin_port, admin_port, admin_port), file=out)
    if setup_code:
        print("Admin setup code: %s (asked for on the first visit to the admin page, to set its password;\n"
              "  or set it with: python scim_appliance.py admin set-password --db %s)"
              % (setup_code, settings.db), file=out)
    if not has_live_token(store):
        print("No bearer token exists yet: generate one on the admin page, or with\n"
              "  python scim_appliance.py token create --name entra --db %s" % settings.db, file=out)
    print("SCIM endpoint: %s" % settings.base_url, file=out)
    out.flush()

    try:
        activity.start()
        # Both listeners share this socket map. (waitress's own run() would
        # cancel the requests still queued for a worker on the way out.)
        run_event_loop(server, run_pending, stopping)
    finally:
        # Graceful: take in the connections and requests that already
        # arrived (a request running on the loop kept them waiting), stop
        # accepting, let every request received finish and its response go
        # out, then write the log and fold the WAL into the database file.
        _take_in_arrived(server._map)
        for opened in servers:
            _stop_listening(opened)
        store.event_head.release()   # waiting long-polls answer now
        finished = _drain(servers, run_pending, time.monotonic() + SHUTDOWN_GRACE_SECONDS)
        for opened in servers:
            _shut_down(opened)
        activity.stop()
        try:
            store.checkpoint()
        except sqlite3.Error as exc:
            print("scim-appliance: WAL checkpoint failed: %s" % exc, file=sys.stderr)
        store.close()
        lock.release()
        if log_stream is not sys.stderr:
            log_stream.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
        print("scim-appliance stopped%s" % ("" if finished else " (some requests were still running after %d s)"
                                            % SHUTDOWN_GRACE_SECONDS), file=out)


def _stop_listening(server):
    """Close a waitress server's listening socket, not its trigger (as
    server.close() would): a worker thread still finishing a request pulls
    the trigger when it is done, and os.write() to the closed pipe's number
    writes its b"x" into whatever file has taken that number since. Here
    that was byte 0 of the database file ("xQLite format 3")."""
    import waitress.wasyncore
    waitress.wasyncore.dispatcher.close(server)


def _shut_down(server, timeout=5):
    """Stop a server's worker threads, then close its trigger, unless one
    is still running (then the pipe stays open until the process ends)."""
    server.task_dispatcher.shutdown(timeout=timeout)
    if not server.task_dispatcher.threads:
        server.trigger.close()


def _take_in_arrived(socket_map):
    """Accept the connections already in the listen queue and read the
    requests already sent: two passes through the event loop without
    waiting, the second for the connections the first accepted. Nothing is
    answered in between, so clients send nothing new; _drain runs what was
    read."""
    import waitress.wasyncore
    for _ in range(2):
        waitress.wasyncore.loop(timeout=0, map=socket_map, count=1)


def _drain(servers, run_pending, deadline):
    """Run the servers' event loop until no connection has a request in
    progress or a response unsent (True), or the deadline passes (False).
    A parked long-poll's connection is out of the socket map (parked_connection):
    the servers' own lists of connections still hold it."""
    import waitress.wasyncore
    socket_map = servers[0]._map
    while time.monotonic() < deadline:
        run_pending()
        channels = list(socket_map.values()) + [channel for server in servers
                                                for channel in list(server.active_channels.values())]
        busy = [channel for channel in channels
                if getattr(channel, "requests", None) or getattr(channel, "total_outbufs_len", 0)]
        if not busy:
            return True
        waitress.wasyncore.loop(timeout=0.05, map=socket_map, count=1)
    return False


# -- print-config: ready configurations for the reverse proxy and systemd -------

NGINX_TEMPLATE = """\
# scim-appliance behind nginx, from `scim_appliance.py print-config nginx`.
# Put it in /etc/nginx/conf.d/ (or sites-enabled/) and reload nginx. Start the
# appliance with --public-url {public_url} --trusted-proxy 127.0.0.1.
server {{
    listen {https_port} ssl;
    listen [::]:{https_port} ssl;
    server_name {server_name};

    # Entra calls only HTTPS with a publicly trusted certificate, TLS 1.2 or newer.
    ssl_certificate     {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;

    # The appliance refuses bodies over its own limit with a SCIM 413; this is a backstop.
    client_max_body_size 4m;

    # Published: the SCIM API and the health check. Never the admin page
    # ({admin_host}:{admin_port}): reach that over SSH.
    location /scim {{
        proxy_pass http://{host}:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        # Set, not appended: a client cannot put its own address in front.
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host "";
        proxy_set_header Forwarded "";
        proxy_read_timeout 120s;
    }}
    location = /healthz {{
        proxy_pass http://{host}:{port};
    }}
    # The change feed, for your own software (read tokens only). Publish it
    # by uncommenting, if that software reaches the appliance through nginx;
    # long-polls wait up to 30 s.
    # location /events {{
    #     proxy_pass http://{host}:{port};
    #     proxy_http_version 1.1;
    #     proxy_set_header Connection "";
    #     proxy_set_header X-Forwarded-For $remote_addr;
    #     proxy_buffering off;
    #     proxy_read_timeout 60s;
    # }}
    location / {{
        return 404;
    }}
}}
"""

CADDY_TEMPLATE = """\
# scim-appliance behind Caddy, from `scim_appliance.py print-config caddy`.
# Caddy obtains and renews a publicly trusted certificate for {server_name}
# itself (ports 80 and 443 must reach it). Start the appliance with
# --public-url {public_url} --trusted-proxy 127.0.0.1.
{server_name} {{
    tls {{
        protocols tls1.2 tls1.3
    }}
    # Published: the SCIM API and the health check. Never the admin page
    # ({admin_host}:{admin_port}): reach that over SSH.
    handle /scim* {{
        reverse_proxy {host}:{port} {{
            header_up X-Forwarded-For {{remote_host}}
            header_up -X-Forwarded-Host
            header_up -Forwarded
        }}
    }}
    handle /healthz {{
        reverse_proxy {host}:{port}
    }}
    # The change feed, for your own software (read tokens only): uncomment
    # to publish it.
    # handle /events* {{
    #     reverse_proxy {host}:{port}
    # }}
    handle {{
        respond 404
    }}
}}
"""

SYSTEMD_TEMPLATE = """\
# scim-appliance as a systemd service, from `scim_appliance.py print-config systemd`.
# Save as /etc/systemd/system/scim-appliance.service, then:
#   useradd --system --home {data_dir} --shell /usr/sbin/nologin {user}
#   install -d -o {user} -g {user} -m 700 {data_dir}
#   systemctl daemon-reload && systemctl enable --now scim-appliance
[Unit]
Description=scim-appliance: SCIM 2.0 server for Microsoft Entra ID and Okta provisioning
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
WorkingDirectory={data_dir}
ExecStart={python} {script} serve --db {db} --host {host} --port {port} \\
    --public-url {public_url} --trusted-proxy 127.0.0.1 --admin-host {admin_host} --admin-port {admin_port}
# SIGTERM: stop accepting, finish the requests in flight, checkpoint the WAL.
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=2
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data_dir}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""

CONFIG_TEMPLATES = {"nginx": NGINX_TEMPLATE, "caddy": CADDY_TEMPLATE, "systemd": SYSTEMD_TEMPLATE}


def render_config(kind, settings, user="scim-appliance", https_port=443, cert=None, key=None):
    """The text of one ready configuration for these settings."""
    if not settings.public_url.startswith("https://"):
        raise ValueError("print-config needs --public-url https://...: Entra calls only HTTPS")
    server_name = urllib.parse.urlsplit(settings.public_url).hostname
    db = os.path.abspath(settings.db)
    return CONFIG_TEMPLATES[kind].format(
        public_url=settings.public_url.rstrip("/"), server_name=server_name, https_port=https_port,
        cert=cert or "/etc/ssl/certs/%s.pem" % server_name, key=key or "/etc/ssl/private/%s.key" % server_name,
        host=_url_host(settings.host), port=settings.port, admin_host=settings.admin_host,
        admin_port=settings.admin_port, user=user, db=db, data_dir=os.path.dirname(db),
        python=sys.executable, script=os.path.abspath(__file__))


class ServerLock:
    """An exclusive advisory lock on DB.lock while `serve` runs, so that a
    second server on the same database, and `restore`, are refused with a
    clear message instead of interleaving with it. (fcntl: Unix only; the
    appliance runs on a Linux VM.)"""

    def __init__(self, db_path):
        self.path = db_path + ".lock"
        self._file = None

    def acquire(self):
        """True if this process now holds the lock; False if another does."""
        import fcntl
        handle = open(self.path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file = handle
        return True

    def release(self):
        if self._file is not None:
            self._file.close()   # closing the file lets go of the lock
            self._file = None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")   # `scim_appliance.py [serve] --port 9000`
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            _positive(args.threads, "--threads", least=0)
            _positive(args.min_free_mb, "--min-free-mb", least=0)
            # Writes in this process queue for the lock for a few milliseconds
            # now and then (the activity log's); a shorter wait would refuse them.
            _positive(args.lock_timeout, "--lock-timeout", least=MIN_LOCK_TIMEOUT)
            _positive(args.max_body_bytes, "--max-body-bytes")
            _positive(args.events_days, "--events-days")
            settings = Settings(**{field: getattr(args, field) for field, *_ in SETTINGS_TABLE})
            serve(settings)
            return 0
        if args.command == "print-config":
            settings = Settings(**{field: getattr(args, field) for field in (
                "public_url", "db", "host", "port", "admin_host", "admin_port")})
            sys.stdout.write(render_config(args.kind, settings, args.user, args.https_port, args.cert, args.key))
            return 0
        if args.command == "check":
            version, problems = check_database(args.db)
            if problems:
                print("scim-appliance: %s fails SQLite's integrity check:\n  %s"
                      % (args.db, "\n  ".join(problems[:20])), file=sys.stderr)
                return 1
            print("%s: ok, schema version %d%s" % (args.db, version, "" if version == SCHEMA_VERSION else
                                                   " (carried forward to %d at the next start)" % SCHEMA_VERSION))
            return 0
        if args.command == "restore":
            lock = ServerLock(args.db)
            if not lock.acquire():
                raise DatabaseError("a server is using %s: stop it before restoring" % args.db)
            try:
                check_backup(args.source)   # before Store() creates or migrates anything
                store = Store(args.db)
                try:
                    restore_database(store, args.source)
                finally:
                    store.close()
            finally:
                lock.release()
            print("restored %s from %s" % (args.db, args.source), file=sys.stderr)
            return 0
        if args.command in ("backup", "export") and not os.path.exists(args.db):
            raise DatabaseError("%s does not exist" % args.db)   # a mistyped path is no empty directory
        store = Store(args.db)
        try:
            if args.command == "backup":
                backup_database(store, args.destination)
                print("backed up %s to %s" % (args.db, args.destination), file=sys.stderr)
            elif args.command == "export":
                base_url = Settings(public_url=args.public_url).base_url
                if args.output:
                    with open(args.output, "wb") as out:
                        cursor = export_resources(store, RESOURCE_TYPES[args.what[:-1].capitalize()], args.format,
                                                  out, base_url)
                else:
                    cursor = export_resources(store, RESOURCE_TYPES[args.what[:-1].capitalize()], args.format,
                                              sys.stdout.buffer, base_url)
                    sys.stdout.buffer.flush()
                # On stderr, so the export itself stays plain JSON, NDJSON or CSV.
                print("cursor: %s (follow the changes since this export with GET /events?after=%s)"
                      % (cursor, cursor), file=sys.stderr)
            elif args.command == "admin":
                set_admin_password(store, read_new_password())
                print("admin password set", file=sys.stderr)
            elif args.token_command == "create":
                print(create_token(store, args.name, scope=args.scope))
            elif args.token_command == "list":
                print("%-24s %-14s %-26s %-26s %-10s %s" % ("NAME", "STARTS", "CREATED", "LAST USED", "SCOPE",
                                                           "STATUS"))
                for token in list_tokens(store):
                    print("%-24s %-14s %-26s %-26s %-10s %s" % (
                        token["name"], token["hint"] or "-", token["created"], token["last_used"] or "never",
                        token["scope"], token["status"] + {"revoked": " " + str(token["revoked"]),
                                           "expired": " " + str(token["expires"])}.get(token["status"], "")))
            elif args.token_command == "revoke":
                revoke_token(store, args.name)
                print("revoked %s" % args.name, file=sys.stderr)
        finally:
            store.close()
    except (ValueError, DatabaseError, sqlite3.Error, OSError, StorageFault) as exc:
        print("scim-appliance: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
