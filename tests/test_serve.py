"""serve.py: the OpenAI-compatible API, /chat, the page, the limits, the queue and the batching, against a tiny
random checkpoint served on a free loopback port."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import serve
import configurator
from chat_gpt2 import chat
from chat_gpt2.engine import Decoder
from chat_gpt2.sampling import SamplingParams

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    """uvicorn in a thread on a socket bound to a free loopback port; stop() always runs (fixture teardown)."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def ckpt(make_tiny_ckpt):
    return make_tiny_ckpt(block_size=128)


@pytest.fixture(scope="module")
def server(ckpt):
    cfg, _ = configurator.load(serve.DEFAULTS, [f"--ckpt={ckpt}", "--device=cpu", "--dtype=float32",
                                                "--max_messages=8", "--max_chars=2000", "--max_body_bytes=20000",
                                                "--temperature=0"])  # the page sends no temperature
    srv = Server(serve.build_app(cfg)).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def service(server):
    return server.app.state.service


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@contextlib.contextmanager
def gated(monkeypatch):
    """Hold the worker before its next step until the block ends, so that requests pile up in the queue."""
    gate, original = threading.Event(), Decoder.step

    def step(decoder):
        gate.wait(30)
        return original(decoder)

    monkeypatch.setattr(Decoder, "step", step)
    try:
        yield gate
    finally:
        gate.set()


def hold_when(monkeypatch, condition):
    """Hold the worker before a step once condition(decoder) is true, until the returned event is set."""
    held, release, original = threading.Event(), threading.Event(), Decoder.step

    def step(decoder):
        if not release.is_set() and condition(decoder):
            held.set()
            release.wait(30)
        return original(decoder)

    monkeypatch.setattr(Decoder, "step", step)
    return held, release


def wait_for(condition, timeout=20):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=60, **kwargs)


GREEDY = {"temperature": 0, "stop": []}
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


# ----------------------------------------------------------------------------------------------------------------
# The official openai client


def test_openai_chat_completion(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, **GREEDY)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_streaming_matches_non_streaming(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, **GREEDY)
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": HELLO, "max_tokens": 4, "stream": True, **GREEDY}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, **GREEDY)
    text = full.choices[0].text
    assert len(text) > 6, text
    stop = text[len(text) // 2:len(text) // 2 + 3].strip()  # no leading space: it cannot match the reply's start
    assert stop
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


def test_n_choices_and_seed_repeat(client):
    ask = lambda seed: client.chat.completions.create(  # noqa: E731
        model="tiny", messages=HELLO, max_tokens=8, temperature=1.0, n=3, seed=seed, stop=[])
    first, again, other = ask(7), ask(7), ask(8)
    texts = lambda r: [c.message.content for c in r.choices]  # noqa: E731
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts(first) == texts(again)
    assert texts(first) != texts(other)


def test_openai_client_sees_api_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=5)
    assert e.value.body["param"] == "temperature"


# ----------------------------------------------------------------------------------------------------------------
# Plain HTTP


def test_health_models_chat_and_page(server, ckpt):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["waiting"] == 0
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    r = post(server, "/chat", {"message": "How are you?", "history": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    assert r.status_code == 200 and isinstance(r.json()["reply"], str)
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "reset" in page.text


def test_long_conversation_is_trimmed_to_the_context(server):
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 50} for i in range(7)]
    r = post(server, "/v1/chat/completions", {"messages": long, "max_tokens": 500, **GREEDY})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] <= 128 - 64  # block_size minus the room kept for the reply
    assert usage["completion_tokens"] <= 127  # max_tokens clamped to the context


BAD = [  # (body, status, param)
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ({"messages": HELLO, "temperature": 2.5}, 400, "temperature"),
    ({"messages": HELLO, "top_p": 1.5}, 400, "top_p"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": HELLO, "n": 9}, 400, "n"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}] * 9}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 2001}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests(server, body, status, param):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_malformed_json_body_size_and_bad_fields_elsewhere(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_invalid"
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 30000}]})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=iter([b'{"prompt": "hi"}']), timeout=30)  # chunked
    assert r.status_code == 411 and "Content-Length" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": "hi", "top_k": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    r = post(server, "/chat", {"history": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "message"


def test_request_fields_come_from_sampling_params():
    """The request model's sampling fields are SamplingParams' options (OpenAI's max_tokens for
    max_new_tokens), with their help as the schema's descriptions and their bounds (plus the API's
    own limits)."""
    from dataclasses import fields

    from chat_gpt2 import server
    request_fields = server.Sampling.model_fields
    for f in fields(SamplingParams):
        name = server.API_NAMES.get(f.name, f.name)
        assert request_fields[name].default is None and request_fields[name].description == f.metadata["help"]
    limits = {type(m).__name__: m for m in request_fields["top_p"].metadata}
    assert limits["Ge"].ge == 0 and limits["Le"].le == 1


