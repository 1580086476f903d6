"""`python sample.py --interactive`: the chat loop in process, with piped stdin, and on a pseudo-terminal."""
import io
import os
import select
import subprocess
import sys
import time

import pytest

import gen_helpers
import helpers
import sample
from chat_gpt2 import chat
from chat_gpt2.checkpoint import load_model
from chat_gpt2.engine import Engine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return gen_helpers.save_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "tiny.pt")


def scripted_input(lines):
    """An input() stand-in: returns the lines (or raises the exceptions) in order, then EOFError."""
    items = iter(lines)

    def read(prompt):
        item = next(items, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    return read


class FakeGenerate:
    """Replaces Engine.replies: records each prompt and settings, streams a canned reply."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, engine, ids, params, num_samples=1, on_text=None, generator=None):
        self.calls.append({"prompt": chat.get_encoder().decode(ids), "n_ids": len(ids),
                           "temperature": params.temperature, "top_k": params.top_k,
                           "max_new_tokens": params.max_new_tokens})
        reply = self.replies.pop(0)
        if reply is KeyboardInterrupt:
            on_text(0, "partial")
            raise KeyboardInterrupt
        on_text(0, reply)
        return [reply]


def run_loop(monkeypatch, lines, replies, ckpt_path, **cfg):
    fake = FakeGenerate(replies)
    monkeypatch.setattr(Engine, "replies", lambda engine, *args, **kwargs: fake(engine, *args, **kwargs))
    model, ckpt = load_model(ckpt=ckpt_path)
    out = io.StringIO()
    history = sample.chat_loop(Engine(model), ckpt, {**sample.DEFAULTS, **cfg}, scripted_input(lines), out)
    return history, fake.calls, out.getvalue()


def test_multi_turn_template_commands_and_interrupt(monkeypatch, ckpt):
    lines = ["Hi", "  ", "What is 2 plus 3?", "/set temperature=0.2 top_k=7", "Again", KeyboardInterrupt,
             "/set temperature=oops", "/nope", "/reset", "Fresh start"]
    history, calls, out = run_loop(monkeypatch, lines, ["Hello!", "5", KeyboardInterrupt, "New"], ckpt,
                                   system="Be brief.")
    assert calls[0]["prompt"] == "System: Be brief.\nHuman: Hi\nAssistant:"
    assert calls[1]["prompt"] == ("System: Be brief.\nHuman: Hi\nAssistant: Hello!\n\n"
                                  "Human: What is 2 plus 3?\nAssistant:")
    assert (calls[1]["temperature"], calls[1]["top_k"]) == (0.8, 200)
    assert (calls[2]["temperature"], calls[2]["top_k"]) == (0.2, 7)  # /set applies to the next replies
    assert "partial [interrupted]" in out  # Ctrl-C stopped the reply, not the session
    assert "error: invalid value 'oops' for --temperature" in out and "unknown command /nope" in out
    # the interrupted exchange is not in the conversation, and /reset forgot the rest (the system message stays)
    assert calls[3]["prompt"] == "System: Be brief.\nHuman: Fresh start\nAssistant:"
    assert history == [{"role": "user", "content": "Fresh start"}, {"role": "assistant", "content": "New"}]
    assert out.count("Hello!") == 1 and out.endswith("\n")


def test_oldest_turns_are_dropped_to_leave_room_for_the_reply(monkeypatch, ckpt):
    long_question = "Please tell me about the number " + "seven " * 6
    lines = [f"{long_question}{i}" for i in range(6)]
    history, calls, out = run_loop(monkeypatch, lines, [f"Answer {i}." for i in range(6)], ckpt,
                                   system="Sys.", max_new_tokens=20)
    budget = 64 - 20  # the tiny checkpoint's block_size minus the reply's room
    assert all(c["n_ids"] <= budget for c in calls)
    assert "oldest turn(s) to fit the context" in out
    last = calls[-1]["prompt"]
    assert last.startswith("System: Sys.\nHuman: ") and last.endswith(f"{long_question}5\nAssistant:")
    assert f"{long_question}0" not in last  # the oldest turns went first
    assert history[-1] == {"role": "assistant", "content": "Answer 5."}


def test_quit_and_ctrl_c_at_the_prompt(monkeypatch, ckpt):
    history, calls, out = run_loop(monkeypatch, [KeyboardInterrupt, "Hi", "/quit", "never read"], ["Yo"], ckpt)
    assert len(calls) == 1 and history[-1]["content"] == "Yo"


def test_piped_stdin(ckpt):
    """End to end with the real model: piped lines, replies streamed, end of input quits cleanly."""
    p = subprocess.run(
        [sys.executable, "sample.py", f"--ckpt={ckpt}", "--interactive", "--device=cpu", "--temperature=0",
         "--max_new_tokens=8"], input="What is 2 plus 3?\n/set top_k=3\nAnd 4 plus 4?\n", capture_output=True,
        text=True, cwd=helpers.REPO, env=helpers.env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert p.stdout.count("> ") == 4  # three inputs, then end of input
    replies = [part.split("\n")[0] for part in p.stdout.split("> ")[1:]]
    assert replies[0].strip() and "top_k=3" in replies[1] and replies[2].strip()


class Terminal:
    """The parent's side of a pseudo-terminal: read_until returns the output up to and including a needle and keeps
    what came after it for the next call (one read often holds a reply's end and the next prompt)."""

    def __init__(self, fd):
        self.fd, self.pending = fd, b""

    def read_until(self, needle, timeout=60.0):
        deadline = time.time() + timeout
        while needle not in self.pending:
            remaining = deadline - time.time()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise AssertionError(f"timed out waiting for {needle!r}; got {self.pending[-500:]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed while waiting for {needle!r}; got {self.pending[-500:]!r}")
            self.pending += chunk
        end = self.pending.index(needle) + len(needle)
        out, self.pending = self.pending[:end], self.pending[end:]
        return out

    def write(self, data):
        os.write(self.fd, data)


def wait_exit(pid, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    raise AssertionError("the chat did not exit")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a pseudo-terminal")
def test_pseudo_terminal_streaming_ctrl_c_and_ctrl_d(ckpt):
    import pty
    args = [sys.executable, "sample.py", f"--ckpt={ckpt}", "--interactive", "--device=cpu", "--temperature=0",
            "--stop=[]", "--max_new_tokens=1000000"]  # a reply that only Ctrl-C ends
    env = helpers.env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: sample.py on the terminal (as little as possible between fork and exec)
        os.chdir(helpers.REPO)
        os.execve(sys.executable, args, env)
    term, seen = Terminal(fd), b""
    try:
        seen += term.read_until(b"> ")
        term.write(b"Tell me a long story\n")
        seen += term.read_until(b"story\r\n")  # the line is echoed; then the reply streams
        streamed = term.read_until(b" ", timeout=30)  # reply text arrives while the generation goes on
        assert b"[interrupted]" not in streamed and b"> " not in streamed
        term.write(b"\x03")  # Ctrl-C
        seen += streamed + term.read_until(b"[interrupted]\r\n> ")  # the reply stopped, the session goes on
        term.write(b"/set max_new_tokens=4\n")
        seen += term.read_until(b"max_new_tokens=4\r\n> ")
        term.write(b"Hi\n")
        seen += term.read_until(b"Hi\r\n") + term.read_until(b"\n> ")  # a 4-token reply, then the prompt
        term.write(b"\x04")  # Ctrl-D at the prompt: end of input
        status = wait_exit(pid)
        pid = None
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert b"Traceback" not in seen + term.pending
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
