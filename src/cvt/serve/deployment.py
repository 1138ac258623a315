"""A model as an HTTP service on Ray Serve (the "serve" extra): `cvt serve MODEL`.

Each replica loads the model and builds its engine once. A request's image is decoded and
preprocessed by cvt's bounded loader in the replica's threads, before it joins a batch, so a bad
upload fails alone and never reaches the model; a `Batcher` gathers the good ones into the
engine's batches, each formed when the engine is free. The API speaks Hugging Face's Inference API
for image classification (POST the bytes, get `[{"label", "score"}, ...]` best first) and serves a
page to try the model in a browser. Bad input is a 4xx with cvt's message; anything unexpected
is a 500 whose traceback goes to the replica's log, never to the client.

What one client can hold is bounded in the HTTP proxy (`cvt.serve.http_limits`); a replica admits a
bounded number of images at once and answers the next one 503 with Retry-After, so that a
saturated service says so at once, and `/health` and `/info` still answer.

`app` is the application builder Ray Serve's own tools call (`serve run cvt.serve:app
model=FOLDER`, or `import_path: cvt.serve:app` in a `serve deploy` config file); `cvt serve`
builds its application with it too, and runs it under a name and route prefix of its own, so
that services on one cluster never replace each other.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) as
# objects, and Ray Serve's ingress rewraps the methods away from this module's names

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import json
import logging
import math
import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..modeling.attention_maps import attention_maps, draw
from ..errors import InvalidValueError, install_hint, short
from ..images import ImageError, load_image_bytes
from ..inference import pipeline, processor_for
from ..run_settings import RunSettings
from .batching import Batcher

try:  # Ray's packages, and cvt.ray (whose own message names the "ray" extra, which "serve" includes)
    import ray
    from fastapi import FastAPI
    from pydantic import BaseModel, ConfigDict
    from ray import serve
    from ray.serve.exceptions import RayServeException
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from ..ray import connect, disconnect
    from .http_limits import HttpLimits
except ImportError as err:  # absolute imports: Ray's package, never this module
    raise ImportError(f"cvt.serve needs Ray Serve: {install_hint('serve')}") from err

log = logging.getLogger(__name__)
APP_NAME = "cvt"  # the application's name, for the route prefix "/" (others add theirs)
DEFAULT_TOP_K = 5  # the Inference API's default
OVERLAY_SIZE = 224  # the attention picture's side, unless the model's input is larger
MIN_CAPACITY = 32  # images a replica admits at once, at least
ROOM_FOR_QUICK_REQUESTS = 16  # /health, /info and the page, answered beside a replica's full load of images
RETRY_AFTER_S = 1
PROXY_CALLBACK = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "cvt.serve.http_limits:install"}
# Ray Serve's throughput settings (those of RAY_SERVE_THROUGHPUT_OPTIMIZED but direct ingress,
# which would bypass the proxy that bounds clients): a replica runs the endpoints, and its router
# runs, on its own event loop rather than on others in other threads (a hop each way per request;
# cvt's endpoints never block it: decoding and the engine run in their threads); the proxy sends
# requests to replicas over gRPC; the objects made at start-up are left out of garbage collection.
# A value already in the environment is kept.
SERVE_THROUGHPUT = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1"}
PARAMETERS = {"top_k", "function_to_apply"}  # the Inference API's, for image classification
ROUTE_PREFIX = re.compile(r"/|(/[A-Za-z0-9._~-]+)+")  # Ray Serve's rule: "/" or no trailing "/"
APPLICATION_NAME = re.compile(r"[A-Za-z0-9._-]+")
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}


class BadRequest(InvalidValueError):
    """A request the service cannot use (400), its message sent back."""


class BodyTooLarge(InvalidValueError):
    """A request body over the service's limit (413)."""


class ServiceBusy(Exception):
    """A replica with all the images it admits in progress (503, with Retry-After)."""


