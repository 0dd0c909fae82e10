"""Checkpoints through Redis, for workers and backends that share no disk (CHECKPOINT_STORE=redis).

Every part of emloop already reaches Redis, while many labs' GPU nodes mount no NFS. The
mirror is a transport, not a second store: each machine keeps its own ``MODEL_DIR`` with
the same atomic writes and SHA-256 checks, a worker publishes a new version to Redis
before it writes it locally, and a reader adopts the versions it lacks (their bytes
checked against the published hash) before it reads its manifest.

Keys per lineage (``project-<id>/<label signature>``), under ``emloop:<RQ_QUEUE>:checkpoints:``
(the queue names a deployment, as for the training state, so two Label Studios' project 1 do
not mix): ``…:files`` (version number → checkpoint bytes), ``…:versions`` (number → the version
record as JSON) and ``…:stamp`` (a counter bumped on every publish, so a reader with
nothing new pays one GET). A publish is one Lua script: the bytes and the record land
together or not at all, and a version number is never taken twice. The first machine to look
at a lineage Redis does not know yet publishes the versions its MODEL_DIR holds, so turning the
mirror on keeps a project's history.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

RETRY_SECONDS = 30.0

# KEYS: files, versions, stamp; ARGV: number, bytes, record. 1 = published, 0 = number taken.
_PUBLISH = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('INCR', KEYS[3])
return 1
"""


class MirrorError(RuntimeError):
    """Redis refused or lost a publish: the version is not visible to other machines."""


class RedisMirror:
    """Publishes and lists the versions of every lineage in one Redis database."""

    def __init__(self, redis: Redis, queue: str) -> None:
        self.redis = redis
        self.prefix = f"emloop:{queue}:checkpoints"
        self._offered: set[str] = set()
        self._publish = redis.register_script(_PUBLISH)
        self._seen: dict[str, bytes | None] = {}  # lineage -> stamp of the last pull
        self._retry: dict[str, float] = {}  # lineage -> when to try again versions `adopt` rejected
        self._warned = 0.0

    def _keys(self, lineage: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:{lineage}"
        return f"{base}:files", f"{base}:versions", f"{base}:stamp"

    def publish(self, lineage: str, number: int, data: bytes, record: str) -> None:
        """Make version `number` visible everywhere; raises MirrorError if the number is taken."""
        files, versions, stamp = self._keys(lineage)
        try:
            published = self._publish(keys=[files, versions, stamp], args=[number, data, record])
        except RedisError as exc:
            raise MirrorError(f"cannot publish {lineage} v{number} to Redis: {exc}") from None
        if not published:
            raise MirrorError(f"{lineage} v{number} was already published by another worker")

    def highest(self, lineage: str) -> int:
        """The highest published version number (0 when none), so a new one can go past it."""
        try:
            numbers = self.redis.hkeys(self._keys(lineage)[1])
        except RedisError as exc:
            raise MirrorError(f"cannot list {lineage} in Redis: {exc}") from None
        return max((int(n) for n in numbers), default=0)

    def pull(
        self,
        lineage: str,
        known: Callable[[], set[int]],
        adopt: Callable[[str, bytes], None],
        local: Callable[[], Iterable[tuple[int, str, bytes]]],
    ) -> int:
        """Hand each published version not in `known()` to `adopt(record, bytes)`, oldest first;
        returns how many. Nothing is read past one GET while the lineage is unchanged. A
        lineage Redis does not know is seeded once per process with `local()`'s
        (number, record, bytes).

        Redis being down is logged (at most once a minute) and the machine keeps serving what
        it has; a version `adopt` rejects is tried again after RETRY_SECONDS, not on every call.
        """
        files, versions, stamp_key = self._keys(lineage)
        try:
            stamp = self.redis.get(stamp_key)
            if stamp is None and lineage not in self._offered:
                self._offered.add(lineage)
                self._seed(lineage, local())
                stamp = self.redis.get(stamp_key)
            retry = lineage in self._retry and time.monotonic() >= self._retry[lineage]
            if stamp is None or (self._seen.get(lineage) == stamp and not retry):
                return 0
            records = self.redis.hgetall(versions)
            have = known()
            missing = sorted(int(n) for n in records if int(n) not in have)
            blobs = self.redis.hmget(files, [str(n) for n in missing]) if missing else []
        except RedisError as exc:
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("cannot read checkpoints from Redis (serving the local ones): %s", exc)
            return 0
        complete = True
        for number, blob in zip(missing, blobs, strict=True):
            try:
                adopt(records[str(number).encode()].decode(), blob or b"")
            except Exception as exc:  # a bad version must not stop the ones after it
                complete = False
                log.error("%s v%d from Redis not adopted: %s", lineage, number, exc)
        self._seen[lineage] = stamp  # the stamp read before listing, so a later publish is seen
        if complete:
            self._retry.pop(lineage, None)
        else:
            self._retry[lineage] = time.monotonic() + RETRY_SECONDS
        return len(missing)

    def _seed(self, lineage: str, versions: Iterable[tuple[int, str, bytes]]) -> None:
        for number, record, data in versions:
            try:
                self.publish(lineage, number, data, record)
                log.info("published %s v%d from this MODEL_DIR to Redis", lineage, number)
            except MirrorError as exc:
                log.error("%s", exc)


_mirrors: dict[tuple[str, str], RedisMirror] = {}
_mirrors_lock = threading.Lock()


def mirror_for(store: str, redis_url: str, queue: str) -> RedisMirror | None:
    """The process's mirror for CHECKPOINT_STORE=redis (one per URL and queue), None for disk."""
    if store != "redis":
        return None
    with _mirrors_lock:
        if (redis_url, queue) not in _mirrors:
            redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
            _mirrors[redis_url, queue] = RedisMirror(redis, queue)
        return _mirrors[redis_url, queue]
