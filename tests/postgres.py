"""A throwaway PostgreSQL server for the tests: the real initdb, pg_ctl and createdb that
pgserver's wheel ships, run through pgserver's wrappers of them. It takes a password login over
TCP on 127.0.0.1, on a free port, with its data in a fresh folder removed at the end.

PostgreSQL refuses to run as root, so as root the server runs as `nobody`. (pgserver's own
get_server would add a system user and open up every folder above its data to others.) The
tests skip only where it cannot start, saying why."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from stopping import free_port

USER = "kdl"  # the database's superuser, as a machine's kdl would log in
PASSWORD = "s3cret-Pass"


@dataclass
class Server:
    port: int
    account: dict[str, Any]  # subprocess's user, group and extra_groups: who runs the server
    data: Path | None = None  # its data folder, and its log
    log: Path | None = None

    def start(self) -> None:
        import pgserver

        pgserver.pg_ctl(["-w", "-o", f"-h 127.0.0.1 -p {self.port} -k ''", "-l", str(self.log), "start"],
                        pgdata=self.data, timeout=60, **self.account)

    def stop(self) -> None:
        """At once, as a server that goes down does: its connections are cut."""
        import pgserver

        pgserver.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.data, **self.account)

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def createdb(self, database: str) -> str:
        """A new database, made as the recipe makes one (createdb); its URL."""
        import pgserver

        pgserver.createdb(["-h", "127.0.0.1", "-p", str(self.port), "-U", USER, database],
                          env={**os.environ, "PGPASSWORD": PASSWORD})
        return self.url(database)


@contextlib.contextmanager
def postgres_server() -> Iterator[Server]:
    pgserver = pytest.importorskip("pgserver", reason="pgserver (PostgreSQL's binaries in a wheel) "
                                                      "is not installed: pip install -e '.[test]'")
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[test]'")
    account = _account()
    # not under pytest's tmp_path: its root is readable by its owner only, and the server may not be
    folder = Path(tempfile.mkdtemp(prefix="kdl-postgres-"))
    data, log = folder / "data", folder / "server.log"
    try:
        (folder / "password").write_text(PASSWORD + "\n")
        for path in (folder, folder / "password") if account else ():
            os.chown(path, account["user"], account["group"])
        server = Server(free_port(), account, data, log)
        try:
            pgserver.initdb(["-U", USER, "--auth=scram-sha-256", f"--pwfile={folder / 'password'}",
                             "--encoding=utf8"], pgdata=data, **account)
            server.start()
        except (OSError, subprocess.SubprocessError) as exc:
            said = log.read_text()[-500:] if log.exists() else ""
            pytest.skip(f"PostgreSQL from pgserver's wheel cannot start here: {exc} {said}")
        try:
            yield server
        finally:
            with contextlib.suppress(OSError, subprocess.SubprocessError):  # (a test stopped it)
                server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _account() -> dict[str, Any]:
    """Who runs the server: this user, or `nobody` for root (whom PostgreSQL refuses)."""
    if os.geteuid() != 0:
        return {}
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("PostgreSQL refuses to run as root, and this machine has no user `nobody` to "
                    "run it as")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