class Settings(BaseModel):
    """What the application needs: the replicas' model, engine, checks and resources, and what
    one client may hold of the HTTP proxies. These are the builder's typed arguments: Ray Serve
    validates `serve run cvt.serve:app key=value` and a config file's `args` against them. How the
    model runs is `run` (a `cvt.RunSettings`, whose defaults these are, `max_batch_size` its
    `batch_size`), checked with the rest in `check_settings`; `from_run` makes them from one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    engine: str = RunSettings.engine
    precision: str = RunSettings.precision
    calibration: str | None = RunSettings.calibration
    device: str | None = RunSettings.device
    image_size: int | None = RunSettings.image_size
    max_batch_size: int = RunSettings.batch_size
    batch_wait_ms: float = 10.0
    max_body_bytes: int = 32_000_000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: int = 75
    max_client_requests: int = 32
    replicas: int = 1
    cpus_per_replica: float = 1.0

    @classmethod
    def from_run(cls, model: str, run: RunSettings, **service: Any) -> "Settings":
        """The settings serving `model` as `run` says, with `service`'s other settings."""
        return cls(model=model, engine=run.engine, precision=run.precision, calibration=run.calibration,
                   device=run.device, image_size=run.image_size, max_batch_size=run.batch_size, **service)

    @property
    def run(self) -> RunSettings:
        """How the replicas run the model (an `InvalidValueError` for a bad setting)."""
        return RunSettings(engine=self.engine, precision=self.precision, calibration=self.calibration,
                           device=self.device, image_size=self.image_size, batch_size=self.max_batch_size)

    @property
    def threads(self) -> int:
        """The engine's threads, and the decoding pool's: one per CPU the replica holds."""
        return max(1, math.floor(self.cpus_per_replica))

    @property
    def capacity(self) -> int:
        """The images a replica admits at once: enough to fill two batches, and a waiting line
        for a few dozen clients when batches are small."""
        return max(2 * self.max_batch_size + 4, MIN_CAPACITY)

    def http_limits(self) -> HttpLimits:
        return HttpLimits(max_body_bytes=self.max_body_bytes, header_timeout_s=self.header_timeout_s,
                          body_timeout_s=self.body_timeout_s, max_client_requests=self.max_client_requests)


def parse_top_k(given: object, labels: int) -> int:
    """`?top_k=` (text) or the JSON parameter `top_k` as a count of labels: a positive integer,
    at most the model's labels."""
    if given is None:
        return min(DEFAULT_TOP_K, labels)
    value = given if isinstance(given, int) and not isinstance(given, bool) else None
    if isinstance(given, str) and given.strip().lstrip("+-").isdigit():
        value = int(given)
    if value is None or value < 1:
        raise BadRequest(f"top_k must be a positive integer, got {short(json.dumps(given))}")
    return min(value, labels)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (`BodyTooLarge`) as soon as it is known to exceed `limit`
    bytes: from its Content-Length before reading, or while it streams in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body ({int(declared):,} bytes) is over this service's limit of {limit:,} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"the body is over this service's limit of {limit:,} bytes")
    return bytes(body)


