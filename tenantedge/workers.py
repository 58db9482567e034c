"""
C{--workers N}: N processes serving the same listening sockets, each with
its own reactor, so the edge uses every core.

The process C{twistd}/C{twist} started becomes a supervisor (L{Supervisor}):

  1. before anything else it makes the base TLS context
     (L{tenantedge.contexts.make_base_context}): OpenSSL draws the
     session-ticket keys when a context is created, and every worker forked
     later inherits them, so a session issued by one worker resumes on any
     other (pyOpenSSL cannot set ticket keys explicitly);
  2. in C{privilegedStartService} (as root, before C{-u/-g} drops
     privileges) it binds the HTTPS and HTTP sockets, and its own admin
     endpoint;
  3. in C{startService} (as the server's user) it prepares the store, the
     local CA and the ACME accounts once, so workers never race to create
     them; then, once its reactor runs, it forks the workers. Each worker
     drops the reactor it inherited (without touching its file
     descriptors' shared kernel state), installs a fresh one, adopts the
     listening sockets and runs the whole edge
     (L{tenantedge.tap.build_edge});
  4. it restarts a worker that dies (logged, with a growing delay if one
     keeps dying at once), and on SIGTERM/SIGINT stops them all (SIGTERM,
     then SIGKILL after 10 s).

What the workers share goes through the store directory
(L{tenantedge.shared}): one issuance per name (a lock, then a re-read), the
pending challenge answers (any worker answers the CA), the backoff and
limit windows; a renewal or removal made by one worker reaches the others'
caches within C{--store-poll}. The supervisor's admin endpoint answers
C{/metrics} for the whole server: every worker's metrics with a C{worker}
label (sum them with C{sum without (worker) (...)}), and passes C{POST
/certs/...} on (C{forget} to every worker). Each worker's own admin
endpoint is a UNIX socket in a private run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, UNIXClientEndpoint, serverFromString
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from .admin import AdminGuard, bound_names
from .config import OnDemandConfig
from .contexts import ServingContexts, make_base_context
from .headers import ADMIN_HEADER
from .listening import ListenFailed, ListeningService
from .pools import quiet_pool
from .proxy import EdgeSite
from .proxyheader import split_proxy_prefix
from .workerlogs import WorkerLogReader, pipe_stream, send_logs_to

__all__ = ["Supervisor", "bind_listening_socket", "run_worker"]

#: A worker that dies sooner than this after starting is restarted after a
#: growing delay (up to MAX_RESTART_DELAY).
QUICK_DEATH = 5.0
MAX_RESTART_DELAY = 30.0
#: How long stopping workers get after SIGTERM before SIGKILL.
STOP_GRACE = 10.0
#: How long a worker replaced at a key rotation may finish its connections.
DRAIN = 30.0


def bind_listening_socket(description: str, purpose: str, port: int | None = None) -> socket.socket:
    """
    Bind a listening TCP socket for a TCP endpoint description, read with
    Twisted's own endpoint parser (on a memory reactor, which binds
    nothing), so C{tcp:443:interface=...}, C{tcp6:...} and C{port=} mean
    what they mean to the single-process server.

    @raise ListenFailed: one line, for a description that is not TCP or a
        port that cannot be bound.
    """
    recorder = MemoryReactor()
    # haproxy:tcp:...: the worker wraps the adopted socket (tenantedge.tap).
    _proxied, inner = split_proxy_prefix(description)
    try:
        serverFromString(recorder, inner).listen(_Nothing())
    except Exception as e:
        raise ListenFailed(f"{description!r} ({purpose}): {e}") from None
    if not recorder.tcpServers:
        raise ListenFailed(f"{description!r} ({purpose}): --workers needs tcp: endpoints (or haproxy:tcp:)")
    described, _factory, backlog, interface = recorder.tcpServers[0]
    port = described if port is None else port
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # One socket per worker on the same port: the kernel spreads new
        # connections over them evenly (by address and port), where one
        # shared socket lets whichever worker wakes first take most.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and interface == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((interface or "0.0.0.0", port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        where = f"port {port}" + (f" of {interface}" if interface else "")
        raise ListenFailed(f"cannot listen on {where} ({purpose}): {e.strerror}") from None
    sock.setblocking(False)
    return sock


class _Nothing:
    """A stand-in factory for reading an endpoint description."""

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: Any) -> None:
        return None


@attrs.define
class _Worker:
    slot: int
    pid: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    restart: Any = None
    #: Bumped each time the slot gets a new process (its admin socket's name).
    generation: int = 0


class Supervisor(MultiService):
    """
    Runs and watches the workers (see the module docstring).

    @ivar config: the configuration every worker runs.
    @ivar count: how many workers.
    @ivar run_worker: C{run_worker(config, sockets, contexts, slot)} runs
        one worker's edge until it stops (in the forked child);
        L{tenantedge.tap} passes its own.
    @ivar prepare: run once before the first fork (the store, the local
        CA, the ACME accounts).
    """

    _log = Logger()

    def __init__(
        self,
        config: OnDemandConfig,
        reactor: Any,
        count: int,
        run_worker: Callable[[OnDemandConfig, dict[str, socket.socket], ServingContexts, int], None],
        prepare: Callable[[], None],
        on_parent: Callable[[Any], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_parent = on_parent
        self.config = config
        self.reactor = reactor
        self.count = count
        self.run_worker = run_worker
        self.prepare = prepare
        # Before any fork: the ticket keys every worker will share.
        self.base_context = make_base_context()
        #: Each worker's listening sockets (one per worker and listener, the
        #: same port, SO_REUSEPORT), by slot.
        self.sockets: list[dict[str, socket.socket]] = []
        self.workers = [_Worker(slot) for slot in range(count)]
        self.rundir: str | None = None
        self.restarts = 0
        self.rotations = 0
        self._monitor: LoopingCall | None = None
        self._stopping = False
        self._parent_pid = os.getpid()
        self._rotation: LoopingCall | None = None
        #: Old workers finishing their connections after a rotation: pid -> deadline.
        self.retiring: dict[int, float] = {}
        if config.admin is not None:
            admin = ListeningService(
                serverFromString(reactor, config.admin),
                EdgeSite(SupervisorAdmin(self), reactor=reactor, max_body_size=64 * 1024),
                "metrics and the certs CLI, for every worker",
            )
            admin.setName("admin")
            admin.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self._on_parent is not None:
            self._on_parent(parent)

    # -- start -------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        if self.sockets:
            return
        purposes = {"https": "tenant traffic", "http": "ACME HTTP-01 answers and redirects to HTTPS"}
        descriptions = {"https": self.config.https, "http": self.config.http}
        ports: dict[str, int] = {}
        try:
            for _slot in range(self.count):
                sockets: dict[str, socket.socket] = {}
                self.sockets.append(sockets)
                for name, description in descriptions.items():
                    if description is None:
                        continue
                    sock = bind_listening_socket(description, purposes[name], ports.get(name))
                    ports.setdefault(name, sock.getsockname()[1])  # port 0: the others take the same
                    sockets[name] = sock
        except ListenFailed:
            self._close_sockets()
            raise
        super().privilegedStartService()

    def startService(self) -> None:
        # After twistd daemonised (a new pid): this is the supervisor.
        self._parent_pid = os.getpid()
        # twist (unlike twistd) starts services without the privileged step.
        self.privilegedStartService()
        self.prepare()
        self.rundir = tempfile.mkdtemp(prefix="tenantedge-workers-")
        super().startService()
        self._log.info("tenantedge: {count} worker processes", count=self.count)
        # The same banner as one process's (tenantedge.edge.EdgeService):
        # every listener, where, and what for.
        purposes = {"https": "tenant traffic", "http": "ACME HTTP-01 answers and redirects to HTTPS"}
        for name, sock in self.sockets[0].items():
            self._log.info("listening: {name} on {address} ({purpose})", name=name, address=_address(sock),
                           purpose=purposes.get(name, name))
        admin = self.getServiceNamed("admin") if self.config.admin is not None else None
        if isinstance(admin, ListeningService):
            self._log.info("listening: {name} on {address} ({purpose})", name="admin", address=admin.address(),
                           purpose=admin.purpose)
        self.reactor.callWhenRunning(self._start_all)

    def _start_all(self) -> None:
        if self._stopping:
            return
        for worker in self.workers:
            self._fork(worker)
        self._monitor = LoopingCall(self._reap)
        self._monitor.clock = self.reactor
        self._monitor.start(0.5, now=False)
        self._rotation = LoopingCall(self._rotate)
        self._rotation.clock = self.reactor
        self._rotation.start(self.config.ticket_key_lifetime, now=False)

    def worker_config(self, slot: int) -> OnDemandConfig:
        """
        A worker's configuration: its admin endpoint is a private UNIX
        socket, and it runs its share of the concurrent orders (the window
        limits are counted across workers through the store; the number of
        orders running at once is per process).
        """
        assert self.rundir is not None
        share = max(1, -(-self.config.max_concurrent_issuance // self.count))
        return attrs.evolve(
            self.config, admin=f"unix:{self.admin_socket(slot)}", workers=1, max_concurrent_issuance=share
        )

    def admin_socket(self, slot: int) -> str:
        assert self.rundir is not None
        return os.path.join(self.rundir, f"worker-{slot}.{self.workers[slot].generation}.sock")

    def _fork(self, worker: _Worker) -> None:
        worker.restart = None
        worker.generation += 1
        config = self.worker_config(slot=worker.slot)
        log_read, log_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                os.close(log_read)
                send_logs_to(pipe_stream(log_write))  # the supervisor alone writes the log
                # A group of its own: a terminal's Ctrl-C or a job-control
                # signal reaches the supervisor, which stops the workers.
                os.setpgid(0, 0)
                mine = self.sockets[worker.slot]
                for slot, others in enumerate(self.sockets):
                    if slot != worker.slot:
                        for sock in others.values():
                            sock.close()  # only this process's copies
                self.run_worker(config, mine, ServingContexts(base=self.base_context), worker.slot)
            except BaseException:
                self._log.failure("worker {slot} failed", slot=worker.slot)
                code = 1
            finally:
                os._exit(code)
        os.close(log_write)
        WorkerLogReader(self.reactor, log_read, worker.slot).start()
        worker.pid = pid
        worker.started = self.reactor.seconds()
        self._log.info("worker {slot} started (pid {pid})", slot=worker.slot, pid=pid)

    # -- watch -------------------------------------------------------------------------

    def _reap(self) -> None:
        now = self.reactor.seconds()
        for pid, deadline in list(self.retiring.items()):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                del self.retiring[pid]
                self._log.info("retired worker (pid {pid}) has finished", pid=pid)
            elif now > deadline:
                _signal(pid, signal.SIGKILL)
        for worker in self.workers:
            if not worker.pid:
                continue
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid == 0:
                continue
            worker.pid = 0
            if self._stopping:
                continue
            self.restarts += 1
            lived = self.reactor.seconds() - worker.started
            worker.quick_deaths = worker.quick_deaths + 1 if lived < QUICK_DEATH else 0
            delay = min(MAX_RESTART_DELAY, 2.0 ** worker.quick_deaths - 1) if worker.quick_deaths else 0.0
            self._log.error(
                "worker {slot} (pid {pid}) {how}; restarting it{later}",
                slot=worker.slot, pid=pid, how=_describe_exit(status),
                later=f" in {delay:.0f}s" if delay else "",
            )
            worker.restart = self.reactor.callLater(delay, self._fork, worker)

    def _rotate(self) -> Deferred[None]:
        """
        New session-ticket keys: a new base context, then each worker
        replaced in turn by one forked with it; the old one stops accepting
        and finishes its connections (up to L{DRAIN} seconds). Sessions
        issued before resume no more (one full handshake each).
        """
        return Deferred.fromCoroutine(self._rotate_all()).addErrback(
            lambda f: self._log.failure("rotating the session-ticket keys failed", f)
        )

    async def _rotate_all(self) -> None:
        if self._stopping:
            return
        self.base_context = make_base_context()
        self.rotations += 1
        self._log.info("rotating TLS session-ticket keys: replacing {count} workers", count=self.count)
        for worker in self.workers:
            if self._stopping or not worker.pid:
                continue
            old = worker.pid
            self._fork(worker)
            for _ in range(100):  # up to 10 s for the new one to serve
                if os.path.exists(self.admin_socket(worker.slot)) or self._stopping:
                    break
                await deferLater(self.reactor, 0.1, lambda: None)
            self.retiring[old] = self.reactor.seconds() + DRAIN + 5
            _signal(old, signal.SIGUSR2)

    def live_workers(self) -> list[int]:
        """Slots of the workers running now."""
        return [w.slot for w in self.workers if w.pid]

    # -- stop ---------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        for loop in (self._monitor, self._rotation):
            if loop is not None and loop.running:
                loop.stop()
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
        d = Deferred.fromCoroutine(self._stop_workers())
        d.addCallback(lambda _: super(Supervisor, self).stopService())
        return d

    async def _stop_workers(self) -> None:
        if os.getpid() != self._parent_pid:
            return
        for pid in self.retiring:
            _signal(pid, signal.SIGTERM)
        for worker in self.workers:
            if worker.pid:
                _signal(worker.pid, signal.SIGTERM)
        waited = 0.0
        while any(w.pid for w in self.workers) and waited < STOP_GRACE:
            await deferLater(self.reactor, 0.1, lambda: None)
            waited += 0.1
            for worker in self.workers:
                if worker.pid:
                    try:
                        pid, _ = os.waitpid(worker.pid, os.WNOHANG)
                    except ChildProcessError:
                        pid = worker.pid
                    if pid:
                        worker.pid = 0
        for worker in self.workers:
            if worker.pid:
                self._log.warn("worker {slot} (pid {pid}) did not stop in time; killing it",
                               slot=worker.slot, pid=worker.pid)
                _signal(worker.pid, signal.SIGKILL)
                try:
                    os.waitpid(worker.pid, 0)
                except ChildProcessError:
                    pass
                worker.pid = 0
        self._close_sockets()
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)

    def _close_sockets(self) -> None:
        for sockets in self.sockets:
            for sock in sockets.values():
                sock.close()
        self.sockets = []


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- in the worker ------------------------------------------------------------------------


def fresh_reactor() -> Any:
    """
    In a forked worker: put a new reactor in place of the inherited one.

    The inherited reactor's epoll instance is shared with the parent (a
    forked file descriptor refers to the same kernel object), so this
    process must never use it: its descriptor is closed here (which only
    drops this process's reference), the signal wake-up descriptor is
    detached, and a new reactor is installed as the global one (Twisted's
    HTTP/2 code finds the reactor globally).
    """
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    old = sys.modules.pop("twisted.internet.reactor", None)
    # EPollReactor's private _poller (no public close; pinned in
    # tests.test_private_apis.ReactorPrivateAPITests): renamed, one
    # descriptor would leak, nothing worse.
    poller = getattr(old, "_poller", None)
    if poller is not None:
        try:
            poller.close()
        except OSError:
            pass
    import twisted.internet

    if hasattr(twisted.internet, "reactor"):
        delattr(twisted.internet, "reactor")
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    return reactor


def _retire(reactor: Any, edge: Any) -> None:
    """Stop listening, let open connections finish (up to L{DRAIN} seconds), then stop."""
    Deferred.fromCoroutine(_drain(reactor, edge))


async def _drain(reactor: Any, edge: Any) -> None:
    await edge.stop_listening()
    waited = 0.0
    while edge.open_connections() and waited < DRAIN:
        await deferLater(reactor, 0.2, lambda: None)
        waited += 0.2
    reactor.stop()


def adopted_endpoints(reactor: Any, sockets: dict[str, socket.socket]) -> dict[str, AdoptedStreamServerEndpoint]:
    """Endpoints that adopt the parent's listening sockets (a duplicate of each)."""
    return {
        name: AdoptedStreamServerEndpoint(reactor, os.dup(sock.fileno()), sock.family)
        for name, sock in sockets.items()
    }


def watch_parent(reactor: Any, parent: int) -> LoopingCall:
    """Stop this worker if its supervisor is gone (it was killed outright)."""

    def check() -> None:
        if os.getppid() != parent:
            reactor.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(1.0, now=False)
    return loop


def run_worker(
    build: Callable[..., Any], config: OnDemandConfig, sockets: dict[str, socket.socket],
    contexts: ServingContexts, slot: int,
) -> None:
    """
    One forked worker: a fresh reactor, the parent's sockets, the whole edge
    from C{build} (L{tenantedge.tap.build_edge}), until it stops.
    """
    parent = os.getppid()
    reactor = fresh_reactor()
    endpoints = adopted_endpoints(reactor, sockets)
    for sock in sockets.values():
        sock.close()  # this process's copies; the adopted duplicates remain
    edge = build(config, reactor, endpoints=endpoints, contexts=contexts)
    edge.startService()
    watch_parent(reactor, parent)
    # SIGUSR2 (a key rotation): stop accepting, finish, then exit.
    signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(_retire, reactor, edge))
    reactor.addSystemEventTrigger("before", "shutdown", edge.stopService)
    reactor.run()


