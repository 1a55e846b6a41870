"""One app served by a local Ray cluster on this machine, for the benches that drive it over HTTP (soak, disconnect
storm, served against the engine alone)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def local_app(config: dict, *, num_cpus: int, port: int = 8000,
              metrics_export_port: int | None = None) -> Iterator[str]:
    """Starts Ray (num_cpus) and Serve on 127.0.0.1:port, deploys build_app(config) at "/"; yields its URL, and shuts
    both down after. metrics_export_port: where Ray's metrics agent serves the app's Prometheus metrics
    (http://127.0.0.1:PORT/metrics; they appear there about 10 s after they change)."""
    import ray
    from ray import serve

    from gptoss_serve.deployments.builder import build_app

    metrics = {} if metrics_export_port is None else {"_metrics_export_port": metrics_export_port}
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **metrics)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="gptoss", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
