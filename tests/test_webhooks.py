"""
Tests for L{tenantedge.webhooks}: the signature, the persisted outbox and
its delivery loop (with a C{Clock} and C{treq.testing.StubTreq}), and the
settings that configure them. The real-socket receiver is in
C{test_webhooks_e2e}.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tenantedge.config import ConfigError, OnDemandConfig
from tenantedge.metrics import WebhookCollector
from tenantedge.store import atomic_write
from tenantedge.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    ExpiryNotices,
    WebhookOutbox,
    read_secrets,
    sign,
    verify_signature,
)

SECRET = b"whsec-0123456789abcdef"
A = "https://hooks.saas.test/a"
B = "https://hooks.saas.test/b"


class Receiver(Resource):
    """
    A webhook receiver: records each delivery and answers with the next
    status in C{script[path]} (then C{default}); C{hang} never answers.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.script: dict[bytes, list[int]] = {}
        self.default = 200
        self.hang = False
        self.got: list[tuple[bytes, dict[str, Any], bytes]] = []
        self.waiting: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        headers = {
            name.decode(): request.requestHeaders.getRawHeaders(name, [None])[0]
            for name in (SIGNATURE_HEADER.encode(), EVENT_ID_HEADER.encode(), b"Content-Type")
        }
        self.got.append((request.path, headers, body))
        if self.hang:
            self.waiting.append(request)
            return NOT_DONE_YET
        codes = self.script.get(request.path, [])
        request.setResponseCode(codes.pop(0) if codes else self.default)
        return b"ok"

    def ids(self, path: bytes) -> list[str]:
        return [json.loads(body)["id"] for p, _, body in self.got if p == path]


