"""API keys never fail open: $GPTOSS_API_KEYS where the app is built reaches every ingress replica in its bound args
(Ray's workers do not inherit the environment of `serve run`), a replica's own environment adds its keys, a variable
set without a key fails closed, and no key is ever shown (repr, errors, logs, `serve build`'s config). In-process,
no Ray cluster: the ingress is built from the args the builder bound, after a round trip through Ray's pickler."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
import yaml
from ray import cloudpickle

from gptoss_serve.deployments.args import API_KEYS_ENV, AppArgs
from gptoss_serve.deployments.builder import build_app, parse_args
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from tests.test_router_and_ingress import ExplodingRouter

SECRET = "sk-test-7f3a9c"


def ingress_args(app) -> AppArgs:
    """The args bound to the app's ingress deployment, as its replicas receive them (pickled by Ray)."""
    router, args = app._bound_deployment.init_args
    assert isinstance(args, AppArgs)
    return cloudpickle.loads(cloudpickle.dumps(args))


def status(args: AppArgs, path: str = "/v1/models", key: str | None = None, method: str = "GET") -> int:
    app = build_fastapi_app(OpenAIIngress(ExplodingRouter(), args))
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.request(method, path, headers=headers)).status_code

    return asyncio.run(main())


def test_keys_in_the_builders_environment_reach_a_replica_without_them(monkeypatch):
    monkeypatch.setenv(API_KEYS_ENV, f"{SECRET}, other-key")
    app = build_app({"served_model_name": "gpt-oss"})
    monkeypatch.delenv(API_KEYS_ENV)  # the replica's worker: started by `ray start`, without the variable
    args = ingress_args(app)
    assert status(args) == 401 and status(args, key="wrong") == 401 and status(args, method="HEAD") == 401
    assert status(args, key=SECRET) == 200 and status(args, key="other-key") == 200
    assert status(args, "/health") == 200  # probes need no key
    # only the ingress holds them: the other deployments' args do not carry the environment's keys
    router = app._bound_deployment.init_args[0]
    replica = router._bound_deployment.init_args[0]
    assert replica._bound_deployment.init_args[0].api_keys == []


def test_a_replicas_own_environment_adds_its_keys(monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    args = ingress_args(build_app({"api_keys": ["from-args"]}))
    monkeypatch.setenv(API_KEYS_ENV, "from-the-pod")  # a Kubernetes Secret in the pod's environment
    assert status(args) == 401
    assert status(args, key="from-args") == 200 and status(args, key="from-the-pod") == 200


def test_the_same_key_twice_is_kept_once(monkeypatch):
    monkeypatch.setenv(API_KEYS_ENV, "k1,k1, k2")
    args = ingress_args(build_app({"api_keys": ["k2"]}))
    assert args.resolved_api_keys == ["k2", "k1"]


@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_a_variable_set_without_a_key_fails_closed(monkeypatch, value):
    monkeypatch.setenv(API_KEYS_ENV, value)
    with pytest.raises(ValueError, match=f"api_keys: \\${API_KEYS_ENV} is set but holds no key"):
        build_app({})
    with pytest.raises(ValueError, match=API_KEYS_ENV):  # in a replica: it does not start, so serves nothing
        build_fastapi_app(OpenAIIngress(ExplodingRouter(), AppArgs()))


def test_require_api_keys_stops_a_replica_that_finds_none(monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    args = ingress_args(build_app({"require_api_keys": True}))  # the builder ran on the cluster, without the key
    with pytest.raises(ValueError, match="require_api_keys is set, but no API key reached this replica"):
        build_fastapi_app(OpenAIIngress(ExplodingRouter(), args))
    monkeypatch.setenv(API_KEYS_ENV, "on-the-node")  # the node's environment has it: the replica starts
    assert status(args) == 401 and status(args, key="on-the-node") == 200
    monkeypatch.setenv(API_KEYS_ENV, "in-the-builder")
    args = ingress_args(build_app({"require_api_keys": True}))
    monkeypatch.delenv(API_KEYS_ENV)
    assert status(args) == 401 and status(args, key="in-the-builder") == 200


@pytest.mark.parametrize("keys", [[""], ["ok", "  "]])
def test_an_empty_key_in_the_args_is_refused(keys):
    with pytest.raises(ValueError, match="api_keys: Value error, a key is empty"):
        parse_args({"api_keys": keys})


def test_no_key_is_ever_shown(monkeypatch, caplog):
    monkeypatch.setenv(API_KEYS_ENV, SECRET)
    with caplog.at_level(logging.DEBUG):
        app = build_app({"api_keys": ["arg-secret-1"]})
    args = ingress_args(app)
    assert {k.get_secret_value() for k in args.api_keys} == {SECRET, "arg-secret-1"}
    shown = [repr(args), str(args), str(args.model_dump()), args.model_dump_json(), caplog.text]
    for text in shown:
        assert SECRET not in text and "arg-secret-1" not in text, text
    # a bad value elsewhere: the error names fields, never the input that held the keys
    for raw in ({"api_keys": [SECRET, ""]}, {"api_keys": [SECRET], "device": "cuda"}, {"api_keys": SECRET}):
        with pytest.raises(ValueError) as e:
            parse_args(raw)
        assert SECRET not in str(e.value), e.value
    with pytest.raises(ValueError) as e:
        AppArgs(api_keys=[SECRET], device="cuda")
    assert SECRET not in str(e.value)


def test_serve_builds_config_holds_no_key(monkeypatch):
    """What `serve build` writes for an app (its deployments' options) holds no key from the environment."""
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.schema import ServeApplicationSchema
    from ray.serve.scripts import deployment_to_schema

    monkeypatch.setenv(API_KEYS_ENV, SECRET)
    built = build_serve_app(build_app({}), name="app1")
    config = ServeApplicationSchema(name="app1", route_prefix="/", import_path="gptoss_serve.deployments.builder:app",
                                    runtime_env={}, deployments=[deployment_to_schema(d) for d in built.deployments])
    text = yaml.safe_dump(config.model_dump(exclude_unset=True))
    assert "OpenAIIngress" in text and SECRET not in text
