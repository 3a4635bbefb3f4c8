"""A reward server: one reward function behind HTTP, for `RemoteReward` (`trl-flow-grpo reward-server`).

It keeps a heavy reward model off the training GPUs, or shares one between runs. Built on the standard library's
`http.server` (no extra dependency: one JSON endpoint needs no web framework), with JSON in and out, never pickle:

- `POST /score` with `{"prompts": [...], "images": [base64 PNG, ...], <column>: [...], ...}` -> `{"rewards": [...]}`,
  one number per image, `null` where the reward does not apply. Every other key is a dataset column, passed to the
  reward function as a keyword with one entry per image; the image columns (`remote.IMAGE_COLUMNS`: an editing run's
  `source_images`) are base64 PNG like `images` and reach the reward as PIL images. The request is one batch, split
  into calls of at most `max_batch_size` images when that is set. Reward calls run one at a time (a lock), since
  reward models are rarely thread-safe.
- `GET /health` -> `{"status": "ok", "reward": <name>, "max_batch_size": ...}`, without authentication.

With a token, `POST /score` needs `Authorization: Bearer <token>`, compared in constant time (`hmac.compare_digest`);
the token is never logged or printed. The server binds 127.0.0.1 by default: only this machine can reach it.
Errors answer JSON `{"error": "..."}`: 400 for a malformed request, 401 for a missing or wrong token, 413 for a body
over `max_request_bytes`, 500 when the reward function raised.
"""

from __future__ import annotations

import argparse
import hmac
import inspect
import json
import logging
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .base import (
    RewardFunc,
    _as_value_list,
    _run_awaitables,
    _select_kwargs,
    _to_float,
    resolve_reward_func,
    reward_func_name,
)
from .remote import IMAGE_COLUMNS, decode_image

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "RewardServer", "main"]

DEFAULT_MAX_REQUEST_BYTES = 512 * 2**20
"""The largest `POST /score` body accepted by default (512 MiB: about 1000 PNG images of 512 x 512)."""

logger = logging.getLogger(__name__)
_MAX_ERROR_CHARS = 2000


