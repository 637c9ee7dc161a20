"""The simulated API itself: its state and its aiohttp handlers.

Design: ``ApiSimulator`` owns all mutable state of one server (the current
``ServerConfig``, the statistics, the fault injector and the rate windows)
and the aiohttp handlers. Every handler runs on the server's single event
loop, so the state needs no locks; code on other threads reaches it only by
scheduling a call onto that loop, which makes every statistics snapshot
consistent. A request walks one pipeline:

1. counted (``requests``, ``by_route``, ``by_api_key``);
2. authenticated (401) when ``api_key`` is set;
3. admitted or refused by ``max_concurrency`` then ``requests_per_minute``
   (429 with retry headers, not counted in flight);
4. one number drawn from the seeded generator, in arrival order, which
   decides the random fault;
5. body parsed and validated (400), then its input tokens admitted or
   refused by ``tokens_per_minute`` (429);
6. ``latency + latency_per_item * items`` slept, plus, for the routes that
   generate text (chat, completions), the largest ``[[delay:SECONDS]]``
   marker among the inputs;
7. a marker trigger in an input (``[[status:503]]``, ``[[hang]]``...) or else
   the random fault applied; otherwise the deterministic answer computed by
   ``feste.testing._responses``.

With ``rate_limit_headers``, every 200 or 429 answer of an OpenAI route
carries the ``x-ratelimit-*`` headers as of the moment it is sent.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ._answers import RequestError, bad_request, error_payload, json_bytes, retry_headers
from ._batches import BatchService
from ._config import ServerConfig
from ._faults import MALFORMED_BODY, FaultInjector, deep_json_body, drop_connection
from ._limits import RateLimits
from ._parsing import ENDPOINTS, Endpoint
from ._responses import delay_of
from ._stats import Stats, key_label

__all__ = ["ApiSimulator"]

# Answers of OpenAI routes with these statuses carry the x-ratelimit-* headers.
_RATE_HEADER_STATUSES = frozenset({200, 429})

# Only requests of these routes take the [[delay:S]] markers of their inputs: a delay
# stands for a slow generation, and since a chat answer echoes its prompt, markers
# included, embedding that answer must not be slowed down a second time.
_GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v2/chat"})


def _bearer_token(request: web.BaseRequest) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class ApiSimulator:
    """State and handlers of one simulated API; use it only on its event loop.

    ``build_app()`` gives the aiohttp application. ``configure``, ``stats`` and
    ``reset_stats`` must be called on the loop thread (``TestServer`` arranges
    that) or while no loop is serving.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        self._config = config or ServerConfig()
        self._faults = FaultInjector(self._config.seed)
        self._stats = Stats()
        self._in_flight = 0
        # Never reset, so request ids stay unique across stats resets.
        self._sequence = 0
        self._limits = RateLimits()
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self._batches = BatchService(
            {endpoint.route: endpoint for endpoint in ENDPOINTS},
            lambda: self._config,
            self._bill_batch_line,
        )
        self._batches.expire_next(self._config.batch_expire_jobs)

    @property
    def config(self) -> ServerConfig:
        return self._config

    def configure(self, **changes: Any) -> ServerConfig:
        new = self._config.with_changes(**changes)
        if "seed" in changes:
            self._faults.reseed(new.seed)
        if "batch_expire_jobs" in changes:
            self._batches.expire_next(new.batch_expire_jobs)
        self._config = new
        return new

    def stats(self) -> dict[str, Any]:
        return {**self._stats.snapshot(self._in_flight), "batches": self._batches.snapshot()}

    def reset_stats(self) -> None:
        """Zero the statistics and forget which ``[[retry_after:S]]`` texts were answered."""
        # Requests still being served keep counting in flight.
        self._stats = Stats(in_flight=self._in_flight)
        self._faults.forget_markers()
        self._batches.reset()

    def cancel_requests(self) -> None:
        """Cancel every request being served (hangs included): used on shutdown."""
        for task in list(self._handler_tasks):
            task.cancel()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        for endpoint in ENDPOINTS:
            app.router.add_route(endpoint.method, endpoint.route, self._api_handler(endpoint))
        self._batches.add_routes(app, self._batch_handler)
        app.router.add_get("/_stats", self._get_stats)
        app.router.add_get("/stats", self._get_stats)
        app.router.add_post("/_stats/reset", self._post_reset)
        app.router.add_get("/_config", self._get_config)
        app.router.add_post("/_config", self._post_config)
        return app

    # -- control routes ----------------------------------------------------

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=json_bytes(self.stats()), content_type="application/json")

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.Response(body=json_bytes(self.stats()), content_type="application/json")

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.Response(
            body=json_bytes(self._config.as_dict()), content_type="application/json"
        )

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            changes = json.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of knob values")
            config = self.configure(**changes)
        except ValueError as exc:
            return web.Response(
                status=400, body=json_bytes({"error": str(exc)}), content_type="application/json"
            )
        return web.Response(body=json_bytes(config.as_dict()), content_type="application/json")

    # -- Files and Batch API routes ------------------------------------------

    def _batch_handler(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """``handler`` counted and authenticated like the API routes (no limits, no
        random faults: jobs are answered line by line when they finish)."""

        async def handle(request: web.Request) -> web.Response:
            stats = self._stats
            config = self._config
            token = _bearer_token(request)
            route = request.match_info.route.resource
            name = route.canonical if route is not None else request.path
            stats.arrived(name, key_label(token))
            if config.api_key is not None and (
                token is None or not secrets.compare_digest(token.encode(), config.api_key.encode())
            ):
                stats.fault("401")
                stats.answered(401)
                refusal = RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
                return web.Response(
                    status=401,
                    body=json_bytes(error_payload("openai", refusal)),
                    content_type="application/json",
                )
            answer = await handler(request)
            stats.answered(answer.status)
            return answer

        return handle

    def _bill_batch_line(self, endpoint: Endpoint, model: str, payload: dict[str, Any]) -> None:
        if model:
            self._stats.billed(model, *endpoint.billed(payload))

    # -- API routes --------------------------------------------------------

    def _api_handler(
        self, endpoint: Endpoint
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(endpoint, request)

        return handle

    def _answer(
        self,
        stats: Stats,
        endpoint: Endpoint,
        config: ServerConfig,
        body: bytes,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        stats.answered(status)
        if (
            config.rate_limit_headers
            and endpoint.provider == "openai"
            and status in _RATE_HEADER_STATUSES
        ):
            headers = {**(headers or {}), **self._limits.headers(config)}
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )

    def _error(
        self, stats: Stats, endpoint: Endpoint, config: ServerConfig, error: RequestError
    ) -> web.Response:
        headers = None
        if error.retry_after is not None:
            headers = retry_headers(error.retry_after, http_date=config.retry_after_http_date)
        body = json_bytes(error_payload(endpoint.provider, error))
        return self._answer(stats, endpoint, config, body, status=error.status, headers=headers)

    async def _handle(self, endpoint: Endpoint, request: web.Request) -> web.StreamResponse:
        self._sequence += 1
        sequence = self._sequence
        # Captured once: a reset during this request must not receive its counts.
        stats = self._stats
        config = self._config
        token = _bearer_token(request)
        stats.arrived(endpoint.route, key_label(token))

        if config.api_key is not None and (
            token is None or not secrets.compare_digest(token.encode(), config.api_key.encode())
        ):
            stats.fault("401")
            message = (
                "Missing bearer authentication in header"
                if token is None
                else "Incorrect API key provided."
            )
            refusal = RequestError(401, message, code="invalid_api_key")
            return self._error(stats, endpoint, config, refusal)

        # Admission: no await between the checks and the in-flight increment,
        # so concurrent arrivals cannot overshoot the limits.
        limited = self._limits.admit_request(config, self._in_flight)
        if limited is not None:
            stats.fault("limit_429")
            return self._error(stats, endpoint, config, limited)
        draw = self._faults.draw()
        self._in_flight += 1
        if self._in_flight > stats.max_in_flight:
            stats.max_in_flight = self._in_flight
        task = asyncio.current_task()
        if task is not None:
            self._handler_tasks.add(task)
        try:
            return await self._serve(endpoint, request, stats, config, sequence, draw)
        finally:
            self._in_flight -= 1
            if task is not None:
                self._handler_tasks.discard(task)

    async def _serve(
        self,
        endpoint: Endpoint,
        request: web.Request,
        stats: Stats,
        config: ServerConfig,
        sequence: int,
        draw: float,
    ) -> web.StreamResponse:
        try:
            body = json.loads(await request.read()) if endpoint.method == "POST" else None
        except ValueError:
            stats.fault("400")
            return self._error(
                stats, endpoint, config, bad_request("the request body is not valid JSON")
            )
        try:
            parsed = endpoint.parse(body, config)
        except RequestError as error:
            stats.fault("400")
            return self._error(stats, endpoint, config, error)
        limited = self._limits.admit_tokens(config, parsed.tokens)
        if limited is not None:
            stats.fault("limit_429")
            return self._error(stats, endpoint, config, limited)

        delay = config.latency + config.latency_per_item * len(parsed.texts)
        if endpoint.route in _GENERATION_ROUTES:
            delay += delay_of(parsed.texts)
        if delay > 0:
            await asyncio.sleep(delay)

        fault = self._faults.choose(parsed.trigger, draw, config)
        if isinstance(fault, RequestError):
            stats.fault(str(fault.status))
            return self._error(stats, endpoint, config, fault)
        if fault == "hang":
            stats.fault("hang")
            # Then answer normally: a client with a shorter timeout gave up
            # already, and its disconnect cancelled this sleep.
            await asyncio.sleep(config.hang_seconds)
        elif fault == "drop":
            stats.fault("drop")
            return await drop_connection(request)
        elif fault == "malformed":
            stats.fault("malformed")
            return self._answer(stats, endpoint, config, MALFORMED_BODY)
        elif fault == "bad_usage":
            stats.fault("bad_usage")
            payload = parsed.answer(str(sequence))
            endpoint.spoil_usage(payload)
            return self._answer(stats, endpoint, config, json_bytes(payload))
        elif fault == "deep_json":
            stats.fault("deep_json")
            payload = parsed.answer(str(sequence))
            return self._answer(stats, endpoint, config, deep_json_body(payload))

        payload = parsed.answer(str(sequence))
        stats.succeeded(endpoint.route, sequence, parsed.texts)
        if parsed.model:
            stats.billed(parsed.model, *endpoint.billed(payload))
        return self._answer(stats, endpoint, config, json_bytes(payload))