async def upload(request: Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The uploaded image's bytes and the request's parameters, in any of the Inference API's
    shapes: the body itself, the first file of a multipart form, or the JSON
    `{"inputs": <the image in base64>, "parameters": {...}}` (no parameters but the JSON's)."""
    body = await read_body(request, limit)
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("application/json"):
        return inference_json(body)
    if not content_type.startswith("multipart/form-data"):
        if not body:
            raise BadRequest("the body is empty: send the image's bytes, a multipart upload or JSON")
        return body, {}

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except HTTPException as err:  # starlette's word for a malformed form
        raise BadRequest(f"the multipart upload could not be read: {err.detail}") from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise BadRequest("the multipart upload holds no file: send the image as a file field")
    return await files[0].read(), {}


def inference_json(body: bytes) -> tuple[bytes, dict[str, Any]]:
    """The image and parameters of the Inference API's JSON request (what huggingface_hub's
    `InferenceClient` sends when given parameters). `inputs` must hold the image itself: the
    service never fetches a URL."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"the JSON body could not be read: {err}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), str):
        raise BadRequest('a JSON body must be {"inputs": <the image in base64>, "parameters": {...}}')
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be a JSON object, such as {\"top_k\": 3}")
    unknown = (set(request) - {"inputs", "parameters"}) | (set(parameters) - PARAMETERS)
    if unknown:
        raise BadRequest(f"unknown in the JSON body: {short(', '.join(sorted(map(str, unknown))))} "
                         f"(parameters: {', '.join(sorted(PARAMETERS))})")
    if parameters.get("function_to_apply", "softmax") != "softmax":
        raise BadRequest("function_to_apply: this service's scores are the softmax's; leave it out or say softmax")
    try:
        image = base64.b64decode(request["inputs"], validate=True)
    except binascii.Error:
        raise BadRequest("inputs must be the image's bytes in base64 (a URL is not fetched)") from None
    if not image:
        raise BadRequest("inputs is empty: send the image's bytes in base64")
    return image, parameters


def model_name(model: str) -> str:
    """The model as the service shows it: a hub id or variant as given, a folder or file by its
    name only (the server's paths are nobody's business)."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def answers(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """An endpoint whose errors become answers: 400 or 413 with cvt's message, 503 when the
    replica is full, 500 for anything unexpected (its traceback logged, never sent); every answer
    is counted by status."""

    @functools.wraps(handler)
    async def endpoint(self: Any, request: Request) -> Response:
        try:
            response = await handler(self, request)
        except BodyTooLarge as err:
            response = JSONResponse({"error": str(err)}, status_code=413)
        except ServiceBusy as err:
            response = JSONResponse({"error": str(err)}, status_code=503,
                                    headers={"Retry-After": str(RETRY_AFTER_S)})
        except (ImageError, BadRequest) as err:
            response = JSONResponse({"error": str(err)}, status_code=400)
        except Exception:
            log.exception("cvt serve: %s %s failed", request.method, request.url.path)
            response = JSONResponse({"error": "internal error: the service's log has the details"},
                                    status_code=500)
        self.responses[str(response.status_code)] += 1
        return response

    return endpoint


def page_file(name: str) -> Response:
    """One of the page's files, shipped inside the package (the page works offline)."""
    content = resources.files("cvt.serve").joinpath("page", name).read_bytes()
    return Response(content, media_type=PAGE_FILES[name])


# Ray Serve serializes the class when it is decorated: what its methods use is defined above it
api = FastAPI(title="cvt", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class CvtService:
    """One replica: the model's pipeline (its engine built once), the images in progress, and
    the counters `/info` shows (of this replica: with several replicas, each answers with its own)."""

    def __init__(self, settings: Settings) -> None:
        torch.set_num_threads(settings.threads)  # before the engine is built: the runtimes read it
        self.pipeline = pipeline("image-classification", settings.model, settings=settings.run)
        self.settings = settings
        self.responses: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.in_progress = 0
        # uploads decode beside the engine, which runs alone on its own thread: while it works
        # on one batch, the next one's images get ready
        self.decoders = ThreadPoolExecutor(settings.threads, thread_name_prefix="cvt-decode")
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="cvt-engine")
        self.batcher = Batcher(self._classify, settings.max_batch_size, settings.batch_wait_ms / 1000)

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """One image in progress, or `ServiceBusy` when the replica has all it admits."""
        if self.in_progress >= self.settings.capacity:
            raise ServiceBusy(f"the service is busy ({self.in_progress} images in progress): retry in "
                              f"{RETRY_AFTER_S} s")
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1

    def _prepare(self, data: bytes) -> torch.Tensor:
        return self.pipeline.image_processor(load_image_bytes(data))["pixel_values"]

    async def _classify(self, items: list[tuple[torch.Tensor, int]]) -> list[list[dict[str, Any]]]:
        self.batch_sizes[len(items)] += 1
        pixel_values = torch.cat([values for values, _ in items])
        top = await asyncio.get_running_loop().run_in_executor(
            self.engine_thread, self.pipeline.classify, pixel_values, max(k for _, k in items))
        return [result[:k] for result, (_, k) in zip(top, items)]

    @api.post("/predict")
    @api.post("/")  # where the Inference API's clients post, given the service's address
    @answers
    async def predict(self, request: Request) -> Response:
        with self._admitted():
            data, parameters = await upload(request, self.settings.max_body_bytes)
            top_k = parse_top_k(parameters.get("top_k", request.query_params.get("top_k")),
                                len(self.pipeline.labels))
            pixel_values = await asyncio.get_running_loop().run_in_executor(self.decoders, self._prepare, data)
            return JSONResponse(await self.batcher.submit((pixel_values, top_k)))

    @api.post("/attention")
    @answers
    async def attention(self, request: Request) -> Response:
        with self._admitted():
            data, _ = await upload(request, self.settings.max_body_bytes)
            png = await asyncio.get_running_loop().run_in_executor(self.engine_thread, self._overlay, data)
            return Response(png, media_type="image/png")

    def _overlay(self, data: bytes) -> bytes:
        processor = self.pipeline.image_processor
        maps = attention_maps(self.pipeline.model, load_image_bytes(data), processor)
        buffer = io.BytesIO()
        draw(maps, "rollout", size=max(OVERLAY_SIZE, processor.size)).save(buffer, format="PNG")
        return buffer.getvalue()

    @api.get("/health")
    @answers
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @api.get("/info")
    @answers
    async def info(self, request: Request) -> Response:
        engine = self.pipeline.engine
        return JSONResponse({
            "model": model_name(self.settings.model), "labels": self.pipeline.labels,
            "input_size": self.pipeline.image_processor.size, "engine": engine.name,
            "precision": engine.precision, "max_batch_size": self.settings.max_batch_size,
            "batch_wait_ms": self.settings.batch_wait_ms, "threads": torch.get_num_threads(), "responses": dict(self.responses),
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())}})

    @api.get("/")
    @answers
    async def page(self, request: Request) -> Response:
        return page_file("index.html")

    @api.get("/static/{name}")
    async def static(self, name: str) -> Response:
        if name not in PAGE_FILES or name == "index.html":
            return JSONResponse({"error": f"no such file: {short(name)}"}, status_code=404)
        return page_file(name)


