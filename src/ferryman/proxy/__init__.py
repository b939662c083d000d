"""The asyncio shell: listeners, connection handling, relaying, sessions.

Everything that touches sockets and the event loop lives here; the decisions it acts on come
from the pure cores (``policy.engine``, ``limits.tracker``, ``pgwire``, ``tlshello``).
"""
