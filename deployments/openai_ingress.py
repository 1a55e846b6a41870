"""OpenAIIngress: the FastAPI front (OpenAI-compatible), validating, rendering harmony, streaming SSE.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{model}, GET /health, and
the Responses API (POST /v1/responses, GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items:
deployments/responses/api.py); vLLM's POST /tokenize, POST /detokenize and GET /version, which need no engine;
HEAD on every GET route (GET's status and headers, no body).
Every error is in OpenAI's shape; a client that disconnects cancels its requests all the way to the engine.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import re
import time
import uuid
import weakref
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss_serve.cluster.constraints import completion_constraint, harmony_constraint
from gptoss_serve.cluster.engine_protocol import EngineRequest, StreamItem
from gptoss_serve.cluster.sampling_params import StructuredOutput
from gptoss_serve.deployments.admission import Admission, ChoiceStream, raise_if_error
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.completion_bodies import ChatChoice, CompletionChoice, token_strings, usage
from gptoss_serve.deployments.http_guards import ApiKeys, BodyLimit
from gptoss_serve.deployments.off_loop import QUICK_CHARS, check_prompt_size, message_texts, off_loop_if
from gptoss_serve.deployments.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                               DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest,
                                               TokenizeResponse, VersionResponse)
from gptoss_serve.deployments.responses.api import ResponsesAPI
from gptoss_serve.deployments.responses.store import open_response_store
from gptoss_serve.model import harmony
from gptoss_serve.model.tokenizer import check_whitespace_runs, load_tokenizer

logger = logging.getLogger("ray.serve")  # Serve shows its replicas' records in `serve run`'s console


def build_fastapi_app(server: OpenAIIngress) -> FastAPI:
    """The HTTP routes of one ingress instance (Serve calls this in the replica; tests call it directly)."""
    app = FastAPI(title="gptoss-serve", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(e).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # unknown paths (404), wrong methods (405), bodies FastAPI cannot decode (400): in OpenAI's shape too
        messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}",
                    400: "the request body could not be parsed (it must be UTF-8 JSON, nested at most a few "
                         "hundred levels)"}
        error = APIError(e.status_code, messages.get(e.status_code, str(e.detail)))
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, "internal error").body(), status_code=500)

    def get(path: str, endpoint, **kwargs) -> None:  # HEAD answers as GET does, without the body (HeadWithoutBody)
        app.add_api_route(path, endpoint, methods=["GET"], **kwargs)
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    get("/health", server.health)
    get("/v1/models", server.models)
    get("/v1/models/{model:path}", server.model)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/responses", server.responses.create, methods=["POST"])
    get("/v1/responses/{response_id}", server.responses.retrieve)
    app.add_api_route("/v1/responses/{response_id}", server.responses.delete, methods=["DELETE"])
    app.add_api_route("/v1/responses/{response_id}/cancel", server.responses.cancel, methods=["POST"])
    app.router.on_shutdown.append(server.responses.shutdown)  # running background responses end as failed
    get("/v1/responses/{response_id}/input_items", server.responses.input_items)
    # vLLM's, at its paths (outside /v1)
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"], response_model=TokenizeResponse)
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"], response_model=DetokenizeResponse)
    get("/version", server.version, response_model=VersionResponse)
    app.add_middleware(BodyLimit, max_bytes=server.args.max_request_bytes,
                       read_timeout_s=server.args.body_read_timeout_s,
                       max_awaiting_body=server.args.max_requests_awaiting_body)
    keys = server.args.resolved_api_keys
    if not keys:  # said once a replica, so that keys set where no replica can see them never fail open silently
        logger.warning("no API key reached this ingress replica: every route is open to whoever reaches the proxy "
                       "(set $GPTOSS_API_KEYS where the app is built, on every node or pod, or require_api_keys: true)")
    app.add_middleware(ApiKeys, keys=keys)  # the first guard: added after BodyLimit
    app.add_middleware(HeadWithoutBody)  # outermost: no answer to HEAD has a body, a guard's 401 or 413 neither
    app.openapi = functools.partial(openapi_document, app)
    return app


class HeadWithoutBody:
    """HEAD gets what GET would get, status and headers (Content-Length included), with an empty body."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            await send({**message, "body": b""} if message["type"] == "http.response.body" else message)

        await self.app(scope, receive, headers_only)


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ERRORS = {400: "invalid request (the message names the field)", 401: "missing or invalid API key",
          404: "unknown model", 408: "the request body did not arrive in time", 413: "request body too large",
          429: "at capacity; retry after Retry-After seconds", 503: "the engine or its experts failed; retry"}


