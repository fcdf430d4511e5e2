"""A small typed async etcd v3 client over etcd's JSON gateway (httpx, runs under trio).

Why our own: no etcd client runs under trio; the gateway is plain HTTP/JSON, so this
module stays small. Facts of the gateway it relies on: keys and values are base64,
int64 fields are strings, zero values are omitted, a watch is a chunked stream of JSON
objects (a chunk is not a message, so the stream is parsed incrementally).

Error contract (what a caller may conclude):
- ``EtcdUnavailable``: no endpoint accepted the connection; the request was NOT applied.
- ``EtcdTimeout``: the request may or may not have been applied (outcome unknown): read
  back before acting on it.
- ``EtcdCompacted``: a watch or read asked for a revision etcd has compacted: re-list.
- ``EtcdLeaseNotFound``: the lease expired or was revoked.
- ``EtcdRequestError``: etcd refused the request (a bug or a misconfiguration).

Concurrency: one ``EtcdClient`` may be used by many trio tasks at once (httpx pools
connections). A ``Watch`` belongs to the one task iterating it.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, NoReturn

import attrs
import httpx
import trio

from storage.backoff import Backoff

__all__ = [
    "Compare",
    "CompareResult",
    "CompareTarget",
    "DeleteOp",
    "DeleteResponse",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdLeaseNotFound",
    "EtcdRequestError",
    "EtcdTimeout",
    "EtcdUnavailable",
    "EventType",
    "KeyValue",
    "Lease",
    "LeaseStatus",
    "PutOp",
    "PutResponse",
    "RangeOp",
    "RangeResponse",
    "TxnOp",
    "TxnResponse",
    "TxnResult",
    "Watch",
    "WatchEvent",
    "prefix_range_end",
]

log = logging.getLogger(__name__)

GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14
COMPACTED_MESSAGE = "required revision has been compacted"
TIMED_OUT_MESSAGE = "request timed out"
LEASE_NOT_FOUND_MESSAGE = "requested lease not found"
MAX_WATCH_MESSAGE_CHARS = 64 << 20
"""A watch message larger than this is garbage, not a message still arriving."""


class EtcdError(Exception):
    """Base of every error this client raises."""


class EtcdUnavailable(EtcdError):
    """No endpoint could be reached: the request was not applied."""


class EtcdTimeout(EtcdError):
    """No answer in time, or the connection broke after sending: outcome unknown."""


class EtcdCompacted(EtcdError):
    """The revision asked for was compacted; ``compact_revision`` is the oldest kept."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class EtcdStreamEnded(EtcdError):
    """The server ended a watch stream (e.g. it shut down); the watch reconnects."""


class EtcdLeaseNotFound(EtcdError):
    """The lease does not exist (expired or revoked)."""


