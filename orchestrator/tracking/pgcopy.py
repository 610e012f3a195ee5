"""PostgreSQL ``COPY ... FROM STDIN`` inside a SQLAlchemy transaction, through the driver's own copy API
(psycopg 3: ``cursor.copy``; psycopg2: ``cursor.copy_expert``).

COPY skips the per-statement work of multi-row INSERTs (parse, plan, parameter binding): into MLflow's
``metrics`` table it is about 1.5x an ``INSERT ... SELECT`` of the same rows on this project's test machine.
It has no ``ON CONFLICT``: a row that is already there (a write retried after a commit whose answer was lost)
fails the COPY, so it runs under a savepoint and the caller falls back to its insert-or-ignore statement.

With psycopg 3 and the column types given, rows go in COPY's binary format: no float formatting here and no
float parsing in the server (bench/tracking.py --postgres: 47-57k points/s vs 43-44k in text, side by side).
The binary format must match each column's type exactly, so the caller passes types only for a table whose
reflected columns it checked.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

_UNIQUE_VIOLATION = "23505"
# COPY's text format: backslash escapes for the field and row separators (MLflow's names never hold them,
# values may).
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def supports_copy(engine: sa.Engine) -> bool:
    """True for PostgreSQL through psycopg 3 or psycopg2 (the drivers whose copy API this module uses)."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver in ("psycopg", "psycopg2")


def field(value: Any) -> str:
    """One value in COPY's text format. Floats use repr (round-trips exactly); the caller maps NaN/inf."""
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return str(value).translate(_ESCAPES)


def encode(rows: Iterable[Sequence[Any]]) -> bytes:
    return "".join("\t".join(map(field, row)) + "\n" for row in rows).encode()


def copy_rows(conn: sa.Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
              binary_types: Sequence[str] | None = None) -> bool:
    """COPY ``rows`` into ``table`` (binary with psycopg 3 when ``binary_types``, PostgreSQL's type names of
    ``columns``, are given; else text, :func:`encode`); False (nothing written, the transaction still usable)
    when a row is already there. Other driver errors are raised as SQLAlchemy's, so the writer tells outages
    (OperationalError) from rejections the way it does for its other statements."""
    dbapi: Any = conn.connection.dbapi_connection
    cols = ", ".join(f'"{c}"' for c in columns)
    sql = f'COPY "{table}" ({cols}) FROM STDIN'
    driver_error = conn.dialect.loaded_dbapi.Error
    cur = dbapi.cursor()
    try:
        cur.execute("SAVEPOINT mfsweep_copy")
        try:
            if hasattr(cur, "copy_expert"):  # psycopg2
                cur.copy_expert(sql, io.BytesIO(encode(rows)))
            elif binary_types is not None:  # psycopg 3, binary
                with cur.copy(f"{sql} (FORMAT BINARY)") as copy:
                    copy.set_types(list(binary_types))
                    for row in rows:
                        copy.write_row(row)
            else:  # psycopg 3, text
                with cur.copy(sql) as copy:
                    copy.write(encode(rows))
        except driver_error as exc:
            if (getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)) != _UNIQUE_VIOLATION:
                raise
            cur.execute("ROLLBACK TO SAVEPOINT mfsweep_copy")
            return False
        cur.execute("RELEASE SAVEPOINT mfsweep_copy")
        return True
    except driver_error as exc:
        dbapi_mod = conn.dialect.loaded_dbapi
        wrap = (sa.exc.OperationalError if isinstance(exc, dbapi_mod.OperationalError | dbapi_mod.InterfaceError)
                else sa.exc.DBAPIError)
        raise wrap(sql, None, exc) from exc
    finally:
        cur.close()
