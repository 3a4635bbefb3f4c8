"""A reward function that scores images on a reward server (`trl-flow-grpo reward-server`, `rewards.server`).

`RemoteReward(url)` follows the reward calling convention: each call is one `POST {url}/score` with JSON
`{"prompts": [...], "images": [base64 PNG, ...], <dataset columns>}` and reads `{"rewards": [...]}` back (`null`
for a sample the reward does not apply to). The image columns (`IMAGE_COLUMNS`: an editing run's `source_images`)
travel as base64 PNG like `images`, so an edit judge behind the server compares each edit with its source. Only the
standard library is used; nothing is pickled.

Connection errors, timeouts and 5xx answers are retried with exponential backoff; a 4xx answer (a rejected token,
a malformed request) fails at once with the server's message. Redirects are refused, so the bearer token is only
ever sent to the address you configured. The token never appears in `repr`, logs or error messages.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import math
import numbers
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from .compression import _to_rgb_image

__all__ = ["DEFAULT_TOKEN_ENV", "IMAGE_COLUMNS", "RemoteReward", "RewardServerError", "decode_image", "encode_png"]

DEFAULT_TOKEN_ENV = "TRL_FLOW_GRPO_REWARD_TOKEN"
"""The environment variable `RemoteReward` reads its bearer token from when no token is passed."""

IMAGE_COLUMNS = ("source_images",)
"""Reward keywords holding one image per sample besides `images`: sent as base64 PNG, decoded to PIL by the server."""
_NOT_SENT = ("trainer_state", "log_extra", "log_metric")  # in-process objects, not data: never sent to a server
_MAX_ERROR_BODY_CHARS = 500


class RewardServerError(RuntimeError):
    """A request to a reward server failed: refused, answered with something that is not rewards, or still failing
    after every retry."""


def encode_png(image: Any) -> str:
    """An image (PIL, any mode, or a uint8 array) as base64 PNG text, the form `POST /score` takes (lossless)."""
    buffer = io.BytesIO()
    _to_rgb_image(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: Any, index: int, field: str = "images") -> Any:
    """Decode one image of a `POST /score` request: base64 PNG, optionally as a `data:image/png;base64,` URL.

    Raises:
        ValueError: `text` is not a string, not base64, or not a PNG image (names `field` and the image's `index`).
    """
    from PIL import Image

    if not isinstance(text, str):
        raise ValueError(f"{field}[{index}] is a JSON {type(text).__name__}; expected a base64 PNG string")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if header.lower() != "data:image/png;base64":
            raise ValueError(f"{field}[{index}] is a data URL of type {header[5:]!r}; expected data:image/png;base64")
    try:
        data = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        image.load()
    except Exception as error:  # binascii.Error, PIL.UnidentifiedImageError, a truncated file, a decompression bomb
        raise ValueError(f"{field}[{index}] is not a base64 PNG image ({type(error).__name__}: {error})") from None
    return image


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses redirects: following one would send the request, and its `Authorization` header, to another address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise RewardServerError(
            f"the reward server at {req.full_url} answered HTTP {code}, a redirect to {newurl}; redirects are not "
            "followed (the bearer token would be sent there). Pass the address that serves POST /score."
        )


_OPENER = urllib.request.build_opener(_NoRedirect)


class _Retryable(Exception):
    """An attempt that failed in a way worth retrying; its message says how (never with the token)."""


def _check_number(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    valid = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not valid or math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"`{name}` must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


class RemoteReward:
    """A reward function served by `trl-flow-grpo reward-server` (or any server speaking its `POST /score`).

    Each call sends the whole batch in one request: the prompts, the images as base64 PNG, and every dataset column
    (which must be JSON-serialisable); `trainer_state`, `log_extra` and `log_metric` stay in this process. It is an
    async reward function, so the trainer overlaps its request with the other async rewards; call `score(...)` to
    use it synchronously.

    Args:
        url: The server's root (`"http://127.0.0.1:8000"`, `/score` is appended) or its `/score` endpoint.
        token: The bearer token to send (`Authorization: Bearer ...`). Default: the value of the environment variable
            `token_env`, and no header when that is unset or empty.
        token_env: The environment variable read when `token` is not given (default `TRL_FLOW_GRPO_REWARD_TOKEN`).
        timeout: Seconds to wait for each attempt's answer.
        retries: Attempts after the first one on a connection error, a timeout or a 5xx answer.
        backoff: Seconds before the first retry; doubled before each further one (`backoff * 2**attempt`).
        name: The reward's name in metrics (`rewards/{name}/mean`) and error messages (default `"remote"`).

    Attributes:
        last_latency: Seconds the last call took, retries included.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_env: str = DEFAULT_TOKEN_ENV,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 1.0,
        name: str = "remote",
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(
                f"`url` must be the http(s) URL of a reward server, e.g. 'http://127.0.0.1:8000'; got {url!r}"
            )
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("`token` must be a non-empty string (or None to read it from `token_env`)")
        if not isinstance(name, str) or not name:
            raise ValueError(f"`name` must be a non-empty string, got {name!r}")
        _check_number("timeout", timeout)
        _check_number("retries", retries, integer=True, allow_zero=True)
        _check_number("backoff", backoff, allow_zero=True)
        root = url.rstrip("/")
        self.url = root if root.endswith("/score") else f"{root}/score"
        self._token = token if token is not None else (os.environ.get(token_env) or None)
        self.token_env = token_env
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.__name__ = name
        self.last_latency = 0.0

    def __repr__(self) -> str:  # the token is deliberately left out
        return f"{type(self).__name__}(url={self.url!r}, name={self.__name__!r}, retries={self.retries})"

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _body(self, prompts: Sequence[str], images: Sequence[Any], columns: dict[str, Any]) -> bytes:
        if len(images) != len(prompts):
            raise ValueError(f"{self.__name__!r}: got {len(images)} images for {len(prompts)} prompts")
        payload: dict[str, Any] = {"prompts": list(prompts), "images": [encode_png(image) for image in images]}
        for key, values in columns.items():
            if key in IMAGE_COLUMNS:
                values = [encode_png(image) for image in values]
            try:
                json.dumps(values, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"{self.__name__!r}: dataset column {key!r} cannot be sent to the reward server as JSON "
                    f"({error}); remove the column from the dataset or make its values JSON data (str, number, "
                    "bool, None, lists and dicts of them)."
                ) from None
            payload[key] = values
        return json.dumps(payload, allow_nan=False).encode("utf-8")

    def _post(self, body: bytes) -> bytes:
        """One attempt. Raises `_Retryable` for what may pass when repeated, `RewardServerError` for the rest."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            try:
                message = error.read().decode("utf-8", errors="replace")[:_MAX_ERROR_BODY_CHARS]
            except Exception:
                message = ""
            failure = f"HTTP {error.code} {self._redact(message or str(error.reason))}"
            if error.code >= 500:
                raise _Retryable(failure) from None
            if error.code in (401, 403):
                raise RewardServerError(
                    f"the reward server at {self.url} refused the request ({failure}): "
                    + (
                        "the bearer token is wrong. "
                        if self._token
                        else f"it needs a bearer token; set ${self.token_env} or pass `token=`. "
                    )
                    + "The server reads its token from the variable named by `reward-server --token-env`."
                ) from None
            raise RewardServerError(f"the reward server at {self.url} rejected the request: {failure}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
            raise _Retryable(self._redact(f"{type(error).__name__}: {error}")) from None
        except urllib.error.URLError as error:  # connection refused, DNS failure, timeout while connecting
            raise _Retryable(self._redact(f"{type(error.reason).__name__}: {error.reason}")) from None

    def _parse(self, payload: bytes, count: int) -> list[float | None]:
        snippet = self._redact(payload[:_MAX_ERROR_BODY_CHARS].decode("utf-8", errors="replace"))
        try:
            rewards = json.loads(payload)["rewards"]
        except (ValueError, KeyError, TypeError):
            rewards = None
        if not isinstance(rewards, list):
            raise RewardServerError(
                f"the reward server at {self.url} did not answer with rewards (expected JSON "
                f'{{"rewards": [one number or null per image]}}); got: {snippet!r}'
            )
        if len(rewards) != count:
            raise RewardServerError(
                f"the reward server at {self.url} answered {len(rewards)} rewards for {count} images"
            )
        for index, value in enumerate(rewards):
            valid = value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool))
            if not valid or (value is not None and not math.isfinite(value)):
                raise RewardServerError(
                    f"the reward server at {self.url} answered {value!r} for image {index}; expected a finite "
                    "number, or null for an image the reward does not apply to"
                )
        return [None if value is None else float(value) for value in rewards]

    def score(self, prompts: Sequence[str], images: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score the batch (blocking): one request, retried on connection errors, timeouts and 5xx answers.

        Returns:
            One reward per image (`None` where the served reward does not apply).

        Raises:
            RewardServerError: the server refused the request (4xx, a redirect), answered something other than one
                finite number (or null) per image, or still failed after `retries` retries.
            TypeError: a dataset column is not JSON data.
        """
        columns = {key: value for key, value in kwargs.items() if key not in _NOT_SENT}
        body = self._body(prompts, images, columns)
        start = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                payload = self._post(body)
                break
            except _Retryable as error:
                last_failure = str(error)
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        else:
            self.last_latency = time.perf_counter() - start
            raise RewardServerError(
                f"the reward server at {self.url} failed {self.retries + 1} attempt(s); last failure: "
                f"{last_failure}. Check that the server is up (GET /health) and reachable, or raise `timeout` / "
                "`retries`."
            )
        self.last_latency = time.perf_counter() - start
        return self._parse(payload, len(prompts))

    async def __call__(self, prompts: Sequence[str], images: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """`score` in a worker thread, so that the event loop runs the other async rewards meanwhile."""
        return await asyncio.to_thread(self.score, prompts, images, **kwargs)
