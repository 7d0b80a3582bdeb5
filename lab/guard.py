"""The front door of the lab's servers (the web lab, and `lab models serve`): they answer only requests addressed
to the names they serve under and coming from their own pages, and the web lab slows down password guessing.

- Host: a page on another site can point its own name at 127.0.0.1 (DNS rebinding) and then drive the lab as if
  it were the lab's own page. So a request whose Host header is not one of the lab's names is refused (421).
- Origin: a browser names the page that sent a request; only the lab's own pages may call it (403 otherwise), and
  no cross-origin permission is ever granted (no access-control-allow-origin header).
- Login: every failed password from a client doubles the wait before its next try (0.5 s, 1 s, 2 s ... 30 s), and
  one client's tries are answered one at a time, so guessing in parallel gains nothing.

Names the lab serves under: the loopback names when it listens on loopback; the bound address (and this machine's
names when it listens on every interface) otherwise; plus `--allowed-hosts` for people who put a proxy in front.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
LOGIN_PATHS = ("/login", "/login/")
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
FORGET_AFTER_S = 15 * 60


def _hostname(value: str) -> str:
    """The host part of a Host header or URL authority ('[::1]:7860' -> '::1'), lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(name: str) -> bool:
    """localhost or a loopback address (`lab serve` needs a password for anything else)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Which Host headers and Origins the lab answers, for a server bound to `bind` on `port`."""

    def __init__(self, bind: str, port: int, allowed_hosts: Iterable[str] = ()):
        self.port = port
        self.any_host = "*" in allowed_hosts
        self.extra = {_hostname(h) for h in allowed_hosts if h and h != "*"}
        bind = _hostname(bind)
        self.loopback_only = is_loopback(bind)
        self.names = set(LOOPBACK_NAMES) | self.extra
        self.every_interface = bind in ("0.0.0.0", "::", "")
        if not self.loopback_only:
            self.names.add(bind)
            if self.every_interface:
                self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    def host_ok(self, host: str | None) -> bool:
        if self.any_host:
            return True
        if not host:
            return False
        name = _hostname(host)
        if name in self.names or (self.loopback_only and is_loopback(name)):
            return True
        # an address literal cannot be rebound to another site; on every interface any of ours may be asked for
        return self.every_interface and _is_ip(name)

    def origin_ok(self, origin: str, host: str | None) -> bool:
        """The lab's own page: same scheme-less authority as the request, or a proxy name given by the user."""
        if origin == "null":
            return False
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        name = parts.hostname.lower()
        if self.any_host or name in self.extra:
            return True
        if host and parts.netloc.lower() == host.strip().lower():
            return True  # the page that was served under the very name the request uses
        return self.host_ok(parts.netloc) and (parts.port or (443 if parts.scheme == "https" else 80)) == self.port


class LoginThrottle:
    """Per-client wait before a login attempt, growing with that client's failed attempts."""

    def __init__(self, first: float = FIRST_DELAY_S, cap: float = MAX_DELAY_S, clock=time.monotonic):
        self.first, self.cap, self.clock = first, cap, clock
        self.failures: dict[str, tuple[int, float]] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    def delay(self, client: str) -> float:
        count, last = self.failures.get(client, (0, 0.0))
        if not count or self.clock() - last > FORGET_AFTER_S:
            return 0.0
        return min(self.cap, self.first * 2 ** (count - 1))

    def failed(self, client: str) -> None:
        count, _ = self.failures.get(client, (0, 0.0))
        self.failures[client] = (count + 1, self.clock())

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)

    def lock(self, client: str) -> asyncio.Lock:
        return self.locks.setdefault(client, asyncio.Lock())


async def _plain(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware applying a HostPolicy to every request and a LoginThrottle to password attempts."""

    def __init__(self, app, policy: HostPolicy, throttle: LoginThrottle | None = None):
        self.app = app
        self.policy = policy
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if not self.policy.host_ok(host):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _plain(send, 421, "this lab does not answer to that host name; if you reach it through "
                                           "a proxy, start it with --allowed-hosts NAME\n")
        origin = headers.get("origin")
        if origin is not None and not self.policy.origin_ok(origin, host):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _plain(send, 403, "requests from other sites are refused\n")
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in LOGIN_PATHS:
            return await self._login(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _login(self, scope, receive, send):
        client = (scope.get("client") or ("?", 0))[0]
        async with self.throttle.lock(client):
            wait = self.throttle.delay(client)
            if wait:
                await asyncio.sleep(wait)
            status = {}

            async def watch(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            await self.app(scope, receive, watch)
            if status.get("code") == 200:
                self.throttle.succeeded(client)
            else:
                self.throttle.failed(client)


def check_port(host: str, port: int) -> None:
    """Say plainly when the address cannot be listened on (taken, or not this machine's)."""
    from lab.errors import LabError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            raise LabError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                           "pick another port with --port") from None
