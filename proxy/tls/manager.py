"""Which certificate serves which name; on-demand issuance, renewal and status.

One manager per supervisor process (the HTTPS listener and the API share it). Only
names this server is responsible for are ever ordered: the control host, registered
tenant hosts (with on_demand) and verified custom domains, so a stranger sending random
SNI names cannot spend the CA's rate limits. Orders for the same names are shared, new
orders are capped per hour, and a failed order backs off before the next try.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from instances import metrics
from proxy.limits import log_throttle
from proxy.tls.config import TlsConfig
from proxy.tls.issuer import Issuer, OrderFailed
from proxy.tls.store import CertStore, StoredCert, describe, now, self_signed, write_private

log = logging.getLogger("tenement.tls")

BACKOFF_BASE = 30.0  # seconds after a first failed order; doubled per failure
BACKOFF_MAX = 3600.0
RENEW_CHECK_MAX = 3600.0  # the renewal loop looks again at least this often
HOUR = 3600.0

# Names asked for -> the names to order, or None when we are not responsible for them.
Resolver = Callable[[str], Awaitable[tuple[str, ...] | None]]
# A certificate's names -> whether we still serve them (a tenant may have been removed).
StillWanted = Callable[[tuple[str, ...]], Awaitable[bool]]


async def always(names: tuple[str, ...]) -> bool:
    return True


def server_context(cert_path: Any, key_path: Any) -> ssl.SSLContext:
    """A server context: TLS 1.2+, HTTP/1.1 by ALPN (we speak nothing else)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert_path, key_path)
    return context


@dataclass
class Served:
    """A certificate we serve, with its context (built once, shared by connections)."""

    cert: StoredCert
    context: ssl.SSLContext
    source: str  # "acme" or "file" (cert_file/key_file: never renewed by us)


def rank(served: Served) -> tuple[bool, float]:
    return (served.source == "file", served.cert.not_after.timestamp())


@dataclass
class Failure:
    count: int
    error: str
    retry_at: float  # wall clock


@dataclass
class Orders:
    """New on-demand orders of the last hour (renewals and the control host not counted)."""

    limit: int
    times: collections.deque[float] = field(default_factory=collections.deque)

    def allow(self, at: float) -> bool:
        while self.times and self.times[0] <= at - HOUR:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(at)
        return True


