"""The rendezvous port of a launch: ``free_port`` for ``MASTER_PORT`` (train, experiment, study, the tests)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port nobody listens on now, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