class _RequestError(Exception):
    """A request the server answers with `status` and `message` (no traceback: the client's fault)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RewardServer:
    """Serves one reward function over HTTP (see the module docstring for the protocol).

    Args:
        reward: A reward function, a built-in name or an import path (`resolve_reward_func`). A Hub id or URL works
            too, though serving a remote reward again is rarely useful.
        host: The address to bind; `"127.0.0.1"` (default) accepts only local clients, `"0.0.0.0"` every interface
            (then set a token).
        port: The port to bind; 0 picks a free one (read it back from `port` / `url`).
        token: The bearer token `POST /score` requires; `None` (default) requires none.
        max_batch_size: The most images per reward call; a larger request is scored in consecutive calls. `None`
            (default): the whole request in one call.
        max_request_bytes: The largest request body accepted (HTTP 413 beyond).
    """

    def __init__(
        self,
        reward: str | RewardFunc,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        max_batch_size: int | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)):
            raise ValueError(f"`max_batch_size` must be a positive integer or None, got {max_batch_size!r}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be a positive integer or None, got {max_batch_size!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("`token` must be a non-empty string, or None for a server without authentication")
        if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
            raise ValueError(f"`max_request_bytes` must be a positive integer, got {max_request_bytes!r}")
        self.reward = resolve_reward_func(reward)
        self.name = reward_func_name(self.reward)
        self.max_batch_size = max_batch_size
        self.max_request_bytes = max_request_bytes
        self._authorization = None if token is None else f"Bearer {token}".encode()
        self._lock = threading.Lock()
        self._serving = False
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True

    def __repr__(self) -> str:  # the token is deliberately left out
        return f"{type(self).__name__}(reward={self.name!r}, url={self.url!r}, auth={self._authorization is not None})"

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def startup_line(self) -> str:
        """What the server prints when it starts: address, reward, batching, whether a token is required."""
        batching = (
            f"at most {self.max_batch_size} images per reward call" if self.max_batch_size else "one call per request"
        )
        auth = "bearer token required" if self._authorization else "no authentication"
        return (
            f"Serving reward {self.name!r} at {self.url} (POST /score, GET /health; {batching}; {auth}). "
            "Press Ctrl-C to stop."
        )

    def serve_forever(self) -> None:
        """Answer requests until `shutdown()` (from another thread) or Ctrl-C."""
        self._serving = True
        self._httpd.serve_forever()

    def shutdown(self) -> None:
        """Stop `serve_forever` (if it runs) and close the socket."""
        if self._serving:
            self._httpd.shutdown()
            self._serving = False
        self._httpd.server_close()

    # ------------------------------------------------------------------------------------------ the protocol
    def authorized(self, header: str | None) -> bool:
        """Whether an `Authorization` header value grants access (constant-time comparison)."""
        if self._authorization is None:
            return True
        return hmac.compare_digest((header or "").encode(), self._authorization)

    def score_request(self, request: Any) -> dict[str, list[float | None]]:
        """The answer to a decoded `POST /score` body.

        Raises:
            _RequestError: the body is malformed (400).
            Exception: whatever the reward function raised (answered with 500).
        """
        if not isinstance(request, dict):
            raise _RequestError(400, f"the body must be a JSON object, got a JSON {type(request).__name__}")
        prompts, images = request.get("prompts"), request.get("images")
        if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
            raise _RequestError(400, '"prompts" must be a list of strings')
        if not isinstance(images, list) or len(images) != len(prompts):
            count = len(images) if isinstance(images, list) else "no list of"
            raise _RequestError(
                400,
                f'"images" must be a list with one image per prompt; got {count} images for {len(prompts)} prompts',
            )
        columns = {key: value for key, value in request.items() if key not in ("prompts", "images")}
        for key, values in columns.items():
            if key in ("trainer_state", "log_extra", "log_metric"):
                raise _RequestError(400, f"{key!r} is a reserved reward keyword, not a dataset column")
            if not isinstance(values, list) or len(values) != len(prompts):
                raise _RequestError(400, f"column {key!r} must be a list with one entry per prompt ({len(prompts)})")
        try:
            decoded = [decode_image(image, index) for index, image in enumerate(images)]
            for key in IMAGE_COLUMNS:
                if key in columns:
                    columns[key] = [decode_image(image, index, key) for index, image in enumerate(columns[key])]
        except ValueError as error:
            raise _RequestError(400, str(error)) from None
        size = self.max_batch_size or max(len(prompts), 1)
        rewards: list[float | None] = []
        with self._lock:
            for start in range(0, len(prompts), size):
                stop = start + size
                kwargs = {key: values[start:stop] for key, values in columns.items()}
                kwargs.update(prompts=prompts[start:stop], images=decoded[start:stop], trainer_state=None)
                result = self.reward(**_select_kwargs(self.reward, kwargs))
                if inspect.isawaitable(result):  # an async reward function
                    result = _run_awaitables([lambda awaitable=result: awaitable])[0]
                # The trainer's checks of a reward's answer (count, numbers, None, finite), at full precision (the
                # client converts to float32 itself); no warning about samples no reward applies to: the client,
                # which may combine several rewards, warns.
                part = _as_value_list(
                    "reward function", self.name, result, len(kwargs["prompts"]), "sample", _to_float
                )
                rewards += [None if math.isnan(value) else value for value in part]
        return {"rewards": rewards}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # the request line only, never headers
                logger.info("%s - %s", self.address_string(), format % args)

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload, allow_nan=False).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 401:
                    self.send_header("WWW-Authenticate", "Bearer")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/health":
                    self._answer(404, {"error": f"no such endpoint {self.path!r}; use POST /score or GET /health"})
                    return
                self._answer(200, {"status": "ok", "reward": server.name, "max_batch_size": server.max_batch_size})

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    length = -1
                if length < 0:
                    self.close_connection = True
                    self._answer(411, {"error": "a Content-Length header (a byte count) is required"})
                    return
                if length > server.max_request_bytes:
                    self.close_connection = True
                    self._answer(
                        413,
                        {
                            "error": f"the body has {length} bytes, over the limit of "
                            f"{server.max_request_bytes}; send fewer images per request"
                        },
                    )
                    return
                body = self.rfile.read(length)
                if self.path.split("?")[0] != "/score":
                    self._answer(404, {"error": f"no such endpoint {self.path!r}; use POST /score or GET /health"})
                    return
                if not server.authorized(self.headers.get("Authorization")):
                    self._answer(401, {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"})
                    return
                try:
                    answer = server.score_request(json.loads(body))
                except json.JSONDecodeError as error:
                    self._answer(400, {"error": f"the body is not JSON: {error}"})
                except _RequestError as error:
                    self._answer(error.status, {"error": str(error)})
                except Exception as error:
                    logger.exception("reward %r failed", server.name)
                    self._answer(
                        500,
                        {
                            "error": f"reward {server.name!r} raised {type(error).__name__}: "
                            f"{str(error)[:_MAX_ERROR_CHARS]}"
                        },
                    )
                else:
                    self._answer(200, answer)

        return Handler


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-flow-grpo reward-server",
        description="Serve a reward function over HTTP (POST /score, GET /health) for RemoteReward / a reward URL.",
    )
    parser.add_argument(
        "--reward",
        required=True,
        help="A built-in reward name (e.g. shapes_geneval, pickscore) or an import path (my_pkg.rewards:my_reward).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    parser.add_argument("--port", type=int, default=8000, help="Port to bind (default 8000; 0 picks a free one).")
    parser.add_argument(
        "--token-env",
        "--token_env",
        default=None,
        metavar="VAR",
        help="Require the bearer token held by this environment variable (the token itself is never printed).",
    )
    parser.add_argument(
        "--max-batch-size",
        "--max_batch_size",
        type=int,
        default=None,
        help="Most images per reward call; larger requests are split (default: one call per request).",
    )
    parser.add_argument(
        "--max-request-mb",
        "--max_request_mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
        help=f"Largest request body accepted, in MiB (default {DEFAULT_MAX_REQUEST_BYTES // 2**20}).",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """`trl-flow-grpo reward-server`: build the server from the command line and serve until Ctrl-C."""
    parser = _parser()
    args = parser.parse_args(argv)
    token = None
    if args.token_env is not None:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(
                f"--token-env {args.token_env}: the environment variable {args.token_env} is not set or empty; "
                f"export the token in it (e.g. export {args.token_env}=$(openssl rand -hex 32))."
            )
    if args.max_batch_size is not None and args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not args.max_request_mb > 0:
        parser.error(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = RewardServer(
        args.reward,
        host=args.host,
        port=args.port,
        token=token,
        max_batch_size=args.max_batch_size,
        max_request_bytes=int(args.max_request_mb * 2**20),
    )
    print(server.startup_line(), flush=True)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"Warning: --host {args.host} without --token-env: anyone who can reach this address can use the reward.",
            flush=True,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