class CertManager:
    def __init__(
        self,
        config: TlsConfig,
        resolver: Resolver,
        clock: Callable[[], float] = time.time,
        wanted: StillWanted = always,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.wanted = wanted
        self.clock = clock
        self.store = CertStore(config.cache_dir)
        self.tokens: dict[str, str] = {}  # HTTP-01: token -> key authorization
        self.issuer = Issuer(config, self.store, self.tokens)
        self.served: dict[tuple[str, ...], Served] = {}
        self.index: dict[str, Served] = {}
        self.failures: dict[tuple[str, ...], Failure] = {}
        self.pending: dict[tuple[str, ...], asyncio.Task[None]] = {}
        self.orders = Orders(config.orders_per_hour)
        self.wakeup = asyncio.Event()
        self.fallback: ssl.SSLContext | None = None
        self.outcomes: collections.Counter[str] = collections.Counter()

    # ---- start-up ------------------------------------------------------------------

    def load(self) -> None:
        """The cache (created 0700), the certificates in it, the operator's own, and the
        self-signed fallback. Blocking file work: call before serving."""
        self.store.prepare()
        for cert in self.store.load_all():
            self.install(cert, "acme")
        if self.config.cert_file and self.config.key_file:
            own = describe(
                self.config.cert_file.read_bytes(), self.config.cert_file, self.config.key_file
            )
            self.install(own, "file")
        self.fallback = self.self_signed()
        log.info(
            "TLS: %d certificate(s) in %s; CA %s",
            len(self.served),
            self.config.cache_dir,
            self.config.directory_url,
            extra={"event": "tls_loaded", "certificates": len(self.served)},
        )

    def self_signed(self) -> ssl.SSLContext:
        """What a handshake gets when no real certificate can be had in time."""
        cert_pem, key_pem = self_signed([self.config.domain])
        key_path = self.store.root / "fallback.key"
        cert_path = self.store.root / "fallback.crt"
        write_private(key_path, key_pem)
        write_private(cert_path, cert_pem)
        return server_context(cert_path, key_path)

    def install(self, cert: StoredCert, source: str) -> Served:
        served = Served(cert, server_context(cert.cert_path, cert.key_path), source)
        current = self.served.get(cert.names)
        # A newer certificate replaces an older one for the same names, never the reverse.
        if current is None or current.cert.not_after <= cert.not_after:
            self.served[cert.names] = served
            self.reindex()
        return self.served[cert.names]

    def reindex(self) -> None:
        """name or wildcard pattern -> the certificate to serve: the operator's own first,
        then the one that lasts longest. Rebuilt per new certificate, read per handshake."""
        index: dict[str, Served] = {}
        for served in self.served.values():
            for pattern in served.cert.names:
                best = index.get(pattern)
                if best is None or rank(served) > rank(best):
                    index[pattern] = served
        self.index = index

    # ---- the handshake's question ------------------------------------------------------

    def lookup(self, name: str) -> Served | None:
        """The certificate covering `name` (exactly, or by a one-label wildcard)."""
        if (served := self.index.get(name)) is not None:
            return served
        return self.index.get("*." + name.partition(".")[2])

    async def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a handshake naming `server_name` (the control host when the
        client sent none). Waits up to handshake_wait for an order, then falls back."""
        name = self.name_of(server_name)
        if (served := self.lookup(name)) is not None:
            return served.context
        names = await self.resolver(name)
        if names is None:
            # Anyone can send any name: one line a second, not one per handshake.
            if (held := log_throttle.allow("tls-unregistered")) is not None:
                log.info(
                    "TLS: no certificate for unregistered name %r: self-signed fallback "
                    "(%d more not logged)",
                    name[:253],
                    held,
                )
            return self.fallback_context()
        task = self.order(names, on_demand=True)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), self.config.handshake_wait)
        if (served := self.lookup(name)) is not None:
            return served.context
        # A client retrying while an order backs off would log a line per handshake.
        if (held := log_throttle.allow("tls-fallback")) is not None:
            log.warning(
                "TLS: no certificate for %s yet (%s): serving the self-signed fallback "
                "(%d more not logged)",
                name,
                self.why_not(names),
                held,
                extra={"event": "tls_fallback", "host": name},
            )
        return self.fallback_context()

    def name_of(self, server_name: str | None) -> str:
        """The name a handshake asks for; none (or an IP literal, which SNI may not carry
        but some clients send) means the control host, as such a Host header does."""
        name = (server_name or "").lower().rstrip(".")
        if not name:
            return self.config.domain
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return name
        return self.config.domain

    def fallback_context(self) -> ssl.SSLContext:
        assert self.fallback is not None, "load() first"
        return self.fallback

    def why_not(self, names: tuple[str, ...]) -> str:
        if (failure := self.failures.get(names)) is not None:
            return f"last order failed: {failure.error}"
        if names in self.pending:
            return f"order still running after {self.config.handshake_wait:g}s"
        return f"over orders_per_hour = {self.config.orders_per_hour}"

    # ---- orders ------------------------------------------------------------------------

    def order(
        self, names: tuple[str, ...], *, on_demand: bool = False
    ) -> asyncio.Task[None] | None:
        """The running order for `names`, or a new one; None when backing off or capped."""
        if (task := self.pending.get(names)) is not None:
            return task
        at = self.clock()
        failure = self.failures.get(names)
        if failure is not None and at < failure.retry_at:
            return None
        if on_demand and not self.orders.allow(at):
            self.count("capped")
            if (held := log_throttle.allow("acme-capped")) is not None:
                log.warning(
                    "TLS: not ordering %s: orders_per_hour = %d reached (%d more not logged)",
                    ",".join(names),
                    self.config.orders_per_hour,
                    held,
                    extra={"event": "acme_capped"},
                )
            return None
        task = asyncio.create_task(self.run_order(names), name=f"tenement-acme-order-{names[0]}")
        self.pending[names] = task
        task.add_done_callback(lambda _: self.pending.pop(names, None))
        return task

    async def run_order(self, names: tuple[str, ...]) -> None:
        started = time.monotonic()
        try:
            cert = await asyncio.to_thread(self.issuer.issue, names)
        except OrderFailed as e:
            self.failed(names, str(e))
            return
        except Exception as e:  # a bug or an unexpected reply: still backed off, logged
            log.exception("TLS: order for %s failed unexpectedly", ",".join(names))
            self.failed(names, f"{type(e).__name__}: {e}")
            return
        self.failures.pop(names, None)
        self.install(cert, "acme")
        self.count("issued")
        self.wakeup.set()  # the renewal loop plans from the new expiry
        log.info(
            "TLS: certificate for %s issued by %s, valid until %s (%.1fs)",
            ",".join(names),
            cert.issuer,
            cert.not_after.isoformat(),
            time.monotonic() - started,
            extra={"event": "acme_issued", "names": list(names)},
        )

    def failed(self, names: tuple[str, ...], error: str) -> None:
        self.issuer.forget_client()
        previous = self.failures.get(names)
        count = previous.count + 1 if previous else 1
        delay = min(BACKOFF_BASE * 2 ** (count - 1), BACKOFF_MAX)
        self.failures[names] = Failure(count, error, self.clock() + delay)
        self.count("failed")
        self.wakeup.set()
        log.warning(
            "TLS: order for %s failed (%d in a row), next try in %.0fs: %s",
            ",".join(names),
            count,
            delay,
            error,
            extra={"event": "acme_failed", "names": list(names)},
        )

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        metrics.acme_order(outcome)

    # ---- renewal -----------------------------------------------------------------------

    def control_names(self) -> tuple[str, ...]:
        return (self.config.domain,)

    def due(self) -> list[tuple[str, ...]]:
        """Names whose certificate is due (or missing, for the control host) and whose
        backoff, if any, has passed."""
        at = now()
        wanted = [
            n for n, s in self.served.items() if s.source == "acme" and s.cert.renew_at() <= at
        ]
        if self.lookup(self.config.domain) is None:
            wanted.append(self.control_names())
        wall = self.clock()
        return [n for n in wanted if n not in self.pending and self.ready(n, wall)]

    def ready(self, names: tuple[str, ...], wall: float) -> bool:
        failure = self.failures.get(names)
        return failure is None or wall >= failure.retry_at

    async def renew(self) -> int:
        """Start an order for every due certificate still wanted; how many were started."""
        started = 0
        for names in self.due():
            if names != self.control_names() and not await self.wanted(names):
                self.retire(names)
            elif self.order(names) is not None:
                started += 1
        return started

    def retire(self, names: tuple[str, ...]) -> None:
        """Stop serving and renewing a certificate whose names are no longer ours (a
        deregistered tenant, a removed domain); its files go too."""
        served = self.served.pop(names, None)
        self.failures.pop(names, None)
        self.reindex()
        if served is not None:
            for path in (served.cert.cert_path, served.cert.key_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        log.info(
            "TLS: %s no longer served here: certificate retired, not renewed",
            ",".join(names),
            extra={"event": "tls_retired", "names": list(names)},
        )

    def next_check(self) -> float:
        """Seconds until the next renewal or retry falls due (capped)."""
        at = now()
        times = [
            (s.cert.renew_at() - at).total_seconds()
            for s in self.served.values()
            if s.source == "acme"
        ]
        times += [f.retry_at - self.clock() for f in self.failures.values()]
        return max(0.5, min([RENEW_CHECK_MAX, *times]))

    async def run(self, stop: asyncio.Event) -> None:
        """The renewal loop: the control host's first certificate, then every renewal."""
        while not stop.is_set():
            self.wakeup.clear()
            await self.renew()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wakeup.wait())]
            try:
                await asyncio.wait(
                    waits, timeout=self.next_check(), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for w in waits:
                    w.cancel()
        for task in list(self.pending.values()):
            task.cancel()

    # ---- status ------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Every certificate (and every failing order) for the API, CLI and dashboard."""
        rows = []
        wall = self.clock()
        # Copies first: this runs in a Django worker thread while the loop may add to them.
        served_now, failures = dict(self.served), dict(self.failures)
        for names, served in sorted(served_now.items()):
            cert = served.cert
            failure = failures.get(names)
            rows.append(
                {
                    "names": list(names),
                    "issuer": cert.issuer,
                    "source": served.source,
                    "not_before": cert.not_before.isoformat(),
                    "not_after": cert.not_after.isoformat(),
                    "next_renewal": cert.renew_at().isoformat()
                    if served.source == "acme"
                    else None,
                    "renewing": names in self.pending,
                    "last_error": failure.error if failure else None,
                    "retry_in_seconds": max(0.0, failure.retry_at - wall) if failure else None,
                }
            )
        for names, failure in sorted(failures.items()):
            if names not in served_now:
                rows.append(
                    {
                        "names": list(names),
                        "issuer": None,
                        "source": None,
                        "not_before": None,
                        "not_after": None,
                        "next_renewal": None,
                        "renewing": names in self.pending,
                        "last_error": failure.error,
                        "retry_in_seconds": max(0.0, failure.retry_at - wall),
                    }
                )
        return rows


_current: CertManager | None = None


def current() -> CertManager | None:
    """The manager of this process when it serves HTTPS (for /api/tls/status, /metrics)."""
    return _current


def set_current(manager: CertManager | None) -> None:
    global _current
    _current = manager
