"""Where the telemetry collector keeps devices' keys and their reports: SQLAlchemy 2 over
SQLite (embedded, the default) or PostgreSQL (a fleet).

Two tables::

    telemetry_devices  device (primary key), key (hex), enrolled (unix seconds)
    telemetry_reports  id, device, seq, sent (device clock), received, epsilon, delta,
                       body (the verified canonical JSON); UNIQUE (device, seq)

The unique constraint is what refuses a replay, atomically, however many collector
processes share the database. A report is acknowledged only after its transaction has
committed: SQLite runs in WAL mode with ``synchronous=FULL``; PostgreSQL with its own
durability settings. Needs the ``[telemetry]`` extra (SQLAlchemy, psycopg).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from edgeloop.errors import TransportError, UsageError
from edgeloop.monitor.telemetry.client import DeviceKey
from edgeloop.monitor.telemetry.estimate import FleetSummary, summarize
from edgeloop.monitor.telemetry.report import Report, parse_report

__all__ = ["TelemetryStore", "database_url"]


class _Base(DeclarativeBase):
    pass


class DeviceRow(_Base):
    """An enrolled device and the key its reports are signed with."""

    __tablename__ = "telemetry_devices"
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(256))
    enrolled: Mapped[float] = mapped_column(Float)


class ReportRow(_Base):
    """One stored report."""

    __tablename__ = "telemetry_reports"
    __table_args__ = (UniqueConstraint("device", "seq", name="one_report_per_seq"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    device: Mapped[str] = mapped_column(ForeignKey("telemetry_devices.device"), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    sent: Mapped[float] = mapped_column(Float)
    received: Mapped[float] = mapped_column(Float)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    body: Mapped[str] = mapped_column(Text)


def database_url(db: str) -> str:
    """A SQLAlchemy URL from ``--db``: a URL (``postgresql://`` uses psycopg 3), or a
    file path, which means SQLite."""
    if "://" not in db:
        return f"sqlite:///{Path(db).resolve()}"
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")     # an acknowledged report survives power loss
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class TelemetryStore:
    """Devices' keys and reports in one database; safe to use from many threads."""

    KEY_CACHE_S = 60.0   # how long a device's key is used before it is read again

    def __init__(self, db: str, *, create: bool = True) -> None:
        """Open ``db`` (see :func:`database_url`), creating the tables if missing; with
        ``create=False`` a SQLite file that does not exist is refused (a mistyped path
        would otherwise read as an empty fleet)."""
        url = database_url(db)
        try:
            parsed = make_url(url)
            self.shown = parsed.render_as_string(hide_password=True)
            sqlite = parsed.get_backend_name() == "sqlite"
            kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}} if sqlite else \
                {"pool_pre_ping": True, "pool_size": 8, "max_overflow": 8}
            self.engine: Engine = create_engine(url, **kwargs)
        except (ArgumentError, NoSuchModuleError, ValueError) as e:
            raise UsageError(f"`--db` must be a database URL (sqlite:///PATH, "
                             f"postgresql://USER@HOST:PORT/DB) or a file path; got {db!r} "
                             f"({str(e)[:100]})") from None
        if sqlite:
            file = parsed.database if parsed.database not in (None, "", ":memory:") else None
            if file and not create and not Path(file).is_file():
                raise UsageError(f"no telemetry database at {file!r}")
            if file:
                Path(file).parent.mkdir(parents=True, exist_ok=True)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._keys: dict[str, tuple[bytes, float]] = {}   # device -> (key, when read)
        self._keys_lock = threading.Lock()
        with self._errors():
            _Base.metadata.create_all(self.engine)

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return _database_errors(self.shown)

    def close(self) -> None:
        """Close the connection pool."""
        self.engine.dispose()

    def enroll(self, key: DeviceKey, *, replace: bool = False) -> bool:
        """Register a device's key; True if it was new or changed. A device enrolled
        with another key is refused unless ``replace`` (e.g. after a re-provisioning).
        Two processes enrolling the same new device at once: the second reads the
        first's row and answers as if it had come after."""
        try:
            return self._enroll(key, replace=replace)
        except IntegrityError:
            return self._enroll(key, replace=replace)

    def _enroll(self, key: DeviceKey, *, replace: bool) -> bool:
        with self._errors(), Session(self.engine) as s, s.begin():
            row = s.get(DeviceRow, key.device)
            if row is not None and row.key == key.key.hex():
                return False
            if row is not None and not replace:
                raise UsageError(f"device {key.device} is enrolled with another key; "
                                 "pass --replace to trust the new one")
            if row is None:
                s.add(DeviceRow(device=key.device, key=key.key.hex(), enrolled=time.time()))
            else:
                row.key, row.enrolled = key.key.hex(), time.time()
        with self._keys_lock:
            self._keys.pop(key.device, None)
        return True

    def key(self, device: str) -> bytes | None:
        """The enrolled key of ``device``, or None. Found keys are cached for
        :attr:`KEY_CACHE_S` seconds, so a key replaced by another process (``telemetry
        enroll --replace``) is used within that time."""
        now = time.monotonic()
        with self._keys_lock:
            cached = self._keys.get(device)
        if cached is not None and now - cached[1] < self.KEY_CACHE_S:
            return cached[0]
        with self._errors(), Session(self.engine) as s:
            row = s.get(DeviceRow, device)
        if row is None:
            return None
        key = bytes.fromhex(row.key)
        with self._keys_lock:
            self._keys[device] = (key, now)
        return key

    def add(self, report: Report, body: bytes) -> str:
        """Store a verified report: ``"stored"``; ``"duplicate"`` if that device's
        ``seq`` was stored before with these very bytes (a replay, or a resend whose
        answer was lost), ``"conflict"`` if with other bytes (the device's numbering
        went back: nothing is stored, and the device is told)."""
        text = body.decode()
        row = ReportRow(device=report.device, seq=report.seq, sent=report.time,
                        received=time.time(), epsilon=report.epsilon, delta=report.delta,
                        body=text)
        try:
            with self._errors(), Session(self.engine) as s, s.begin():
                s.add(row)
        except IntegrityError:
            with self._errors(), Session(self.engine) as s:
                stored = s.scalar(select(ReportRow.body).where(
                    ReportRow.device == report.device, ReportRow.seq == report.seq))
            return "duplicate" if stored == text else "conflict"
        return "stored"

    def count(self) -> int:
        """Reports stored."""
        with self._errors(), Session(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(ReportRow)) or 0)

    def seqs(self) -> set[tuple[str, int]]:
        """(device, seq) of every stored report (for checks that nothing was lost)."""
        with self._errors(), Session(self.engine) as s:
            return {(d, q) for d, q in s.execute(select(ReportRow.device, ReportRow.seq))}

    def reports(self, *, since: float | None = None) -> Iterator[Report]:
        """Every stored report (received at or after ``since``), parsed, in batches."""
        query = select(ReportRow.body).order_by(ReportRow.id)
        if since is not None:
            query = query.where(ReportRow.received >= since)
        with self._errors(), Session(self.engine) as s:
            for body in s.scalars(query.execution_options(yield_per=2000)):
                yield parse_report(body.encode())

    def summary(self, *, level: float = 0.95, since: float | None = None) -> FleetSummary:
        """De-biased fleet estimates (see :func:`edgeloop.monitor.telemetry.summarize`)."""
        return summarize(self.reports(since=since), level=level)



@contextlib.contextmanager
def _database_errors(shown: str) -> Iterator[None]:
    """Turn a database that cannot be reached or used into one line (TransportError)."""
    try:
        yield
    except OperationalError as e:
        first = (str(e.orig or e).strip().splitlines() or ["error"])[0][:200]
        raise TransportError(f"database {shown}: {first}") from None
