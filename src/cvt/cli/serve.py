"""`cvt serve`: a model as an HTTP service on Ray Serve (the work is `cvt.serve`'s)."""

from __future__ import annotations

import argparse
import os
import sys

from ..run_settings import RunSettings
from .common import UsageError, add_engine_arguments, add_ray_arguments, messages_on_stderr, run_settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve a model over HTTP (Ray Serve), with a page to try it",
                         description="Serve a model over HTTP on Ray Serve: POST /predict (image bytes "
                         "or a multipart upload) answers [{label, score}, ...]; GET / is a page to try "
                         "it in a browser. Runs until Ctrl-C or SIGTERM. No authentication: it binds "
                         "to 127.0.0.1 unless --host says otherwise.")
    srv.add_argument("model", help="variant name, hub id, checkpoint folder or weights file")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, "
                     "this machine only; 0.0.0.0 is every interface)")
    srv.add_argument("--port", type=int, default=8000, help="default: 8000")
    srv.add_argument("--route-prefix", default="/", help="the path the service answers under, such as "
                     "/cats (default: /); services sharing a cluster's HTTP port each need their own")
    srv.add_argument("--name", help="the Ray Serve application's name (default: from the route prefix: "
                     "cvt for /, cvt-cats for /cats)")
    srv.add_argument("--replicas", type=int, default=1, help="copies of the model, --cpus-per-replica "
                     "CPUs (or one GPU) each (default: 1)")
    srv.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica holds; its "
                     "engine and its image decoding run that many threads (default: 1)")
    srv.add_argument("--max-batch-size", type=int, default=RunSettings.batch_size, help="most requests per "
                     f"forward pass (default: {RunSettings.batch_size}; 1 turns batching off)")
    srv.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request waits for "
                     "others to fill a batch (default: 10)")
    srv.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in "
                     "megabytes; larger ones get 413 (default: 32)")
    srv.add_argument("--header-timeout-s", type=float, default=10.0, help="time a client has to send "
                     "a request's headers; later, 408 and the connection closed (default: 10)")
    srv.add_argument("--body-timeout-s", type=float, default=30.0, help="time a client has to send "
                     "a request's body once its headers are in; later, 408 (default: 30)")
    srv.add_argument("--keep-alive-s", type=int, default=75, help="how long an idle connection is "
                     "kept open between requests (default: 75, longer than the 60 s after which common "
                     "reverse proxies close theirs)")
    srv.add_argument("--max-client-requests", type=int, default=32, help="requests one client address "
                     "may have in progress; more get 429 (default: 32; a reverse proxy in front is one "
                     "address)")
    srv.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda or mps if available)")
    srv.add_argument("--image-size", type=int, help="input size (default: the model's own "
                     "preprocessing; needed for a weights file, which carries none)")
    add_ray_arguments(srv, workers=False)
    add_engine_arguments(srv)
    srv.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then end the process at once with status 0."""
    try:
        from .. import serve
    except ImportError as err:  # its message names the extra to install
        raise UsageError(str(err)) from err

    if args.max_batch_size < 1:  # named as the option it is, before it reaches the settings
        raise UsageError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    settings = serve.Settings.from_run(
        args.model, run_settings(args, batch_size=args.max_batch_size), batch_wait_ms=args.batch_wait_ms,
        max_body_bytes=round(args.max_body_mb * 1e6), header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s, keep_alive_s=args.keep_alive_s,
        max_client_requests=args.max_client_requests, replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica)
    with messages_on_stderr():
        serve.run(settings, host=args.host, port=args.port, address=args.ray or "local",
                  route_prefix=args.route_prefix, name=args.name)
    # The service is down and Ray shut down (or our application deleted). Finalizing Ray's,
    # torch's and the runtimes' modules would take seconds more, and a stopped service must be
    # gone within 5 s of SIGTERM: end now, the output flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
