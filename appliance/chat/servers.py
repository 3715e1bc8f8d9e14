"""Chat models behind a server, by URL: Ollama's ``/api/chat`` and any OpenAI-compatible
``/v1/chat/completions``, on one shared ``ServerChatModel``. Neither server is contacted until
the first stream; httpx and ollama are imported when a model is built.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Iterable, Iterator
from typing import Any, ClassVar

from appliance.chat.base import BaseChatModel, Usage, estimate_prompt_tokens, estimate_tokens
from appliance.core.chat_settings import server_url
from appliance.core.errors import ModelError, missing_dependency
from appliance.core.protocols import ChatMessage, GenerationParams

log = logging.getLogger(__name__)


class ServerChatModel(BaseChatModel):
    """What the server backends share: the checked URL, the model's name on the server, the
    timeout, the context the settings declare (a server does not say), estimated token counts
    and one HTTP client to close. Subclasses set ``_client`` and implement ``_generate``."""

    prefix: ClassVar[str]
    """The backend's part of ``name`` (``ollama:<model>``)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        timeout: float,
        n_ctx: int,
        default_params: GenerationParams | None,
    ) -> None:
        super().__init__(default_params)
        self._url = server_url(url)
        self._model = model
        self._timeout = timeout
        self._n_ctx = n_ctx
        self._client: Any = None

    @property
    def name(self) -> str:
        return f"{self.prefix}:{self._model}"

    @property
    def context_length(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def _close(self) -> None:
        self._client.close()


class OllamaChatModel(ServerChatModel):
    """An Ollama server's ``/api/chat``, through the official ``ollama`` client."""

    prefix = "ollama"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        timeout: float = 120,
        n_ctx: int = 4096,
        default_params: GenerationParams | None = None,
    ) -> None:
        try:
            import httpx
            import ollama
        except ImportError as exc:
            raise missing_dependency("ollama", package="ollama") from exc
        super().__init__(url, model, timeout=timeout, n_ctx=n_ctx, default_params=default_params)
        self._ollama: Any = ollama
        self._httpx: Any = httpx
        # trust_env=False: no proxy or netrc from the environment; the URL is the whole story.
        self._client = ollama.Client(host=self._url, timeout=timeout, trust_env=False)

    def _error(self, exc: Exception) -> ModelError:
        where = f"the Ollama server at {self._url}"
        if isinstance(exc, self._ollama.ResponseError):
            if exc.status_code == 404:
                return ModelError(
                    f"{where} has no model {self._model!r} ({exc.error}); pull or create it "
                    f"there (ollama pull {self._model}) or set chat.model (APPLIANCE_CHAT__MODEL)"
                )
            status = f" (HTTP {exc.status_code})" if exc.status_code > 0 else ""
            return ModelError(f"{where} failed for model {self._model!r}: {exc.error}{status}")
        if isinstance(exc, self._httpx.TimeoutException):
            return ModelError(
                f"{where} sent nothing for {self._timeout:g} s (model {self._model!r}); "
                "raise chat.timeout_s (APPLIANCE_CHAT__TIMEOUT_S) or check the server"
            )
        if isinstance(exc, ConnectionError | OSError | self._httpx.TransportError):
            return ModelError(
                f"cannot reach {where} (model {self._model!r}): {exc}; start it or fix "
                "chat.url (APPLIANCE_CHAT__URL)"
            )
        return ModelError(
            f"{where} answered something that is not Ollama's chat stream (model "
            f"{self._model!r}): {exc}"
        )

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, Usage]:
        options: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "num_predict": params.max_tokens,
            "num_ctx": self._n_ctx,
            "repeat_penalty": params.repeat_penalty,
        }
        if params.stop:
            options["stop"] = list(params.stop)
        if params.seed is not None:
            options["seed"] = params.seed
        failures = (
            self._ollama.ResponseError,
            self._httpx.HTTPError,
            self._httpx.StreamError,
            OSError,
            ValueError,  # malformed JSON, or a chunk that is not a ChatResponse
        )
        pieces = 0
        final: Any = None
        chunks: Any = None
        try:
            chunks = self._client.chat(
                model=self._model, messages=messages, stream=True, options=options
            )
            for chunk in chunks:
                content = chunk.message.content or ""
                if content:
                    pieces += 1
                    yield content
                if chunk.done:
                    final = chunk
                    break
        except failures as exc:
            raise self._error(exc) from exc
        finally:
            if chunks is not None:
                chunks.close()
        if final is None:
            raise ModelError(
                f"the Ollama server at {self._url} ended the stream before it was done "
                f"(model {self._model!r})"
            )
        rate = None
        if final.eval_count and final.eval_duration:
            rate = final.eval_count / (final.eval_duration / 1e9)
        return Usage(
            model=final.model or self._model,
            prompt_tokens=final.prompt_eval_count or estimate_prompt_tokens(messages),
            completion_tokens=final.eval_count or pieces,
            finish_reason=final.done_reason or "stop",
            tokens_per_s=rate,
            estimated=not (final.eval_count and final.prompt_eval_count),
        )


