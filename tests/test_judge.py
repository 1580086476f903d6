"""chat_gpt2/judge.py: the optional external judge of eval.py, a command or an OpenAI-style endpoint, and where its
API key may go."""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import eval as eval_py
from chat_gpt2 import judge
from chat_gpt2.judge import make_judge


ROW = {"prompt": "Human: 2+3?\nAssistant:", "reference": "5", "response": "5"}


def test_judge_command(tmp_path):
    judge = tmp_path / "judge.py"
    judge.write_text("import json, sys\nrow = json.load(sys.stdin)\n"
                     "print('score:', 9 if row['response'] == row['reference'] else 2)\n")
    score = make_judge({**eval_py.DEFAULTS, "judge_cmd": f"{sys.executable} {judge}"})
    assert score(ROW) == 9.0 and score({**ROW, "response": "6"}) == 2.0
    failing = make_judge({**eval_py.DEFAULTS, "judge_cmd": f"{sys.executable} -c 'import sys; sys.exit(3)'"})
    with pytest.raises(RuntimeError, match="exited 3"):
        failing(ROW)


class _FakeOpenAI(BaseHTTPRequestHandler):
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeOpenAI.requests.append((self.path, body))
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "7"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_judge_endpoint():
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        score = make_judge({**eval_py.DEFAULTS, "judge_url": url, "judge_model": "judge-1"})
        assert score(ROW) == 7.0
        path, body = _FakeOpenAI.requests[-1]
        assert path == "/v1/chat/completions" and body["model"] == "judge-1"
        assert "Reference answer:\n5" in body["messages"][-1]["content"]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(RuntimeError, match="judge endpoint .* failed"):
        score(ROW)  # the server is gone: a clear error, not a traceback from urllib
    with pytest.raises(ValueError, match="needs --judge_model"):
        make_judge({**eval_py.DEFAULTS, "judge_url": url})


def test_judge_is_off_by_default():
    assert make_judge(dict(eval_py.DEFAULTS)) is None



# ---------------------------------------------------------------------------------------------------------------
# The endpoint's API key


def test_api_key_only_over_https_or_to_this_host():
    assert judge.key_may_go_to("https://api.example.com/v1/chat/completions")
    assert judge.key_may_go_to("http://127.0.0.1:8000/v1/chat/completions")
    assert judge.key_may_go_to("http://localhost:8000/v1/chat/completions")
    assert not judge.key_may_go_to("http://api.example.com/v1/chat/completions")
    assert not judge.key_may_go_to("ftp://127.0.0.1/x")


def test_judge_endpoint_follows_no_redirect_and_sends_no_key_over_http(monkeypatch):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.2:9/steal")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    try:
        row = {"prompt": "p", "reference": "r", "response": "r"}
        with pytest.raises(judge.JudgeError, match="redirect to http://127.0.0.2:9/steal refused"):
            judge.judge_with_endpoint(f"http://127.0.0.1:{server.server_port}/v1", "m", row, 5)
    finally:
        server.shutdown()
    assert seen == [("/v1/chat/completions", "Bearer sk-secret")]  # loopback http: the key is sent, once
