"""An optional external judge for eval.py's replies: a command (the row as JSON on stdin, a
number on stdout) or an OpenAI-compatible chat-completions endpoint asked for a 1-10 score."""
import json
import os
import re
import shlex
import subprocess
import urllib.error
import urllib.parse
import urllib.request

from .errors import ConfigError, JudgeError


JUDGE_INSTRUCTIONS = ("You grade a chat assistant's reply against a reference answer. Reply with "
                      "only an integer from 1 (wrong or useless) to 10 (correct and as good as "
                      "the reference).")


def parse_score(text, source):
    found = re.search(r"-?\d+(?:\.\d+)?", text)
    if not found:
        raise JudgeError(f"{source} returned no score: {text.strip()[:200]!r}")
    return float(found.group())


def judge_with_command(cmd, row, timeout):
    """Run cmd (split like a shell would, not through a shell) with the
    row as JSON on stdin; its stdout's first number is the score."""
    payload = json.dumps({k: row[k] for k in ("prompt", "reference", "response")})
    try:
        p = subprocess.run(shlex.split(cmd), input=payload, capture_output=True, text=True,
                           timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise JudgeError(f"judge command {cmd!r} failed: {e}") from None
    if p.returncode != 0:
        raise JudgeError(f"judge command {cmd!r} exited {p.returncode}: {p.stderr.strip()[-500:]}")
    return parse_score(p.stdout, f"judge command {cmd!r}")


def judge_with_endpoint(url, model, row, timeout):
    """Ask an OpenAI-compatible chat-completions endpoint (base URL
    ending in /v1) for a 1-10 score."""
    question = (f"Conversation:\n{row['prompt']}\n\nReference answer:\n{row['reference']}\n\n"
                f"Assistant's reply:\n{row['response']}\n\nScore (1-10):")
    body = {"model": model, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "system", "content": JUDGE_INSTRUCTIONS},
                         {"role": "user", "content": question}]}
    headers = {"Content-Type": "application/json"}
    endpoint = url.rstrip("/") + "/chat/completions"
    if os.environ.get("OPENAI_API_KEY") and key_may_go_to(endpoint):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    request = urllib.request.Request(endpoint, json.dumps(body).encode(), headers, method="POST")
    try:
        with _NO_REDIRECTS.open(request, timeout=timeout) as response:
            content = json.load(response)["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise JudgeError(f"judge endpoint {endpoint} failed: {type(e).__name__}: {e}") from None
    return parse_score(content, f"judge endpoint {endpoint}")


def key_may_go_to(url):
    """The API key is sent only over https, or over plain http to the
    loopback host (a local server)."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http"
                                       and parts.hostname in ("localhost", "127.0.0.1", "::1"))


class _RefuseRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could carry the Authorization header to another
    host: the judge endpoint must answer itself."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers,
                                     fp)


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirect)


def make_judge(cfg):
    """A function row -> score, or None when no judge is configured (the default)."""
    if cfg["judge_cmd"] and cfg["judge_url"]:
        raise ConfigError("pass either --judge_cmd or --judge_url, not both")
    if cfg["judge_cmd"]:
        return lambda row: judge_with_command(cfg["judge_cmd"], row, cfg["judge_timeout"])
    if cfg["judge_url"]:
        if not cfg["judge_model"]:
            raise ConfigError("--judge_url needs --judge_model "
                              "(the model name the endpoint serves)")
        return lambda row: judge_with_endpoint(cfg["judge_url"], cfg["judge_model"], row,
                                               cfg["judge_timeout"])
    return None

