"""Consensus behind one small interface: a replicated log (pysyncobj) and an in-memory one (dev).

pysyncobj is used only through `RaftLog`, which fixes what `shared/raft-engine.md` measured:
- one replicated entry point taking an encoded, typed command (method ids never shift);
- apply never raises and reads no clock (the state machine guarantees it; time is in the command);
- every command carries a request id, so resubmitting after an unknown outcome is safe;
- the cluster key is always set (without it the Raft port unpickles whatever a stranger sends);
- the journal always has its dump file beside it; batching off; timeouts tuned for the GIL;
- a short leader fallback; `barrier()` is a replicated no-op for `?consistent` reads;
- a wedge detector (apply stuck below commit, tick-thread exceptions);
- the journal is msync'ed and its metadata fsync'ed every `flush_interval`, which bounds what a
  power loss can take to that interval (pysyncobj itself never fsyncs).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import random
import struct
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lictor import metrics
from lictor.errors import APIError, NoLeader
from lictor.registry import raft_wire
from lictor.registry.state import Result, StateStore

log = logging.getLogger("lictor.raft")

# Errors after which the command may or may not have committed: resubmit with the same id.
_RETRYABLE = {2, 3, 4, 5, 7}  # MISSING_LEADER, DISCARDED, NOT_LEADER, LEADER_CHANGED, UNKNOWN_OUTCOME
_QUEUE_FULL = 1
MAX_BATCH = 256  # commands per Raft entry at most (keeps one entry's pickle and apply short)
MAX_BATCH_BYTES = 8 * 1024 * 1024  # and bytes: a batch never outgrows what one command may be

# Declared lengths of pysyncobj frames we are willing to buffer. Before a connection has proved it
# holds the cluster key (its first frame decrypts to the peer's session key, ~200 bytes), a stranger
# gets a few KiB; after, up to the biggest legitimate entry: a 256 MiB snapshot restore, zlib'd and
# sealed (raft_wire), with room to spare. pysyncobj itself buffers whatever a frame declares.
HANDSHAKE_FRAME_MAX = 4096
AUTHENTICATED_FRAME_MAX = 512 * 1024 * 1024


_frame_warned = [0.0]


# Exit status of a server that stopped because its Raft files could not be written (EX_IOERR).
STORAGE_FAILED_EXIT = 74
_exit = os._exit  # replaced in tests


def stop_on_storage_failure(what: str, path: str, exc: OSError) -> None:
    """Fail-stop: a server that cannot store a Raft entry or its vote must not say it did.

    pysyncobj appends an entry to its in-memory log before writing it to the journal, and its tick
    loop logs an exception and carries on, so a failed write would leave this server acknowledging
    entries (and granting votes) it will have forgotten after a restart. Exiting is what etcd does
    on a failed WAL write; the other servers keep the quorum, and this one catches up from them once
    it has room again."""
    log.critical("%s failed (%s: %s). This server stops rather than acknowledge Raft entries it could not "
                 "store; free space on (or repair) the disk holding %s and start it again: it catches up from "
                 "the other servers.", what, type(exc).__name__, exc, path)
    for handler in logging.getLogger().handlers + log.handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001, S110 - exiting anyway
            pass
    _exit(STORAGE_FAILED_EXIT)


RESERVE_STEP = 4 * 1024 * 1024  # journal bytes reserved ahead of the writes
# A file system that cannot reserve blocks (posix_fallocate unsupported): write without reserving.
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
_no_reservation_warned: set[str] = set()


def _warn_no_reservation(path: str, exc: OSError) -> None:
    if path not in _no_reservation_warned:
        _no_reservation_warned.add(path)
        log.warning("cannot reserve disk blocks for %s (%s): a full disk will kill this server with SIGBUS "
                    "instead of stopping it with a message", path, exc)


def _journal_writes_without_fstat() -> None:
    """Make pysyncobj's journal check its mapping's length, not the file's, before each write, and
    reserve the file's blocks before writing into them.

    `ResizableFile.write` called `mmap.size()`, an fstat, twice per Raft entry on every server. It
    blocks while the raft-flush thread fsyncs the same file: in a profile of 3,000 writes one
    follower's calls averaged 26 µs (the others 1.7 µs), a tenth of its tick thread's time. The
    mapping covers the whole file (pysyncobj maps it with length 0 and only grows it through this
    class), so its length is the file's size without a system call.

    Growing the mapping only extends the file's length: its new pages get disk blocks when first
    written through the mapping, and on a full disk that write is a SIGBUS, which killed the server
    without a word. `posix_fallocate` takes the blocks up front, so a full disk is an ENOSPC here,
    and any failure to write the journal or its metadata (term and vote) stops the server with a
    message instead (`stop_on_storage_failure`)."""
    from pysyncobj import journal

    cls = journal.ResizableFile
    if getattr(cls, "_lictor_no_fstat", False):
        return
    grow = cls._ResizableFile__extand  # type: ignore[attr-defined]

    def write(self: Any, offset: int, values: bytes) -> None:
        size = len(values)
        try:
            while offset + size > len(self._ResizableFile__mm):
                current = len(self._ResizableFile__mm)
                wanted = max(int(current * self._ResizableFile__resizeFactor), offset + size)
                try:
                    self._ResizableFile__mm.resize(wanted)
                except (SystemError, OSError):
                    grow(self, wanted - current)
            reserved = getattr(self, "_lictor_reserved", 0)
            if reserved < offset + size:  # blocks up to the end of this write, a step at a time
                mapped = len(self._ResizableFile__mm)
                end = min(mapped, max(offset + size, reserved + RESERVE_STEP))
                fd = self._ResizableFile__f.fileno()
                try:
                    os.posix_fallocate(fd, reserved, end - reserved)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC and end > offset + size:
                        end = offset + size  # room for this write, if not for a whole step
                        os.posix_fallocate(fd, reserved, end - reserved)
                    elif exc.errno in _NO_FALLOCATE:
                        _warn_no_reservation(self._ResizableFile__fileName, exc)
                        end = mapped
                    else:
                        raise
                self._lictor_reserved = end
        except OSError as exc:
            stop_on_storage_failure("writing the Raft journal", self._ResizableFile__fileName, exc)
            raise
        self._ResizableFile__mm[offset:offset + size] = values

    store_meta = journal.MetaStorer.storeMeta

    def store_meta_or_stop(self: Any, meta: dict[str, Any]) -> None:
        try:
            store_meta(self, meta)
        except OSError as exc:
            stop_on_storage_failure("storing the Raft term and vote", self.getPath(), exc)
            raise

    cls.write = write  # type: ignore[method-assign]
    journal.MetaStorer.storeMeta = store_meta_or_stop  # type: ignore[method-assign]
    cls._lictor_no_fstat = True  # type: ignore[attr-defined]


def _limit_raft_frames() -> None:
    """Make pysyncobj hang up on a frame longer than the limits above instead of buffering it."""
    from pysyncobj import tcp_connection

    cls = tcp_connection.TcpConnection
    if getattr(cls, "_lictor_frame_limit", False):
        return
    read_some = cls._TcpConnection__processRead  # type: ignore[attr-defined]
    parse = cls._TcpConnection__processParseMessage  # type: ignore[attr-defined]

    def refuse_oversized(conn: Any) -> bool:
        buffered = conn._TcpConnection__readBuffer
        if len(buffered) < 4:
            return False
        declared = struct.unpack("i", buffered[:4])[0]
        limit = AUTHENTICATED_FRAME_MAX if conn.recvRandKey else HANDSHAKE_FRAME_MAX
        if 0 <= declared <= limit:
            return False
        now = time.monotonic()
        if now - _frame_warned[0] > 10.0:  # a flood of strangers must not flood the log
            _frame_warned[0] = now
            log.warning("raft: a peer declared a %d-byte frame (limit %d; %d before the key handshake, %d after); "
                        "disconnected", declared, limit, HANDSHAKE_FRAME_MAX, AUTHENTICATED_FRAME_MAX)
        _count_refusal("raft_frame")
        conn.disconnect()
        return True

    def guarded_read(conn: Any) -> None:
        # pysyncobj reads until the socket is drained; a fast sender could keep it buffering forever.
        while read_some(conn):
            if refuse_oversized(conn):
                return
        conn._TcpConnection__lastReadTime = time.monotonic()

    def guarded_parse(conn: Any) -> Any:
        if refuse_oversized(conn):
            return None
        return parse(conn)

    cls._TcpConnection__tryReadBuffer = guarded_read  # type: ignore[attr-defined]
    cls._TcpConnection__processParseMessage = guarded_parse  # type: ignore[attr-defined]
    cls._lictor_frame_limit = True  # type: ignore[attr-defined]


def _count_refusal(kind: str) -> None:
    try:
        from lictor.limits import count_refusal
    except ImportError:  # pragma: no cover
        return
    count_refusal(kind)


_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_counter = itertools.count()


def _new_request_id_prefix() -> None:
    global _REQUEST_ID_PREFIX
    _REQUEST_ID_PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_request_id_prefix)  # a forked child must not reuse the parent's ids


def request_id() -> str:
    """A command's id for the state machine's dedup: unique across processes (a random 64-bit
    per-process prefix) and within one (a counter). uuid4 cost an os.urandom call per write, 1.6 %
    of a leader's GIL time under sequential writes (py-spy, 2026-12-04)."""
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):x}"