# ----------------------------------------------------------------------------------------------------------------
# Queue, disconnects, batching


def test_queue_limit_returns_503(server, service, monkeypatch):
    monkeypatch.setattr(service.batcher, "max_waiting", 1)
    body = {"prompt": "Hello", "max_tokens": 2, **GREEDY}
    results = []
    with gated(monkeypatch):
        threads = [threading.Thread(target=lambda: results.append(post(server, "/v1/completions", body)))
                   for _ in range(2)]
        threads[0].start()
        wait_for(lambda: service.batcher.stats()["running"] == 1)  # the first holds the (gated) worker
        threads[1].start()
        wait_for(lambda: service.batcher.stats()["waiting"] == 1)  # the second fills the queue
        full = post(server, "/v1/completions", body)
    for t in threads:
        t.join(60)
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "queue_full"
    assert [r.status_code for r in results] == [200, 200]


def test_disconnect_mid_stream_frees_the_slot(server, service, monkeypatch):
    model = service.engine.model
    calls = []

    def slow_forward(*args, **kwargs):  # ~0.05 s a token: the client leaves long before 120 tokens
        calls.append(1)
        time.sleep(0.05)
        return type(model).forward(model, *args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    body = {"prompt": "Tell me a story", "max_tokens": 120, "stream": True, "temperature": 1.0, "stop": []}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the first chunk arrived: generation runs; now leave
    idle = lambda stats: stats["running"] == 0 and stats["waiting"] == 0  # noqa: E731
    wait_for(lambda: idle(service.batcher.stats()))
    steps = len(calls)
    assert steps < 100, f"the abandoned request ran {steps} steps"
    time.sleep(0.3)
    assert len(calls) == steps  # nothing decodes any more


def test_batched_equals_alone_for_any_lengths_and_seeds(server, service, monkeypatch):
    enc = chat.get_encoder()
    bodies = [{"prompt": p, "max_tokens": 16, **GREEDY} for p in ("The cat", "A dog ran to the park and then",
                                                                   "My friend went to the market to buy some")]
    bodies.append({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 7, "n": 2, "stop": []})
    assert len({len(enc.encode_ordinary(b["prompt"])) for b in bodies}) == 4
    texts = lambda r: [c["text"] for c in r.json()["choices"]]  # noqa: E731
    alone = [texts(post(server, "/v1/completions", body)) for body in bodies]
    results = {}
    with gated(monkeypatch) as gate:
        blocker = threading.Thread(target=lambda: post(server, "/v1/completions", {"prompt": "Hi", **GREEDY}))
        blocker.start()
        wait_for(lambda: service.batcher.stats()["running"] == 1)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, post(server, "/v1/completions",
                                                                                  bodies[i])))
                   for i in range(len(bodies))]
        for t in threads:
            t.start()
        wait_for(lambda: service.batcher.stats()["waiting"] == len(bodies))
        gate.set()
        for t in threads + [blocker]:
            t.join(60)
    assert 5 in service.batcher.stats()["recent_batch_sizes"]  # the four joined the blocker's batch at once
    assert [texts(results[i]) for i in range(len(bodies))] == alone


def run_job(batcher, prompt, params, n=1, log=None, name=None):
    """Submit a job straight to the batcher: (the job, its events as they come, an Event set when it ended).
    log: also gets (name, kind) of every event, in the order the worker sent them."""
    events, done = [], threading.Event()

    def emit(*event):
        events.append(event)
        if log is not None:
            log.append((name, event[0]))
        if event[0] != "text":
            done.set()

    return batcher.submit(prompt, params, n, emit), events, done


def reply_tokens(events):
    assert events[-1][0] == "done", events[-1]
    return [row.tokens for row in events[-1][1]]


def test_a_request_joins_the_running_batch_and_finishes_first(service, monkeypatch):
    enc, batcher = chat.get_encoder(), service.batcher
    long_prompt, short_prompt = enc.encode_ordinary("Once upon a time there was a"), enc.encode_ordinary("Hi")
    long_params = SamplingParams(temperature=0, max_new_tokens=80)
    short_params = SamplingParams(temperature=0, max_new_tokens=4)
    alone = []
    for prompt, params in ((long_prompt, long_params), (short_prompt, short_params)):
        _, events, done = run_job(batcher, prompt, params)
        assert done.wait(60)
        alone.append(reply_tokens(events))
    log = []
    generated = lambda decoder: max(len(row.reply.tokens) for row in decoder.rows)  # noqa: E731
    held, release = hold_when(monkeypatch, lambda decoder: generated(decoder) >= 3)
    _, long_events, long_done = run_job(batcher, long_prompt, long_params, log=log, name="long")
    assert held.wait(60)  # the long one runs, three tokens in
    _, short_events, short_done = run_job(batcher, short_prompt, short_params, log=log, name="short")
    wait_for(lambda: batcher.stats()["waiting"] == 1)
    release.set()
    assert short_done.wait(60) and long_done.wait(60)
    ends = [name for name, kind in log if kind == "done"]
    assert ends == ["short", "long"]  # it joined the long one's batch and finished first ...
    assert ("long", "text") in log[log.index(("short", "done")):]  # ... while the long one still decoded
    assert [reply_tokens(short_events), reply_tokens(long_events)] == alone[::-1]
    assert 2 in batcher.stats()["recent_batch_sizes"]


