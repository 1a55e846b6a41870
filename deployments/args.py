"""The application's arguments: one pydantic model, validated in the builder before any replica starts.

The same fields come from a Serve config's `args:`, `serve run ... key=value`, or KubeRay's serveConfigV2.
`model` may also come from the GPTOSS_MODEL environment variable; with neither, the app serves the embedded
default: the random `tiny` checkpoint, written once to a cache directory.

API keys come from `api_keys` and from $GPTOSS_API_KEYS, read twice: where the app is built (the builder binds them
into the args every ingress replica receives, `with_env_api_keys`) and in each ingress replica (a Kubernetes Secret
on the pods). Ray's workers get the environment of the `ray start` that started their node, not that of the
process that runs `serve run`, so reading it in the replica alone could leave the API open. Where the builder runs
on the cluster (`serve run config.yaml`, `serve deploy`, KubeRay) only the cluster's environment counts; with
`require_api_keys` an ingress replica that finds no key does not start. Keys are SecretStr: repr, str and
model_dump show `**********`, and a validation error never repeats its input.
"""

from __future__ import annotations

import json
import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gptoss_serve.cluster.engine_config import EngineConfig

MODEL_ENV = "GPTOSS_MODEL"
API_KEYS_ENV = "GPTOSS_API_KEYS"  # comma-separated; how a Kubernetes secret reaches the app
# a tool server's label is the harmony namespace of its tools (`to=LABEL.TOOL`): a name as OpenAI's function names are
TOOL_SERVER_LABEL = re.compile(r"[A-Za-z0-9_-]{1,64}")
# recipients harmony gives a meaning of its own: a plain MCP server's namespace must not take one
HARMONY_NAMESPACES = ("functions", "browser", "python", "assistant", "user", "system", "developer")


def check_http_url(url: str) -> str:
    """An http(s) URL with a host, as a tool server's endpoint must be; ValueError otherwise."""
    if not re.fullmatch(r"https?://[^/?#@\s]+(/[^\s]*)?", url):
        # the URL is not repeated: it may hold a credential after all
        raise ValueError("must be an http:// or https:// URL with a host, and no credentials in it")
    return url


