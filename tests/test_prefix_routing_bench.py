"""bench.prefix_routing waits for Ray's metrics agent before its load, and goes on without it when it never comes."""

import http.server
import socket
import threading

from gptoss_serve.bench.prefix_routing import metrics_agent_up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_agent_that_never_answers_is_given_up_on_after_the_wait():
    assert not metrics_agent_up(f"http://127.0.0.1:{free_port()}/metrics", 0.5)


def test_an_agent_that_answers_is_up():
    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(b"# nothing yet\n")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert metrics_agent_up(f"http://127.0.0.1:{port}/metrics", 5.0)
        assert not metrics_agent_up(f"http://127.0.0.1:{port}/elsewhere", 0.5)  # a 404 is not the agent
    finally:
        server.shutdown()