TOKENIZE_FORMS = (TokenizeCompletionRequest, TokenizeChatRequest)


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document, told the truth: errors are 4xx/5xx in OpenAI's shape (never FastAPI's 422), the
    completion routes stream text/event-stream when asked to, and /tokenize takes either of its two bodies."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version="1", routes=app.routes)
        if "/tokenize" in document.get("paths", {}):  # the route reads a JSON object and picks its form itself
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for form in TOKENIZE_FORMS:
                schemas[form.__name__] = form.model_json_schema(ref_template="#/components/schemas/{model}")
            body = document["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]
            body["schema"] = {"anyOf": [{"$ref": f"#/components/schemas/{form.__name__}"} for form in TOKENIZE_FORMS]}
        for path, methods in document.get("paths", {}).items():
            for operation in methods.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if path != "/health":
                    responses |= {str(status): {"description": text, "content": {
                        "application/json": {"schema": ERROR_SCHEMA}}} for status, text in ERRORS.items()}
                if path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
                    responses["200"].setdefault("content", {})["text/event-stream"] = {
                        "schema": {"type": "string", "description": "server-sent events, when stream is true"}}
        document.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        document.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = document
    return app.openapi_schema


# pydantic's complaints about the body as a whole: missing (no body), not an object (null, [], 3, "x", or not JSON)
NOT_AN_OBJECT = {"missing", "model_attributes_type", "model_type", "dict_type"}


def validation_error(e: RequestValidationError) -> APIError:
    """pydantic's first complaint as a 400 naming the field: `messages.0.role: Field required`."""
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'bad JSON')})")
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in NOT_AN_OBJECT:
        # no body, or null, a list, a number, a string, or a body not sent as JSON: about no field in particular
        return APIError(400, "the request body must be a JSON object (content-type: application/json)")
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    text = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        text = "unknown field (not supported by this server)"
    if location:
        return APIError(400, f"{'.'.join(location)}: {text}", param=location[0])
    # a check across fields (a model validator): its message starts with the field it is about
    field = re.match(r"[A-Za-z_]+", text)
    return APIError(400, text, param=field.group(0) if field else None)


