"""Leases and done records in Redis, shared by the workers of many hosts.

The records and verdicts are those of :class:`._leases.SQLiteLeaseStore`; only where they live
differs. A record is a hash under ``prefix + key`` (fields ``state``, ``token``, ``owner``,
``expires`` and ``updated``, in milliseconds of Redis's clock, never a host's). Every change is
one Lua script (one round trip, atomic), reading the time with ``TIME``.

Retention is Redis's own: each record carries a TTL, so the records never grow without bound
and :meth:`RedisLeaseStore.prune` has nothing to do. A done or resolved record lives
``retention``; a running one lives a day past its lease's expiry (renewals push it on), so that
the marker of a dead run still finds its record.

A run held by a process of this host that no longer exists is taken over at once: the script
runs again with that run's token named dead (a compare-and-set on it); a run of another host
must let its lease expire.

redis-py (``pip install 'steadyrabbit[redis]'``) is imported when a store is made, never on
``import steadyrabbit``. Redis 5 or later (scripts that read ``TIME`` and then write are
replicated by their effects). Keys of one store are independent, so a cluster works too.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._errors import ConfigurationError
from ._leases import Acquired, StoreReport, Verdict, owner_gone
from ._url import mask_url

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisLeaseStore"]

#: A running record is kept this long past its expiry: its marker may still come back.
_KEEP_RUNNING_MS = 86_400_000

# Every script starts with Redis's clock in milliseconds. Numbers written back are formatted
# with %.0f: Lua would otherwise write large ones in exponent notation.
_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function ms(value) return string.format('%.0f', value) end
"""

# KEYS[1]: the record. ARGV: token, owner, lease (ms), marker ('' for none), dead ('' for
# none: the token of a run whose process is known to be gone), keep (ms).
# Returns {verdict, holder, holder's owner}.
_ACQUIRE = (
    _NOW
    + """
local token, owner, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local marker, dead, keep = ARGV[4], ARGV[5], tonumber(ARGV[6])
local record = redis.call('HMGET', KEYS[1], 'state', 'token', 'owner', 'expires')
local state, holder, holder_owner = record[1], record[2], record[3]
if state then
    local alive = state == 'running' and tonumber(record[4]) > now and holder ~= dead
    if marker == '' then
        if state == 'done' then return {'done'} end
        if alive then return {'running', holder, holder_owner} end
    else
        if holder ~= marker or state ~= 'running' then return {'drop'} end
        if alive then return {'redelay', holder, holder_owner} end
    end
end
redis.call('HSET', KEYS[1], 'state', 'running', 'token', token, 'owner', owner,
    'expires', ms(now + lease), 'updated', ms(now))
redis.call('PEXPIRE', KEYS[1], ms(lease + keep))
return {'run'}
"""
)

# KEYS[1]: the record. ARGV: token, lease (ms), keep (ms). Returns 1 if renewed.
_RENEW = (
    _NOW
    + """
local lease, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
local record = redis.call('HMGET', KEYS[1], 'state', 'token')
if record[1] ~= 'running' or record[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'expires', ms(now + lease), 'updated', ms(now))
redis.call('PEXPIRE', KEYS[1], ms(lease + keep))
return 1
"""
)

# KEYS[1]: the record. ARGV: token, retention (ms). Done even if another run took the lease
# over meanwhile: this one completed.
_COMPLETE = (
    _NOW
    + """
local retention = math.max(tonumber(ARGV[2]), 1)
redis.call('HSET', KEYS[1], 'state', 'done', 'token', ARGV[1], 'owner', '',
    'expires', ms(now + retention), 'updated', ms(now))
redis.call('PEXPIRE', KEYS[1], ms(retention))
return 1
"""
)

# KEYS[1]: the record. ARGV: token.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

# KEYS[1]: the record. ARGV: token, retention (ms).
_RESOLVE = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local retention = math.max(tonumber(ARGV[2]), 1)
redis.call('HSET', KEYS[1], 'state', 'resolved', 'expires', ms(now + retention),
    'updated', ms(now))
