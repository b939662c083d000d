"""The admin listener (``[admin] listen``): for now ``/metrics`` and ``/healthz``."""

from ferryman.admin.server import AdminServer, Answer

__all__ = ["AdminServer", "Answer"]
