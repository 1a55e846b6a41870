"""OpenAIIngress: the FastAPI front (OpenAI-compatible), validating, rendering harmony, streaming SSE.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{model}, GET /health, and
the Responses API (POST /v1/responses, GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items:
deployments/responses/api.py); HEAD on every GET route (GET's status and headers, no body).
Every error is in OpenAI's shape; a client that disconnects cancels its requests all the way to the engine.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss_serve.cluster.constraints import completion_constraint, harmony_constraint
from gptoss_serve.cluster.engine_protocol import EngineRequest, StreamItem
from gptoss_serve.cluster.sampling_params import StructuredOutput
from gptoss_serve.deployments.admission import Admission, ChoiceStream, raise_if_error
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.completion_bodies import ChatChoice, CompletionChoice, usage
from gptoss_serve.deployments.http_guards import ApiKeys, BodyLimit
from gptoss_serve.deployments.off_loop import QUICK_CHARS, check_prompt_size, message_texts, off_loop_if
from gptoss_serve.deployments.protocol import APIError, ChatCompletionRequest, CompletionRequest
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

    def get(path: str, endpoint) -> None:  # HEAD answers as GET does, without the body (HeadWithoutBody)
        app.add_api_route(path, endpoint, methods=["GET"])
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    get("/health", server.health)
    get("/v1/models", server.models)
    get("/v1/models/{model:path}", server.model)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/responses", server.responses.create, methods=["POST"])
    get("/v1/responses/{response_id}", server.responses.retrieve)
    app.add_api_route("/v1/responses/{response_id}", server.responses.delete, methods=["DELETE"])
    get("/v1/responses/{response_id}/input_items", server.responses.input_items)
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


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document, told the truth: errors are 4xx/5xx in OpenAI's shape (never FastAPI's 422), and the
    completion routes stream text/event-stream when asked to."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version="1", routes=app.routes)
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
        # a prompt that cannot fit is refused before it is rendered; a long one renders on a thread (its long texts are
        # encoded by tiktoken, which lets go of the GIL)
        texts = message_texts(body.messages)
        await check_prompt_size(texts, self.args.max_prompt_tokens, "messages")
        try:
            prompt = await off_loop_if(sum(map(len, texts)) > QUICK_CHARS, functools.partial(
                harmony.render_chat, body.messages, reasoning_effort=body.reasoning_effort, tools=body.tools))
            constraint = await off_loop_if(bool(body.response_format or body.tools), harmony_constraint,
                                           body.response_format, body.tools, body.tool_choice)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from None
        self.admission.check_prompt_length([prompt], "messages")
        choices = [ChatChoice(i, self.tokenizer, logprobs=body.logprobs, stop=body.stop_strings) for i in range(body.n)]
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
        prompts = []
        for p in body.prompts():
            if isinstance(p, str):  # a long one is counted first (refused early), and encoded on a thread
                await check_prompt_size([p], self.args.max_prompt_tokens, "prompt")
                try:
                    check_whitespace_runs(p, "prompt")
                except ValueError as e:
                    raise APIError(400, str(e), param="prompt") from None
                p = await off_loop_if(len(p) > QUICK_CHARS, self.tokenizer.encode, p)
            prompts.append(p)
        self.admission.check_prompt_length(prompts, "prompt")
        vocab = self.tokenizer.vocab_size
        if any(not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids) for ids in prompts):
            raise APIError(400, f"prompt must be non-empty text or token ids in [0, {vocab})", param="prompt")
        choices = [CompletionChoice(p * body.n + j, self.tokenizer, logprobs=body.logprobs is not None,
                                    prefix=self.tokenizer.decode(ids) if body.echo else "")
                   for p, ids in enumerate(prompts) for j in range(body.n)]
        return await self._respond(body, prompts, choices, "text_completion", body.max_tokens, body.logprobs,
                                   constraint)

    # ---- plumbing -----------------------------------------------------------------------------------------------
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
