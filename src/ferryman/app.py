"""The composition root: builds a running gateway from a :class:`Config` and keeps it in step.

Owns: :class:`Gateway` -- creating identity sources and loading the policy, binding and
starting listeners, applying a changed configuration live (SIGHUP: new listeners start,
removed ones stop, changed ones rebind, unrelated connections are untouched; an invalid file
keeps the old configuration), the revalidation loop, and the ordered shutdown (stop
accepting → drain up to the grace period → close the rest with reason ``shutdown``; a second
signal skips the wait).

Must not: handle connections itself (``proxy.tcp`` and friends do) or parse configuration
(``config.load`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from typing import Any

from ferryman import logs
from ferryman._aio import cancel_and_wait, spawn
from ferryman.admin.service import AdminService
from ferryman.audit import AuditLog
from ferryman.config.load import load_config
from ferryman.config.model import Config, ListenerConfig
from ferryman.errors import AccessDenied, ConfigError, FerrymanError
from ferryman.identity.base import Identity, IdentitySource
from ferryman.identity.mtls import MtlsSource
from ferryman.identity.static import StaticEntry, StaticSource
from ferryman.identity.tailscale import TailscaleSource
from ferryman.policy.model import EMPTY_POLICY, Policy
from ferryman.policy.parse import load_policy
from ferryman.proxy.access import Access, AccessGeneration
from ferryman.proxy.listener import Listener, bind_socket
from ferryman.proxy.pg import serve_postgres
from ferryman.proxy.pgroles import ListenerRoles
from ferryman.proxy.poller import release_poller
from ferryman.proxy.runtime import Runtime
from ferryman.proxy.session import GRACEFUL_CLOSE_TIMEOUT, Session
from ferryman.proxy.tcp import serve_tcp
from ferryman.proxy.tlssetup import ListenerTLS, build_listener_tls
from ferryman.routing import Router
from ferryman.tailscale.localapi import LocalAPIClient

logger = logging.getLogger(__name__)

DEFAULT_CAPABILITY = "ferryman.dev/cap/ferryman"


def capability_of(config: Config) -> str:
    return config.tailscale.capability if config.tailscale is not None else DEFAULT_CAPABILITY


def build_tailscale_client(config: Config) -> LocalAPIClient | None:
    if config.tailscale is None:
        return None
    return LocalAPIClient(config.tailscale.socket, timeout=config.tailscale.timeout)


def build_sources(config: Config, tailscale: LocalAPIClient | None = None) -> dict[str, IdentitySource]:
    """Identity sources for ``config``, by name."""
    sources: dict[str, IdentitySource] = {}
    if config.tailscale is not None:
        client = tailscale or build_tailscale_client(config)
        assert client is not None
        sources["tailscale"] = TailscaleSource(client, config.tailscale.capability)
    if config.identity.mtls is not None:
        sources["mtls"] = MtlsSource(config.identity.mtls.user_from, config.identity.mtls.groups_from)
    if config.identity.static:
        entries = [
            StaticEntry(
                ipaddress.ip_network(item.cidr, strict=False),
                Identity(user=item.user, source="static", node=item.node, groups=item.groups, tags=item.tags),
            )
            for item in config.identity.static
        ]
        sources["static"] = StaticSource(entries)
    return sources


def read_policy(config: Config, *, log_warnings: bool = True) -> Policy:
    """Load the policy file named by ``config`` (empty policy when none); its warnings are
    logged unless ``log_warnings`` is off (``ferryman check`` prints them itself). Raises
    ConfigError."""
    if not config.policy_file:
        return EMPTY_POLICY
    policy = load_policy(
        config.policy_file,
        capability=capability_of(config),
        listeners=[item.name for item in config.listeners],
    )
    if log_warnings:
        for warning in policy.warnings:
            logger.warning("policy: %s", warning)
    return policy


def _routing(item: ListenerConfig) -> tuple[object, ...]:
    return (item.backend, item.rules, item.sni, item.target_down_time)


def _same_backend(a: ListenerConfig, b: ListenerConfig) -> bool:
    """Whether a running provisioner can serve the changed listener unchanged."""
    keys = ("backend", "postgres", "backend_tls", "backend_ca_file", "dial_timeout")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _policy_stamp(path: str | None) -> tuple[float, int] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


class Gateway:
    """A running ferryman: listeners, sessions, revalidation, reload and shutdown."""

    housekeeping_interval: float = 5.0
    """Seconds between housekeeping passes (see :meth:`_housekeeping_loop`)."""

    def __init__(self, config: Config, *, config_path: str | None = None, splice: bool = False) -> None:
        self.config = config
        self.config_path = config_path
        self.runtime = Runtime(
            config=config,
            access=Access(AccessGeneration(EMPTY_POLICY, {}, capability_of(config))),
            audit=AuditLog(config.audit.file),
            splice=splice,
        )
        # Listener policies (SPEC §3) are read from the running listeners' configuration,
        # which this class keeps current (start, reload).
        self.runtime.access.listeners = self.runtime.listeners
        self.listeners: dict[str, Listener] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired_conns: set[asyncio.Task[Any]] = set()
        """Connection tasks of listeners a reload stopped (removed or rebound), until they end:
        shutdown waits for them and cuts them like the running listeners' own."""
        self._sweepers: dict[str, asyncio.Task[Any]] = {}
        self._renewers: dict[str, asyncio.Task[Any]] = {}
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reval_wakeup = asyncio.Event()
        self._policy_stamp: tuple[float, int] | None = None
        self.stopped = asyncio.Event()
        self.admin = AdminService(self.runtime, self._addresses)
        sessions = self.runtime.sessions
        self.runtime.metrics.live_sessions = lambda: ((s.listener, s.mode) for s in sessions)

    def _addresses(self) -> dict[str, str]:
        """Running listeners: name → the address they are bound to."""
        return {name: f"{lis.address[0]}:{lis.address[1]}" for name, lis in self.listeners.items()}

    # -- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load policy, bind every listener, start background loops. Raises on failure."""
        policy = read_policy(self.config)
        self._policy_stamp = _policy_stamp(self.config.policy_file)
        self.runtime.tailscale = build_tailscale_client(self.config)
        self.runtime.access.generation = AccessGeneration(
            policy, build_sources(self.config, self.runtime.tailscale), capability_of(self.config)
        )
        tls = {
            item.name: await build_listener_tls(item, self.config, self.runtime.tailscale)
            for item in self.config.listeners
        }
        bound = self._bind_all(self.config.listeners)
        for item in self.config.listeners:
            await self._start_resources(item, tls[item.name])
            self._start_listener(item, bound[item.name])
        spawn(self._revalidation_loop(), name="revalidation", owner=self._tasks)
        spawn(self._housekeeping_loop(), name="housekeeping", owner=self._tasks)
        await self.admin.apply(self.config.admin)
        logger.info(
            "ferryman started with %d listener(s)",
            len(self.listeners),
            extra={
                "listeners": {n: f"{lis.address[0]}:{lis.address[1]}" for n, lis in self.listeners.items()}
            },
        )

    def _bind_all(self, items: tuple[ListenerConfig, ...] | list[ListenerConfig]) -> dict[str, Any]:
        """Bind all sockets first, so a bind failure leaves nothing half-applied."""
        bound: dict[str, Any] = {}
        try:
            for item in items:
                host, port = item.listen_address
                try:
                    bound[item.name] = bind_socket(host, port)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot listen on {item.listen}: {exc.strerror or exc}",
                        key=f"listeners.{item.name}.listen",
                    ) from exc
        except BaseException:
            for sock in bound.values():
                sock.close()
            raise
        return bound

    async def _start_resources(self, item: ListenerConfig, tls: ListenerTLS | None) -> None:
        """Per-listener helpers: TLS (with tailnet certificate renewal) and, for PostgreSQL,
        the role provisioner."""
        renewer = self._renewers.pop(item.name, None)
        if renewer is not None:
            await cancel_and_wait([renewer])
        running_config = self.runtime.listeners.get(item.name)
        if running_config is None or _routing(running_config) != _routing(item):
            self.runtime.routers[item.name] = Router(item)
        if tls is None:
            self.runtime.tls.pop(item.name, None)
        else:
            self.runtime.tls[item.name] = tls
            if tls.store is not None:
                self._renewers[item.name] = spawn(
                    self._renew_forever(item.name, tls), name=f"cert renewal {item.name}", owner=self._tasks
                )
        old = self.runtime.provisioners.get(item.name)
        running = self.runtime.listeners.get(item.name)
        if old is not None and running is not None and _same_backend(running, item):
            return
        await self._stop_provisioner(item.name)
        if item.mode != "postgres":
            return
        # Not awaited here: the backend may be down, and binding must not wait for it. The
        # background task opens the provisioner (and logs a failure); connections open it too.
        roles = ListenerRoles(item)
        self.runtime.provisioners[item.name] = roles
        name = item.name

        def live_roles() -> set[str]:
            return {str(s.extra.get("role")) for s in self.runtime.sessions.for_listener(name)}

        self._sweepers[name] = spawn(roles.run(live_roles), name=f"sweeper {name}", owner=self._tasks)

    async def _renew_forever(self, name: str, tls: ListenerTLS) -> None:
        interval = self.config.tailscale.cert_check_interval if self.config.tailscale else 3600.0
        while True:
            await asyncio.sleep(interval)
            try:
                await tls.refresh()
            except FerrymanError as exc:
                logger.warning("listener %s: tailnet certificate renewal failed: %s", name, exc)

    async def _stop_resources(self, name: str) -> None:
        renewer = self._renewers.pop(name, None)
        if renewer is not None:
            await cancel_and_wait([renewer])
        self.runtime.tls.pop(name, None)
        self.runtime.routers.pop(name, None)
        await self._stop_provisioner(name)

    async def _stop_provisioner(self, name: str) -> None:
        # Sessions of the listener being closed gracefully still need it to terminate their
        # backends (bounded, and only when some are closing).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GRACEFUL_CLOSE_TIMEOUT + 0.5
        while any(s.closing for s in self.runtime.sessions.for_listener(name)) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        task = self._sweepers.pop(name, None)
        if task is not None:
            await cancel_and_wait([task])
        roles = self.runtime.provisioners.pop(name, None)
        if roles is not None:
            await roles.close()

    def _start_listener(self, item: ListenerConfig, sock: Any) -> None:
        name = item.name
        self.runtime.listeners[name] = item

        async def handle(conn: Any, addr: tuple[Any, ...]) -> None:
            # Read the listener's config at accept time: a reload may have changed it.
            config = self.runtime.listeners.get(name, item)
            try:
                if config.mode == "postgres":
                    await serve_postgres(self.runtime, config, conn, addr)
                else:
                    await serve_tcp(self.runtime, config, conn, addr)
            except Exception:
                logger.exception("connection handler for %s failed", name)
                conn.close()

        listener = Listener(name, sock, handle)
        listener.start()
        self.listeners[name] = listener

    # -- reload ---------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config and policy files and apply the difference. False on error."""
        if self.config_path is None:
            logger.warning("reload requested but ferryman was started without a config file")
            return False
        try:
            config = load_config(self.config_path)
            policy = read_policy(config)
        except ConfigError as exc:
            logger.error("reload failed, keeping the running configuration: %s", exc)
            self.runtime.metrics.reloaded(False)
            return False
        try:
            await self.apply(config, policy)
        except ConfigError as exc:
            logger.error("reload failed, keeping the running configuration: %s", exc)
            self.runtime.metrics.reloaded(False)
            return False
        self.runtime.metrics.reloaded(True)
        logger.info("configuration reloaded", extra={"listeners": sorted(self.listeners)})
        return True

    async def apply(self, config: Config, policy: Policy) -> None:
        """Switch to ``config``/``policy``. Raises ConfigError, leaving the old state, if a
        certificate cannot be loaded or a bind fails."""
        # Certificates first: a bad one fails the reload before anything changes.
        tls = {
            item.name: await build_listener_tls(item, config, self.runtime.tailscale)
            for item in config.listeners
        }
        old = dict(self.runtime.listeners)
        new = {item.name: item for item in config.listeners}
        rebinding = [
            item
            for name, item in new.items()
            if name not in old or old[name].listen_address != item.listen_address
        ]
        # Bind what we can before changing anything, so a busy port fails the whole reload.
        # An address still held by one of our own listeners (moved between listeners) is
        # bound after that listener stops.
        bound = self._bind_all([item for item in rebinding if not self._held_by_other_listener(item)])

        old_sources = self.runtime.access.generation.sources
        old_tailscale = self.runtime.tailscale
        self.config = config
        self.runtime.config = config
        self.runtime.tailscale = build_tailscale_client(config)
        self.runtime.access.generation = AccessGeneration(
            policy, build_sources(config, self.runtime.tailscale), capability_of(config)
        )
        self._policy_stamp = _policy_stamp(config.policy_file)
        if config.audit.file != self.runtime.audit.target:
            self.runtime.audit.reopen(config.audit.file)
        logs.set_level(config.log_level)

        for name in list(old):
            if name not in new or name in {i.name for i in rebinding}:
                self._stop_listener(name, close_sessions=name not in new)
            if name not in new:
                await self._stop_resources(name)
        for item in new.values():
            await self._start_resources(item, tls[item.name])
            self.runtime.listeners[item.name] = item
        for item in rebinding:
            sock = bound.get(item.name)
            if sock is None:
                host, port = item.listen_address
                try:
                    sock = bind_socket(host, port)
                except OSError as exc:
                    logger.error("listener %s: cannot listen on %s: %s", item.name, item.listen, exc)
                    continue
            self._start_listener(item, sock)
        for source in old_sources.values():
            spawn(source.aclose(), name="close identity source", owner=self._tasks)
        if old_tailscale is not None:
            spawn(old_tailscale.aclose(), name="close LocalAPI client", owner=self._tasks)
        await self.admin.apply(config.admin)
        self._reval_wakeup.set()

    def _held_by_other_listener(self, item: ListenerConfig) -> bool:
        """True when another currently running listener holds ``item``'s address."""
        for name, running in self.runtime.listeners.items():
            if name != item.name and running.listen_address == item.listen_address and name in self.listeners:
                return True
        return False

    def _stop_listener(self, name: str, *, close_sessions: bool) -> None:
        listener = self.listeners.pop(name, None)
        if listener is not None:
            listener.stop_accepting()
            for task in listener.tasks:
                self._retired_conns.add(task)
                task.add_done_callback(self._retired_conns.discard)
        if close_sessions:
            self.runtime.listeners.pop(name, None)
            for session in self.runtime.sessions.for_listener(name):
                session.close("shutdown", "listener removed from configuration")

    # -- housekeeping -----------------------------------------------------------------------

    async def _housekeeping_loop(self) -> None:
        """Every :attr:`housekeeping_interval`, the limit tracker forgets bandwidth windows
        nobody needs any more."""
        while True:
            await asyncio.sleep(self.housekeeping_interval)
            self.runtime.tracker.prune()

    # -- revalidation ---------------------------------------------------------------------

    async def _revalidation_loop(self) -> None:
        while not self._stop.is_set():
            interval = self.config.revalidation.interval
            try:
                async with asyncio.timeout(interval if interval > 0 else None):
                    await self._reval_wakeup.wait()
            except TimeoutError:
                pass
            self._reval_wakeup.clear()
            if self._stop.is_set():
                return
            self._reload_policy_if_changed()
            if self.config.revalidation.interval > 0:
                await self.revalidate()

    def _reload_policy_if_changed(self) -> None:
        stamp = _policy_stamp(self.config.policy_file)
        if stamp is None or stamp == self._policy_stamp:
            return
        self._policy_stamp = stamp
        try:
            policy = read_policy(self.config)
        except ConfigError as exc:
            logger.error("policy file changed but is invalid, keeping the previous grants: %s", exc)
            return
        gen = self.runtime.access.generation
        self.runtime.access.generation = AccessGeneration(policy, gen.sources, gen.capability)
        logger.info("policy file reloaded: %s", self.config.policy_file)

    async def revalidate(self) -> None:
        """Re-identify and re-authorize every live session; close those that lost their grant."""
        sessions = list(self.runtime.sessions)
        for start in range(0, len(sessions), 64):
            batch = sessions[start : start + 64]
            await asyncio.gather(*(self._recheck(s) for s in batch))

    async def _recheck(self, session: Session) -> None:
        access = self.runtime.access
        config = self.runtime.listeners.get(session.listener)
        if config is None:
            return
        try:
            async with asyncio.timeout(config.identity_timeout):
                identity = await access.identify(session.peer, self.runtime.sources_for(config))
            if identity.user != session.identity.user:
                raise AccessDenied(f"identity changed from {session.identity.user} to {identity.user}")
            auth = access.authorize(identity, session.peer, session.listener)
            if session.recheck is not None:
                await session.recheck(auth)
        except (AccessDenied, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, AccessDenied) else "identity lookup timed out"
            session.close("revoked", reason)
            return
        except FerrymanError as exc:
            logger.warning("revalidation of %s failed: %s", session.id, exc)
            return
        session.identity = identity
        session.update(auth)

    # -- shutdown -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: graceful shutdown. Second call: force (skip the grace period)."""
        if self._stop.is_set():
            logger.warning("second stop signal: closing all connections now")
            self._force.set()
        else:
            self._stop.set()

    async def serve_forever(self) -> None:
        """Run until :meth:`request_stop`, handling SIGHUP/SIGTERM/SIGINT, then shut down."""
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            signal.SIGHUP: lambda: spawn(self.reload(), name="reload", owner=self._tasks),
        }
        for sig, callback in handlers.items():
            loop.add_signal_handler(sig, callback)
        try:
            await self._stop.wait()
            await self.shutdown()
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)

    async def _drained(self, conn_tasks: set[asyncio.Task[Any]]) -> None:
        """Return once every connection task has finished and no session is live."""
        while True:
            pending = [t for t in conn_tasks if not t.done()]
            if pending:
                await asyncio.wait(pending)
            await self.runtime.sessions.wait_empty()
            if all(t.done() for t in conn_tasks):
                return

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, drain up to ``grace`` seconds, then close what is left."""
        self._stop.set()
        self._reval_wakeup.set()
        grace = self.config.shutdown.grace if grace is None else grace
        rt = self.runtime
        rt.draining = True
        for name in list(self.listeners):
            self.listeners[name].stop_accepting()
        conn_tasks = {t for lis in self.listeners.values() for t in lis.tasks} | self._retired_conns
        self.listeners.clear()
        # A live connection is a task (set-up; PostgreSQL mode keeps its task to the end) or a
        # TCP-mode session, whose relay runs without a task once set up.
        live = sum(1 for t in conn_tasks if not t.done()) + sum(1 for s in rt.sessions if s.mode == "tcp")
        if live:
            logger.info("draining %d connection(s) for up to %gs", live, grace)
            drained = asyncio.ensure_future(self._drained(conn_tasks))
            force_wait = asyncio.ensure_future(self._force.wait())
            try:
                await asyncio.wait([drained, force_wait], timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            finally:
                drained.cancel()
                force_wait.cancel()
        cut = 0
        for session in rt.sessions:
            cut += 1
            session.close("shutdown", "gateway shutting down")
        if cut:
            logger.info("closed %d connection(s) at shutdown", cut)
            # Each session audits its close from its relay's done callback, on the next turn;
            # PostgreSQL sessions first have their backend terminated, so the client reads the
            # server's FATAL 57P01 (bounded: a hard close follows GRACEFUL_CLOSE_TIMEOUT).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GRACEFUL_CLOSE_TIMEOUT + 0.5):
                    await rt.sessions.wait_empty()
        await cancel_and_wait([t for t in conn_tasks if not t.done()])
        await cancel_and_wait(list(self._tasks))
        for name in list(rt.provisioners):
            await self._stop_resources(name)
        for source in rt.access.generation.sources.values():
            await source.aclose()
        if rt.tailscale is not None:
            await rt.tailscale.aclose()
        await self.admin.close()  # last: /healthz says "draining" until the drain is over
        rt.audit.close()
        release_poller(asyncio.get_running_loop())
        self.stopped.set()