def _sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each Server-Sent Event (several data lines joined by newlines)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def _error_detail(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300] or "no details"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)[:300]


class OpenAICompatibleChatModel(ServerChatModel):
    """A server's ``POST /v1/chat/completions`` with ``stream: true`` (Server-Sent Events)."""

    prefix = "openai"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120,
        n_ctx: int = 4096,
        default_params: GenerationParams | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise missing_dependency("httpx", package="httpx") from exc
        super().__init__(url, model, timeout=timeout, n_ctx=n_ctx, default_params=default_params)
        self._httpx: Any = httpx
        self._endpoint = self._url.removesuffix("/v1") + "/v1/chat/completions"
        self._include_usage = True
        headers = {"Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(timeout=timeout, headers=headers, trust_env=False)

    def _http_error(self, status: int, body: str) -> ModelError:
        detail = _error_detail(body)
        where = f"the server at {self._endpoint}"
        if status == 404:
            return ModelError(
                f"{where} answered 404 for model {self._model!r}: {detail}; check chat.model "
                "(APPLIANCE_CHAT__MODEL) and that chat.url (APPLIANCE_CHAT__URL) is an "
                "OpenAI-compatible server"
            )
        if status in (401, 403):
            return ModelError(
                f"{where} refused the request (HTTP {status}): {detail}; set chat.api_key "
                "(APPLIANCE_CHAT__API_KEY)"
            )
        return ModelError(f"{where} answered HTTP {status} for model {self._model!r}: {detail}")

    def _transport_error(self, exc: Exception) -> ModelError:
        where = f"the server at {self._endpoint}"
        if isinstance(exc, self._httpx.TimeoutException):
            return ModelError(
                f"{where} sent nothing for {self._timeout:g} s (model {self._model!r}); raise "
                "chat.timeout_s (APPLIANCE_CHAT__TIMEOUT_S) or check the server"
            )
        if isinstance(exc, ValueError):
            return ModelError(
                f"{where} answered something that is not an OpenAI chat stream (model "
                f"{self._model!r}): {exc}"
            )
        return ModelError(
            f"cannot reach {where} (model {self._model!r}): {exc}; start it or fix chat.url "
            "(APPLIANCE_CHAT__URL)"
        )

    def _body(self, messages: list[ChatMessage], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "stream": True,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if self._include_usage:
            body["stream_options"] = {"include_usage": True}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, Usage]:
        httpx = self._httpx
        usage: dict[str, Any] | None = None
        served_model, finish, pieces, done = self._model, "", 0, False
        try:
            while True:
                request = self._body(messages, params)
                with self._client.stream("POST", self._endpoint, json=request) as response:
                    if response.status_code >= 400:
                        body = response.read().decode("utf-8", "replace")
                        if (
                            response.status_code in (400, 422)
                            and self._include_usage
                            and "stream_options" in body
                        ):
                            log.info("%s refuses stream_options; counting pieces", self._url)
                            self._include_usage = False
                            continue
                        raise self._http_error(response.status_code, body)
                    for data in _sse_data(response.iter_lines()):
                        if data.strip() == "[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if not isinstance(event, dict):
                            raise ValueError(f"an event that is not a JSON object: {data[:100]}")
                        if event.get("error"):
                            raise ModelError(
                                f"the server at {self._endpoint} failed while generating "
                                f"(model {self._model!r}): {_error_detail(data)}"
                            )
                        served_model = event.get("model") or served_model
                        usage = event.get("usage") or usage
                        for choice in event.get("choices") or []:
                            if choice.get("index", 0) != 0:
                                continue
                            content = (choice.get("delta") or {}).get("content")
                            if content:
                                pieces += 1
                                yield content
                            finish = choice.get("finish_reason") or finish
                break
        except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as exc:
            raise self._transport_error(exc) from exc
        if not done and not finish:
            raise ModelError(
                f"the server at {self._endpoint} ended the stream before it was done "
                f"(model {self._model!r})"
            )
        prompt_tokens = (usage or {}).get("prompt_tokens")
        completion_tokens = (usage or {}).get("completion_tokens")
        return Usage(
            model=served_model,
            prompt_tokens=prompt_tokens
            if isinstance(prompt_tokens, int)
            else estimate_prompt_tokens(messages),
            completion_tokens=completion_tokens if isinstance(completion_tokens, int) else pieces,
            finish_reason=finish or "stop",
            estimated=not (isinstance(prompt_tokens, int) and isinstance(completion_tokens, int)),
        )