def test_cancelled_job_frees_its_rows_for_a_waiting_one(service, monkeypatch):
    enc, batcher = chat.get_encoder(), service.batcher
    monkeypatch.setattr(batcher, "max_rows", 2)
    params = SamplingParams(temperature=0, max_new_tokens=100)
    held, release = hold_when(monkeypatch, lambda decoder: len(decoder.rows[0].reply.tokens) >= 2)
    first, _, first_done = run_job(batcher, enc.encode_ordinary("Tell me a story"), params, n=2)
    assert held.wait(60)
    prompt = enc.encode_ordinary("Hello")
    second, events, done = run_job(batcher, prompt, SamplingParams(temperature=0, max_new_tokens=6))
    wait_for(lambda: batcher.stats()["waiting"] == 1)  # no room: the first job holds both rows
    batcher.cancel(first)
    release.set()
    assert done.wait(60)
    assert len(first.replies[0].tokens) < 100 and not first_done.is_set()  # dropped, never finished
    _, alone, alone_done = run_job(batcher, prompt, SamplingParams(temperature=0, max_new_tokens=6))
    assert alone_done.wait(60) and reply_tokens(events) == reply_tokens(alone)
    wait_for(lambda: batcher.stats()["rows"] == 0)


@pytest.mark.slow
def test_serve_script_starts_and_stops(ckpt):
    """The CLI end to end: serve.py in a subprocess on a free port, asked /health, then stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), f"--ckpt={ckpt}", "--device=cpu",
                             f"--port={port}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            with contextlib.suppress(httpx.TransportError):
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"] == "ok"
                break
            assert time.time() < deadline, "serve.py did not answer"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------------------------------
# The chat page in a real browser


def browser():
    """Headless Chromium through Selenium, or pytest.skip saying what is missing."""
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no headless browser: install Chromium and its driver (Debian: apt-get install chromium "
                    "chromium-driver) to test the chat page")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)


def test_chat_page_streams_a_reply_and_resets(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "input").send_keys("Hello there", Keys.ENTER)
        wait = WebDriverWait(driver, 60)
        reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='1'] span"))
        messages = driver.execute_script("return messages")
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[0]["content"] == "Hello there"
        assert reply.text == messages[1]["content"].strip() and reply.text  # the streamed deltas, joined
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        driver.find_element(By.ID, "reset").click()
        assert driver.execute_script("return messages.length") == 0
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg")
    finally:
        driver.quit()


def test_chat_page_settings_stop_and_the_key_prompt(ckpt):
    """The page against a server with a key: it asks for the key once (a prompt at the first 401),
    shows the model's name, sends the system prompt, temperature and max tokens, and Stop keeps the
    reply so far."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    cfg, _ = configurator.load(serve.DEFAULTS, [f"--ckpt={ckpt}", "--device=cpu", "--api_key=page-key"])
    srv = Server(serve.build_app(cfg)).start()
    try:
        driver.get(srv.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.switch_to.alert).send_keys("page-key")
        driver.switch_to.alert.accept()
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        driver.execute_script("""window.sent = []; const original = window.fetch;
            window.fetch = (url, options) => { if (options.body) sent.push(JSON.parse(options.body));
                                               return original(url, options); };""")
        driver.find_element(By.ID, "system").send_keys("Be brief.")
        driver.find_element(By.ID, "temperature").send_keys("0")
        driver.find_element(By.ID, "max_tokens").send_keys("3")
        driver.find_element(By.ID, "input").send_keys("Hello there", Keys.ENTER)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='1'] span"))
        body = driver.execute_script("return sent[0]")
        assert body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert body["temperature"] == 0 and body["max_tokens"] == 3 and body["stream"] is True
        assert driver.execute_script("return sessionStorage.getItem('apiKey')") == "page-key"
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("120")
        driver.find_element(By.ID, "input").send_keys("Tell me more", Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "stop").is_enabled())
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: not d.find_element(By.ID, "stop").is_enabled())
        messages = driver.execute_script("return messages")
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        driver.quit()
        srv.stop()