def app(args: Settings) -> serve.Application:
    """The application builder: `serve run cvt.serve:app model=FOLDER engine=onnxruntime`, a
    config file's `import_path: cvt.serve:app` with its `args`, and `cvt serve` all build the
    service here. `replicas` replicas of `cpus_per_replica` CPUs (and one GPU with a CUDA
    device) each. Ray Serve sends a replica its images and room for quick requests beside them:
    the replica, not Ray's queue, refuses images over its capacity. A config file's deployment
    options (`num_replicas`, `autoscaling_config`, ...) override these."""
    settings = Settings.model_validate(args)
    check_settings(settings)
    gpu = str(settings.device or "").startswith("cuda")
    return CvtService.options(
        num_replicas=settings.replicas, max_ongoing_requests=settings.capacity + ROOM_FOR_QUICK_REQUESTS,
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": 1 if gpu else 0},
        graceful_shutdown_timeout_s=2, graceful_shutdown_wait_loop_s=0.5, max_constructor_retry_count=1,
    ).bind(settings)


def check_settings(settings: Settings) -> None:
    """The settings, checked before Ray starts: numbers in range, the model's preprocessing found."""
    for name, value in (("--replicas", settings.replicas), ("--max-batch-size", settings.max_batch_size)):
        if value < 1:
            raise InvalidValueError(f"{name} must be at least 1, got {value}")
    if settings.max_body_bytes < 1:
        raise InvalidValueError(f"--max-body-mb must be positive, got {settings.max_body_bytes / 1e6:g}")
    if settings.batch_wait_ms < 0:
        raise InvalidValueError(f"--batch-wait-ms must not be negative, got {settings.batch_wait_ms}")
    limits = {"--header-timeout-s": settings.header_timeout_s, "--body-timeout-s": settings.body_timeout_s,
              "--keep-alive-s": settings.keep_alive_s, "--max-client-requests": settings.max_client_requests,
              "--cpus-per-replica": settings.cpus_per_replica}
    for name, value in limits.items():
        if not value > 0:
            raise InvalidValueError(f"{name} must be positive, got {value}")
    processor_for(settings.model, settings.run)


def check_service(port: int, route_prefix: str, name: str | None) -> str:
    """The service's port, route prefix and name, checked before Ray starts; the application's
    name: `name`, or one made from the route prefix ("cvt" for "/", "cvt-cats" for "/cats")."""
    if not 1 <= port <= 65535:
        raise InvalidValueError(f"--port must be from 1 to 65535, got {port}")
    if not ROUTE_PREFIX.fullmatch(route_prefix):
        raise InvalidValueError(f"--route-prefix must be / or /WORD[/WORD...] (letters, digits, . _ ~ -), "
                                f"got {short(route_prefix)}")
    name = name if name is not None else "-".join([APP_NAME, *route_prefix.split("/")[1:]]).rstrip("-")
    if not APPLICATION_NAME.fullmatch(name):
        raise InvalidValueError(f"--name must be letters, digits, . _ -, got {short(name)}")
    return name


