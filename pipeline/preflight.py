"""What a newcomer sees when a service is missing: one line naming it, its URL and the fix.

Two halves, used by the CLI (``pipeline.cli``) for every command:

- ``explain(exc, settings)`` turns a failure of a service we depend on — from our error tree or
  straight from SQLAlchemy, psycopg, sqlite3, pika, Dramatiq or the minio SDK — into that line,
  or answers ``None`` for anything else (which stays the caller's business).
- ``check_schema`` / ``check_broker`` look before a command leaps: the database is at the
  migrations' head, RabbitMQ accepts a connection. Long-running commands (``serve``,
  ``worker``, ``scheduler``) run them first, so a wrong setting fails at once in the foreground
  instead of in a child process or at the first tick.

URLs are shown with their password replaced by ``***``, and any configured secret that still
appears in a driver's message is masked too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from pipeline.errors import ChecksumMismatch, InvalidKey, ObjectMissing, ServiceError, StorageError
from pipeline.settings import Settings

MIGRATE_FIX = "run `pipeline migrate`"
_SCHEMA_PATTERN = re.compile(
    r"no such table|no such column|has no column named|UndefinedTable|UndefinedColumn"
    r"|relation \"[^\"]+\" does not exist|column \"[^\"]+\" (of relation \"[^\"]+\" )?does not exist",
)
_S3_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                                  "InvalidSecurity", "AuthorizationHeaderMalformed"})


def safe_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def database_label(settings: Settings) -> str:
    return f"the database at {safe_url(settings.database_url)}"


def s3_label(settings: Settings) -> str:
    scheme = "https" if settings.s3_secure else "http"
    endpoint = settings.s3_endpoint or ""
    where = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
    return f"the S3 server at {where} (bucket {settings.blob_url})"


def broker_label(settings: Settings) -> str:
    return f"RabbitMQ at {safe_url(settings.broker_url or '')}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(text: str, limit: int = 160) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _mask(text: str, settings: Settings | None) -> str:
    if settings is None:
        return text
    secrets = [settings.s3_secret_key, settings.s3_access_key if settings.s3_secret_key else None]
    for url in (settings.database_url, settings.broker_url):
        if url:
            try:
                secrets.append(urlsplit(url).password)
            except ValueError:
                pass
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _network_reason(text: str) -> str:
    """The gist of a transport error: drivers wrap "connection refused" in a paragraph."""
    lowered = text.lower()
    for gist in ("connection refused", "timed out", "name or service not known", "no route to host",
                 "temporary failure in name resolution", "connection reset"):
        if gist in lowered:
            return gist
    return _first_line(text, 100)


def _database_reason(error: sa_exc.DBAPIError) -> str:
    message = _first_line(str(error.orig))
    # libpq: 'connection failed: connection to server at "h", port p failed: Connection refused'
    return message.rsplit("failed: ", 1)[-1] if "failed: " in message else message


def schema_problem(settings: Settings) -> str:
    """Why the schema does not fit this version: never migrated, or at an older revision."""
    from pipeline.migrate import current, head

    at, wanted = current(settings.database_url), head()
    if at is None:
        return f"{database_label(settings)} has no schema (migrate never ran there): {MIGRATE_FIX}"
    return (f"{database_label(settings)} has schema revision {at}, this version needs {wanted}: "
            f"{MIGRATE_FIX}")


def check_schema(engine: Engine, settings: Settings) -> None:
    """Raise ``ServiceError`` unless the database answers and is migrated to the newest revision.

    Raises:
        ServiceError: the schema is missing or older than this version's migrations.
        sqlalchemy.exc.DBAPIError: the database cannot be reached (``explain`` describes it).
    """
    from alembic.runtime.migration import MigrationContext

    from pipeline.migrate import head

    with engine.connect() as connection:
        at = MigrationContext.configure(connection).get_current_revision()
    if at != head():
        raise ServiceError(schema_problem(settings))


def check_broker(settings: Settings, *, timeout_s: float = 10.0) -> None:
    """Open and close one AMQP connection to ``PIPELINE_BROKER_URL`` (nothing when it is unset).

    Raises:
        ServiceError: RabbitMQ is unreachable, refuses the credentials or lacks the vhost.
    """
    if not settings.broker_url:
        return
    import pika

    params = pika.URLParameters(settings.broker_url)
    params.connection_attempts = 1
    params.retry_delay = 0
    params.socket_timeout = timeout_s
    params.stack_timeout = timeout_s
    params.blocked_connection_timeout = timeout_s
    try:
        pika.BlockingConnection(params).close()
    except Exception as exc:
        message = explain(exc, settings)
        if message is None:
            raise
        raise ServiceError(message) from exc


def explain(exc: BaseException, settings: Settings | None) -> str | None:
    """One line for a failure of the database, RabbitMQ or the S3 server, or ``None``.

    ``settings`` gives the URLs to name (``None`` when they could not be read: the line then
    names the service and the variable only).
    """
    for error in _chain(exc):
        line = _explain_one(error, settings)
        if line is not None:
            return _mask(line, settings)
    return None


def _explain_one(error: BaseException, settings: Settings | None) -> str | None:
    if isinstance(error, ServiceError):
        return str(error)
    if isinstance(error, sa_exc.DBAPIError):
        return _explain_database(error, settings)
    if _is_broker_error(error):
        return _explain_broker(error, settings)
    if isinstance(error, StorageError) and not isinstance(error, ObjectMissing | ChecksumMismatch | InvalidKey):
        return _explain_storage(error, settings)
    return None


def _explain_database(error: sa_exc.DBAPIError, settings: Settings | None) -> str:
    label = database_label(settings) if settings else "the database (PIPELINE_DATABASE_URL)"
    text = f"{type(error.orig).__name__}: {error.orig}"
    if _SCHEMA_PATTERN.search(text):
        if settings is not None:
            try:
                return schema_problem(settings)
            except Exception:  # the generic line below still says what to do
                pass
        return f"{label} is not migrated to this version ({_first_line(str(error.orig))}): {MIGRATE_FIX}"
    reason = _database_reason(error)
    if settings is not None and make_url(settings.database_url).get_backend_name() == "sqlite":
        fix = "point PIPELINE_DATABASE_URL at a file in a directory that exists and is writable"
    else:
        fix = "start PostgreSQL or point PIPELINE_DATABASE_URL at a running server"
    return f"{label} is unreachable ({reason}): {fix}"


def _is_broker_error(error: BaseException) -> bool:
    module = type(error).__module__
    if module.startswith("pika"):
        return True
    if module.startswith("dramatiq"):
        import dramatiq.errors

        return isinstance(error, dramatiq.errors.ConnectionError)
    return False


def _explain_broker(error: BaseException, settings: Settings | None) -> str:
    import pika.exceptions

    label = broker_label(settings) if settings and settings.broker_url else "RabbitMQ (PIPELINE_BROKER_URL)"
    causes = list(_chain(error)) + [arg for arg in error.args if isinstance(arg, BaseException)]
    if any(isinstance(cause, pika.exceptions.ProbableAuthenticationError) for cause in causes):
        return f"{label} refused the user name or password: fix the credentials in PIPELINE_BROKER_URL"
    if any(isinstance(cause, pika.exceptions.ProbableAccessDeniedError) for cause in causes):
        return (f"{label} denied access to the virtual host: create it (rabbitmqctl add_vhost) and grant "
                "the user rights on it, or fix the vhost in PIPELINE_BROKER_URL")
    reason = _network_reason(f"{error} {error!r}")
    return f"{label} is unreachable ({reason}): start RabbitMQ or point PIPELINE_BROKER_URL at a running broker"


def _explain_storage(error: StorageError, settings: Settings | None) -> str:
    from minio.error import S3Error
    from urllib3.exceptions import HTTPError

    s3 = settings is not None and settings.blob_url.startswith("s3://")
    label = s3_label(settings) if settings is not None and s3 else "blob storage"
    for cause in _chain(error):
        if isinstance(cause, S3Error):
            if cause.code in _S3_CREDENTIAL_CODES:
                return (f"{label} refused the credentials ({cause.code}): fix PIPELINE_S3_ACCESS_KEY and "
                        "PIPELINE_S3_SECRET_KEY")
            if cause.code == "NoSuchBucket":
                return f"{label}: the bucket does not exist: create it or fix PIPELINE_BLOB_URL"
        if isinstance(cause, HTTPError | ConnectionError):
            return (f"{label} is unreachable ({_network_reason(str(cause))}): start the S3 server or point "
                    "PIPELINE_S3_ENDPOINT at a running one")
    fix = "check PIPELINE_S3_ENDPOINT, PIPELINE_S3_ACCESS_KEY and PIPELINE_S3_SECRET_KEY" if s3 \
        else "check PIPELINE_BLOB_URL"
    return f"{label}: {_first_line(str(error), 240)}: {fix}"