class OpenAIIngress:
    def __init__(self, router, args: AppArgs) -> None:
        self.args = args
        self.admission = Admission(router, args)
        self.tokenizer = load_tokenizer()
        # /tokenize's max_model_len: the ingress's limit on prompts, or the engine's on prompt and output together
        # where it is set and smaller (one the engine only finds at start, from the model and its KV cache, is
        # unknown here: that engine still refuses past it)
        self.max_model_len = min(args.max_prompt_tokens, args.engine.max_model_len or args.max_prompt_tokens)
        # POST /v1/responses shares this ingress's router, slots and checks (deployments/responses/api.py)
        self.responses = ResponsesAPI(self.admission, open_response_store(
            max_entries=args.response_store_max_entries, max_bytes=args.response_store_max_bytes,
            ttl_s=args.response_store_ttl_s, max_entry_bytes=args.response_store_max_entry_bytes))

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve's hook: the replica builds its FastAPI app around this instance."""
        return build_fastapi_app(self)

    # ---- routes ---------------------------------------------------------------------------------------------
    async def health(self) -> dict:
        return {"status": "ok"}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model: str) -> dict:
        """The openai client's models.retrieve: the served model's card, 404 in OpenAI's shape for any other."""
        self.admission.check_model(model)
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.args.served_model_name, "object": "model", "created": 0, "owned_by": "gptoss-serve"}

    async def chat_completions(self, body: ChatCompletionRequest):
        self.admission.check_model(body.model)
        self.admission.check_limits(stops=body.stop_strings, tools=body.tools, stop_token_ids=body.stop_token_ids,
                                    formats={"response_format": body.response_format})
        prompt = await self._render_chat(body.messages, body.reasoning_effort, body.tools)
        try:
            constraint = await off_loop_if(bool(body.response_format or body.tools), harmony_constraint,
                                           body.response_format, body.tools, body.tool_choice)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from None
        choices = [ChatChoice(i, self.tokenizer, logprobs=body.logprobs, stop=body.stop_strings,
                              include_reasoning=body.include_reasoning) for i in range(body.n)]
        return await self._respond(body, [prompt], choices, "chat.completion", body.output_limit, body.num_logprobs,
                                   constraint)

    async def completions(self, body: CompletionRequest):
        self.admission.check_model(body.model)
        self.admission.check_limits(stops=body.stop_strings, stop_token_ids=body.stop_token_ids,
                                    formats={"response_format": body.response_format})
        try:
            constraint = await off_loop_if(bool(body.response_format), completion_constraint, body.response_format)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from None
        prompts = [await self._encode_text(p) if isinstance(p, str) else p for p in body.prompts()]
        self.admission.check_prompt_length(prompts, "prompt")
        vocab = self.tokenizer.vocab_size
        if any(not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids) for ids in prompts):
            raise APIError(400, f"prompt must be non-empty text or token ids in [0, {vocab})", param="prompt")
        choices = [CompletionChoice(p * body.n + j, self.tokenizer, logprobs=body.logprobs is not None,
                                    prefix=self.tokenizer.decode(ids) if body.echo else "")
                   for p, ids in enumerate(prompts) for j in range(body.n)]
        return await self._respond(body, prompts, choices, "text_completion", body.max_tokens, body.logprobs,
                                   constraint)

    # ---- vLLM's extras: no engine, no slot -------------------------------------------------------------------
    async def tokenize(self, body: dict[str, Any]) -> dict:
        """vLLM's /tokenize. A `prompt`: its ids as /v1/completions sends them to the engine. `messages`: the prompt
        /v1/chat/completions renders for the same messages, tools and reasoning_effort; with add_generation_prompt
        false, less its closing `<|start|>assistant`; with continue_final_message, the earlier messages' prompt and
        then the last (assistant) message as the model would have written it, left open. The checks of those
        routes, a prompt's length included."""
        request = tokenize_request(body)
        self._check_model(request.model)
        if isinstance(request, TokenizeCompletionRequest):
            ids = await self._encode_text(request.prompt)
            self.admission.check_prompt_length([ids], "prompt")
        else:
            ids = await self._tokenize_chat(request)
        strs = None
        if request.return_token_strs:
            strs = await off_loop_if(len(ids) > QUICK_CHARS, token_strings, self.tokenizer, ids)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        """vLLM's /detokenize: the text of token ids of the vocabulary (special tokens by name; a character cut
        between ids comes out as U+FFFD)."""
        self._check_model(body.model)
        vocab = self.tokenizer.vocab_size
        if body.tokens and not (min(body.tokens) >= 0 and max(body.tokens) < vocab):
            raise APIError(400, f"tokens: token ids must be in [0, {vocab})", param="tokens")
        # decoding is quick, but a body may hold millions of ids
        return {"prompt": await off_loop_if(len(body.tokens) > QUICK_CHARS, self.tokenizer.decode, body.tokens)}

    async def version(self) -> dict:
        """vLLM's /version: this server's package version."""
        return {"version": PACKAGE_VERSION}

    def _check_model(self, model: str | None) -> None:
        if model is not None:  # vLLM's tokenizer routes may leave it out: the served model
            self.admission.check_model(model)

    async def _tokenize_chat(self, request: TokenizeChatRequest) -> list[int]:
        self.admission.check_limits(tools=request.tools)
        messages = request.messages
        if not request.continue_final_message:
            ids = await self._render_chat(messages, request.reasoning_effort, request.tools)
            if not request.add_generation_prompt:  # the chat route's prompt less the assistant's header
                header = harmony.generation_prompt()
                assert ids[-len(header):] == header, "harmony's prompt for a chat ends with the assistant's header"
                ids = ids[:-len(header)]
            return ids
        # the chat route's prompt for the earlier messages, then the last one as the model would have written it
        *history, last = messages
        where = f"messages[{len(history)}]"
        try:
            texts = harmony.continued_texts(last, where)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from None
        await check_prompt_size([t for t in texts if t], self.args.max_prompt_tokens, "messages")
        ids = await self._render_chat(history, request.reasoning_effort, request.tools)
        ids += await off_loop_if(sum(len(t or "") for t in texts) > QUICK_CHARS, harmony.continuation, *texts)
        self.admission.check_prompt_length([ids], "messages")
        return ids

    # ---- plumbing -----------------------------------------------------------------------------------------------
    async def _render_chat(self, messages: list, reasoning_effort: str, tools: list | None) -> list[int]:
        """The chat route's prompt (its /tokenize too): 400 naming the field for what harmony cannot render, or a
        prompt longer than the server takes."""
        # a prompt that cannot fit is refused before it is rendered; a long one renders on a thread (its long texts are
        # encoded by tiktoken, which lets go of the GIL)
        texts = message_texts(messages)
        await check_prompt_size(texts, self.args.max_prompt_tokens, "messages")
        try:
            prompt = await off_loop_if(sum(map(len, texts)) > QUICK_CHARS, functools.partial(
                harmony.render_chat, messages, reasoning_effort=reasoning_effort, tools=tools))
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from None
        self.admission.check_prompt_length([prompt], "messages")
        return prompt

    async def _encode_text(self, text: str) -> list[int]:
        """A text prompt's ids, as /v1/completions sends them (and its /tokenize): special-token text stays text,
        nothing is added. A long one is counted first (refused early), and encoded on a thread."""
        await check_prompt_size([text], self.args.max_prompt_tokens, "prompt")
        try:
            check_whitespace_runs(text, "prompt")
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        return await off_loop_if(len(text) > QUICK_CHARS, self.tokenizer.encode, text)

    async def _respond(self, body, prompts: list[list[int]], choices: list, kind: str, max_tokens, logprobs,
                       structured_output: StructuredOutput | None = None):
        base = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        now = time.time()
        requests = []
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                params = body.sampling_params(max_tokens=max_tokens, logprobs=logprobs, seed=seed,
                                              engine_stops=kind != "chat.completion",
                                              structured_output=structured_output)
                requests.append(EngineRequest(f"{base}-{p}-{j}", ids, params, arrival_time=now))
        stream, firsts = await self.admission.open(requests)
        header = {"id": base, "object": kind + ".chunk" if kind == "chat.completion" else kind,
                  "created": int(now), "model": self.args.served_model_name}
        if body.stream:
            events = self._sse(stream, firsts, choices, header, kind, body.include_usage, len(prompts))
            # a stream dropped before it starts never runs its `finally`: stop it (and free its slot) when collected
            weakref.finalize(events, stream.close)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            async for items in stream.choice_steps(firsts):
                raise_if_error([item for _, item in items])
                for index, item in items:
                    if item.output is not None:
                        choices[index].feed(item.output)
                    if getattr(choices[index], "stopped", False):
                        stream.end(index)
        finally:
            stream.close()
        return {**header, "object": kind,
                "choices": [c.message() if kind == "chat.completion" else c.body() for c in choices],
                "usage": usage(choices, num_prompts=len(prompts))}

    async def _sse(self, stream: ChoiceStream, firsts, choices, header, kind, include_usage, num_prompts):
        """Server-sent events: each engine step's chunks of all choices in one write, then usage, then [DONE]."""
        chat = kind == "chat.completion"
        try:
            if chat:
                yield "".join(_event({**header, "choices": [{"index": c.index, "delta": {"role": "assistant"},
                                                              "logprobs": None, "finish_reason": None}]})
                              for c in choices)
            async for items in stream.choice_steps(firsts):
                events = []
                for index, item in items:
                    if item.error is not None:
                        events.append(_event(APIError(item.status, item.error).body()))
                        continue
                    chunk = self._chunk(choices[index], item, chat)
                    if chunk is not None:
                        events.append(_event({**header, "choices": [chunk]}))
                    if chat and choices[index].stopped:
                        stream.end(index)
                if events:
                    yield "".join(events)
            if include_usage:
                yield _event({**header, "choices": [], "usage": usage(choices, num_prompts=num_prompts)})
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: stop every choice's request, free the slot
            stream.close()

    @staticmethod
    def _chunk(choice, item: StreamItem, chat: bool) -> dict | None:
        """A choice's chunk for one engine output; None when it has nothing to show (harmony headers)."""
        if chat:
            fed = choice.feed(item.output)
            if fed is None:  # after a stop string: the request is being aborted
                return None
            delta, logprobs = fed
            if not delta and not logprobs and choice.finish_reason is None:
                return None
            return {"index": choice.index, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                    "finish_reason": choice.finish_reason}
        text, logprobs = choice.feed(item.output)
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _package_version() -> str:
    try:
        return importlib.metadata.version("gptoss-serve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed: no metadata
        return "0+unknown"


PACKAGE_VERSION = _package_version()


def tokenize_request(body: dict[str, Any]) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """/tokenize's body in its form: a chat when it has `messages`, else a text. Picked here rather than by a
    pydantic union, whose errors would name the form before the field (`TokenizeChatRequest.messages`)."""
    if "messages" in body and "prompt" in body:
        raise APIError(400, "prompt: give either prompt (a text) or messages (a chat), not both", param="prompt")
    try:
        return (TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest).model_validate(body)
    except ValidationError as e:  # a 400 naming the field, as for every other body
        raise validation_error(RequestValidationError(e.errors())) from None
