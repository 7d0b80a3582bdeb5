"""A throwaway local PostgreSQL server (Debian's `postgresql` binaries) for tests and benchmarks.

Not how a lab is deployed: there, LAB_DATABASE_URL points at a server you run (see the README).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lab.errors import LabError


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise LabError("PostgreSQL's server is not installed", "`make postgres` installs Debian's `postgresql`")
    return Path(found[-1]).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def throwaway_server(max_connections: int = 200) -> Iterator[str]:
    """Start a new cluster on a free port (trust auth on 127.0.0.1 only); yield its SQLAlchemy URL without a
    database name; stop and delete it afterwards."""
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="lab-pg-"))  # somewhere the postgres user can enter
    run_as = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    try:
        subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
                       check=True, capture_output=True)
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections={max_connections}",
                        "start"], check=True, capture_output=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server; its SQLAlchemy URL."""
    import psycopg

    with psycopg.connect(server_url.replace("postgresql+psycopg", "postgresql") + "/postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"
