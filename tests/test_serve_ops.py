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
    assert ("POST", "/v1/chat/completions") in seen
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