class ToolServerConfig(BaseModel):
    """One MCP tool server (streamable HTTP) whose tools the Responses API calls for the model, inside a response
    (deployments/responses/tool_servers.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    url: str = Field(description="its streamable-HTTP MCP endpoint, such as http://127.0.0.1:8001/mcp")
    label: str = Field(description="its server_label: what a request's mcp tool names; a plain server's tools are "
                                   "the harmony namespace of this name")
    builtin: Literal["browser", "python"] | None = Field(None, description="the harmony built-in tool it serves: "
                                                         "browser (tools search, open, find; requests ask for it as "
                                                         "web_search_preview) or python (one tool, python(code); "
                                                         "requests ask for it as code_interpreter); none: a plain "
                                                         "MCP server, asked for as {type: mcp, server_label}")
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="sent with every request to it (an "
                                          "Authorization header, say)")
    description: str | None = Field(None, description="a plain server's namespace description in the prompt")
    timeout_s: float = Field(30.0, gt=0, description="longest one call (or listing) may take; the call fails past it")
    # at most 64k: a longer run of whitespace than that is more than the tokenizer's regex takes
    max_output_chars: int = Field(16384, ge=256, le=65536, description="a call's result is cut to this many "
                                  "characters (the model reads that it was cut)")

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return check_http_url(url)

    @model_validator(mode="after")
    def _check(self) -> ToolServerConfig:
        if not TOOL_SERVER_LABEL.fullmatch(self.label):
            raise ValueError(f"label: must match {TOOL_SERVER_LABEL.pattern}")
        if self.builtin is None and self.label in HARMONY_NAMESPACES:
            raise ValueError(f"label: {self.label!r} is one of harmony's own namespaces; a plain MCP server needs "
                             "another (or set builtin)")
        return self


class AppArgs(BaseModel):
    # an error never repeats the input: it may hold keys
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    model: str | None = Field(None, description=f"checkpoint directory or hub id; default ${MODEL_ENV}, "
                                                "else the embedded tiny random model")
    served_model_name: str = Field("gpt-oss", min_length=1, description="the `model` clients ask for")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    load_format: Literal["auto", "dummy"] = Field("auto", description="dummy: random weights of the checkpoint's "
                                                                      "shapes (it needs only config.json)")
    dequantize_experts: bool = Field(False, description="widen MXFP4 experts to dtype at load instead of keeping "
                                                        "them packed (4x the memory)")
    bf16_expert_copy: bool = Field(False, description="keep MXFP4 experts packed and also a bf16 copy of them, which "
                                                      "steps of many tokens an expert (prefill) multiply on the GPU: "
                                                      "faster prefill for 3x the packed experts' memory again "
                                                      "(gpt-oss-20b: +38 GB)")
    num_attention_replicas: int = Field(1, ge=1, description="AttentionReplica deployments (one engine each)")
    num_gpus_per_replica: float = Field(0, ge=0, description="GPUs (or a fraction) for each attention replica")
    num_cpus_per_replica: float = Field(1, ge=0)
    engine: EngineConfig = Field(default_factory=EngineConfig, description="the engine's limits in each "
                                                                          "attention replica")
    attention_routing: Literal["prefix", "most_room"] = Field(
        "prefix", description="how a batch picks its attention replica: prefix, the one this router sent its "
                              "prompts' prefixes to (their prefix cache) unless it is overloaded; most_room, the one "
                              "with the most free KV blocks")
    # the HTTP front and the router: CPUs reserved so that they keep pace; more replicas for more clients
    num_ingress_replicas: int = Field(1, ge=1, description="OpenAIIngress replicas (HTTP, SSE, harmony)")
    num_cpus_per_ingress: float = Field(0.5, ge=0)
    num_router_replicas: int = Field(1, ge=1, description="BatchingRouter replicas")
    num_cpus_per_router: float = Field(0.5, ge=0)
    max_ongoing_requests: int = Field(256, ge=1, description="requests one ingress replica serves at once")
    max_queued_requests: int = Field(512, ge=0, description="requests waiting beyond that before 429")
    # what one request may ask for (400 beyond), and who may ask
    max_request_bytes: int = Field(16 << 20, ge=1024, description="largest request body; 413 beyond")
    body_read_timeout_s: float = Field(30.0, gt=0, description="the whole body must arrive within this; 408 and "
                                                               "the connection closed beyond")
    max_requests_awaiting_body: int = Field(256, ge=0, description="requests of an ingress replica whose body is "
                                            "still incomplete 1 s after they arrived; one more such is 408 at once")
    max_prompt_tokens: int = Field(131072, ge=1, description="longest prompt after tokenizing")
    max_stop_strings: int = Field(16, ge=0, description="entries in `stop`")
    max_stop_length: int = Field(256, ge=1, description="characters in one stop string")
    max_tools: int = Field(128, ge=0, description="function tools in one chat request")
    max_stop_token_ids: int = Field(64, ge=0, description="entries in `stop_token_ids`")
    max_schema_bytes: int = Field(64 << 10, ge=1024, description="a response format (its schema and description) or "
                                                                 "one tool, as JSON; it bounds the grammar's compile time")
    api_keys: list[SecretStr] = Field(default_factory=list, description=f"if any (or ${API_KEYS_ENV}), every "
                                                                        "route but /health needs one as a Bearer token")
    require_api_keys: bool = Field(False, description="an ingress replica that finds no key (in api_keys, or "
                                   f"${API_KEYS_ENV} where the app was built or in its own environment) does not "
                                   "start: a key that did not reach the cluster stops the app instead of opening it")
    drain_timeout_s: float = Field(20.0, ge=0, description="on shutdown or redeploy, how long a replica waits for "
                                                           "its requests in flight to finish before it goes")
    max_waiting_per_replica: int = Field(512, ge=0, description="requests an engine may hold beyond those it "
                                                                "runs; more get 429 at once")
    # POST /v1/responses: what the app keeps for previous_response_id and GET /v1/responses/{id} (one store per app,
    # shared by its ingress replicas; the oldest responses go first)
    response_store_max_entries: int = Field(10_000, ge=1, description="stored responses kept at most")
    response_store_max_bytes: int = Field(256 << 20, ge=1024, description="their JSON size at most, in all")
    response_store_max_entry_bytes: int = Field(4 << 20, ge=1024, description="one stored response (with its "
                                                "conversation) at most; a larger one is not stored: it says "
                                                "`store: false`, and GET answers 404")
    response_store_ttl_s: float = Field(86_400.0, gt=0, description="how long a stored response is kept")
    # built-in and MCP tools of /v1/responses, run by this server inside a response (deployments/responses/tool_loop.py)
    tool_servers: list[ToolServerConfig] = Field(default_factory=list, description="MCP tool servers (a list, or "
                                                 "its JSON on the command line)")
    max_tool_calls: int = Field(16, ge=0, description="tool-server calls in one response at most (a request's "
                                "max_tool_calls may ask for fewer); the model is told when it reaches the limit")
    tool_list_ttl_s: float = Field(300.0, gt=0, description="how long a server's listed tools are kept before they "
                                                            "are listed again")
    mcp_server_url_allowlist: list[str] = Field(default_factory=list, description="URLs (or prefixes ending in /) "
                                                "a request's mcp tool may name as server_url; none by default: "
                                                "requests name configured servers only")
    router_max_batch_size: int = Field(64, ge=1, description="requests the router sends in one handle call")
    router_max_wait_ms: float = Field(5.0, ge=0, description="longest a request waits for a batch to fill "
                                                             "while replicas are busy (never when idle)")
    # expert parallelism: 0 workers keeps the experts inside each attention replica (colocated)
    num_moe_workers: int = Field(0, ge=0, description="MoEWorker actors sharing every layer's experts evenly")
    num_gpus_per_moe_worker: float = Field(0, ge=0)
    num_cpus_per_moe_worker: float = Field(1, ge=0)
    expert_transport: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPUs, else gloo")
    micro_batches: int = Field(2, ge=1, le=8, description="ping-pong micro-batches a step (with MoE workers)")
    expert_timeout_s: float = Field(10.0, gt=0, description="longest a replica waits for a worker's answer")

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        stripped = [k.get_secret_value().strip() for k in keys]
        if not all(stripped):  # an empty key would be dropped, and could leave the API open
            raise ValueError("a key is empty")
        return [SecretStr(k) for k in stripped]

    @field_validator("tool_servers", mode="before")
    @classmethod
    def _tool_servers_from_json(cls, value):
        """`serve run ... tool_servers='[{"url": ..., "label": ...}]'` gives a string: its JSON."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("must be a list of tool servers, or its JSON") from None
        return value

    @field_validator("mcp_server_url_allowlist")
    @classmethod
    def _check_allowlist(cls, urls: list[str]) -> list[str]:
        return [check_http_url(url) for url in urls]

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        labels = [server.label for server in self.tool_servers]
        if len(set(labels)) < len(labels):
            twice = next(label for label in labels if labels.count(label) > 1)
            raise ValueError(f"tool_servers: two servers are labelled {twice!r}")
        builtins = [server.builtin for server in self.tool_servers if server.builtin]
        if len(set(builtins)) < len(builtins):
            raise ValueError(f"tool_servers: two servers serve {next(b for b in builtins if builtins.count(b) > 1)}; "
                             "at most one each")
        if self.dequantize_experts and self.bf16_expert_copy:
            raise ValueError("dequantize_experts and bf16_expert_copy both widen the experts (the first keeps only the "
                             "bf16 weights, the second the packed ones too): choose one")
        if self.device == "cuda" and self.num_gpus_per_replica == 0:
            raise ValueError("num_gpus_per_replica must be > 0 when device is 'cuda'")
        if self.device == "cpu" and self.num_gpus_per_replica > 0:
            raise ValueError("num_gpus_per_replica must be 0 when device is 'cpu'")
        if self.expert_transport == "nccl" and self.num_moe_workers and not (
                self.num_gpus_per_moe_worker and self.resolved_device == "cuda"):
            raise ValueError("expert_transport 'nccl' needs GPUs for the attention replicas and the MoE workers")
        return self

    @property
    def resolved_transport(self) -> str:
        if self.expert_transport != "auto":
            return self.expert_transport
        return "nccl" if self.resolved_device == "cuda" and self.num_gpus_per_moe_worker > 0 else "gloo"

    @property
    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def resolved_model_dir(self):
        """The local checkpoint directory (a hub id is downloaded; the default model written on first use)."""
        from gptoss_serve.deployments.default_model import default_model_dir
        from gptoss_serve.model.hub import resolve_checkpoint

        return resolve_checkpoint(self.resolved_model) if self.resolved_model else default_model_dir()

    @property
    def resolved_model(self) -> str | None:
        return self.model or os.environ.get(MODEL_ENV) or None

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus_per_replica > 0 else "cpu"

    @property
    def resolved_api_keys(self) -> list[str]:
        """The keys from the args (the builder's $GPTOSS_API_KEYS among them) and from this process's
        $GPTOSS_API_KEYS together, each once."""
        keys = list(dict.fromkeys([k.get_secret_value() for k in self.api_keys] + api_keys_from_env()))
        if self.require_api_keys and not keys:
            raise ValueError(f"require_api_keys is set, but no API key reached this replica: give api_keys, or set "
                             f"${API_KEYS_ENV} where the app is built or on every node (the environment of "
                             f"`ray start`, a Kubernetes Secret on the pods)")
        return keys

    def with_env_api_keys(self) -> AppArgs:
        """These args with this process's $GPTOSS_API_KEYS added to `api_keys`: what the builder binds."""
        known = {k.get_secret_value() for k in self.api_keys}
        from_env = [SecretStr(k) for k in dict.fromkeys(api_keys_from_env()) if k not in known]
        return self.model_copy(update={"api_keys": self.api_keys + from_env}) if from_env else self


def api_keys_from_env() -> list[str]:
    """$GPTOSS_API_KEYS split at commas. Set but without a key (an empty Secret, `,`), it is an error, never "no
    keys": whoever set it meant the API to need one."""
    raw = os.environ.get(API_KEYS_ENV)
    if raw is None:
        return []
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if not keys:
        raise ValueError(f"${API_KEYS_ENV} is set but holds no key; unset it to serve without API keys")
    return keys