def new_command(op: str, **fields: Any) -> dict[str, Any]:
    """A command with its request id and proposer timestamp set."""
    return {"op": op, "rid": request_id(), "ts": time.time(), **fields}


@dataclass
class RaftSettings:
    data_dir: str | None
    self_addr: str
    peers: list[str]
    password: str
    min_timeout: float = 0.8
    max_timeout: float = 2.0
    connection_retry: float = 1.0
    leader_fallback: float = 2.5
    snapshot_threshold: int = 5000
    flush_interval: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


def compaction_jitter(minimum: int, spread: float = 0.5) -> int:
    """A per-process value in [minimum, minimum * (1 + spread)]: when this server compacts its log."""
    return int(minimum * (1 + random.uniform(0, spread)))


WAKE_PER_ITERATION = 2  # blocking queries woken per event-loop iteration (see ChangeFeed._release)
# A follower repeats an unchanged AppendEntries acknowledgement only this long after the last one
# (see Node._SyncObj__sendNextNodeIdx); well under pysyncobj's 0.1 s heartbeat period.
ACK_REPEAT_AFTER = 0.05


class TickHandoff:
    """What pysyncobj's tick thread hands to the event loop, delivered in one wake-up per tick,
    sent just before the tick thread blocks in poll().

    Waking the loop from the tick thread (`call_soon_threadsafe`: an eventfd write) makes the loop
    thread runnable while the tick thread still holds the GIL; the loop thread then blocks on the
    GIL until the tick thread lets go. Measured on a 2-vCPU VM, one such wake-up costs 20-80 µs of
    GIL-held time, and py-spy put a quarter of a follower's GIL-held time during sequential writes
    in the change-feed wake-up (its CPU cost measured much smaller). Posted from inside a tick (apply
    results, change notifications), they are collected and sent together by `flush`, which pysyncobj
    calls as the last step before its poll(), where the GIL is released.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tick_thread: int | None = None
        self._items: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` on the loop: after this tick when called on the tick thread, else now."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() != self._tick_thread:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed during shutdown
                pass
            return
        with self._lock:
            self._items.append((fn, args))

    def flush(self) -> None:
        """pysyncobj's on-tick callback: runs on the tick thread, right before it polls."""
        self._tick_thread = threading.get_ident()
        with self._lock:
            if not self._items:
                return
            items, self._items = self._items, []
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_run_all, items)
        except RuntimeError:
            pass


