"""Python client for the satchel daemon (protocol.md in the satchel repository).

``Client`` is blocking and safe to share between threads; ``AsyncClient`` is for
asyncio. Both pipeline every call over one Unix-socket connection and reconnect on the
next call after the connection drops.
"""

from ._common import (
    CLIENT_OVERLOADED,
    CLIENT_TIMEOUT,
    CLOSED,
    DISCONNECTED,
    PROTOCOL_VERSION,
    UNREACHABLE,
    SatchelError,
    default_socket_path,
    socket_path_for,
    mail_fields,
)
from .aio import AsyncClient
from .client import Client

__all__ = [
    "AsyncClient",
    "Client",
    "SatchelError",
    "PROTOCOL_VERSION",
    "DISCONNECTED",
    "UNREACHABLE",
    "CLOSED",
    "CLIENT_TIMEOUT",
    "CLIENT_OVERLOADED",
    "default_socket_path",
    "socket_path_for",
    "mail_fields",
]
__version__ = "0.1.0"
