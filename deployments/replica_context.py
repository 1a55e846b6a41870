"""Who this Serve replica is (app, replica id); stand-in values outside Serve, as in unit tests."""

from __future__ import annotations


def _context():
    from ray import serve

    try:
        return serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not inside a Serve replica
        return None


def current_app_name() -> str:
    context = _context()
    return context.app_name if context is not None else "local"


def current_replica_id() -> str:
    context = _context()
    return context.replica_id.unique_id if context is not None else "local"
