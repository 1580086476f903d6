"""sample.py: one prompt (greedy replies equal a full-forward reference; the prompt ids; options; errors) and
`--interactive` (the chat loop in process, with piped stdin, and on a pseudo-terminal).

cli_run / untrained_ckpt (conftest.py) are a checkpoint trained by the commands; tiny_ckpt a random tiny model."""
import io
import os
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch

import helpers
import sample
from chat_gpt2 import chat, engine
from chat_gpt2.checkpoint import load_model
from chat_gpt2.engine import Engine
from helpers import EOT, REPO, greedy_reply, prompt, run, script

QUESTION = "What is 3 plus 4?"


def sample_cli(cwd, *args):
    return run([script("sample.py"), "--device=cpu", "--dtype=float32", *args], cwd).stdout


@pytest.mark.slow
def test_sample_greedy(cli_run, untrained_ckpt):
    cwd = cli_run["cwd"]
    out = sample_cli(cwd, f"--ckpt={untrained_ckpt}", f"--prompt={QUESTION}", "--temperature=0",
                     "--max_new_tokens=12")
    reply = greedy_reply(untrained_ckpt, prompt(QUESTION), 12, ["\n"])
    assert len(reply) > 10 and out == reply + "\n"


@pytest.mark.slow
def test_sample_system_and_num_samples(cli_run, untrained_ckpt):
    cwd = cli_run["cwd"]
    out = sample_cli(cwd, f"--ckpt={untrained_ckpt}", "--prompt", QUESTION, "--system", "Answer with a number.",
                     "--temperature=0", "--num_samples=2", "--max_new_tokens=10")
    reply = greedy_reply(untrained_ckpt, prompt(QUESTION, system="Answer with a number."), 10, ["\n"])
    assert reply and out == f"{reply}\n---\n{reply}\n"


@pytest.mark.slow
def test_sample_raw_with_stop(cli_run, untrained_ckpt):
    cwd = cli_run["cwd"]
    text = "Once upon a time"
    ids = chat.get_encoder().encode_ordinary(text)
    full = greedy_reply(untrained_ckpt, ids, 14, [])
    # a stop string from the middle of the greedy continuation (it may span tokens) cuts the reply before it
    starts = [i for i in range(1, len(full) - 3) if full.find(full[i:i + 3]) == i and "\\" not in full[i:i + 3]
              and full[i:i + 3].strip()]
    if not starts:
        pytest.skip(f"greedy continuation {full!r} has no usable stop string")
    stop = full[starts[0]:starts[0] + 3]
    out = sample_cli(cwd, f"--ckpt={untrained_ckpt}", "--raw", f"--prompt={text}", "--temperature=0",
                     "--max_new_tokens=14", f"--stop={stop}")
    assert out == greedy_reply(untrained_ckpt, ids, 14, [stop]) + "\n"
    assert out.strip() == full[:starts[0]].strip() and len(out.strip()) < len(full)


@pytest.mark.slow
def test_sample_newest_checkpoint_literal_endoftext_and_sampling(cli_run):
    cwd, best = cli_run["cwd"], cli_run["best"]  # no --ckpt: the newest run's best checkpoint in ./out
    out = sample_cli(cwd, "--prompt=Say <|endoftext|> please", "--num_samples=2", "--max_new_tokens=6",
                     "--temperature=0.8", "--seed=7")
    assert out.count("---\n") == 1
    out = sample_cli(cwd, "--prompt=Say <|endoftext|> please", "--temperature=0", "--max_new_tokens=6")
    assert out == greedy_reply(best, prompt("Say <|endoftext|> please"), 6, ["\n"]) + "\n"


class Spy:
    """Wraps engine.Decoder.add to record the prompt ids of each request, once per reply asked for."""

    def __init__(self, real):
        self.real, self.prompts = real, []

    def __call__(self, decoder, request):
        self.prompts.append([request.prompt] * request.n)
        return self.real(decoder, request)


@pytest.mark.parametrize("args, expected", [
    (["--prompt=Hi"], prompt("Hi")),
    (["--prompt=Hi", "--system=Be kind."], prompt("Hi", system="Be kind.")),
    (["--prompt=Say <|endoftext|>"], prompt("Say <|endoftext|>")),
    (["--prompt=Once upon", "--raw"], chat.get_encoder().encode_ordinary("Once upon")),
])
def test_sample_prompt_ids(tiny_ckpt, monkeypatch, capsys, args, expected):
    spy = Spy(engine.Decoder.add)
    monkeypatch.setattr(engine.Decoder, "add", lambda decoder, request: spy(decoder, request))  # a method
    sample.main([f"--ckpt={tiny_ckpt}", "--device=cpu", "--dtype=float32", "--max_new_tokens=2", "--num_samples=2", *args])
    assert spy.prompts == [[expected, expected]]
    assert EOT not in expected
    assert capsys.readouterr().out.count("---") == 1


