"""Per-message seals: every request message of a keyed mesh, unary or streamed, ends with field
2047 (unknown to the schema, so a keyless peer ignores it) holding its time, a nonce and a MAC of
the message's bytes before the seal, bound to the method and the sender. The server checks it on the
raw bytes before it parses them (`sealed_handler`)."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import secrets
import struct
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
from cryptography.hazmat.primitives.poly1305 import Poly1305
from google.protobuf.message import Message

log = logging.getLogger("mesh.auth")
Context = grpc.aio.ServicerContext[Message, Message]

REFUSAL = "wrong or missing mesh key: start every peer with the same --mesh-key"
BAD_MESSAGE = "a message failed its mesh-key seal (altered, replayed or unsigned): start every peer with the same --mesh-key"

# the seal: field 2047, length-delimited (tag varint 0xFA 0x7F), 40 bytes: time (f64), nonce, tag
SEAL_PREFIX = b"\xfa\x7f\x28"
TAG_LEN = 16
SEAL_LEN = len(SEAL_PREFIX) + 8 + 16 + TAG_LEN


def seal(key: bytes, method: str, node: str, body: bytes, *, now: float | None = None,
         nonce: bytes | None = None) -> bytes:
    """The seal to append to `body`, a serialized request of `method` sent by `node`."""
    return _seal_parts(key, method, node, [body], now=now, nonce=nonce)


def _seal_parts(key: bytes, method: str, node: str, parts: list[bytes | memoryview], *,
                now: float | None = None, nonce: bytes | None = None) -> bytes:
    head = struct.pack(">d", time.time() if now is None else now) + (nonce or secrets.token_bytes(16))
    mac = Poly1305(_one_time_key(key, method, node, head))
    for p in parts:  # the MAC of the parts' concatenation, without making it
        mac.update(p)
    return SEAL_PREFIX + head + mac.finalize()


def _seal_mac(key: bytes, method: str, node: str, head: bytes, body: bytes | memoryview) -> bytes:
    return Poly1305.generate_tag(_one_time_key(key, method, node, head), body)


def _one_time_key(key: bytes, method: str, node: str, head: bytes) -> bytes:
    # Poly1305 under a one-time key bound to method, sender, time and nonce: HMAC-SHA256 of a whole
    # frame costs ~0.8 ms per 300 KB on a CPU without SHA extensions, Poly1305 a tenth of that
    return hmac.new(key, f"together-msg|{method}|{node}|".encode() + head, hashlib.sha256).digest()


def sealed(key: bytes, method: str, node: str, msg: Any) -> Any:
    """A copy of `msg` with its seal as an unknown field (serialized last); the caller's message is
    left alone (it may be sent to several peers)."""
    if isinstance(msg, bytes):  # a caller's own serializer: the bytes are the body
        return msg + seal(key, method, node, msg)
    if not isinstance(msg, Message):
        return msg
    body = msg.SerializeToString()  # an old seal of a relayed message is just part of the body
    return type(msg).FromString(body + seal(key, method, node, body))


def sealed_bytes(key: bytes | None, method: str, node: str, msg: Message,
                 payload: bytes | memoryview = b"") -> bytes:
    """`msg` serialized once with `payload` appended as its field 6 (a Frame's `data`: protobuf
    takes a field that comes after the others), then its seal when there is a key: what the
    long-lived streams send. One copy of the payload, no parse of the sealed message."""
    parts: list[bytes | memoryview] = [msg.SerializeToString()]
    if len(payload):
        n, head = len(payload), bytearray(b"\x32")  # field 6, length-delimited, then its length
        while n > 0x7F:
            head.append(n & 0x7F | 0x80)
            n >>= 7
        head.append(n)
        parts += [bytes(head), payload]
    if key is not None:
        parts.append(_seal_parts(key, method, node, parts))
    return b"".join(parts)


async def _refuse_message(context: Context, method: str, reason: str) -> NoReturn:
    log.warning("refused a message of %s from %s: %s", method, context.peer(), reason)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, BAD_MESSAGE)


def sealed_handler(handler: grpc.RpcMethodHandler, method: str, open_: Callable[[bytes], Any]) -> grpc.RpcMethodHandler:
    """`handler` taking raw bytes and checking each request's seal before it parses and serves it."""
    async def one(raw: bytes, context: Context) -> Any:
        got = open_(raw)
        if isinstance(got, str):
            await _refuse_message(context, method, got)
        return got

    async def each(raws: AsyncIterable[bytes], context: Context) -> AsyncIterator[Any]:
        async for raw in raws:
            yield await one(raw, context)

    kind = (bool(handler.request_streaming), bool(handler.response_streaming))
    inner: Any = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                  (True, False): handler.stream_unary, (True, True): handler.stream_stream}[kind]

    async def arg(req: Any, ctx: Context) -> Any:
        return each(req, ctx) if kind[0] else await one(req, ctx)

    async def gen(req: Any, ctx: Context) -> AsyncIterator[Any]:
        async for r in inner(await arg(req, ctx), ctx):
            yield r

    async def call(req: Any, ctx: Context) -> Any:
        return await inner(await arg(req, ctx), ctx)

    behavior = gen if inspect.isasyncgenfunction(inner) else call
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[kind](behavior, None, handler.response_serializer)
