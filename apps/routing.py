"""Several models in one mesh: any API peer answers a request for another ring's model by passing the
HTTP request on to an API peer of that ring, and its answer (streamed chunk by chunk) back.

A middleware rather than code in each handler: chat completions, completions, Anthropic messages,
their token count and responses all name their model in the JSON body's `model`, and none of them
needs anything of this peer when another ring serves that model (no tokenizer: the other ring's API
peer tokenizes with its own). It runs after the API key check, so a caller without the key learns
nothing about the other rings; the caller's own key headers go on with the request."""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from protos import together_pb2 as pb

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROUTED = {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses"}
PROXIED = "X-Together-Proxied-By"  # set on a passed-on request (never passed on twice) and on its answer
ROUTED_TO = "X-Together-Routed-To"  # on the answer: the API peer (host:port) of the ring that served it
# hop-by-hop and length headers are the proxy's own business on each leg (RFC 9110 7.6.1)
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length"}
CLIENT = web.AppKey("routing_client", aiohttp.ClientSession)


def rings(plan: pb.Plan) -> list[pb.Plan]:
    """This peer's ring first, then the mesh's other rings (one per model)."""
    return [plan, *plan.rings]


def api_peers(ring: pb.Plan) -> list[str]:
    """host:port of the ring's API peers (its own model's peers that serve HTTP), oldest first."""
    peers = [p for p in ring.peers if p.api and (p.model == ring.model or not p.model)]
    return [p.api for p in sorted(peers, key=lambda p: (p.started_at, p.node_id))]


def ring_of(plan: pb.Plan, model: str) -> pb.Plan | None:
    """Another ring of the mesh that serves `model` (its base, before any '+ADAPTER')."""
    base = model.partition("+")[0]
    return next((r for r in plan.rings if r.model == base), None)


def ring_items(plan: pb.Plan, known: dict[str, pb.PeerInfo]) -> list[dict[str, Any]]:
    """A ring's stages as /health and /v1/mesh list them (its `ring`)."""
    peers = {p.node_id: p for p in plan.peers}
    out = []
    for st in plan.stages:
        p = peers.get(st.node_id) or known.get(st.node_id)
        out.append({"node_id": st.node_id, "name": p.name if p else "?", "backend": p.backend if p else "?",
                    "address": p.address if p else "", "start": st.start, "end": st.end,
                    # for the page: the peer's own API (host:port, "" if it serves none), its stage's
                    # recent speed and the memory it offers
                    "api": p.api if p else "", "tokens_per_s": round(p.tokens_per_s, 2) if p else 0.0,
                    "free_memory": int(p.free_memory) if p else 0,
                    # ready only once it holds exactly the assigned range (not while reloading)
                    "ready": bool(p and p.ready and (p.start, p.end) == (st.start, st.end)),
                    # a tensor-parallel stage: its peers in rank order (the leader first)
                    "tp_members": [getattr(peers.get(n) or known.get(n), "name", "?") for n in st.tp_members]})
    return out


def plan_adapters(plan: pb.Plan, known: dict[str, pb.PeerInfo]) -> list[str]:
    """Adapters every stage of a ring has loaded: the ones its requests can use."""
    infos = {**known, **{p.node_id: p for p in plan.peers}}
    common: set[str] | None = None
    for st in plan.stages:
        have = set(filter(None, infos[st.node_id].adapters.split(","))) if st.node_id in infos else set()
        common = have if common is None else common & have
    return sorted(common or ())


def rings_view(plan: pb.Plan, known: dict[str, pb.PeerInfo], own_adapters: list[str]) -> list[dict[str, Any]]:
    """Every ring of the mesh as /v1/mesh's `rings` lists it, this peer's first."""
    out = []
    for i, r in enumerate(rings(plan)):
        out.append({"model": r.model, "complete": r.complete, "missing": r.missing, "epoch": r.epoch,
                    "num_layers": r.num_layers, "ring": ring_items(r, known if i == 0 else {}),
                    "api": [f"http://{a}" for a in api_peers(r)],
                    "adapters": own_adapters if i == 0 else plan_adapters(r, {}), "self": i == 0})
    return out


class Router:
    """Picks an API peer of a ring (round robin over those that answer) and passes requests on."""

    def __init__(self, plan: Callable[[], pb.Plan], me: Callable[[], str], served: Callable[[], list[str]]) -> None:
        # plan: this peer's plan (its rings the others); me: its API's host:port; served: /v1/models' ids
        self._plan, self._me, self._served = plan, me, served
        self._turn = itertools.count()

    def middleware(self) -> Middleware:
        @web.middleware
        async def route(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method != "POST" or request.path not in ROUTED or PROXIED in request.headers:
                return await handler(request)
            model = await _model_of(request)
            plan = self._plan()
            base = model.partition("+")[0]
            if not model or base == plan.model:
                return await handler(request)  # this ring's model, or none named: the handler answers
            ring = ring_of(plan, model)
            if ring is None:
                return model_not_found(request, model, self._served())
            if not ring.complete:
                return _error(request, 503, f"the ring of {ring.model} is incomplete: {ring.missing}",
                              "service_unavailable", None)
            targets = [a for a in api_peers(ring) if a != self._me()]
            if not targets:
                return _error(request, 503, f"no peer of the {ring.model} ring serves the HTTP API (start one of "
                              f"its peers with --api-port)", "service_unavailable", None)
            return await self._pass_on(request, targets)

        return route

    async def _pass_on(self, request: web.Request, targets: list[str]) -> web.StreamResponse:
        k = next(self._turn)
        body = await request.read()  # cached by aiohttp: the peek above read it already
        headers = {h: v for h, v in request.headers.items() if h.lower() not in _HOP}
        headers[PROXIED] = self._me() or "together"
        session = request.app[CLIENT]
        last = ""
        for i in range(len(targets)):  # the next in turn first; one that does not answer: the one after
            target = targets[(k + i) % len(targets)]
            try:
                upstream = await session.post(f"http://{target}{request.path_qs}", data=body, headers=headers)
            except (aiohttp.ClientError, OSError) as e:
                last = f"{target}: {e}"
                log.info("API peer %s of another ring did not answer: %s", target, e)
                continue
            try:
                resp = await _relay(request, upstream, target)
            except BaseException:
                upstream.close()  # the caller went away: the other ring's API peer sees it go and stops
                raise
            upstream.release()
            return resp
        return _error(request, 502, f"no API peer of that model's ring answered ({last})", "service_unavailable", None)


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse, target: str) -> web.StreamResponse:
    """The upstream answer, its chunks written as they arrive (a stream stays a stream)."""
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for h, v in upstream.headers.items():
        if h.lower() not in _HOP:
            resp.headers.add(h, v)
    resp.headers[ROUTED_TO] = target
    await resp.prepare(request)
    async for chunk in upstream.content.iter_any():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def _model_of(request: web.Request) -> str:
    """The body's `model`, or "" when the body says none (the handler then answers with its 400)."""
    try:
        body: Any = json.loads(await request.read())
    except (ValueError, RecursionError):
        return ""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


def _error(request: web.Request, status: int, message: str, type_: str, code: str | None) -> web.Response:
    """An error in the API's own shape: Anthropic's on its paths, else OpenAI's."""
    if request.path.startswith("/v1/messages"):
        kind = {404: "not_found_error", 503: "overloaded_error"}.get(status, "api_error")
        return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status)
    return web.json_response({"error": {"message": message, "type": type_, "param": "model", "code": code}},
                             status=status)


def model_not_found(request: web.Request, model: str, served: list[str]) -> web.Response:
    return _error(request, 404, f"the model '{model}' does not exist here; GET /v1/models lists them "
                                f"({', '.join(served)})", "invalid_request_error", "model_not_found")


async def client_ctx(app: web.Application) -> Any:
    """One HTTP client for the app's life (no total timeout: a proxied stream lasts as long as it lasts)."""
    app[CLIENT] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                                        auto_decompress=False)
    yield
    await app[CLIENT].close()


