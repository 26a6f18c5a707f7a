"""How the PostgreSQL store reaches its server: our own URL parameters, the libpq
parameters that end a connection gone silent, and how a failure is told apart
from a silence or from a fault of the rows sent."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg

from .._errors import StoreOpenError

__all__ = ["QUERY_CANCELED", "first_line", "liveness_params", "lost", "split_url", "unreachable"]

#: The server's code for a statement cancelled by ``statement_timeout``.
QUERY_CANCELED = "57014"


def liveness_params(timeout: float) -> dict[str, str]:
    """libpq parameters that make a connection gone silent fail within about ``timeout``.

    ``tcp_user_timeout`` bounds data sent and never acknowledged; the
    keepalive probes bound a request that was acknowledged but never
    answered (the socket is idle then, and unanswered probes end it).
    """
    idle = max(1, int(timeout / 3))
    interval = max(1, int(timeout / 6))
    count = max(1, int((timeout - idle) / interval))
    return {
        "keepalives": "1",
        "keepalives_idle": str(idle),
        "keepalives_interval": str(interval),
        "keepalives_count": str(count),
        "tcp_user_timeout": str(int(timeout * 1000)),
    }


def lost(conn: psycopg.Connection[Any]) -> bool:
    """Whether the connection is unusable (closed, or its socket failed: an ended keepalive)."""
    return conn.closed or conn.broken


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def split_url(url: str, name: str = "schema") -> tuple[str, str | None]:
    """Split one of our own parameters (``schema``, ``timeout``) off a URL: (URL for libpq, value or None).

    >>> split_url("postgresql://u@h/db?schema=team_a&sslmode=require")
    ('postgresql://u@h/db?sslmode=require', 'team_a')
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in pairs if k == name]
    if not values:
        return url, None
    rest = [(k, v) for k, v in pairs if k != name]
    # quote, not quote_plus: libpq decodes %XX but not '+'.
    query = urlencode(rest, quote_via=quote, safe="")
    return urlunsplit(parts._replace(query=query)), values[-1]


def unreachable(e: BaseException) -> bool:
    """Whether a failed write failed for want of the server, not because of its rows."""
    return isinstance(e, (StoreOpenError, psycopg.OperationalError, psycopg.InterfaceError))