class EtcdRequestError(EtcdError):
    """etcd refused the request; ``code`` is the gRPC code, ``status`` the HTTP status."""

    def __init__(self, message: str, code: int | None, status: int | None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\x00"  # every key
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _int(body: dict[str, Any], field: str) -> int:
    return int(body.get(field, 0))


@attrs.frozen
class KeyValue:
    """One key as etcd stores it. Revisions are etcd's cluster-wide counters."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(body.get("key")).decode(errors="surrogateescape"),
            value=_unb64(body.get("value")),
            create_revision=_int(body, "create_revision"),
            mod_revision=_int(body, "mod_revision"),
            version=_int(body, "version"),
            lease=_int(body, "lease"),
        )


class CompareTarget(enum.Enum):
    VERSION = "VERSION"
    CREATE = "CREATE"
    MOD = "MOD"
    VALUE = "VALUE"
    LEASE = "LEASE"


class CompareResult(enum.Enum):
    EQUAL = "EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"
    NOT_EQUAL = "NOT_EQUAL"


_TARGET_FIELD = {
    CompareTarget.VERSION: "version",
    CompareTarget.CREATE: "create_revision",
    CompareTarget.MOD: "mod_revision",
    CompareTarget.VALUE: "value",
    CompareTarget.LEASE: "lease",
}


@attrs.frozen
class Compare:
    """One condition of a transaction, e.g. ``Compare.create_revision(key, 0)`` ("absent")."""

    key: str
    target: CompareTarget
    operand: int | bytes
    result: CompareResult = CompareResult.EQUAL

    @classmethod
    def version(
        cls, key: str, operand: int, result: CompareResult = CompareResult.EQUAL
    ) -> Compare:
        return cls(key, CompareTarget.VERSION, operand, result)

    @classmethod
    def create_revision(
        cls, key: str, operand: int, result: CompareResult = CompareResult.EQUAL
    ) -> Compare:
        return cls(key, CompareTarget.CREATE, operand, result)

    @classmethod
    def mod_revision(
        cls, key: str, operand: int, result: CompareResult = CompareResult.EQUAL
    ) -> Compare:
        return cls(key, CompareTarget.MOD, operand, result)

    @classmethod
    def value(
        cls, key: str, operand: bytes, result: CompareResult = CompareResult.EQUAL
    ) -> Compare:
        return cls(key, CompareTarget.VALUE, operand, result)

    def to_json(self) -> dict[str, Any]:
        operand = _b64(self.operand) if isinstance(self.operand, bytes) else str(self.operand)
        if (self.target is CompareTarget.VALUE) != isinstance(self.operand, bytes):
            raise TypeError(f"compare on {self.target.value} needs a bytes operand only for VALUE")
        return {
            "key": _b64(_key_bytes(self.key)),
            "target": self.target.value,
            "result": self.result.value,
            _TARGET_FIELD[self.target]: operand,
        }


@attrs.frozen
class PutOp:
    key: str
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(_key_bytes(self.key)), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return {"request_put": body}


@attrs.frozen
class DeleteOp:
    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_delete_range": _range_body(self.key, self.prefix)}


@attrs.frozen
class RangeOp:
    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_range": _range_body(self.key, self.prefix)}


TxnOp = PutOp | DeleteOp | RangeOp


def _range_body(key: str, prefix: bool) -> dict[str, Any]:
    raw = _key_bytes(key)
    body: dict[str, Any] = {"key": _b64(raw)}
    if prefix:
        body["range_end"] = _b64(prefix_range_end(raw))
    return body


@attrs.frozen
class RangeResponse:
    revision: int
    kvs: tuple[KeyValue, ...]
    count: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RangeResponse:
        return cls(
            revision=_int(body.get("header", {}), "revision"),
            kvs=tuple(KeyValue.from_json(kv) for kv in body.get("kvs", ())),
            count=_int(body, "count"),
        )


@attrs.frozen
class PutResponse:
    revision: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PutResponse:
        return cls(revision=_int(body.get("header", {}), "revision"))


@attrs.frozen
class DeleteResponse:
    revision: int
    deleted: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> DeleteResponse:
        return cls(revision=_int(body.get("header", {}), "revision"), deleted=_int(body, "deleted"))


TxnResponse = RangeResponse | PutResponse | DeleteResponse


@attrs.frozen
class TxnResult:
    """``succeeded`` says which branch ran; ``responses`` answer its ops in order;
    ``revision`` is the store revision after the transaction."""

    succeeded: bool
    responses: tuple[TxnResponse, ...]
    revision: int


def _txn_response(body: dict[str, Any]) -> TxnResponse:
    if "response_range" in body:
        return RangeResponse.from_json(body["response_range"])
    if "response_put" in body:
        return PutResponse.from_json(body["response_put"])
    if "response_delete_range" in body:
        return DeleteResponse.from_json(body["response_delete_range"])
    raise EtcdRequestError(f"unexpected txn response {body!r}", None, None)


@attrs.frozen
class Lease:
    """A granted lease: keys put with ``id`` vanish ``ttl_s`` after the last keepalive."""

    id: int
    ttl_s: int


@attrs.frozen
class LeaseStatus:
    """A lease's remaining time; ``ttl_s`` is -1 when the lease no longer exists."""

    id: int
    ttl_s: int
    granted_ttl_s: int
    keys: tuple[str, ...]


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@attrs.frozen
class WatchEvent:
    """One change; ``revision`` is the store revision of the change (``kv.mod_revision``).
    A DELETE carries the key and its revision with an empty value."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@attrs.define
class EtcdClient:
    """Async client of one etcd cluster given by its client URLs.

    A connection failure moves to the next endpoint within the call's deadline (safe:
    nothing was sent). Every call has a deadline (``timeout_s`` or the client's
    ``request_timeout_s``). Use as ``async with EtcdClient([...]) as etcd:``.
    """

    endpoints: Sequence[str]
    request_timeout_s: float = 1.0
    _http: httpx.AsyncClient = attrs.field(init=False)
    _current: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("EtcdClient needs at least one endpoint, e.g. http://127.0.0.1:2379")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        self.endpoints = [e.rstrip("/") for e in self.endpoints]
        self._http = httpx.AsyncClient(timeout=None)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def endpoint(self) -> str:
        """The endpoint the next request goes to first."""
        return self.endpoints[self._current]

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)

    async def _call(self, path: str, body: dict[str, Any], timeout_s: float | None) -> Any:
        """POST ``body`` to ``path``; returns the decoded JSON answer or raises a typed error.

        A refused or timed-out connect tries the next endpoint (nothing was sent), each
        connect bounded by a share of the deadline so one black-holed member cannot use
        it all. After a timeout the next call starts at the next endpoint, since a member
        cut off from its quorum keeps timing out."""
        limit_s = self.request_timeout_s if timeout_s is None else timeout_s
        timeout = httpx.Timeout(None, connect=limit_s / len(self.endpoints))
        sending = False
        failures: list[str] = []
        with trio.move_on_after(limit_s):
            while len(failures) < len(self.endpoints):
                url = self.endpoint + path
                request = self._http.build_request("POST", url, json=body, timeout=timeout)
                try:
                    sending = True
                    answer = await self._http.send(request)
                except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                    sending = False
                    failures.append(f"{url}: {error!r}")
                    self._rotate()
                    continue
                except httpx.TransportError as error:
                    self._rotate()
                    raise EtcdTimeout(
                        f"etcd {path} at {url} broke off: {error!r}; outcome unknown"
                    ) from error
                return _decode(path, answer)
            raise EtcdUnavailable(
                f"cannot reach etcd ({'; '.join(failures)}); is etcd running "
                "(tidelog cluster up starts one) and are the endpoints right?"
            )
        if not sending:
            raise EtcdUnavailable(f"cannot reach etcd at {list(self.endpoints)} in {limit_s}s")
        self._rotate()
        raise EtcdTimeout(f"etcd {path} gave no answer in {limit_s}s; outcome unknown")

    async def get(self, key: str, *, timeout_s: float | None = None) -> KeyValue | None:
        """The key, or None when absent (a linearizable read)."""
        answer = await self.range(key, timeout_s=timeout_s)
        return answer.kvs[0] if answer.kvs else None

    async def range(
        self,
        key: str,
        *,
        prefix: bool = False,
        revision: int = 0,
        timeout_s: float | None = None,
    ) -> RangeResponse:
        """The key (or every key under ``prefix``), at ``revision`` if given (0: latest)."""
        body = _range_body(key, prefix)
        if revision:
            body["revision"] = str(revision)
        return RangeResponse.from_json(await self._call("/v3/kv/range", body, timeout_s))

    async def put(
        self, key: str, value: bytes, *, lease: int = 0, timeout_s: float | None = None
    ) -> PutResponse:
        body = PutOp(key, value, lease).to_json()["request_put"]
        return PutResponse.from_json(await self._call("/v3/kv/put", body, timeout_s))

    async def delete(
        self, key: str, *, prefix: bool = False, timeout_s: float | None = None
    ) -> DeleteResponse:
        body = _range_body(key, prefix)
        return DeleteResponse.from_json(await self._call("/v3/kv/deleterange", body, timeout_s))

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
        *,
        timeout_s: float | None = None,
    ) -> TxnResult:
        """If every ``compare`` holds, run ``success``, else ``failure``, atomically.

        On EtcdTimeout the transaction may have committed: read back before acting."""
        body = {
            "compare": [c.to_json() for c in compare],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure],
        }
        answer = await self._call("/v3/kv/txn", body, timeout_s)
        return TxnResult(
            succeeded=bool(answer.get("succeeded", False)),
            responses=tuple(_txn_response(r) for r in answer.get("responses", ())),
            revision=_int(answer.get("header", {}), "revision"),
        )

    async def lease_grant(self, ttl_s: int, *, timeout_s: float | None = None) -> Lease:
        if ttl_s < 1:
            raise ValueError(f"an etcd lease TTL is whole seconds >= 1, got {ttl_s}")
        answer = await self._call("/v3/lease/grant", {"TTL": str(ttl_s)}, timeout_s)
        if answer.get("error"):
            raise EtcdRequestError(f"lease grant refused: {answer['error']}", None, None)
        return Lease(id=_int(answer, "ID"), ttl_s=_int(answer, "TTL"))

    async def lease_keepalive_once(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        """Renew the lease once; returns the TTL it now has. The caller measures the send
        time itself (the fencing deadline counts from before the request left)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)}, timeout_s)
        ttl_s = _int(answer.get("result", {}), "TTL")
        if ttl_s <= 0:
            raise EtcdLeaseNotFound(f"lease {lease_id} expired or was revoked")
        return ttl_s

    async def lease_revoke(self, lease_id: int, *, timeout_s: float | None = None) -> None:
        """Revoke the lease, deleting its keys. A lease already gone is not an error."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)}, timeout_s)
        except EtcdLeaseNotFound:
            return

    async def lease_time_to_live(
        self, lease_id: int, *, keys: bool = False, timeout_s: float | None = None
    ) -> LeaseStatus:
        body = {"ID": str(lease_id), "keys": keys}
        answer = await self._call("/v3/lease/timetolive", body, timeout_s)
        return LeaseStatus(
            id=lease_id,
            ttl_s=int(answer.get("TTL", 0)),
            granted_ttl_s=_int(answer, "grantedTTL"),
            keys=tuple(_unb64(k).decode(errors="surrogateescape") for k in answer.get("keys", ())),
        )

    async def compact(self, revision: int, *, timeout_s: float | None = None) -> None:
        """Discard history before ``revision`` (tests use it to provoke EtcdCompacted)."""
        await self._call(
            "/v3/kv/compaction", {"revision": str(revision), "physical": True}, timeout_s
        )

    def watch(
        self,
        key: str,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        idle_timeout_s: float = 5.0,
    ) -> Watch:
        """Changes of ``key`` (or under ``prefix``) from ``start_revision`` (0: from now).

        ``async with etcd.watch(k) as watch: async for event in watch: ...``. The watch
        reconnects by itself from the last revision + 1 (with backoff) when the stream
        breaks or stays silent for ``idle_timeout_s``; it raises EtcdCompacted when the
        history it needs is gone (re-list, then watch from the listing's revision + 1).
        """
        return Watch(self, key, prefix, start_revision, idle_timeout_s)

    async def _open_watch_stream(
        self, body: dict[str, Any], idle_timeout_s: float
    ) -> httpx.Response:
        timeout = httpx.Timeout(self.request_timeout_s, read=idle_timeout_s)
        for _ in range(len(self.endpoints)):
            request = self._http.build_request(
                "POST", self.endpoint + "/v3/watch", json=body, timeout=timeout
            )
            try:
                response = await self._http.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                self._rotate()
                continue
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                await response.aclose()
                _raise_for_error(text, response.status_code)
            return response
        raise EtcdUnavailable(f"cannot reach etcd at {list(self.endpoints)} to watch")


def _decode(path: str, answer: httpx.Response) -> Any:
    if answer.status_code == 200:
        try:
            return answer.json()
        except ValueError as error:
            raise EtcdRequestError(
                f"etcd {path} answered non-JSON: {answer.text[:200]!r}", None, 200
            ) from error
    _raise_for_error(answer.text, answer.status_code)


def _raise_for_error(text: str, status: int | None) -> NoReturn:
    """Turn an error answer (HTTP body or a stream message's ``error``) into a typed error."""
    try:
        body = json.loads(text)
    except ValueError:
        body = {"message": text}
    if isinstance(body.get("error"), dict):  # a stream message wraps it
        body = body["error"]
        status = body.get("http_code", status)
        code = body.get("grpc_code")
    else:
        code = body.get("code")
    message = str(body.get("message") or body.get("error") or text)
    if LEASE_NOT_FOUND_MESSAGE in message:
        raise EtcdLeaseNotFound(message)
    if COMPACTED_MESSAGE in message:
        raise EtcdCompacted(message, 0)
    if TIMED_OUT_MESSAGE in message:
        raise EtcdTimeout(f"etcd: {message}; outcome unknown")
    if code == GRPC_UNAVAILABLE:
        raise EtcdUnavailable(f"etcd: {message}")
    raise EtcdRequestError(f"etcd refused the request: {message}", code, status)


@attrs.define
class Watch:
    """One logical watch that survives broken streams. Owned by one task.

    Invariant: ``next_revision`` is the first revision not yet delivered (0 until the
    first stream tells the current revision when started "from now"); every event is
    delivered once, in revision order, across reconnects.
    """

    client: EtcdClient
    key: str
    prefix: bool
    next_revision: int
    idle_timeout_s: float
    _response: httpx.Response | None = None
    _chunks: AsyncIterator[str] | None = None
    _pending: list[WatchEvent] = attrs.field(factory=list)
    _decoder: json.JSONDecoder = attrs.field(factory=json.JSONDecoder)
    _buffer: str = ""
    _backoff: Backoff = attrs.field(factory=lambda: Backoff(0.05, 1.0))
    reconnects: int = 0

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._response is not None:
            response, self._response = self._response, None
            with trio.CancelScope(shield=True):
                await response.aclose()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._pending:
            await self._fill()
        event = self._pending.pop(0)
        self.next_revision = event.revision + 1
        return event

    async def _fill(self) -> None:
        """Read until at least one event is pending, reconnecting as needed."""
        if self._response is None:
            await self._connect()
            return
        try:
            self._handle(await self._next_message())
        except (httpx.TransportError, EtcdStreamEnded, EtcdUnavailable, EtcdTimeout) as error:
            # a broken stream, or the member lost its own backend or quorum (an error
            # message inside the stream): resume from next_revision, elsewhere if possible
            await self._reconnect_later("stream broke", error)

    async def _reconnect_later(self, what: str, error: Exception) -> None:
        log.info(
            "etcd watch %s key=%s next_revision=%s error=%r",
            what,
            self.key,
            self.next_revision,
            error,
        )
        await self.aclose()
        self.client._rotate()
        self.reconnects += 1
        await trio.sleep(self._backoff.next_delay_s())

    async def _connect(self) -> None:
        body: dict[str, Any] = _range_body(self.key, self.prefix)
        if self.next_revision:
            body["start_revision"] = str(self.next_revision)
        body["progress_notify"] = True
        try:
            self._response = await self.client._open_watch_stream(
                {"create_request": body}, self.idle_timeout_s
            )
        except (EtcdUnavailable, EtcdTimeout, httpx.TransportError) as error:
            await self._reconnect_later("cannot connect", error)
            return
        self._buffer = ""
        self._chunks = self._response.aiter_text()

    async def _next_message(self) -> dict[str, Any]:
        """The next complete JSON object of the stream (chunks split and join messages)."""
        while True:
            message = self._complete_message()
            if message is not None:
                return message
            if len(self._buffer) > MAX_WATCH_MESSAGE_CHARS:
                raise EtcdRequestError(
                    f"etcd watch sent {len(self._buffer)} characters without a complete "
                    f"JSON message: {self._buffer[:200]!r}",
                    None,
                    None,
                )
            assert self._chunks is not None
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                raise EtcdStreamEnded("etcd closed the watch stream") from None
            self._buffer += chunk

    def _complete_message(self) -> dict[str, Any] | None:
        """Take one whole JSON object off the buffer, or None if it holds only a part."""
        self._buffer = self._buffer.lstrip()
        if not self._buffer:
            return None
        try:
            message, end = self._decoder.raw_decode(self._buffer)
        except ValueError:
            return None  # incomplete: wait for the next chunk
        self._buffer = self._buffer[end:]
        if not isinstance(message, dict):
            raise EtcdRequestError(f"etcd watch sent a non-object {message!r}", None, None)
        return message

    def _handle(self, message: dict[str, Any]) -> None:
        if "error" in message:
            _raise_for_error(json.dumps(message), None)
        result = message.get("result", {})
        header_revision = _int(result.get("header", {}), "revision")
        if result.get("canceled"):
            compact_revision = _int(result, "compact_revision")
            if compact_revision:
                raise EtcdCompacted(
                    f"etcd compacted history up to {compact_revision}; watch of {self.key} "
                    f"needed {self.next_revision}: re-list and watch again",
                    compact_revision,
                )
            raise EtcdRequestError(
                f"etcd cancelled the watch: {result.get('cancel_reason')}", None, None
            )
        events = result.get("events", ())
        if result.get("created"):
            self._backoff.reset()
            if not self.next_revision:
                self.next_revision = header_revision + 1
            return
        if not events:
            # a progress notification: every change up to header_revision was delivered
            self.next_revision = max(self.next_revision, header_revision + 1)
            return
        for raw in events:
            kv = KeyValue.from_json(raw["kv"])
            if kv.mod_revision < self.next_revision:
                continue  # already delivered before a reconnect
            prev = raw.get("prev_kv")
            self._pending.append(
                WatchEvent(
                    type=EventType(raw.get("type", "PUT")),
                    kv=kv,
                    prev_kv=KeyValue.from_json(prev) if prev else None,
                )
            )
