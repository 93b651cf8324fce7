"""The real stack on one host without Docker: ``scripts/stack up | down | env | status``.

The machine's PostgreSQL and RabbitMQ (started when installed and down), a database and a
vhost of the stack's own, and a SeaweedFS server (``storage.seaweed``) as the S3 server, whose
filer web UI is the bucket browser. State lives under ``.stack/`` (``PIPELINE_STACK_DIR``):
SeaweedFS's data, its ports and credentials, so ``up`` after ``down`` (or a reboot) finds every
object again. ``env`` prints the ``PIPELINE_*`` variables to export.

The local-service helpers below are also what the test fixtures and the benchmarks use
(``tests/services.py``): one way to find, start and provision PostgreSQL and RabbitMQ.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import psycopg
import typer
from psycopg import sql
from sqlalchemy.engine import make_url

from errors import ConfigError, PipelineError
from storage.seaweed import SeaweedFS

LOCAL_POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_AMQP_HOST = "127.0.0.1"
LOCAL_AMQP_PORT = 5672
DEFAULT_NAME = "pipeline"
BUCKET = "pipeline"
STATE_FILE = "stack.json"


# --- waiting and local services -------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``condition`` until it returns true; fail naming ``what`` once ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run(*command: str, timeout: float = 120.0) -> str:
    """Run ``command``; its stdout, or a RuntimeError carrying its output when it fails."""
    try:
        done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as exc:
        output = (exc.stderr or exc.stdout or "").strip()
        raise RuntimeError(f"{' '.join(command)} failed with exit code {exc.returncode}: {output}") from exc
    except FileNotFoundError as exc:
        raise RuntimeError(f"{command[0]} is not installed") from exc
    return done.stdout


def conninfo(url: str) -> str:
    """libpq form of a SQLAlchemy URL (drops the ``+psycopg`` driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(conninfo(url), connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def ensure_local_postgres(admin_url: str = LOCAL_POSTGRES_ADMIN_URL, *, timeout: float = 60.0) -> str:
    """Return ``admin_url`` once the local server answers, starting the Debian cluster if it is down."""
    if postgres_answers(admin_url):
        return admin_url
    clusters = Path("/etc/postgresql")
    versions = sorted(clusters.iterdir(), key=lambda path: int(path.name)) if clusters.is_dir() else []
    if not versions or not shutil.which("pg_ctlcluster"):
        raise RuntimeError(f"PostgreSQL at {make_url(admin_url).render_as_string()} is down and no local"
                           " cluster is installed")
    run("pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main", "start")
    wait_for(lambda: postgres_answers(admin_url), timeout=timeout, what="the local PostgreSQL")
    return admin_url


def create_database(admin_url: str, name: str, *, exist_ok: bool = False) -> str:
    """Create the empty database ``name`` on the server of ``admin_url``; return its URL."""
    with psycopg.connect(conninfo(admin_url), autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not (exists and exist_ok):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    """Drop ``name`` even while connections to it are still open."""
    with psycopg.connect(conninfo(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def ensure_local_rabbitmq(*, timeout: float = 90.0) -> None:
    """Return once the local broker accepts AMQP connections, starting it if it is down."""
    if port_open(LOCAL_AMQP_HOST, LOCAL_AMQP_PORT):
        return
    run("rabbitmq-server", "-detached")
    run("rabbitmqctl", "--timeout", str(int(timeout)), "await_startup", timeout=timeout + 10)
    wait_for(lambda: port_open(LOCAL_AMQP_HOST, LOCAL_AMQP_PORT), timeout=timeout,
             what=f"RabbitMQ on {LOCAL_AMQP_HOST}:{LOCAL_AMQP_PORT}")


def add_vhost(vhost: str, user: str = "guest", *, exist_ok: bool = False) -> None:
    """Create ``vhost`` on the local broker and give ``user`` full rights on it."""
    if not (exist_ok and vhost in run("rabbitmqctl", "list_vhosts", "--quiet", "--no-table-headers").split()):
        run("rabbitmqctl", "add_vhost", vhost)
    run("rabbitmqctl", "set_permissions", "-p", vhost, user, ".*", ".*", ".*")


def delete_vhost(vhost: str) -> None:
    """Delete ``vhost`` (and every queue in it) from the local broker."""
    run("rabbitmqctl", "delete_vhost", vhost)


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{LOCAL_AMQP_HOST}:{LOCAL_AMQP_PORT}/{quote(vhost, safe='')}"


# --- the stack --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StackState:
    """What ``up`` provisioned, kept in ``.stack/stack.json`` (mode 0600: it holds the S3 secret)."""

    name: str
    database_url: str
    vhost: str
    access_key: str
    secret_key: str
    seaweed_pid: int | None = None


class Stack:
    """The stack kept in ``directory``; ``name`` names its database and vhost."""

    def __init__(self, directory: Path, *, name: str = DEFAULT_NAME,
                 admin_url: str = LOCAL_POSTGRES_ADMIN_URL) -> None:
        self.directory = directory.resolve()
        self.name = name
        self.admin_url = admin_url

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def state(self) -> StackState | None:
        if not self.state_path.is_file():
            return None
        try:
            return StackState(**json.loads(self.state_path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"unreadable stack state {self.state_path}: {exc}; remove {self.directory}") from exc

    def seaweed(self, state: StackState) -> SeaweedFS:
        return SeaweedFS(self.directory / "seaweedfs", access_key=state.access_key, secret_key=state.secret_key,
                         outlive_parent=True)

    def up(self) -> StackState:
        """Start what is down, create what is missing; safe to run again."""
        self.directory.mkdir(parents=True, exist_ok=True)
        previous = self.state()
        ensure_local_postgres(self.admin_url)
        database_url = create_database(self.admin_url, self.name, exist_ok=True)
        ensure_local_rabbitmq()
        add_vhost(self.name, exist_ok=True)
        state = previous or StackState(
            name=self.name, database_url=database_url, vhost=self.name,
            access_key=f"pipeline-{secrets.token_hex(4)}", secret_key=secrets.token_urlsafe(24),
        )
        pid = state.seaweed_pid if state.seaweed_pid and _alive(state.seaweed_pid) else None
        if pid is None:
            server = self.seaweed(state).start()
            pid = server.pid
        state = StackState(**{**asdict(state), "seaweed_pid": pid})
        self._save(state)
        return state

    def down(self, *, purge: bool = False) -> None:
        """Stop SeaweedFS (its data stays); ``purge`` also drops the database, the vhost and ``.stack/``.

        The machine's PostgreSQL and RabbitMQ keep running: other work may use them.
        """
        state = self.state()
        if state is None:
            return
        if state.seaweed_pid and _alive(state.seaweed_pid):
            os.kill(state.seaweed_pid, signal.SIGTERM)
            try:
                wait_for(lambda: not _alive(state.seaweed_pid or 0), timeout=20, what="SeaweedFS to stop")
            except TimeoutError:
                os.kill(state.seaweed_pid, signal.SIGKILL)
        if purge:
            if postgres_answers(self.admin_url):
                drop_database(self.admin_url, state.name)
            if port_open(LOCAL_AMQP_HOST, LOCAL_AMQP_PORT):
                delete_vhost(state.vhost)
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            self._save(StackState(**{**asdict(state), "seaweed_pid": None}))

    def environment(self, state: StackState) -> dict[str, str]:
        server = self.seaweed(state)
        return {
            "PIPELINE_DATABASE_URL": state.database_url,
            "PIPELINE_BROKER_URL": amqp_url(state.vhost),
            "PIPELINE_BLOB_URL": f"s3://{BUCKET}",
            "PIPELINE_S3_ENDPOINT": server.endpoint,
            "PIPELINE_S3_ACCESS_KEY": state.access_key,
            "PIPELINE_S3_SECRET_KEY": state.secret_key,
        }

    def bucket_browser(self, state: StackState) -> str:
        return f"{self.seaweed(state).filer_url}/buckets/{BUCKET}/"

    def _save(self, state: StackState) -> None:
        self.state_path.touch(mode=0o600, exist_ok=True)
        self.state_path.chmod(0o600)
        self.state_path.write_text(json.dumps(asdict(state), indent=2))


def _alive(pid: int) -> bool:
    """True when ``pid`` runs and is a ``weed`` process (not a recycled pid, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat.partition("(")[2].rpartition(")")
    return name == "weed" and rest.split()[:1] != ["Z"]


# --- the command line -----------------------------------------------------------------------------

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The real stack on this host without Docker: PostgreSQL, RabbitMQ, SeaweedFS (S3).")
Directory = Annotated[Path, typer.Option(envvar="PIPELINE_STACK_DIR", help="where the stack keeps its state")]
Name = Annotated[str, typer.Option(envvar="PIPELINE_STACK_NAME", help="the database and vhost name")]


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"stack: {exc}", err=True)
    return typer.Exit(1)


@app.command()
def up(directory: Directory = Path(".stack"), name: Name = DEFAULT_NAME) -> None:
    """Start PostgreSQL and RabbitMQ if down, create the database and vhost, start SeaweedFS."""
    stack = Stack(directory, name=name)
    try:
        state = stack.up()
    except (PipelineError, RuntimeError, TimeoutError, OSError, psycopg.Error) as exc:
        raise _fail(exc) from None
    env = stack.environment(state)
    typer.echo(f"PostgreSQL  {make_url(state.database_url).render_as_string()}")
    typer.echo(f"RabbitMQ    {env['PIPELINE_BROKER_URL']}")
    typer.echo(f"S3          http://{env['PIPELINE_S3_ENDPOINT']} (SeaweedFS, data in {stack.directory})")
    typer.echo(f"bucket      {stack.bucket_browser(state)}  (filer web UI: browse the documents)")
    typer.echo('export the settings with:  eval "$(scripts/stack env)"')


@app.command()
def env(directory: Directory = Path(".stack"), name: Name = DEFAULT_NAME) -> None:
    """Print ``export PIPELINE_...=...`` lines for the stack (``eval "$(scripts/stack env)"``)."""
    stack = Stack(directory, name=name)
    state = stack.state()
    if state is None:
        raise _fail(ConfigError(f"no stack in {stack.directory}: run scripts/stack up first"))
    for key, value in stack.environment(state).items():
        typer.echo(f"export {key}={shlex.quote(value)}")
    typer.echo(f"# bucket browser: {stack.bucket_browser(state)}")


@app.command()
def status(directory: Directory = Path(".stack"), name: Name = DEFAULT_NAME) -> None:
    """Say what runs: PostgreSQL, RabbitMQ, SeaweedFS."""
    stack = Stack(directory, name=name)
    state = stack.state()
    typer.echo(f"PostgreSQL  {'up' if postgres_answers(stack.admin_url) else 'down'}")
    typer.echo(f"RabbitMQ    {'up' if port_open(LOCAL_AMQP_HOST, LOCAL_AMQP_PORT) else 'down'}")
    running = state is not None and state.seaweed_pid is not None and _alive(state.seaweed_pid)
    typer.echo(f"SeaweedFS   {'up' if running else 'down'}" + (f"  {stack.bucket_browser(state)}" if state else ""))


@app.command()
def down(directory: Directory = Path(".stack"), name: Name = DEFAULT_NAME,
         purge: Annotated[bool, typer.Option(help="also drop the database, the vhost and the state")] = False) -> None:
    """Stop SeaweedFS (data kept unless --purge); PostgreSQL and RabbitMQ keep running."""
    try:
        Stack(directory, name=name).down(purge=purge)
    except (PipelineError, RuntimeError, OSError, psycopg.Error) as exc:
        raise _fail(exc) from None


if __name__ == "__main__":
    app()
