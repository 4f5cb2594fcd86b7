"""The login throttle: who pays for a wrong password, so that a flood cannot lock the operator out.

Every wrong password is charged to a budget, and a try is refused unchecked (429, the password never looked at)
only when the budget it would be charged to is spent. There are two kinds of budget:

- A browser's own (a *device*). A successful login also sets a device cookie (`kiosk_device`: a random id and
  an expiry, signed with a key derived from the stored password hash; HttpOnly, SameSite=Strict, sent to
  `/login` only, kept on logout). A login that presents a valid one is charged to that device alone: MAX_FAILURES
  wrong passwords free, then a wait that doubles with each further one (BACKOFF_FIRST_S up to BACKOFF_MAX_S).
  Nobody else's wrong passwords touch it.
- Everyone else's: a try without a valid device cookie is charged to its peer (the TCP peer, or the client a
  trusted proxy names; an IPv6 peer by its /64), with the same backoff, *and* to one pool shared by every
  cookie-less try: MAX_POOL_FAILURES wrong passwords a minute.

Why a flood cannot be turned against the operator: a flood, from one address or a thousand, spends its own
peers' budgets and the cookie-less pool, and nothing else; it cannot mint or spend a device's budget (the cookie
is signed, and only a login with the right password sets one). So the operator's browser, once it has logged in
(at installation, at the start of a shift), always has its password checked: right, it gets in; a typo costs its
own budget only. An operator already logged in never meets the throttle at all (a session is checked before
any of this). On the loopback bind every local user is 127.0.0.1, so a peer budget cannot tell the operator from
another local user: there the device cookie is what does. What a flood can still do: delay a browser that has
never logged in (or has cleared its cookies, or logs in after the password changed) and shares a flooded peer
or finds the pool spent; the wait ends BACKOFF_MAX_S after the flood does, at most.

Why brute force stays bounded: a try is checked only out of a budget that is not spent. Without a device cookie,
all peers together get at most MAX_POOL_FAILURES checked wrong passwords a minute, and one peer at most
MAX_FAILURES, then one per backoff step (about 100 a day at BACKOFF_MAX_S). A device budget exists only for a
browser that logged in with the right password, and each gets the same backoff. The check compares scrypt
hashes in constant time; a try's slot is taken before its check in one locked step, so a hundred concurrent
tries on one budget get MAX_FAILURES checks, not a hundred.

Device cookies survive a console restart when the password file holds a hash line (`kiosk console
--hash-password`): the key is derived from that hash. A plain-text password file is hashed with a new salt at
each start, so its device cookies last until the console restarts. Changing the password revokes them all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

DEVICE_COOKIE = "kiosk_device"
DEVICE_TTL_S = 90 * 86400.0
MAX_FAILURES = 5  # wrong passwords a budget gets before it must wait
BACKOFF_FIRST_S = 30.0  # the wait after MAX_FAILURES; doubled by each further wrong password...
BACKOFF_MAX_S = 900.0  # ...up to this
FORGET_S = 3600.0  # a budget quiet this long starts afresh
MAX_POOL_FAILURES = 30  # wrong passwords a minute from every try without a device cookie together
POOL_WINDOW_S = 60.0
MAX_TRACKED = 10_000  # peers remembered; a full table forgets the longest quiet ones first
MAX_DEVICES = 1_000  # devices remembered (each one a login with the right password)


class DeviceCookies:
    """Mints and checks device cookies: `ID.EXPIRES.MAC`, MAC an HMAC-SHA256 under a key of the console's."""

    def __init__(self, key: bytes, *, ttl_s: float = DEVICE_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self.ttl_s = ttl_s
        self._clock = clock

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def mint(self) -> str:
        body = f"{secrets.token_urlsafe(16)}.{int(self._clock() + self.ttl_s)}"
        return f"{body}.{self._mac(body)}"

    def device_of(self, value: str | None) -> str | None:
        """The device id a cookie value names, or None when it is missing, forged, malformed or expired."""
        if not value or len(value) > 200:
            return None
        body, _, mac = value.rpartition(".")
        device, _, expires = body.partition(".")
        if not device or not expires.isdigit() or not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return None
        return device if int(expires) > self._clock() else None


@dataclass(frozen=True)
class Ticket:
    """A check's slot, taken before the password is checked: `budget` is charged, and the pool too if
    `pooled`. `Throttle.succeeded` gives it back."""

    budget: str
    pooled: bool
    stamp: float


@dataclass
class _Budget:
    failures: int = 0
    last: float = 0.0


@dataclass(frozen=True)
class Refusal:
    """Why a try is refused unchecked, and how long until its budget has a check again."""

    reason: str
    retry_after_s: float


def backoff_s(failures: int) -> float:
    """The wait a budget with `failures` wrong passwords owes after its last one."""
    if failures < MAX_FAILURES:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (failures - MAX_FAILURES))