@pytest.mark.slow
def test_sample_errors(tmp_path):
    with pytest.raises(ValueError, match="--prompt"):
        sample.main(["--device=cpu", "--dtype=float32"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sample.main([f"--out_dir={tmp_path}", "--prompt=Hi", "--device=cpu", "--dtype=float32"])
    p = run([script("sample.py"), f"--out_dir={tmp_path}", "--prompt=Hi"], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_sample_main_num_samples_and_options(tiny_ckpt, capsys):
    args = [f"--ckpt={tiny_ckpt}", "--prompt=What is 2 plus 3?", "--device=cpu", "--dtype=float32", "--max_new_tokens=6"]
    sample.main(args + ["--temperature=0", "--num_samples=2", "--stop=['\\n', 'xyz']"])
    replies = capsys.readouterr().out.strip().split("\n---\n")
    assert len(replies) == 2 and replies[0] == replies[1]  # greedy: both samples alike
    options = ["--temperature=1.0", "--top_p=0.9", "--top_k=40", "--repetition_penalty=1.2", "--seed=5"]
    sample.main(args + options + ["--use_cache=false"])  # kept for old commands: a note, the same reply
    old_flag = capsys.readouterr()
    assert "--use_cache=false no longer changes anything" in old_flag.err
    sample.main(args + options)
    assert capsys.readouterr().out == old_flag.out  # the seed fixes the sample


def test_sample_init_from_our_checkpoint_or_a_run_folder(tiny_ckpt, tmp_path, capsys):
    """--init_from takes one of our .pt files or a run's out_dir (its newest best checkpoint), as train.py does."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny_ckpt, run_dir / "finetuned_20260101_000000.pt")
    args = ["--prompt=What is 2 plus 3?", "--device=cpu", "--dtype=float32", "--max_new_tokens=6", "--temperature=0"]
    replies = []
    for source in (f"--ckpt={tiny_ckpt}", f"--init_from={tiny_ckpt}", f"--init_from={run_dir}"):
        assert sample.main([source, *args]) in (0, None)
        replies.append(capsys.readouterr().out)
    assert replies[0] and replies == [replies[0]] * 3


@pytest.mark.slow
def test_sample_cli_reports_bad_options(tiny_ckpt):
    bad = helpers.run(["sample.py", f"--ckpt={tiny_ckpt}", "--prompt=Hi", "--device=cpu", "--dtype=float32", "--temperature=-1"],
                      cwd=helpers.REPO, check=False)
    assert bad.returncode == 1 and bad.stderr.strip() == \
        "error: temperature must be >= 0, got -1.0 (0 = greedy; higher = more varied)"


def test_sample_in_half_precision(tiny_ckpt, capsys):
    sample.main([f"--ckpt={tiny_ckpt}", "--device=cpu", "--dtype=bfloat16", "--prompt=Hi", "--temperature=0",
                 "--max_new_tokens=4"])
    assert capsys.readouterr().out.endswith("\n")


# ---------------------------------------------------------------------------------------------------------------
# --interactive


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
    """Engine.complete's stand-in (helpers.fake_complete): records each prompt and settings, gives a
    canned reply."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, engine, request):
        params = request.params
        self.calls.append({"prompt": chat.get_encoder().decode(request.prompt), "n_ids": len(request.prompt),
                           "temperature": params.temperature, "top_k": params.top_k,
                           "max_new_tokens": params.max_new_tokens})
        reply = self.replies.pop(0)
        if reply is KeyboardInterrupt:
            request.on_text(0, "partial")
            raise KeyboardInterrupt
        return reply


def run_loop(monkeypatch, lines, replies, ckpt_path, **cfg):
    fake = FakeGenerate(replies)
    helpers.fake_complete(monkeypatch, fake)
    model, ckpt = load_model(ckpt=ckpt_path)
    out = io.StringIO()
    history = sample.chat_loop(Engine(model), ckpt, {**sample.DEFAULTS, **cfg}, scripted_input(lines), out)
    return history, fake.calls, out.getvalue()


def test_multi_turn_template_commands_and_interrupt(monkeypatch, tiny_ckpt):
    lines = ["Hi", "  ", "What is 2 plus 3?", "/set temperature=0.2 top_k=7", "Again", KeyboardInterrupt,
             "/set temperature=oops", "/nope", "/reset", "Fresh start"]
    history, calls, out = run_loop(monkeypatch, lines, ["Hello!", "5", KeyboardInterrupt, "New"], tiny_ckpt,
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


def test_oldest_turns_are_dropped_to_leave_room_for_the_reply(monkeypatch, tiny_ckpt):
    long_question = "Please tell me about the number " + "seven " * 6
    lines = [f"{long_question}{i}" for i in range(6)]
    history, calls, out = run_loop(monkeypatch, lines, [f"Answer {i}." for i in range(6)], tiny_ckpt,
                                   system="Sys.", max_new_tokens=20)
    budget = 64 - 20  # the tiny checkpoint's block_size minus the reply's room
    assert all(c["n_ids"] <= budget for c in calls)
    assert "oldest turn(s) to fit the context" in out
    last = calls[-1]["prompt"]
    assert last.startswith("System: Sys.\nHuman: ") and last.endswith(f"{long_question}5\nAssistant:")
    assert f"{long_question}0" not in last  # the oldest turns went first
    assert history[-1] == {"role": "assistant", "content": "Answer 5."}


def test_quit_and_ctrl_c_at_the_prompt(monkeypatch, tiny_ckpt):
    history, calls, out = run_loop(monkeypatch, [KeyboardInterrupt, "Hi", "/quit", "never read"], ["Yo"], tiny_ckpt)
    assert len(calls) == 1 and history[-1]["content"] == "Yo"


@pytest.mark.slow
def test_piped_stdin(tiny_ckpt):
    """End to end with the real model: piped lines, replies streamed, end of input quits cleanly. The replies are
    exactly the greedy ones of a full-forward reference; the second one's prompt holds the first exchange."""
    first_q, second_q = "What is 2 plus 3?", "And 4 plus 4?"
    p = subprocess.run(
        [sys.executable, "sample.py", f"--ckpt={tiny_ckpt}", "--interactive", "--device=cpu", "--dtype=float32", "--temperature=0",
         "--max_new_tokens=8"], input=f"{first_q}\n/set top_k=3\n{second_q}\n", capture_output=True,
        text=True, cwd=helpers.REPO, env=helpers.env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert p.stdout.count("> ") == 4  # three inputs, then end of input
    replies = [part.split("\n")[0] for part in p.stdout.split("> ")[1:]]
    assert replies[0].strip() and "top_k=3" in replies[1] and replies[2].strip()
    model = helpers.model_of(tiny_ckpt)  # the checkpoint's default stop is a newline
    first = greedy_reply(model, prompt(first_q), 8, ["\n"])
    second = greedy_reply(model, prompt(second_q, history=[(first_q, first)]), 8, ["\n"])
    assert first and second and first != second
    assert replies[0] == first and replies[2] == second
    assert p.stdout.endswith(f"> {first}\n> {replies[1]}\n> {second}\n> \n")


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


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a pseudo-terminal")
def test_pseudo_terminal_streaming_ctrl_c_and_ctrl_d(tiny_ckpt):
    import pty
    args = [sys.executable, "sample.py", f"--ckpt={tiny_ckpt}", "--interactive", "--device=cpu", "--dtype=float32", "--temperature=0",
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


def test_a_prompt_without_prompt_and_a_malformed_checkpoint(tmp_path, tiny_ckpt):
    p = run([script("sample.py"), "How are you?"], tmp_path, check=False)
    assert p.returncode == 2 and "options go as --key=value" in p.stderr and "Traceback" not in p.stderr
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    del ckpt["model_args"]
    torch.save(ckpt, tmp_path / "broken.pt")
    p = run([script("sample.py"), f"--ckpt={tmp_path / 'broken.pt'}", "--prompt=Hi"], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip() == "error: not a model checkpoint: it lacks model_args"


def test_scripts_start_without_the_compiler():
    """Importing what sample.py and serve.py import must not import torch._dynamo (~2 s at every start)."""
    code = "import sys, sample, serve, eval; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_interactive_turns_run_only_what_is_new_and_reply_as_a_fresh_prompt(tiny_ckpt, monkeypatch):
    """The chat keeps the conversation's keys and values between turns (engine.PromptCache): each turn's greedy
    reply is the one its whole prompt gives in a fresh run, and its prefill covers less than that prompt."""
    model, ckpt = load_model(ckpt=tiny_ckpt)
    prefilled = helpers.counting_prefills(model, monkeypatch)
    cfg = {**sample.DEFAULTS, "temperature": 0.0, "max_new_tokens": 6, "stop": []}
    history = sample.chat_loop(Engine(model), ckpt, cfg, scripted_input(["Hi there", "And then?", "Why?"]),
                               io.StringIO())
    enc, template = chat.get_encoder(), ckpt["template"]
    for turn in range(3):
        ids = chat.render_prompt(history[:2 * turn + 1], template, enc)
        assert history[2 * turn + 1]["content"] == greedy_reply(model, ids, 6, ())
        assert prefilled[turn] < len(ids) - 1 if turn else prefilled[turn] == len(ids) - 1