def error_lines(case: SynchronousTestCase) -> list[dict[str, Any]]:
    """Collect the error-level log events emitted until the test ends."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") is not None and event["log_level"].name in ("error", "critical"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


class OutboxTestCase(SynchronousTestCase):
    urls: tuple[str, ...] = (A,)

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_767_225_600)
        self.receiver = Receiver()
        self.http = StubTreq(self.receiver)
        self.directory = os.path.join(self.mktemp(), "webhooks")
        self.outbox = self.make()
        self.addCleanup(self.stop)

    def make(self, **kwargs: Any) -> WebhookOutbox:
        kwargs.setdefault("random", lambda: 1.0)
        outbox = WebhookOutbox(self.urls, [SECRET], self.directory, self.http, self.clock, **kwargs)
        return outbox

    def start(self, outbox: WebhookOutbox | None = None) -> WebhookOutbox:
        outbox = outbox or self.outbox
        outbox.prepare()
        outbox.startService()
        self.pump()
        return outbox

    def stop(self) -> None:
        for outbox in (self.outbox, getattr(self, "other", None)):
            if outbox is not None and outbox.running:
                outbox.stopService()

    def pump(self, turns: int = 20) -> None:
        """Let deliveries that need no waiting go through."""
        for _ in range(turns):
            self.http.flush()
            self.clock.advance(0)

    def files(self, url: str = A) -> list[str]:
        from tenantedge.webhooks import _slug

        directory = os.path.join(self.directory, _slug(url))
        return sorted(n for n in os.listdir(directory) if n.endswith(".json"))

    def retry_in(self, index: int = 0) -> float:
        """Seconds until the next attempt for the C{index}-th URL."""
        retry = self.outbox._destinations[index].retry
        assert retry is not None and retry.active()
        return retry.getTime() - self.clock.seconds()


class SignatureTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """A signature made by L{sign} verifies with the same secret, body and a time within the tolerance."""
        body = b'{"id":"1"}'
        header = sign([SECRET], 1000, body)
        self.assertRegex(header, r"^t=1000,v1=[0-9a-f]{64}$")
        self.assertTrue(verify_signature(SECRET, header, body, now=1000))
        self.assertTrue(verify_signature(SECRET.decode(), header.encode(), body, now=1299))

    def test_forgeries_rejected(self) -> None:
        """
        Another secret, a changed body, a stale or future timestamp (a
        replay), a timestamp changed without re-signing and malformed
        headers are all refused, never raised on.
        """
        body = b'{"id":"1"}'
        header = sign([SECRET], 1000, body)
        self.assertFalse(verify_signature(b"another-secret-0123456", header, body, now=1000))
        self.assertFalse(verify_signature(SECRET, header, body + b" ", now=1000))
        self.assertFalse(verify_signature(SECRET, header, body, now=1301))
        self.assertFalse(verify_signature(SECRET, header, body, now=699))
        self.assertFalse(verify_signature(SECRET, header.replace("t=1000", "t=1001"), body, now=1000))
        for bad in (None, "", "t=1000", "v1=abc", "t=x,v1=" + "0" * 64, "garbage", "t=1000,v1=" + "0" * 64):
            self.assertFalse(verify_signature(SECRET, bad, body, now=1000), bad)

    def test_rotation(self) -> None:
        """With two secrets each delivery carries two C{v1}: a receiver holding either accepts it."""
        new = b"whsec-new-0123456789ab"
        header = sign([new, SECRET], 1000, b"x")
        self.assertEqual(header.count("v1="), 2)
        self.assertTrue(verify_signature(SECRET, header, b"x", now=1000))
        self.assertTrue(verify_signature(new, header, b"x", now=1000))


    def test_readme_snippet(self) -> None:
        """The receiver's check the README shows accepts tenantedge's signatures and refuses forgeries."""
        import re
        import time

        readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
        with open(readme, encoding="utf-8") as f:
            code = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", f.read(), re.S)
        assert code is not None
        namespace: dict[str, Any] = {}
        exec(code.group(1), namespace)
        verify = namespace["verify"]
        body = b'{"id":"1"}'
        header = sign([SECRET], int(time.time()), body)
        self.assertTrue(verify(SECRET, header, body))
        self.assertFalse(verify(SECRET, header, body + b" "))
        self.assertFalse(verify(b"another-secret-0123456", header, body))
        self.assertFalse(verify(SECRET, sign([SECRET], int(time.time()) - 600, body), body))


class DeliveryTests(OutboxTestCase):
    def test_delivered_signed(self) -> None:
        """
        An event is POSTed as C{{id, type, created, data}} JSON with a
        valid signature over the exact body and its id in a header; then
        its file is gone and it counts as delivered.
        """
        self.start()
        self.outbox.emit({"type": "hostname.issued", "data": {"hostname": "shop.example.com"}})
        self.pump()
        [(path, headers, body)] = self.receiver.got
        self.assertEqual(path, b"/a")
        event = json.loads(body)
        self.assertEqual(set(event), {"id", "type", "created", "data"})
        self.assertEqual(event["type"], "hostname.issued")
        self.assertEqual(event["created"], 1_767_225_600)
        self.assertEqual(event["data"], {"hostname": "shop.example.com"})
        self.assertEqual(headers[EVENT_ID_HEADER], event["id"].encode())
        self.assertEqual(headers["Content-Type"], b"application/json")
        self.assertTrue(verify_signature(SECRET, headers[SIGNATURE_HEADER], body, now=self.clock.seconds()))
        self.assertFalse(verify_signature(b"not-the-secret-at-all", headers[SIGNATURE_HEADER], body,
                                          now=self.clock.seconds()))
        self.assertEqual(self.files(), [])
        self.assertEqual(self.outbox.results["delivered"], 1)
        self.assertEqual(self.outbox.queued(), 0)

    def test_event_file_private(self) -> None:
        """The outbox is 0700 and an event waiting in it 0600."""
        self.receiver.hang = True
        self.start()
        self.outbox.emit({"type": "hostname.issued", "data": {}})
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        [name] = self.files()
        from tenantedge.webhooks import _slug

        path = os.path.join(self.directory, _slug(A), name)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_caller_id_kept(self) -> None:
        """An id given by the caller is the event's id (receivers deduplicate on it)."""
        self.start()
        created = int(self.clock.seconds()) - 5
        self.outbox.emit({"type": "hostname.renewed", "id": "evt-1", "created": created, "data": {}})
        self.pump()
        event = json.loads(self.receiver.got[0][2])
        self.assertEqual((event["id"], event["created"]), ("evt-1", created))

    def test_invalid_event_dropped(self) -> None:
        """An event without a type, with unserialisable data or too large is dropped and counted, never raised."""
        errors = error_lines(self)
        self.start()
        self.outbox.emit({"data": {}})
        self.outbox.emit({"type": "hostname.issued", "data": {"x": object()}})
        self.outbox.emit({"type": "hostname.issued", "data": {"x": "y" * 20000}})
        self.outbox.emit({"type": "hostname.issued", "data": []})  # type: ignore[dict-item]
        self.outbox.emit("not a mapping")  # type: ignore[arg-type]
        self.pump()
        self.assertEqual(self.receiver.got, [])
        self.assertEqual(self.outbox.results["dropped"], 5)
        self.assertEqual(len(errors), 5)

    def test_retry_schedule_and_cap(self) -> None:
        """
        Each failure in a row doubles the delay from 5 s up to the 1 h cap;
        the same event (same id) is sent again each time, and a success
        resets the backoff.
        """
        self.receiver.default = 500
        self.start()
        self.outbox.emit({"type": "hostname.failed", "data": {"problem": "urn:ietf:params:acme:error:rateLimited"}})
        self.pump()
        delays = []
        for _ in range(12):
            delays.append(self.retry_in())
            self.clock.advance(delays[-1])
            self.pump()
        self.assertEqual(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600])
        self.assertEqual(len(set(self.receiver.ids(b"/a"))), 1)
        self.assertEqual(len(self.receiver.got), 13)
        self.assertEqual(self.outbox.results["failed-attempt"], 13)
        self.receiver.default = 200
        self.clock.advance(self.retry_in())
        self.pump()
        self.assertEqual(self.outbox.results["delivered"], 1)
        self.receiver.default = 500
        self.outbox.emit({"type": "hostname.failed", "data": {}})
        self.pump()
        self.assertEqual(self.retry_in(), 5)

    def test_jitter(self) -> None:
        """The delay is between half and all of the exponential step."""
        outbox = self.make(random=lambda: 0.0)
        self.assertEqual([outbox.retry_delay(n) for n in (1, 2, 30)], [2.5, 5, 1800])
        outbox = self.make(random=lambda: 0.5)
        self.assertEqual(outbox.retry_delay(1), 3.75)

    def test_deadline(self) -> None:
        """A receiver that does not answer within the deadline is a failed attempt, retried later."""
        self.receiver.hang = True
        self.outbox = self.make(timeout=10)
        self.start()
        self.outbox.emit({"type": "hostname.issued", "data": {}})
        self.pump()
        self.assertEqual(self.outbox.results["failed-attempt"], 0)
        self.clock.advance(10)
        self.pump()
        self.assertEqual(self.outbox.results["failed-attempt"], 1)
        self.assertEqual(self.retry_in(), 5)
        self.assertEqual(len(self.files()), 1)

    def test_give_up(self) -> None:
        """
        An event still undelivered after 3 days is given up (counted and
        logged, its file removed) and the next one is sent.
        """
        errors = error_lines(self)
        self.receiver.default = 500
        self.start()
        self.outbox.emit({"type": "hostname.issued", "id": "old", "data": {}})
        self.pump()
        self.clock.advance(3 * 86400 - 100)
        self.pump()
        self.outbox.emit({"type": "hostname.issued", "id": "new", "data": {}})
        self.receiver.default = 200
        for _ in range(5):
            self.clock.advance(3600)
            self.pump()
        self.assertEqual(self.outbox.results["gave-up"], 1)
        self.assertEqual(self.outbox.results["delivered"], 1)
        self.assertEqual(self.receiver.ids(b"/a")[-1], "new")
        self.assertEqual(self.files(), [])
        self.assertEqual([e["id"] for e in errors if "gave up" in e["log_format"]], ["old"])

    def test_bounded_queue(self) -> None:
        """
        Past C{max_queued} events the oldest waiting one is dropped (file
        and all) and counted; the one being sent stays.
        """
        self.receiver.hang = True
        self.outbox = self.make(max_queued=3)
        self.start()
        for n in range(6):
            self.outbox.emit({"type": "hostname.issued", "id": f"e{n}", "data": {}})
        self.pump()
        self.assertEqual(self.outbox.results["dropped"], 3)
        self.assertEqual(self.outbox.queued(), 3)
        self.assertEqual(len(self.files()), 3)
        self.receiver.hang = False
        for request in self.receiver.waiting:
            request.setResponseCode(200)
            request.finish()
        self.pump()
        self.assertEqual(self.receiver.ids(b"/a"), ["e0", "e4", "e5"])

    def test_full_disk_dropped(self) -> None:
        """A write failing with ENOSPC drops the event: one error line, counted, nothing raised."""
        errors = error_lines(self)

        def full(path: str, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        self.outbox = self.make(write=full)
        self.start()
        self.assertIsNone(self.outbox.emit({"type": "hostname.issued", "data": {}}))
        self.pump()
        self.assertEqual(self.outbox.results["dropped"], 1)
        self.assertEqual(self.receiver.got, [])
        self.assertEqual(len(errors), 1)
        self.assertIn("No space left", errors[0]["error"])

    def test_restart_replays_outbox(self) -> None:
        """
        Events not delivered when the process stops are on disk, and the
        next start delivers them, oldest first, with their ids.
        """
        self.receiver.default = 503
        self.start()
        for n in range(3):
            self.outbox.emit({"type": "hostname.issued", "id": f"e{n}", "data": {}})
            self.clock.advance(1)
        self.pump()
        self.outbox.stopService()
        self.assertEqual(len(self.files()), 3)
        self.receiver.default = 200
        self.clock.advance(60)
        self.outbox = self.start(self.make())
        self.pump()
        self.assertEqual(self.receiver.ids(b"/a"), ["e0", "e0", "e1", "e2"])
        self.assertEqual(self.outbox.results["delivered"], 3)
        self.assertEqual(self.files(), [])

    def test_emitted_before_start(self) -> None:
        """An event emitted before the service starts waits on disk and goes out at start."""
        self.outbox.prepare()
        self.outbox.emit({"type": "hostname.issued", "id": "early", "data": {}})
        self.start()
        self.assertEqual(self.receiver.ids(b"/a"), ["early"])


class TwoURLTests(OutboxTestCase):
    urls = (A, B)

    def test_order_per_url(self) -> None:
        """
        Each URL gets every event, in order, on its own schedule: a failing
        receiver holds back its own queue, not the other's.
        """
        self.receiver.script[b"/a"] = [500, 500]
        self.start()
        for n in range(3):
            self.outbox.emit({"type": "hostname.issued", "id": f"e{n}", "data": {}})
        self.pump()
        self.assertEqual(self.receiver.ids(b"/b"), ["e0", "e1", "e2"])
        self.assertEqual(self.outbox.queued(), 3)
        self.clock.advance(5)
        self.pump()
        self.clock.advance(10)
        self.pump()
        self.assertEqual(self.receiver.ids(b"/a"), ["e0", "e0", "e0", "e1", "e2"])
        self.assertEqual(self.outbox.results["delivered"], 6)

    def test_gone(self) -> None:
        """
        410 Gone: that URL is not called again (until restart), but its
        events keep being written (for after the restart); the other goes on.
        """
        self.receiver.script[b"/a"] = [410]
        self.start()
        self.outbox.emit({"type": "hostname.issued", "id": "e0", "data": {}})
        self.pump()
        self.outbox.emit({"type": "hostname.issued", "id": "e1", "data": {}})
        self.clock.advance(7200)
        self.pump()
        self.assertEqual(self.receiver.ids(b"/a"), ["e0"])
        self.assertEqual(self.receiver.ids(b"/b"), ["e0", "e1"])
        self.assertEqual(len(self.files(A)), 2)

    def test_metrics(self) -> None:
        """The collector shows deliveries by result (every result from zero) and the queue depth."""
        self.receiver.script[b"/a"] = [500]
        self.start()
        self.outbox.emit({"type": "hostname.issued", "data": {}})
        self.pump()
        families = {f.name: f for f in WebhookCollector(self.outbox.results, self.outbox.queued).collect()}
        samples = {s.labels.get("result"): s.value for s in families["tenantedge_webhook_deliveries"].samples
                   if s.name.endswith("_total")}
        self.assertEqual(samples, {"delivered": 1, "failed-attempt": 1, "gave-up": 0, "dropped": 0})
        self.assertEqual(families["tenantedge_webhook_queue"].samples[0].value, 1)


class ProcessesTests(OutboxTestCase):
    def test_one_process_delivers(self) -> None:
        """
        Two processes on one outbox: one holds the delivery lock and sends
        what both emit; when it stops, the other takes over.
        """
        self.start()
        self.other = self.start(self.make())
        self.other.emit({"type": "hostname.issued", "id": "from-other", "data": {}})
        self.pump()
        self.assertEqual(self.receiver.got, [])
        self.clock.advance(2)
        self.pump()
        self.assertEqual(self.receiver.ids(b"/a"), ["from-other"])
        self.assertEqual(self.outbox.results["delivered"], 1)
        self.outbox.stopService()
        self.other.emit({"type": "hostname.issued", "id": "later", "data": {}})
        self.clock.advance(2)
        self.pump()
        self.assertEqual(self.receiver.ids(b"/a"), ["from-other", "later"])
        self.assertEqual(self.other.results["delivered"], 1)


class ExpiryNoticeTests(SynchronousTestCase):
    def test_once_per_certificate(self) -> None:
        """One C{hostname.expiring-soon} per certificate, with an id derived from the name and serial."""
        events: list[Any] = []
        notices = ExpiryNotices(events.append)
        notices("shop.example.com", 0xABC, 1000.0, "CA down")
        notices("shop.example.com", 0xABC, 1000.0, "CA down again")
        notices("shop.example.com", 0xDEF, 2000.0, "CA down")
        self.assertEqual([e["id"] for e in events],
                         ["hostname.expiring-soon:shop.example.com:abc", "hostname.expiring-soon:shop.example.com:def"])
        self.assertEqual(events[0]["type"], "hostname.expiring-soon")
        self.assertEqual(events[0]["data"], {"hostname": "shop.example.com", "serial": "abc", "not_after": 1000,
                                             "error": "CA down"})


class SettingsTests(SynchronousTestCase):
    def secret_file(self, content: bytes = SECRET + b"\n", mode: int = 0o600) -> str:
        path = self.mktemp()
        atomic_write(path, content, mode=mode)
        os.chmod(path, mode)
        return path

    def config(self, **kwargs: Any) -> OnDemandConfig:
        kwargs.setdefault("store", self.mktemp())
        return OnDemandConfig(ca=["internal"], **kwargs)

    def test_secrets_read(self) -> None:
        """Each non-empty line is a secret; the secrets never appear in the repr."""
        path = self.secret_file(SECRET + b"\n\n" + b"second-secret-0123456\n")
        config = self.config(webhook=[A, "http://127.0.0.1:9000/hook"], webhook_secret_file=path)
        self.assertEqual(config.webhook_secrets, (SECRET, b"second-secret-0123456"))
        self.assertNotIn(SECRET.decode(), repr(config))
        self.assertEqual(config.webhook_directory, os.path.join(config.store, "webhooks"))

    def test_secret_file_private(self) -> None:
        """A secret file others can read is refused with the chmod that fixes it."""
        path = self.secret_file(mode=0o644)
        e = self.assertRaises(ConfigError, self.config, webhook=[A], webhook_secret_file=path)
        self.assertEqual(e.key, "webhook-secret-file")
        self.assertIn("chmod 600", e.problem)
        self.assertNotIn(SECRET.decode(), str(e))

    def test_short_secret(self) -> None:
        """A secret under 16 bytes is refused."""
        e = self.assertRaises(ConfigError, self.config, webhook=[A], webhook_secret_file=self.secret_file(b"short"))
        self.assertIn("at least 16 bytes", e.problem)

    def test_secret_required(self) -> None:
        """Webhooks are always signed: a URL without a secret file is refused."""
        e = self.assertRaises(ConfigError, self.config, webhook=[A])
        self.assertEqual(e.key, "webhook-secret-file")

    def test_plain_http_only_to_loopback(self) -> None:
        """http:// is refused but to a loopback address; https:// anywhere."""
        path = self.secret_file()
        for url in ("http://127.0.0.1/h", "http://[::1]:8000/h", "http://localhost/h", "https://x.test/h"):
            self.config(webhook=[url], webhook_secret_file=path)
        for url in ("http://hooks.saas.test/h", "http://10.0.0.1/h", "ftp://x.test/", "https://x.test/#f"):
            e = self.assertRaises(ConfigError, self.config, webhook=[url], webhook_secret_file=path)
            self.assertEqual(e.key, "webhook")

    def test_redis_store_needs_outbox(self) -> None:
        """With a redis:// store the outbox directory must be given."""
        path = self.secret_file()
        e = self.assertRaises(ConfigError, OnDemandConfig, store="redis://127.0.0.1:6379/0", ca=["letsencrypt"],
                              challenge="tls-alpn-01", webhook=[A], webhook_secret_file=path)
        self.assertEqual(e.key, "webhook-outbox")
        config = OnDemandConfig(store="redis://127.0.0.1:6379/0", ca=["letsencrypt"], challenge="tls-alpn-01",
                                webhook=[A], webhook_secret_file=path, webhook_outbox="/var/spool/te")
        self.assertEqual(config.webhook_directory, "/var/spool/te")

    def test_service_has_outbox(self) -> None:
        """
        With C{webhook} the service has the outbox as a child service
        (C{edge.webhooks}), prepared at start-up, with its metrics.
        """
        from prometheus_client import generate_latest

        from tenantedge.service import OnDemandTLS

        clock = Clock()
        config = self.config(webhook=[A], webhook_secret_file=self.secret_file())
        edge = OnDemandTLS.from_config(config, clock)
        self.assertIsInstance(edge.webhooks, WebhookOutbox)
        self.assertIs(edge.getServiceNamed("webhooks"), edge.webhooks)
        self.assertIs(edge.renewal.expiring.emit.__self__, edge.webhooks)  # type: ignore[union-attr]
        edge.prepare()
        self.assertTrue(os.path.isdir(config.webhook_directory))
        text = generate_latest(edge.timings.registry).decode()
        self.assertIn('tenantedge_webhook_deliveries_total{result="gave-up"} 0.0', text)
        self.assertIn("tenantedge_webhook_queue 0.0", text)
        self.assertIsNone(OnDemandTLS.from_config(self.config(), clock).webhooks)


class LifecycleBridgeTests(SynchronousTestCase):
    """The hostname lifecycle's events become webhook events."""

    def test_events_become_webhooks(self) -> None:
        from tenantedge.webhooks import lifecycle_webhook

        sent: list[Any] = []
        bridge = lifecycle_webhook(sent.append)
        bridge({"event": "failed", "host": "a.test", "at": 1.0, "state": "failing", "attempts": 2,
                "problem_type": "dns-not-pointing-here", "detail": "a.test resolves to 203.0.113.9", "next_retry": 9.0})
        bridge({"event": "issued", "host": "a.test", "at": 2.0, "state": "active", "not_after": 3.0})
        bridge({"event": "expiring-soon", "host": "a.test", "at": 4.0, "state": "active", "not_after": 5.0})
        self.assertEqual(sent, [
            {"type": "hostname.failed", "data": {
                "hostname": "a.test", "at": 1.0, "state": "failing", "attempts": 2, "problem": "dns-not-pointing-here",
                "detail": "a.test resolves to 203.0.113.9", "next_retry": 9.0}},
            {"type": "hostname.issued", "data": {"hostname": "a.test", "at": 2.0, "state": "active", "not_after": 3.0}},
        ])  # expiring-soon comes from ExpiryNotices, once per certificate

    def test_a_transition_is_emitted(self) -> None:
        """A lifecycle transition, through the bridge, is one webhook event."""
        from tenantedge.lifecycle import HostnameLifecycle

        emitted: list[Any] = []
        lifecycle = HostnameLifecycle(None, Clock())
        from tenantedge.webhooks import lifecycle_webhook

        lifecycle.subscribe(lifecycle_webhook(emitted.append))
        lifecycle.archived("gone.test")
        self.assertEqual([e["type"] for e in emitted], ["hostname.archived"])


class ForgedHeaderTests(SynchronousTestCase):
    def test_non_ascii_never_raises(self) -> None:
        """A header with non-ASCII or replaced bytes is refused, never an exception in the receiver."""
        from tenantedge.webhooks import verify_signature

        for header in ("t=1,v1=\u00e9", b"t=1,v1=\xff".decode("utf-8", "replace"), b"t=1,v1=\xff"):
            self.assertFalse(verify_signature(b"s" * 16, header, b"{}", now=1.0))

    def test_logged_url_has_no_secrets(self) -> None:
        from tenantedge.webhooks import _Destination

        destination = _Destination("https://user:pw@hooks.example/in?token=abc", "/nowhere")
        self.assertEqual(destination.shown, "https://hooks.example/in")