# -- the supervisor's admin endpoint --------------------------------------------------------------


@implementer(IAgentEndpointFactory)
class _UNIXSockets:
    """Agent endpoints to each worker's admin socket, by the URL's host (C{worker-N})."""

    def __init__(self, reactor: Any, supervisor: Supervisor) -> None:
        self.reactor = reactor
        self.supervisor = supervisor

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        slot = int(uri.host.decode("ascii").split("-", 1)[1])
        return UNIXClientEndpoint(self.reactor, self.supervisor.admin_socket(slot), timeout=10)


class SupervisorAdmin(Resource):
    """
    The supervisor's admin endpoint: C{/metrics} for every worker (each
    sample labelled C{worker}), C{POST /certs/<host>/<action>} passed on to
    a worker (C{forget} to all of them).
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self.supervisor = supervisor
        self._agent: Agent | None = None
        config = supervisor.config
        # The supervisor checks Host (its workers' UNIX sockets do not); the
        # token is checked by the worker that answers (same token file).
        self.guard = AdminGuard(config.admin_token, (*config.admin_name, *bound_names(config.admin)))

    def _client(self) -> Agent:
        if self._agent is None:
            reactor = self.supervisor.reactor
            self._agent = Agent.usingEndpointFactory(
                reactor, _UNIXSockets(reactor, self.supervisor),
                pool=quiet_pool(HTTPConnectionPool(reactor, persistent=False)),
            )
        return self._agent

    def _ask(self, slot: int, method: bytes, path: bytes,
             authorization: bytes | None = None) -> Deferred[tuple[int, bytes]]:
        from twisted.web.http_headers import Headers

        headers = Headers({ADMIN_HEADER: [b"1"]})
        if authorization is not None:
            headers.setRawHeaders(b"authorization", [authorization])
        d = self._client().request(method, b"http://worker-%d%s" % (slot, path), headers)

        def body(response: Any) -> Deferred[tuple[int, bytes]]:
            return readBody(response).addCallback(lambda data: (response.code, data))

        return d.addCallback(body)

    def render(self, request: Request) -> bytes | int:
        refusal = self.guard.host_refusal(request)
        if refusal is not None:
            request.setResponseCode(refusal[0])
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(refusal[1]).encode() + b"\n"
        if request.path.startswith(b"/v1/") or request.path == b"/v1":
            return self._forward(request)
        result: bytes | int = super().render(request)
        return result

    def _forward(self, request: Request) -> bytes | int:
        """The hostname API, answered by one worker (they share its state through the store)."""
        slots = self.supervisor.live_workers()
        if not slots:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error": "unavailable", "detail": "no worker is running"}\n'
        d = self._ask(slots[0], request.method, request.uri, request.getHeader(b"authorization"))
        return self._relay(request, d)

    def _relay(self, request: Request, d: Deferred[tuple[int, bytes]]) -> int:
        def done(result: tuple[int, bytes]) -> None:
            code, body = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            request.setResponseCode(502)
            request.setHeader(b"content-type", b"application/json")
            request.write(b'{"error": "worker", "detail": "a worker did not answer"}\n')
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET

    def render_GET(self, request: Request) -> bytes | int:
        if request.path == b"/metrics":
            slots = self.supervisor.live_workers()
            # One worker that does not answer (restarting, busy) must not
            # hide the others: it is left out and marked down.
            asks = [self._ask(slot, b"GET", b"/metrics").addErrback(lambda f: (0, b"")) for slot in slots]
            d = gatherResults(asks)

            def done(results: list[tuple[int, bytes]]) -> None:
                answered = {slot: body for slot, (code, body) in zip(slots, results) if code == 200}
                up = {slot: slot in answered for slot in range(self.supervisor.count)}
                request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
                request.write(merge_metrics(answered, self.supervisor.restarts, len(slots), up,
                                            self.supervisor.rotations))
                request.finish()

            def failed(failure: Any) -> None:
                request.setResponseCode(502)
                request.write(b"metrics could not be gathered: " + failure.getErrorMessage().encode() + b"\n")
                request.finish()

            d.addCallbacks(done, failed)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return (b"tenantedge admin (%d workers): GET /metrics, POST /certs/<host>/(issue|renew|forget)\n"
                % (self.supervisor.count,))

    def render_POST(self, request: Request) -> bytes | int:
        if request.getHeader(ADMIN_HEADER) != b"1":
            request.setResponseCode(403)
            return b'{"error": "send X-Tenantedge-Admin: 1 (the CLI does)"}\n'
        slots = self.supervisor.live_workers()
        if not slots:
            request.setResponseCode(503)
            return b'{"error": "no worker is running"}\n'
        path = request.path
        targets = slots if path.endswith(b"/forget") else slots[:1]
        authorization = request.getHeader(b"authorization")
        d = gatherResults([self._ask(slot, b"POST", path, authorization) for slot in targets], consumeErrors=True)
        return self._relay(request, d.addCallback(lambda results: results[0]))  # the first worker's answer


def merge_metrics(
    by_worker: dict[int, bytes], restarts: int, live: int, up: dict[int, bool] | None = None, rotations: int = 0
) -> bytes:
    """
    One exposition for the whole server: each worker's samples with a
    C{worker} label, each metric's C{# HELP}/C{# TYPE} once, and the
    supervisor's own C{tenantedge_workers} and
    C{tenantedge_worker_restarts_total}.
    """
    seen: set[bytes] = set()
    families: dict[bytes, list[bytes]] = {}
    order: list[bytes] = []
    for slot, text in sorted(by_worker.items()):
        label = b'worker="%d"' % slot
        family = b""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith(b"#"):
                parts = line.split(b" ", 3)
                if len(parts) >= 3:
                    family = parts[2]
                    if family not in families:
                        families[family] = []
                        order.append(family)
                    if line not in seen:
                        seen.add(line)
                        families[family].append(line)
                continue
            name, _, rest = line.partition(b" ")
            if b"{" in name:
                head, _, labels = name.partition(b"{")
                sample = head + b"{" + label + b"," + labels
            else:
                sample = name + b"{" + label + b"}"
            families.setdefault(family, [])
            if family not in order:
                order.append(family)
            families[family].append(sample + b" " + rest)
    out = [b"\n".join(families[f]) for f in order]
    out.append(b"# HELP tenantedge_workers Worker processes running.\n# TYPE tenantedge_workers gauge\n"
               b"tenantedge_workers %d" % live)
    if up is not None:
        out.append(b"# HELP tenantedge_worker_up Whether a worker answered this scrape.\n"
                   b"# TYPE tenantedge_worker_up gauge\n"
                   + b"\n".join(b'tenantedge_worker_up{worker="%d"} %d' % (slot, ok) for slot, ok in sorted(up.items())))
    out.append(b"# HELP tenantedge_ticket_key_rotations_total Session-ticket key rotations (workers replaced).\n"
               b"# TYPE tenantedge_ticket_key_rotations_total counter\n"
               b"tenantedge_ticket_key_rotations_total %d" % rotations)
    out.append(b"# HELP tenantedge_worker_restarts_total Workers restarted after they died.\n"
               b"# TYPE tenantedge_worker_restarts_total counter\ntenantedge_worker_restarts_total %d" % restarts)
    return b"\n".join(out) + b"\n"