redis.call('PEXPIRE', KEYS[1], ms(retention))
return 1
"""
)

_VERDICTS = {
    "done": Verdict.DONE,
    "running": Verdict.RUNNING,
    "drop": Verdict.DROP,
    "redelay": Verdict.REDELAY,
    "run": Verdict.RUN,
}


def _ms(seconds: float) -> int:
    return max(round(seconds * 1000), 0)


class RedisLeaseStore:
    """Leases and done records in Redis, for workers on many hosts.

    ``url``: a ``redis://``, ``rediss://`` or ``unix://`` URL, as redis-py reads it.
    ``prefix``: put before every key; the records of one store are all the keys under it.
    """

    def __init__(self, url: str, *, prefix: str = "steadyrabbit:lease:") -> None:
        try:
            from redis.asyncio import Redis
        except ImportError:
            raise ConfigurationError(
                "the Redis lease store needs redis-py, which is not installed: "
                "pip install 'steadyrabbit[redis]'"
            ) from None
        self.prefix = prefix
        self.description = mask_url(url)
        self._host = socket.gethostname()
        try:
            self._redis: Redis = Redis.from_url(
                url, decode_responses=True, socket_timeout=10.0, socket_connect_timeout=10.0
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"the Redis lease store cannot use {self.description}: {mask_url(str(exc))}"
            ) from None
        register = self._redis.register_script
        self._acquire: AsyncScript = register(_ACQUIRE)
        self._renew: AsyncScript = register(_RENEW)
        self._complete: AsyncScript = register(_COMPLETE)
        self._release: AsyncScript = register(_RELEASE)
        self._resolve: AsyncScript = register(_RESOLVE)

    # -- lifecycle

    async def open(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    # -- the operations

    async def acquire(
        self, key: str, token: str, lease: float, *, marker: str | None = None
    ) -> Acquired:
        owner = token.rpartition("/")[0]
        dead = ""
        while True:
            reply: list[str] = await self._acquire(
                keys=[self.prefix + key],
                args=[token, owner, _ms(lease), marker or "", dead, _KEEP_RUNNING_MS],
            )
            verdict = _VERDICTS[reply[0]]
            holder = reply[1] if len(reply) > 1 else None
            if (
                not dead
                and holder is not None
                and verdict in (Verdict.RUNNING, Verdict.REDELAY)
                and owner_gone(reply[2], host=self._host)
            ):
                dead = holder  # once: the script takes it over unless it changed meanwhile
                continue
            return Acquired(verdict, holder if verdict is Verdict.RUNNING else None)

    async def begin(self, key: str, token: str, lease: float) -> None:
        # One round trip either way: the verdict is simply not needed (a first delivery).
        await self.acquire(key, token, lease)

    async def renew(self, leases: Sequence[tuple[str, str]], lease: float) -> None:
        if not leases:
            return
        # One script per record (a cluster may hold them on different nodes), one round trip.
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, token in leases:
                await self._renew(
                    keys=[self.prefix + key],
                    args=[token, _ms(lease), _KEEP_RUNNING_MS],
                    client=pipe,
                )
            await pipe.execute()

    async def complete(self, key: str, token: str, retention: float) -> None:
        await self._complete(keys=[self.prefix + key], args=[token, _ms(retention)])

    async def release(self, key: str, token: str) -> None:
        await self._release(keys=[self.prefix + key], args=[token])

    async def resolve(self, key: str, token: str, retention: float) -> None:
        await self._resolve(keys=[self.prefix + key], args=[token, _ms(retention)])

    async def prune(self) -> int:
        """Nothing to do: every record carries its TTL, and Redis deletes it when due."""
        return 0

    async def report(self) -> StoreReport:
        records = running = 0
        oldest: float | None = None
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        batch: list[str] = []

        async def count(keys: list[str]) -> None:
            nonlocal records, running, oldest
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in keys:
                    pipe.hmget(name, ["state", "updated"])
                rows: list[list[str | None]] = await pipe.execute()
            for state, updated in rows:
                if state is None or updated is None:
                    continue  # expired meanwhile, or not a record
                records += 1
                running += state == "running"
                changed = int(updated) / 1000
                oldest = changed if oldest is None else min(oldest, changed)

        async for name in self._redis.scan_iter(match=pattern, count=1000):
            batch.append(name)
            if len(batch) >= 1000:
                await count(batch)
                batch = []
        if batch:
            await count(batch)
        return StoreReport(self.description, records, running, oldest)