def check_port_free(host: str, port: int) -> None:
    """An `InvalidValueError` now, rather than a proxy that never starts, if host:port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise InvalidValueError(f"cannot serve on {host}:{port}: {err.strerror}") from None


def run(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, address: str = "local",
        route_prefix: str = "/", name: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then return. With "local", on a private Ray instance, shut
    down with every Ray process on the way out; on a cluster, this service's application (and
    no other) is deleted and the cluster left running."""
    application = app(settings)
    name = check_service(port, route_prefix, name)
    if address == "local":
        check_port_free(host, port)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = not ray.is_initialized()  # then this call connects (and what it starts is its to stop)
    deployed = False
    try:
        _connect(settings, address)
        cpus = ray.cluster_resources().get("CPU", 0)
        if address == "local" and settings.replicas * settings.cpus_per_replica > cpus:  # Serve would wait for ever
            raise InvalidValueError(f"--replicas {settings.replicas} of --cpus-per-replica "
                                    f"{settings.cpus_per_replica:g}: this machine has {cpus:g} CPUs for Ray")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": settings.keep_alive_s})
        check_cluster_http(host, port, name)
        deployed = True
        _deploy(application, name, route_prefix)
        log.info("cvt: serving %s at http://%s:%d%s (%d replica%s); Ctrl-C stops it", settings.model,
                 f"[{host}]" if ":" in host else host, port, route_prefix if route_prefix == "/" else route_prefix + "/",
                 settings.replicas, "" if settings.replicas == 1 else "s")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as stop:  # the normal end of a service (exit status 0), even while it starts
        log.info("cvt: stopping (%s)", stop)
    finally:
        _stop(started, private=address == "local", name=name if deployed else None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_cluster_http(host: str, port: int, name: str) -> None:
    """A cluster's Ray Serve has one HTTP host and port, set by whoever started it first: a
    service asked to listen elsewhere is refused (never a port printed that nothing listens on),
    and so is a name another service already runs under (Ray would replace that application)."""
    # Ray shows its running HTTP options only through the controller's client (or the dashboard)
    http = serve.context._get_global_client().http_config
    if (http.host, http.port) != (host, port):
        raise InvalidValueError(
            f"Ray Serve on this cluster listens on {http.host}:{http.port} (a cluster has one HTTP port, "
            f"for all its applications): serve this model there with --host {http.host} --port {http.port} "
            f"and a --route-prefix of its own, such as --route-prefix /{name}")
    if name in serve.status().applications:
        raise InvalidValueError(f"an application named {name!r} already runs on this cluster: give this "
                                f"service a --route-prefix of its own (or --name)")


def _deploy(application: serve.Application, name: str, route_prefix: str) -> None:
    """`serve.run`, with Ray's refusal of a route prefix another application holds in cvt's words."""
    try:
        serve.run(application, name=name, route_prefix=route_prefix)
    except RayServeException as err:
        taken = re.search(r"Prefix (\S+) is being used by application \"([^\"]+)\"", str(err))
        if not taken:
            raise
        raise InvalidValueError(f"--route-prefix {taken[1]} is taken on this cluster by the application "
                                f"{taken[2]!r}: give this service a --route-prefix of its own") from None


def _connect(settings: Settings, address: str) -> None:
    """`connect`, SIGTERM meaning "stop" throughout: `ray.init` installs a handler of its own that
    exits with status 15 (then the caller's `_stop` ends what it had started)."""
    try:
        with proxy_environment(settings) if address == "local" else contextlib.nullcontext():
            connect(address)
    except SystemExit as exit_:
        if exit_.code != signal.SIGTERM:
            raise
        raise KeyboardInterrupt(f"by {signal.SIGTERM.name}") from None
    finally:
        signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def proxy_environment(settings: Settings) -> Iterator[None]:
    """The environment a private Ray instance starts with, so that its HTTP proxy bounds what
    clients send (`cvt.serve.http_limits.install`, with these settings' limits) and its replicas
    run as `SERVE_THROUGHPUT` says; this process's own environment as it was afterwards."""
    added = {**PROXY_CALLBACK, **settings.http_limits().to_env(),
             **{name: os.environ.get(name, value) for name, value in SERVE_THROUGHPUT.items()}}
    before = {name: os.environ.get(name) for name in added}
    os.environ.update(added)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"by {signal.Signals(signum).name}")


def _stop(started: bool, private: bool, name: str | None) -> None:
    """A private instance this call started is shut down, Ray Serve's processes with it;
    otherwise only this service's application, `name` (None: not deployed), is deleted (Serve's
    applications outlive their driver)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ray.is_initialized() and name is not None and not (started and private):
        serve.delete(name)
    if started:
        disconnect()  # a private instance's processes with it, Serve's included
