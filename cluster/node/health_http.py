"""The node's monitoring port: ``GET /metrics`` (Prometheus) and ``GET /health``, over
a small HTTP/1.1 server on trio streams.

It runs as a task in the node's nursery, like the client server, and answers on the
event loop: a scrape reads the node's state between two of its steps, never from
another thread. Each connection carries one request (the answer says
``Connection: close``); a request must arrive whole within :data:`REQUEST_TIMEOUT_S`
and fit in :data:`MAX_REQUEST_BYTES`, and at most :data:`MAX_CONNECTIONS` are served at
once (more are closed at accept), so a slow or hostile peer holds a few file
descriptors at most and never delays the node's clients.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Final

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from cluster.node.health import Health, judge_health
from cluster.node.role import describe

if TYPE_CHECKING:
    from cluster.node.lifecycle import Node

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT_S",
    "HttpAnswer",
    "http_get",
    "node_health",
    "serve_http",
    "serve_monitoring",
]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES: Final = 8192
"""Request line and headers together; a scrape sends a few hundred bytes."""
REQUEST_TIMEOUT_S: Final = 10.0
"""A request not received whole by then is dropped (Prometheus' default scrape timeout)."""
MAX_CONNECTIONS: Final = 32
"""Monitoring connections served at once; one more is closed as it is accepted."""

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@attrs.frozen
class HttpAnswer:
    status: int
    content_type: str
    body: bytes

    @classmethod
    def text(cls, status: int, text: str) -> HttpAnswer:
        return cls(status, "text/plain; charset=utf-8", text.encode())


Route = Callable[[], HttpAnswer]


def node_health(node: Node) -> Health | None:
    """The node's health now, or None while it has not opened its store yet."""
    if node.store is None or node.server is None or node.topics is None:
        return None
    refuses = node.role.write_refusal(node.epoch) is not None
    return judge_health(
        node.node_status(),
        write_refusal=f"{describe(node.role)} takes no writes" if refuses else None,
        shutting_down=node.server.draining,
    )


def _health_answer(node: Node) -> HttpAnswer:
    health = node_health(node)
    if health is None:
        body = {"status": "unavailable", "node": node.config.node.name, "reason": "starting"}
        return HttpAnswer(503, "application/json", json.dumps(body).encode())
    return HttpAnswer(
        200 if health.healthy else 503, "application/json", json.dumps(health.to_json()).encode()
    )


def _metrics_answer(node: Node) -> HttpAnswer:
    assert node.metrics is not None, "the monitoring port runs only with metrics on"
    return HttpAnswer(200, CONTENT_TYPE_LATEST, node.metrics.exposition())


async def serve_monitoring(
    node: Node, host: str, port: int, *, task_status: trio.TaskStatus[tuple[str, int]]
) -> None:
    """Serve ``/metrics`` and ``/health`` of ``node`` on ``host:port`` (0: a free port)
    until cancelled; report ``(host, port)`` with the port really bound."""
    routes: dict[str, Route] = {
        "/metrics": partial(_metrics_answer, node),
        "/health": partial(_health_answer, node),
    }
    await serve_http(host, port, routes, task_status=task_status)


async def serve_http(
    host: str,
    port: int,
    routes: Mapping[str, Route],
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET``/``HEAD`` of each path in ``routes`` on ``host:port`` until cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics_listening host=%s port=%d paths=%s", host, bound, ",".join(sorted(routes)))
    slots = trio.Semaphore(MAX_CONNECTIONS)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, routes, slots)
        task_status.started((host, bound))


async def _accept_loop(
    listener: trio.SocketListener, routes: Mapping[str, Route], slots: trio.Semaphore
) -> None:
    async with listener, trio.open_nursery() as connections:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of file descriptors: the node's clients come first
                log.warning("metrics_accept_failed error=%s", exc)
                await trio.sleep(0.1)
                continue
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                await stream.aclose()
                continue
            connections.start_soon(_serve_one, stream, routes, slots)


async def _serve_one(
    stream: trio.SocketStream, routes: Mapping[str, Route], slots: trio.Semaphore
) -> None:
    try:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                request = await _read_head(stream)
                answer, head = _route(request, routes)
                await stream.send_all(_encode(answer, head=head))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return  # the peer went away; nothing to answer
    finally:
        slots.release()


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers, or None when they do not fit the limit (what came
    before an early EOF is returned as it is: it answers 400 unless it is whole)."""
    data = bytearray()
    while (end := data.find(b"\r\n\r\n")) < 0:
        if len(data) > MAX_REQUEST_BYTES:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return bytes(data)
        data += chunk
    return bytes(data[:end]) if end <= MAX_REQUEST_BYTES else None


def _route(request: bytes | None, routes: Mapping[str, Route]) -> tuple[HttpAnswer, bool]:
    """The answer to ``request`` and whether it is a ``HEAD`` (headers only)."""
    if request is None:
        return HttpAnswer.text(431, f"request headers over {MAX_REQUEST_BYTES} bytes\n"), False
    line = request.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return HttpAnswer.text(400, "expected an HTTP/1.x request line\n"), False
    method, target, _version = parts
    head = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return HttpAnswer.text(405, f"{method} is not served here: use GET\n"), False
    route = routes.get(target.split("?", 1)[0])
    if route is None:
        paths = ", ".join(sorted(routes))
        return HttpAnswer.text(404, f"{target} is not served here; the paths are {paths}\n"), head
    try:
        return route(), head
    except Exception as exc:  # a bug in reading the node must not stop the node
        log.error("metrics_route_failed path=%s error=%r", target, exc, exc_info=exc)
        return HttpAnswer.text(
            500, f"internal error answering {target}; the node logged it\n"
        ), head


def _encode(answer: HttpAnswer, *, head: bool) -> bytes:
    reason = _REASONS.get(answer.status, "")
    headers = (
        f"HTTP/1.1 {answer.status} {reason}\r\n"
        f"Content-Type: {answer.content_type}\r\n"
        f"Content-Length: {len(answer.body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return headers if head else headers + answer.body


async def http_get(host: str, port: int, path: str) -> HttpAnswer:
    """``GET path`` from a monitoring port (ours or any HTTP/1.x server that closes after
    answering): the launcher, health checks and tests read ``/health`` and ``/metrics``
    with it. Raises ``OSError`` when nothing listens, ``ValueError`` on a garbled answer;
    the caller bounds the time (``trio.fail_after``)."""
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, separator, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not separator or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer from {host}:{port}{path}: {bytes(data[:80])!r}")
    content_type = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            content_type = value.strip()
    return HttpAnswer(int(parts[1]), content_type, body)