def peer_budget(peer: str) -> str:
    """The budget a cookie-less try from `peer` is charged to: the address, an IPv6 one by its /64 (one
    holder's whole network is one peer)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return f"peer:{peer}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:10.0.0.9 is 10.0.0.9
            return f"peer:{address.ipv4_mapped}"
        return f"peer:{ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"peer:{address}"


class Throttle:
    """The budgets (see the module docstring). `clock` is monotonic: a clock step neither frees nor locks."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._peers: OrderedDict[str, _Budget] = OrderedDict()  # least recently charged first
        self._devices: OrderedDict[str, _Budget] = OrderedDict()
        self._pool: deque[float] = deque()  # each cookie-less failure's time
        self._lock = threading.Lock()

    def begin(self, peer: str, device: str | None) -> Ticket | Refusal:
        """Take a check's slot (counted as a wrong password until `succeeded` gives it back), or say why not.
        One locked step, so concurrent tries cannot all slip in between a check and its record."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            table, key = self._budget_of(peer, device)
            refused = self._refusal(now, table.get(key), device)
            if refused is not None:
                return refused
            budget = table.setdefault(key, _Budget())
            budget.failures += 1
            budget.last = now
            table.move_to_end(key)
            while len(table) > (MAX_DEVICES if device else MAX_TRACKED):  # bounded whatever tries: quietest go
                table.popitem(last=False)
            if not device:
                self._pool.append(now)
            return Ticket(key, not device, now)

    def succeeded(self, ticket: Ticket) -> None:
        """The right password: its slot was no failure. A device starts afresh (its holder knows the
        password); a peer only gets the one slot back, since others may share its address."""
        with self._lock:
            budget = (self._peers if ticket.pooled else self._devices).get(ticket.budget)
            if budget is not None:
                budget.failures = max(0, budget.failures - 1) if ticket.pooled else 0
            if ticket.pooled and ticket.stamp in self._pool:
                self._pool.remove(ticket.stamp)

    def refusal(self, peer: str, device: str | None) -> Refusal | None:
        """What `begin` would answer now, without taking anything (None: a check would be allowed)."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            table, key = self._budget_of(peer, device)
            return self._refusal(now, table.get(key), device)

    def peer_failures(self) -> dict[str, int]:
        """The address budgets remembered (least recently charged first) and the wrong passwords each holds."""
        with self._lock:
            return {key: budget.failures for key, budget in self._peers.items()}

    def device_failures(self) -> dict[str, int]:
        """The device budgets remembered (least recently charged first) and the wrong passwords each holds."""
        with self._lock:
            return {key: budget.failures for key, budget in self._devices.items()}

    def pooled_failures(self) -> int:
        """The cookie-less wrong passwords that count toward the shared budget (as of the last try)."""
        with self._lock:
            return len(self._pool)

    def _budget_of(self, peer: str, device: str | None) -> tuple[OrderedDict[str, _Budget], str]:
        return (self._devices, f"device:{device}") if device else (self._peers, peer_budget(peer))

    def _refusal(self, now: float, budget: _Budget | None, device: str | None) -> Refusal | None:
        if budget is not None and budget.failures and budget.last + backoff_s(budget.failures) > now:
            return Refusal(
                "this browser's wrong passwords" if device else "this address's wrong passwords",
                budget.last + backoff_s(budget.failures) - now,
            )
        if not device and len(self._pool) >= MAX_POOL_FAILURES:
            return Refusal(
                f"the wrong passwords of every address together ({MAX_POOL_FAILURES} a minute; a "
                "browser that has logged in before has a budget of its own)",
                self._pool[0] + POOL_WINDOW_S - now,
            )
        return None

    def _expire(self, now: float) -> None:
        while self._pool and now - self._pool[0] >= POOL_WINDOW_S:
            self._pool.popleft()
        for table in (self._peers, self._devices):
            while table:  # least recently charged first: stop at the first one still remembered
                key, budget = next(iter(table.items()))
                if now - budget.last < FORGET_S:
                    break
                del table[key]
