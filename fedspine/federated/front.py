"""The coordinator's only exposed port: a TLS front that forwards Flower's Fleet API and nothing else.

Flower 1.42's SuperLink serves its Fleet API (what SuperNodes call), its Control API (start and
list runs: what `flwr run` calls) and its Runtime API on one HTTP port. Control API
authentication needs an OIDC provider and the CA certificate is public by design, so anyone who
could reach that port could submit an app bundle that every site would run. fedspine therefore
binds the SuperLink to loopback and puts this front on the public address:

- it terminates TLS with the coordinator's certificate (sites verify it with ``ca.crt``);
- it forwards ``/v1/fleet/*`` and ``/health`` to the SuperLink on loopback (over TLS, verified
  with the same CA), headers and body unchanged, so SuperNode authentication (signed headers)
  works end to end;
- it answers every other path, ``/v1/control/*`` and the Runtime API included, with 403.

Why a small Python process rather than a documented nginx: it is managed by ``fedspine server
start|stop`` like the SuperLink, needs nothing the hospital has to install (uvicorn, starlette
and httpx come with Flower), and its allowlist is tested with the rest of fedspine.

Run as ``python -m fedspine.federated.front --listen HOST:PORT --upstream URL --ca CA --cert
CERT --key KEY``.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_EXACT = ("/health",)
REFUSAL = "fedspine front: only Flower's Fleet API is served on this port"
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the forwarding layer sets itself.
_DROP_REQUEST = {"host", "connection", "keep-alive", "transfer-encoding", "upgrade", "te"}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"}


def allowed(path: str) -> bool:
    """Whether ``path`` is part of what sites may call: the Fleet API and the health check."""
    if ".." in path or "//" in path or "%" in path:
        return False
    return path in ALLOWED_EXACT or any(path.startswith(p) for p in ALLOWED_PREFIXES)


def make_app(upstream: str, ca_cert: str | Path | None):
    """The ASGI app: forward allowed paths to ``upstream``, refuse the rest with 403."""
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else False
    )
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=None)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not allowed(path):
            return JSONResponse({"error": REFUSAL, "path": path}, status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
        try:
            reply = await client.request(
                request.method,
                path,
                params=request.url.query or None,
                headers=headers,
                content=await request.body(),
            )
        except httpx.HTTPError as err:
            return JSONResponse(
                {"error": f"fedspine front: the SuperLink did not answer ({type(err).__name__})"},
                status_code=502,
            )
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP_RESPONSE}
        return Response(reply.content, status_code=reply.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on (public)")
    parser.add_argument("--upstream", required=True, help="the SuperLink, e.g. https://127.0.0.1:N")
    parser.add_argument("--ca", help="CA certificate that signed the SuperLink's certificate")
    parser.add_argument("--cert", help="server certificate (PEM) presented to sites")
    parser.add_argument("--key", help="its private key (PEM)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    uvicorn.run(
        make_app(args.upstream, args.ca),
        host=host.strip("[]"),
        port=int(port),
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