def _run_all(items: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
    for fn, args in items:
        try:
            fn(*args)
        except Exception:  # one failing hand-off must not drop the others
            log.exception("error delivering a Raft result to the event loop")


class ChangeFeed:
    """Wakes blocking queries on the event loop when the state machine applies something.

    `notify` is called from pysyncobj's tick thread; it coalesces bursts into a single wake-up
    per loop iteration so a write storm cannot flood the loop with callbacks.

    A parked waiter may carry an `unchanged` check (a cheap stamp comparison, see
    httpapi.blocking). `notify` runs those checks itself, on the notifying thread, takes out the
    waiters whose view changed (or that have no check) and wakes the loop only for them: in the soak (issue #9)
    every waiter watches catalog or health views, so a KV write, 60 % of the writes, woke every
    server's loop for nothing, a cross-thread wake-up and a GIL hand-off per write per server.
    The generation still moves with every change, so a query between its read and its `wait`
    re-reads. Parking, re-parking and the scan hold `_lock`: a waiter whose check ran before a
    change is either in the list when that change's scan runs, or sees the change itself.
    """

    _instances: weakref.WeakSet[ChangeFeed] = weakref.WeakSet()

    def __init__(self, handoff: TickHandoff | None = None) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.handoff = handoff  # set when notify is called from a Raft tick thread
        self.generation = 0
        self.closed = False  # shutting down: blocking queries answer now instead of being cancelled
        self.coalesce = 0.0  # seconds a woken blocking query waits from its arrival (httpapi.blocking)
        self.wakes_skipped = 0  # changes no parked waiter's view saw: the loop was not woken
        self._waiters: list[tuple[asyncio.Future[None], Callable[[], bool] | None]] = []
        self._to_wake: list[tuple[asyncio.Future[None], Callable[[], bool] | None]] = []
        self._pending = False  # a wake is posted to the loop and has not run yet
        self._rescan = False  # changes came while it was pending
        self._lock = threading.Lock()
        ChangeFeed._instances.add(self)

    @classmethod
    def close_all(cls) -> None:
        """At shutdown: every feed in the process (catalog, leaf cache, ...) releases its waiters."""
        for feed in list(cls._instances):
            feed.close()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def notify(self, _index: int = 0) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with self._lock:
            self.generation += 1
            if self._pending:
                self._rescan = True  # the coming wake checks the still-parked waiters again
                return
            self._to_wake = self._changed_waiters()
            if not self._to_wake:
                self.wakes_skipped += 1
                return
            self._pending = True
        if self.handoff is not None:
            self.handoff.post(self._wake)
            return
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _changed_waiters(self) -> list[tuple[asyncio.Future[None], Callable[[], bool] | None]]:
        """Take out of the parked waiters those this change may concern: no check, or a check that
        fails; drop those already done (timed out or cancelled). The caller holds `_lock`."""
        keep, changed = [], []
        for fut, unchanged in self._waiters:
            if fut.done():
                continue
            if unchanged is None or self.closed or not _holds(unchanged):
                changed.append((fut, unchanged))
            else:
                keep.append((fut, unchanged))
        self._waiters = keep
        return changed

    def _wake(self) -> None:
        with self._lock:
            self._pending = False
            waiters, self._to_wake = self._to_wake, []
            if self._rescan:
                self._rescan = False
                waiters += self._changed_waiters()
        self._release(waiters)

    def _release(self, waiters: list[tuple[asyncio.Future[None], Callable[[], bool] | None]]) -> None:
        """Wake WAKE_PER_ITERATION waiters now and the rest on later loop iterations. A woken
        watcher answers in one go (~0.2 ms for a 100-instance health body), so waking a dozen at
        once held every other request on this loop for the whole burst; paced, the loop polls for
        I/O between them."""
        loop = self.loop
        paced = loop is not None and not loop.is_closed()  # else: all at once, nothing to interleave
        woken = 0
        for position, (fut, _unchanged) in enumerate(waiters):
            if fut.done():  # timed out or cancelled: forget it
                continue
            if paced and woken == WAKE_PER_ITERATION:
                loop.call_soon(self._release, waiters[position:])  # type: ignore[union-attr]
                return
            fut.set_result(None)
            woken += 1

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.generation += 1
            self._rescan = True  # closed: every parked waiter counts as changed
        self._wake()

    async def wait(self, generation: int, timeout: float, unchanged: Callable[[], bool] | None = None) -> None:
        """Return when anything changed after `generation` was read, or after `timeout`.

        `unchanged`, if given, is a cheap check (run at each change, possibly on the Raft tick
        thread) that is true while nothing the caller reads has changed; the caller then sleeps
        through that change. It must only read state (under the store's lock)."""
        if self.closed:
            # Shutting down: nothing will change any more. Sleep rather than return, so that a
            # loop around wait() still yields and can be cancelled.
            await asyncio.sleep(timeout)
            return
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.generation != generation:
                return
            self._waiters.append((fut, unchanged))
        # A timer that settles the future, not wait_for(shield(...)): those wrap it in two more
        # futures and callbacks, per round of every blocking query.
        timer = loop.call_later(timeout, _settle_if_pending, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if not fut.done():
                fut.cancel()  # cancelled from outside: a parked entry is dropped at the next change


def _settle_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _holds(unchanged: Callable[[], bool]) -> bool:
    """A waiter's check; one that fails counts as "changed", so its waiter wakes and re-reads."""
    try:
        return bool(unchanged())
    except Exception:  # noqa: BLE001 - a broken check must not strand the other waiters
        log.exception("blocking-query change check failed")
        return False


class ConsensusLog:
    """What the HTTP layer needs from consensus. Addresses are Raft `host:port` strings."""

    store: StateStore
    feed: ChangeFeed
    self_addr: str

    async def start(self) -> None: ...

    async def submit(self, command: dict[str, Any], timeout: float = 5.0) -> Any:
        raise NotImplementedError

    async def barrier(self, timeout: float = 5.0) -> None:
        await self.submit(new_command("noop"), timeout)

    def leader(self) -> str | None:
        raise NotImplementedError

    def is_leader(self) -> bool:
        return self.leader() == self.self_addr

    def peers(self) -> list[str]:
        raise NotImplementedError

    def last_contact_ms(self) -> int:
        return 0

    def status(self) -> dict[str, Any]:
        return {}

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    async def add_peer(self, addr: str) -> None:
        raise APIError("membership changes need a clustered server", 400)

    async def remove_peer(self, addr: str) -> None:
        raise APIError("membership changes need a clustered server", 400)

    async def transfer_leadership(self) -> None: ...

    async def close(self) -> None: ...


def _unwrap(result: Result) -> Any:
    if result.get("ok"):
        return result.get("value")
    raise APIError(result.get("error", "command failed"), int(result.get("status", 500)))


class LocalLog(ConsensusLog):
    """`-dev`: one in-memory node that applies commands directly. Same semantics, no quorum."""

    def __init__(self, self_addr: str = "127.0.0.1:8300") -> None:
        self.self_addr = self_addr
        self.store = StateStore()
        self.feed = ChangeFeed()
        self.store.listeners.append(self.feed.notify)

    async def start(self) -> None:
        self.feed.bind(asyncio.get_running_loop())
        metrics.RAFT_LEADER_CHANGES.inc()  # dev mode elects itself once

    async def submit(self, command: dict[str, Any], timeout: float = 5.0) -> Any:
        command.setdefault("rid", request_id())
        command.setdefault("ts", time.time())
        # Round-trip through JSON exactly as the replicated path does, so dev mode cannot
        # accept a command a cluster would fail to encode.
        start = time.perf_counter()
        result = self.store.apply(json.loads(json.dumps(command)))
        metrics.RAFT_COMMIT_SECONDS.observe(time.perf_counter() - start)
        return _unwrap(result)

    def leader(self) -> str | None:
        return self.self_addr

    def peers(self) -> list[str]:
        return [self.self_addr]

    def status(self) -> dict[str, Any]:
        return {"state": "leader", "term": 1, "commit_index": self.store.index, "last_applied": self.store.index}


def _build_replicated(store: StateStore):  # noqa: ANN202 - classes built lazily, pysyncobj is optional in unit tests
    from pysyncobj import SyncObj, SyncObjConsumer, replicated

    class ReplicatedStore(SyncObjConsumer):
        """The single replicated entry point. Its method id never changes: there is one."""

        def __init__(self, target: StateStore) -> None:
            # Set before SyncObjConsumer.__init__ so they are not part of snapshots.
            self.corrupt_entries = 0
            self.last_corruption = ""
            super().__init__()
            self.store = target

        @replicated
        def apply_command(self, blob: bytes) -> Result:
            try:
                command = json.loads(blob)
                if not isinstance(command, dict):
                    raise ValueError("command is not an object")
            except Exception as exc:
                # We only ever write valid JSON objects, so this is a damaged journal entry.
                # Raising would wedge the tick thread forever; skipping silently would let this
                # replica diverge. Skip it, and make the node report itself broken so an
                # operator wipes and rejoins it (docs/operations.md).
                self.corrupt_entries += 1
                self.last_corruption = f"undecodable log entry ({exc.__class__.__name__}: {exc})"[:300]
                return {"ok": False, "error": f"undecodable command: {exc}", "status": 500}
            if command.get("op") == "batch":
                # Group commit: one entry, many commands, each applied (and indexed) on its own.
                subcommands = command.get("Commands")
                if not isinstance(subcommands, list):
                    return {"ok": False, "error": "batch without Commands", "status": 500}
                return {
                    "ok": True,
                    "batch": True,
                    "value": [
                        self.store.apply(sub) if isinstance(sub, dict)
                        else {"ok": False, "error": "batch element is not a command", "status": 500}
                        for sub in subcommands
                    ],
                }
            return self.store.apply(command)

        def _deserialize(self, data: dict[str, Any]) -> None:
            # Restore into the live store so the HTTP layer's references stay valid.
            incoming = data.get("store")
            if isinstance(incoming, StateStore):
                self.store.replace_with(incoming)

    class Node(SyncObj):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Set before SyncObj.__init__: attributes that exist then are not snapshotted, and the
            # tick thread it starts reads them.
            self.tick_errors = 0
            self.last_tick_error = ""
            self.acks_skipped = 0
            self._last_ack: dict[Any, tuple[int, int, float]] = {}  # leader node -> (term, next index, when)
            super().__init__(*args, **kwargs)

        def _SyncObj__sendNextNodeIdx(self, node: Any, reset: bool = False, nextNodeIdx: int | None = None,  # noqa: N802,N803
                                      success: bool = False) -> None:
            """A follower's AppendEntries acknowledgement, not repeated when it would say nothing new.

            The leader sends every committed entry twice: with the entry, then with the commit
            index that lets followers apply it. pysyncobj acknowledges both, and the second
            acknowledgement carries the same term and next index as the first, so the leader
            learns nothing from it: it was a quarter of the cluster's Raft frames per write. A
            success with an unchanged (term, next index) sent to the same leader within
            ACK_REPEAT_AFTER is dropped; heartbeats every 0.1 s still get one, so the leader's
            view of its followers' liveness (leaderFallbackTimeout, 2.5 s) stays fresh. Failures,
            resets and snapshot acknowledgements are always sent."""
            if success and not reset and nextNodeIdx is not None:
                now = time.monotonic()
                key = (self._SyncObj__raftCurrentTerm, nextNodeIdx)
                last = self._last_ack.get(node)
                if last is not None and last[:2] == key and now - last[2] < ACK_REPEAT_AFTER:
                    self.acks_skipped += 1
                    return
                self._last_ack[node] = (*key, now)
            else:
                self._last_ack.pop(node, None)
            super()._SyncObj__sendNextNodeIdx(node, reset=reset, nextNodeIdx=nextNodeIdx, success=success)

        def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802,N803 - pysyncobj's names
            try:
                super()._onTick(timeToWait)
            except Exception:
                self.tick_errors += 1
                self.last_tick_error = traceback.format_exc(limit=3)
                raise

    return ReplicatedStore(store), Node


class RaftLog(ConsensusLog):
    def __init__(self, settings: RaftSettings) -> None:
        if not settings.password:
            raise ValueError("a cluster key is required: pass -encrypt (generate one with `lictor keygen`)")
        self.settings = settings
        self.self_addr = settings.self_addr
        self.store = StateStore()
        self.handoff = TickHandoff()
        self.feed = ChangeFeed(self.handoff)
        self.store.listeners.append(self.feed.notify)
        self._consumer: Any = None
        self._node: Any = None
        self._last_contact = time.monotonic()
        self._progress = (0, 0, time.monotonic())  # (last_applied, commit_idx, since)
        self.wedged_reason = ""
        self._monitor: asyncio.Task[None] | None = None
        self._flusher: threading.Thread | None = None
        self._closing = threading.Event()
        self._batch: list[tuple[bytes, asyncio.Future[tuple[Any, int]]]] = []
        self._flush_scheduled = False

    async def start(self) -> None:
        from pysyncobj import SyncObjConf

        loop = asyncio.get_running_loop()
        self.feed.bind(loop)
        self.handoff.bind(loop)
        s = self.settings
        journal = dump = None
        if s.data_dir:
            os.makedirs(s.data_dir, exist_ok=True)
            journal = os.path.join(s.data_dir, "raft.journal")
            dump = os.path.join(s.data_dir, "raft.dump")  # always beside the journal
        conf = SyncObjConf(
            appendEntriesUseBatch=False,
            journalFile=journal,
            fullDumpFile=dump,
            raftMinTimeout=s.min_timeout,
            raftMaxTimeout=s.max_timeout,
            connectionRetryTime=s.connection_retry,
            leaderFallbackTimeout=s.leader_fallback,
            dynamicMembershipChange=True,
            password=s.password,
            # Every server's log reaches the same length at the same moment: with one threshold for
            # all, the three compacted together and the whole cluster stalled at once (the soak's
            # slowest reads, 4-10 ms on every server for ~150 ms). Each server draws its own
            # threshold and period above the configured minimum, as hashicorp/raft jitters its
            # snapshot checks, so they compact at different times.
            logCompactionMinEntries=compaction_jitter(s.snapshot_threshold),
            logCompactionMinTime=compaction_jitter(300),
            # Split staggers compaction into a 30 s window every 5 min; with fork-based dumps
            # (a few ms of stall) compacting as soon as the threshold is passed is cheaper.
            logCompactionSplit=False,
            commandsWaitLeader=True,
            **s.extra,
        )
        _limit_raft_frames()
        _journal_writes_without_fstat()
        raft_wire.install()
        self._consumer, node_class = _build_replicated(self.store)
        # SyncObj binds its port and starts its tick thread in the constructor; it must be built
        # on the main thread, whose liveness its tick thread watches.
        self._node = node_class(s.self_addr, [p for p in s.peers if p != s.self_addr], conf=conf, consumers=[self._consumer])
        self._node.addOnTickCallback(self.handoff.flush)
        self._monitor = loop.create_task(self._watch())
        if journal:
            self._flusher = threading.Thread(target=self._flush_loop, name="raft-flush", daemon=True)
            self._flusher.start()

    # -- writes -----------------------------------------------------------------------------

    async def submit(self, command: dict[str, Any], timeout: float = 5.0) -> Any:
        command.setdefault("rid", request_id())
        command.setdefault("ts", time.time())
        blob = json.dumps(command, separators=(",", ":")).encode()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        while True:
            fut: asyncio.Future[tuple[Any, int]] = loop.create_future()
            self._enqueue(blob, fut)
            remaining = deadline - loop.time()
            try:
                result, error = await asyncio.wait_for(fut, max(remaining, 0.001))
            except TimeoutError:
                raise NoLeader() if self.leader() is None else APIError(
                    "timed out waiting for the write to commit; it may still apply", 500
                ) from None
            if error == 0:
                metrics.RAFT_COMMIT_SECONDS.observe(loop.time() - started)  # submit -> applied, retries included
                return _unwrap(result)
            if error == _QUEUE_FULL:
                raise APIError("Raft queue full, try again", 429)
            if error in _RETRYABLE and loop.time() < deadline - 0.05:
                # Same request id: if the first attempt did commit, the state machine answers
                # with its recorded result instead of applying twice.
                await asyncio.sleep(0.05)
                continue
            raise NoLeader() if error in _RETRYABLE else APIError(f"raft error {error}", 500)

    def _enqueue(self, blob: bytes, fut: asyncio.Future[tuple[Any, int]]) -> None:
        """Group commit: writes that arrive in the same loop iteration share one Raft entry.

        Each Raft entry costs pysyncobj a pickle, a network round to the followers and a journal
        append; under concurrency that per-entry cost, not the state machine, is the ceiling.
        Every command keeps its own request id, so dedup and retries work per command.
        """
        self._batch.append((blob, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_batch)

    def _flush_batch(self) -> None:
        self._flush_scheduled = False
        while self._batch:
            size, take = 0, 0
            for blob, _ in self._batch[:MAX_BATCH]:
                size += len(blob)
                if take and size > MAX_BATCH_BYTES:
                    break
                take += 1
            batch, self._batch = self._batch[:take], self._batch[take:]
            if len(batch) == 1:
                blob, fut = batch[0]

                def single(result: Any, error: int, fut: asyncio.Future[tuple[Any, int]] = fut) -> None:
                    self.handoff.post(_settle, fut, result, error)

                self._consumer.apply_command(blob, callback=single)
                continue
            blob = b'{"op":"batch","Commands":[' + b",".join(b for b, _ in batch) + b"]}"
            futures = [f for _, f in batch]

            def many(result: Any, error: int, futures: list[asyncio.Future[tuple[Any, int]]] = futures) -> None:
                self.handoff.post(_settle_batch, futures, result, error)

            self._consumer.apply_command(blob, callback=many)

    # -- status -----------------------------------------------------------------------------

    def leader(self) -> str | None:
        node = self._node
        if node is None:
            return None
        leader = node._getLeader()
        return str(leader.address) if leader is not None else None

    def peers(self) -> list[str]:
        node = self._node
        if node is None:
            return list(self.settings.peers)
        return sorted([self.self_addr] + [str(n.address) for n in node.otherNodes])

    def last_contact_ms(self) -> int:
        if self.is_leader():
            return 0
        return int((time.monotonic() - self._last_contact) * 1000)

    def status(self) -> dict[str, Any]:
        node = self._node
        if node is None:
            return {"state": "starting"}
        raw = node.getStatus()
        return {
            "state": {0: "follower", 1: "candidate", 2: "leader"}.get(raw["state"], str(raw["state"])),
            "term": raw["raft_term"],
            "leader": self.leader(),
            "commit_index": raw["commit_idx"],
            "last_applied": raw["last_applied"],
            "log_len": raw["log_len"],
            "has_quorum": raw["has_quorum"],
            "tick_errors": node.tick_errors,
            "acks_skipped": node.acks_skipped,
            "wedged": self.wedged_reason,
            "partners": {
                str(n.address): node.isNodeConnected(n) for n in node.otherNodes
            },
        }

    def health(self) -> tuple[bool, str]:
        if self.wedged_reason:
            return False, self.wedged_reason
        if self._node is not None and self.leader() is None:
            return False, "no cluster leader"
        return True, "raft healthy"

    async def _watch(self) -> None:
        """The wedge detector: apply stuck below commit, or the tick thread failing."""
        seen_errors = 0
        seen_leader: str | None = None
        while True:
            await asyncio.sleep(1.0)
            node = self._node
            if node is None:
                continue
            try:
                raw = node.getStatus()
            except Exception:
                continue
            now = time.monotonic()
            leader = str(raw["leader"].address) if raw["leader"] is not None else None
            if leader is not None and leader != seen_leader:  # sampled each second: flaps inside one are missed
                seen_leader = leader
                metrics.RAFT_LEADER_CHANGES.inc()
            if raw["leader"] is not None and (raw["state"] == 2 or node.isNodeConnected(raw["leader"])):
                self._last_contact = now
            applied, commit = raw["last_applied"], raw["commit_idx"]
            last_applied, _last_commit, since = self._progress
            if applied >= commit or applied != last_applied:
                self._progress = (applied, commit, now)
                stuck = False
            else:
                stuck = now - since > 10.0
            reasons = []
            if stuck:
                reasons.append(f"apply stuck at {applied} below commit index {commit} for {now - since:.0f}s")
            if self._consumer is not None and self._consumer.corrupt_entries:
                reasons.append(
                    f"{self._consumer.corrupt_entries} damaged log entries skipped, this replica may have "
                    f"diverged: {self._consumer.last_corruption}"
                )
            if node.tick_errors > seen_errors + 20:
                reasons.append(f"raft tick thread raised {node.tick_errors} times: {node.last_tick_error.strip()[-300:]}")
            if not reasons and node.tick_errors == seen_errors:
                self.wedged_reason = ""
            elif reasons:
                self.wedged_reason = "; ".join(reasons)
                log.error("raft node looks wedged: %s (see docs/operations.md, 'Wipe and rejoin')", self.wedged_reason)
            seen_errors = node.tick_errors if not reasons else seen_errors

    def _flush_loop(self) -> None:
        """Bound what a power loss can take: msync the journal and fsync its files periodically."""
        journal_path = os.path.join(self.settings.data_dir or "", "raft.journal")
        while not self._closing.wait(self.settings.flush_interval):
            node = self._node
            try:
                raft_log = getattr(node, "_SyncObj__raftLog", None)
                if raft_log is not None and hasattr(raft_log, "flush"):
                    raft_log.flush()
                for path in (journal_path, journal_path + ".meta", os.path.join(self.settings.data_dir or "", "raft.dump")):
                    if os.path.exists(path):
                        fd = os.open(path, os.O_RDONLY)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
            except FileNotFoundError:
                continue  # a file replaced by compaction between the check and the open
            except OSError as exc:
                if self._closing.is_set():
                    return  # files closed under us by a shutdown
                # A failed fsync may have dropped the dirty pages it could not write (Linux marks
                # them clean), so carrying on would let a power loss take acknowledged writes.
                stop_on_storage_failure("flushing the Raft journal to disk", journal_path, exc)
            except Exception as exc:  # noqa: BLE001 - e.g. the journal closed under us at shutdown
                log.warning("journal flush failed: %s", exc)

    # -- membership ---------------------------------------------------------------------------

    async def _membership(self, method: str, addr: str, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Any, int]] = loop.create_future()

        def done(result: Any, error: int) -> None:
            loop.call_soon_threadsafe(_settle, fut, result, error)

        getattr(self._node, method)(addr, callback=done)
        try:
            _result, error = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise APIError(f"timed out changing membership ({method} {addr})", 500) from None
        if error != 0:
            raise APIError(f"membership change {method} {addr} failed with raft error {error}", 500)

    async def add_peer(self, addr: str) -> None:
        if addr in self.peers():
            return
        await self._membership("addNodeToCluster", addr)

    async def remove_peer(self, addr: str) -> None:
        if addr not in self.peers():
            raise APIError(f"address {addr!r} is not a Raft peer", 400)
        await self._membership("removeNodeFromCluster", addr)

    async def transfer_leadership(self) -> None:
        if not self.is_leader():
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Any, int]] = loop.create_future()
        self._node.transferLeadership(callback=lambda r, e: loop.call_soon_threadsafe(_settle, fut, r, e))
        try:
            await asyncio.wait_for(fut, 5.0)
        except TimeoutError:
            pass
        for _ in range(50):
            if not self.is_leader():
                return
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        self._closing.set()
        if self._monitor:
            self._monitor.cancel()
        node = self._node
        if node is not None:
            await asyncio.to_thread(node.destroy_synchronous)
            self._node = None


def _settle(fut: asyncio.Future[tuple[Any, int]], result: Any, error: int) -> None:
    if not fut.done():
        fut.set_result((result, error))


def _settle_batch(futures: list[asyncio.Future[tuple[Any, int]]], result: Any, error: int) -> None:
    results = result.get("value") if error == 0 and isinstance(result, dict) and result.get("batch") else None
    for i, fut in enumerate(futures):
        if results is not None and i < len(results):
            _settle(fut, results[i], 0)
        elif error == 0:  # a batch the state machine could not take apart: each caller sees why
            _settle(fut, result, 0)
        else:
            _settle(fut, None, error)
