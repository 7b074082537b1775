"""Storage: the SQLite schema, migrations and transactions (design.md §2)."""

import json
import re
import sqlite3
import threading

import pytest

import scim_appliance
from scim_appliance import URN_PATCH, URN_USER


def test_a_new_database_is_migrated_to_the_current_schema_in_wal_mode(tmp_path):
    path = str(tmp_path / "new.db")
    store = scim_appliance.Store(path)
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == scim_appliance.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"users", "groups", "members", "tokens"} <= tables
    conn.close()


def test_many_first_opens_at_once_migrate_exactly_once(tmp_path):
    """`token create` while `serve` starts on a new file: the WAL switch is
    retried while another opener holds the file, and the version is read
    under the write lock, so the second opener does not migrate again.
    (Each round races 8 openers; one round in ~25 used to fail.)"""
    errors = []
    for round_number in range(100):
        path = str(tmp_path / ("race%d.db" % round_number))
        barrier = threading.Barrier(8)

        def open_store():
            barrier.wait()
            try:
                scim_appliance.Store(path).close()
            except Exception as exc:   # the assertion below reports it
                errors.append(exc)

        threads = [threading.Thread(target=open_store) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == scim_appliance.SCHEMA_VERSION
        conn.close()
    assert errors == []


def test_a_database_from_a_newer_version_is_refused_untouched(tmp_path):
    path = str(tmp_path / "future.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE later (x)")
    conn.execute("PRAGMA user_version = %d" % (scim_appliance.SCHEMA_VERSION + 1))
    conn.commit()
    conn.close()
    with pytest.raises(scim_appliance.DatabaseError, match="schema version"):
        scim_appliance.Store(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == scim_appliance.SCHEMA_VERSION + 1
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["later"]
    conn.close()


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(scim_appliance.DatabaseError):
        scim_appliance.Store(str(path))
    assert path.read_bytes() == b"this is not sqlite" * 100


def test_a_write_that_raises_is_rolled_back(store, db):
    with pytest.raises(RuntimeError):
        with store.write() as tx:
            tx.insert_token("t", "digest", scim_appliance.utc_now())
            raise RuntimeError("midway")
    assert db.execute("SELECT count(*) FROM tokens").fetchone()[0] == 0


def test_writes_begin_immediate(store):
    """design.md §2: a deferred BEGIN lets two read-modify-writes interleave and lose an update."""
    statements = []
    conn = store._connection()
    store._local.conn = _Recording(conn, statements)
    with store.write():
        pass
    assert statements[0] == "BEGIN IMMEDIATE"


def test_an_update_assigns_only_the_columns_it_changes(store, db):
    """SQLite rewrites an index's entries whenever an UPDATE assigns one of
    its columns, even to the value it has, and each page that touches is a
    WAL frame at commit: a PATCH of name.familyName assigns neither userName
    nor externalId, whose columns are indexed."""
    user = scim_appliance.create_resource(store, scim_appliance.USER, {
        "schemas": [URN_USER], "userName": "Ann@example.com", "externalId": "ext-1",
        "name": {"familyName": "Old"}}, "http://127.0.0.1/scim")
    statements = []
    store._local.conn = _Recording(store._connection(), statements)
    operations = scim_appliance.read_patch_request({"schemas": [URN_PATCH], "Operations": [
        {"op": "Replace", "path": "name.familyName", "value": "New"}]})
    scim_appliance.patch_resource(store, scim_appliance.USER, user["id"], operations, "http://127.0.0.1/scim")
    [update] = [sql for sql in statements if sql.startswith("UPDATE")]
    assigned = set(re.findall(r"(\w+) = \?", update.split(" WHERE ")[0]))
    # last_modified has millisecond precision: within the same millisecond it is unchanged too.
    assert {"document", "version"} <= assigned <= {"document", "version", "last_modified"}
    row = db.execute("SELECT user_name, user_name_key, external_id, version, document FROM users").fetchone()
    assert tuple(row)[:4] == ("Ann@example.com", "ann@example.com", "ext-1", 2)
    assert json.loads(row["document"])["name"] == {"familyName": "New"}


class _Recording:
    """A connection stand-in that records the statements it is given."""

    def __init__(self, conn, statements):
        self._conn = conn
        self._statements = statements

    def execute(self, sql, *args):
        self._statements.append(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql, *args):
        self._statements.append(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name):   # in_transaction, total_changes, ...
        return getattr(self._conn, name)
