"""serve.py in operation: API keys, metrics and a graceful stop (SIGTERM), against a tiny random
checkpoint served on a free loopback port."""
import httpx
import pytest

import configurator
import serve
from test_serve import HELLO, Server, post

openai = pytest.importorskip("openai")

KEY = "s3cret-key"


def start(ckpt, *args):
    cfg, _ = configurator.load(serve.DEFAULTS, [f"--ckpt={ckpt}", "--device=cpu", "--dtype=float32",
                                                "--temperature=0", *args])
    return Server(serve.build_app(cfg)).start()


@pytest.fixture(scope="module")
def ckpt(make_tiny_ckpt):
    return make_tiny_ckpt(block_size=128)


@pytest.fixture(scope="module")
def keyed(ckpt):
    srv = start(ckpt, f"--api_key={KEY}")
    try:
        yield srv
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------------
# API keys


def routes(app):
    """(method, path) of every route the app serves."""
    return [(method, route.path) for route in app.routes for method in sorted(route.methods - {"HEAD"})]


def test_every_route_but_health_and_the_page_needs_the_key(keyed):
    seen = routes(keyed.app)
    assert ("POST", "/v1/chat/completions") in seen and ("GET", "/metrics") in seen
    for method, path in seen:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, keyed.url + path, headers=headers, json={}, timeout=30)
            if path in ("/", "/health"):
                assert r.status_code == 200, (path, r.text)
                continue
            assert r.status_code == 401, (method, path, headers, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        r = httpx.request(method, keyed.url + path, headers={"Authorization": f"Bearer {KEY}"},
                          json={}, timeout=30)
        assert r.status_code != 401, (method, path)


def test_the_openai_client_with_and_without_the_key(keyed):
    ask = lambda key: openai.OpenAI(base_url=keyed.url + "/v1", api_key=key,  # noqa: E731
                                    max_retries=0, timeout=60).chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=3, temperature=0)
    assert ask(KEY).choices[0].message.role == "assistant"
    with pytest.raises(openai.AuthenticationError):
        ask("not-the-key")
    r = post(keyed, "/chat", {"message": "Hi"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and isinstance(r.json()["reply"], str)


def test_key_from_the_environment_and_the_exposed_host_warning(monkeypatch, capsys):
    cfg = dict(serve.DEFAULTS)
    monkeypatch.setenv(serve.KEY_ENV, "from-env")
    assert serve.api_key(cfg) == "from-env"
    assert serve.api_key({**cfg, "api_key": "given"}) == "given"  # the option wins
    monkeypatch.delenv(serve.KEY_ENV)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert serve.api_key(cfg) == "" and capsys.readouterr().out == ""  # loopback: no warning
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        assert serve.api_key({**cfg, "host": host}) == ""
        assert "without an API key" in capsys.readouterr().out
    monkeypatch.setenv("OPENAI_API_KEY", "sk-client-side")  # a client's variable is not the server's key
    assert serve.api_key(cfg) == ""
    for host in ("127.0.0.1", "::1", "localhost"):
        serve.api_key({**cfg, "host": host})
        assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------------
# Metrics


def scrape(srv, **kwargs):
    """{(name, labels): value} of /metrics' samples, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(srv.url + "/metrics", timeout=30, **kwargs)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_metrics_count_requests_tokens_and_time(ckpt):
    srv = start(ckpt)
    try:
        before = scrape(srv)
        assert value(before, "chat_gpt2_max_rows") == 16 and value(before, "chat_gpt2_queue_depth") == 0
        r = post(srv, "/v1/completions", {"prompt": ["Hello there", "Once upon"], "max_tokens": 5,
                                          "temperature": 0, "stop": [], "n": 2})
        assert r.status_code == 200
        usage = r.json()["usage"]
        assert post(srv, "/v1/completions", {"prompt": "Hi", "temperature": 9}).status_code == 400
        after = scrape(srv)
        route = "/v1/completions"
        assert value(after, "chat_gpt2_requests_total", route=route, status="200") == 1
        assert value(after, "chat_gpt2_requests_total", route=route, status="400") == 1
        assert value(after, "chat_gpt2_prompt_tokens_total") == usage["prompt_tokens"]
        assert value(after, "chat_gpt2_generated_tokens_total") == usage["completion_tokens"]
        assert value(after, "chat_gpt2_request_duration_seconds_count", route=route) == 2
        assert value(after, "chat_gpt2_time_to_first_token_seconds_count") == 1
        assert 0 < value(after, "chat_gpt2_time_to_first_token_seconds_sum") <= \
            value(after, "chat_gpt2_request_duration_seconds_sum", route=route)
        assert value(after, "chat_gpt2_running_rows") == 0
    finally:
        srv.stop()


def test_metrics_see_the_queue(ckpt, monkeypatch):
    import threading

    from test_serve import gated, wait_for
    srv = start(ckpt)
    try:
        service = srv.app.state.service
        body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0, "n": 3}
        with gated(monkeypatch):
            threads = [threading.Thread(target=post, args=(srv, "/v1/completions", body)) for _ in range(2)]
            threads[0].start()
            wait_for(lambda: service.batcher.stats()["running"] == 1)
            threads[1].start()
            wait_for(lambda: service.batcher.stats()["waiting"] == 1)  # the worker is held
            now = scrape(srv)
            assert value(now, "chat_gpt2_running_rows") == 3 and value(now, "chat_gpt2_queue_depth") == 1
            assert value(now, "chat_gpt2_running_requests") == 1
        for t in threads:
            t.join(60)
    finally:
        srv.stop()


def test_metrics_need_the_key(keyed):
    assert httpx.get(keyed.url + "/metrics").status_code == 401
    samples = scrape(keyed, headers={"Authorization": f"Bearer {KEY}"})
    assert value(samples, "chat_gpt2_requests_total", route="/metrics", status="401") >= 1


# --------------------------------------------------------------------------------------------------
# Graceful stop: SIGTERM drains


class Draining:
    """serve.py's uvicorn server (server.uvicorn_server) in a thread; sigterm() is what the signal
    does in the script's main thread."""

    def __init__(self, ckpt, grace):
        import socket
        import threading

        from chat_gpt2.server import uvicorn_server
        cfg, _ = configurator.load(serve.DEFAULTS, [f"--ckpt={ckpt}", "--device=cpu", "--temperature=0"])
        self.app = serve.build_app(cfg)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(self.app, grace, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        from test_serve import wait_for
        wait_for(lambda: self.server.started)

    def sigterm(self):
        import signal
        self.server.handle_exit(signal.SIGTERM, None)


def slow_model(monkeypatch, app, seconds):
    import time
    model = app.state.service.engine.model

    def forward(*args, **kwargs):
        time.sleep(seconds)
        return type(model).forward(model, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)


def stream_lines(url, body, into):
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                into.append(line)


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(ckpt, monkeypatch):
    import threading

    from test_serve import wait_for
    srv = Draining(ckpt, grace=30)
    slow_model(monkeypatch, srv.app, 0.02)
    service = srv.app.state.service
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stop": []}
    lines, result = [], {}
    streaming = threading.Thread(target=stream_lines, args=(srv.url, body, lines))
    plain = threading.Thread(target=lambda: result.update(r=post(srv, "/v1/completions", body)))
    streaming.start()
    plain.start()
    wait_for(lambda: len(lines) >= 2 and service.batcher.stats()["running"] == 2)
    srv.sigterm()
    wait_for(lambda: service.draining)
    r = post(srv, "/v1/completions", body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    health = httpx.get(srv.url + "/health", timeout=30)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    streaming.join(60)
    plain.join(60)
    srv.thread.join(60)
    assert not srv.thread.is_alive()  # the server stopped once they were done
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 40


def test_sigterm_ends_what_outlasts_the_grace_period_with_an_error(ckpt, monkeypatch):
    import threading

    from test_serve import wait_for
    srv = Draining(ckpt, grace=0.5)
    slow_model(monkeypatch, srv.app, 0.05)
    body = {"prompt": "Once upon a time", "max_tokens": 120, "temperature": 0, "stop": []}
    lines, result = [], {}
    streaming = threading.Thread(target=stream_lines, args=(srv.url, body, lines))
    plain = threading.Thread(target=lambda: result.update(r=post(srv, "/v1/completions", body)))
    streaming.start()
    plain.start()
    wait_for(lambda: len(lines) >= 1 and srv.app.state.service.batcher.stats()["running"] == 2)
    srv.sigterm()
    streaming.join(60)
    plain.join(60)
    srv.thread.join(60)
    assert not srv.thread.is_alive()
    r = result["r"]
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert lines[-1] == "data: [DONE]" and "shutting down" in lines[-2]  # an error event, then [DONE]


@pytest.mark.slow
def test_serve_script_exits_0_on_sigterm_after_the_request_in_flight(make_tiny_ckpt):
    """serve.py in a subprocess: SIGTERM while a long reply streams; new requests get 503, the reply
    ends whole, the process exits 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from test_serve import REPO
    big = make_tiny_ckpt(block_size=1024)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), f"--ckpt={big}", "--device=cpu",
                             f"--port={port}", "--dtype=float32"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "serve.py did not answer"
                time.sleep(0.2)
        body = {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "stop": [],
                "stream": True, "n": 4}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines += [line] if line else []
                if len(lines) == 3 and line:  # the reply streams: stop the server
                    proc.send_signal(signal.SIGTERM)
                    time.sleep(0.2)
                    refused = httpx.post(url + "/v1/completions", json={"prompt": "Hi"}, timeout=30)
                    assert refused.status_code == 503, refused.text
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------
# The per-request time limit


def test_request_timeout_is_504_or_an_error_event_then_done(ckpt, monkeypatch):
    from test_serve import wait_for
    srv = start(ckpt, "--request_timeout=0.5")
    try:
        slow_model(monkeypatch, srv.app, 0.05)
        body = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0, "stop": []}
        r = post(srv, "/v1/completions", body)
        assert r.status_code == 504 and "limit of 0.5 s" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        lines = []
        stream_lines(srv.url, body, lines)
        assert lines[-1] == "data: [DONE]" and "limit of 0.5 s" in lines[-2]
        batcher = srv.app.state.service.batcher
        wait_for(lambda: not batcher.busy())  # the timed-out requests' rows were freed
        quick = post(srv, "/v1/completions", {**body, "max_tokens": 2})
        assert quick.status_code == 200
    finally:
        srv.stop()
