"""End to end through the command lines, in a temp dir: prepare.py -> train.py -> sample.py."""
import os
import re

import pytest
import torch

import sample
from chat_gpt2 import chat, engine
from chat_gpt2.model import GPT, GPTConfig
from helpers import EOT, checkpoints, decode, load_ckpt, read_metrics, run, script, write_records

ENC_VOCAB = chat.VOCAB_SIZE
QUESTION = "What is 3 plus 4?"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """prepare.py and train.py run as a user would, from a fresh folder. Returns (cwd, best checkpoint path)."""
    cwd = tmp_path_factory.mktemp("cli")
    records = [{"user": f"What is {i} plus {j}?", "assistant": f"{i + j}"} for i in range(8) for j in range(4)]
    write_records(cwd / "chat.jsonl", records)
    p = run([script("prepare.py"), "chat.jsonl", "--out_dir=data/chat", "--seed=3"], cwd)
    assert "32 read (29 train / 3 val)" in p.stdout.replace(",", "")
    p = run([script("train.py"), script("config/finetune_chat.py"), "--init_from=scratch", "--n_layer=2",
             "--n_head=2", "--n_embd=32", "--max_iters=12", "--dataset=chat", "--eval_interval=6", "--eval_iters=2",
             "--log_interval=3", "--batch_size=4", "--block_size=64", "--learning_rate=3e-3", "--warmup_iters=2",
             "--dropout=0", "--device=cpu", "--sample_max_tokens=4"], cwd)
    names = checkpoints(cwd / "out")
    best = [n for n in names if re.fullmatch(r"finetuned_\d{8}_\d{6}\.pt", n)]
    assert len(best) == 1 and len(names) == 2, names
    assert f"best model: out/{best[0]}" in p.stdout or f"best model: {cwd / 'out' / best[0]}" in p.stdout
    return cwd, str(cwd / "out" / best[0])


@pytest.fixture(scope="module")
def untrained_ckpt(cli_run):
    """The run's checkpoint with freshly initialised weights: its greedy replies are long and never stop early (a
    briefly trained model tends to answer <|endoftext|> at once, which would make reply comparisons vacuous)."""
    cwd, best = cli_run
    ckpt = load_ckpt(best)
    torch.manual_seed(0)
    ckpt["model"] = GPT(GPTConfig(**ckpt["model_args"])).state_dict()
    path = str(cwd / "untrained.pt")
    torch.save(ckpt, path)
    return path


def test_train_cli_outputs(cli_run):
    cwd, best = cli_run
    ckpt = load_ckpt(best)  # weights_only=True
    assert ckpt["config"]["init_from"] == "scratch" and ckpt["model_args"]["n_layer"] == 2
    assert ckpt["config"]["block_size"] == 64 and ckpt["model_args"]["block_size"] == 64
    last = load_ckpt(best.replace(".pt", "_last.pt"))
    assert last["iter_num"] == 12
    steps = [r["iter"] for r in read_metrics(cwd / "out") if r["event"] == "step"]
    assert steps == [3, 6, 9, 12]
    assert os.path.getsize(cwd / "out" / "loss.png") > 0


def greedy_reply(ckpt_path, prompt_ids, max_new_tokens, stops):
    """The reference: argmax decoding by full forward passes, cut at the first stop string or <|endoftext|>."""
    ckpt = load_ckpt(ckpt_path)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([ids]))
            token = int(logits[0, -1, :ENC_VOCAB].argmax())
            if token == EOT:
                break
            ids.append(token)
            out.append(token)
            text = decode(out)
            cuts = [text.find(s) for s in stops if s in text]
            if cuts:
                return text[:min(cuts)].strip()
    return decode(out).strip()


def prompt(user, system=None):
    """The generation prompt, written out from the template in the spec."""
    text = (f"System: {system}\n" if system else "") + f"Human: {user}\nAssistant:"
    return chat.get_encoder().encode_ordinary(text)


def sample_cli(cwd, *args):
    return run([script("sample.py"), "--device=cpu", *args], cwd).stdout


def test_sample_greedy(cli_run, untrained_ckpt):
    cwd, best = cli_run
    out = sample_cli(cwd, f"--ckpt={untrained_ckpt}", f"--prompt={QUESTION}", "--temperature=0",
                     "--max_new_tokens=12")
    reply = greedy_reply(untrained_ckpt, prompt(QUESTION), 12, ["\n"])
    assert len(reply) > 10 and out == reply + "\n"


def test_sample_system_and_num_samples(cli_run, untrained_ckpt):
    cwd, _ = cli_run
    out = sample_cli(cwd, f"--ckpt={untrained_ckpt}", "--prompt", QUESTION, "--system", "Answer with a number.",
                     "--temperature=0", "--num_samples=2", "--max_new_tokens=10")
    reply = greedy_reply(untrained_ckpt, prompt(QUESTION, system="Answer with a number."), 10, ["\n"])
    assert reply and out == f"{reply}\n---\n{reply}\n"


def test_sample_raw_with_stop(cli_run, untrained_ckpt):
    cwd, _ = cli_run
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


def test_sample_newest_checkpoint_literal_endoftext_and_sampling(cli_run):
    cwd, best = cli_run  # no --ckpt: the newest run's best checkpoint in ./out
    out = sample_cli(cwd, "--prompt=Say <|endoftext|> please", "--num_samples=2", "--max_new_tokens=6",
                     "--temperature=0.8", "--seed=7")
    assert out.count("---\n") == 1
    out = sample_cli(cwd, "--prompt=Say <|endoftext|> please", "--temperature=0", "--max_new_tokens=6")
    assert out == greedy_reply(best, prompt("Say <|endoftext|> please"), 6, ["\n"]) + "\n"


class Spy:
    """Wraps engine.generate to record the prompt ids it is given."""

    def __init__(self, real):
        self.real, self.prompts = real, []

    def __call__(self, model, idx, *args, **kwargs):
        self.prompts.append(idx.tolist())
        return self.real(model, idx, *args, **kwargs)


@pytest.mark.parametrize("args, expected", [
    (["--prompt=Hi"], prompt("Hi")),
    (["--prompt=Hi", "--system=Be kind."], prompt("Hi", system="Be kind.")),
    (["--prompt=Say <|endoftext|>"], prompt("Say <|endoftext|>")),
    (["--prompt=Once upon", "--raw"], chat.get_encoder().encode_ordinary("Once upon")),
])
def test_sample_prompt_ids(cli_run, monkeypatch, capsys, args, expected):
    cwd, best = cli_run
    spy = Spy(engine.generate)
    monkeypatch.setattr(engine, "generate", spy)
    sample.main([f"--ckpt={best}", "--device=cpu", "--max_new_tokens=2", "--num_samples=2", *args])
    assert spy.prompts == [[expected, expected]]
    assert EOT not in expected
    assert capsys.readouterr().out.count("---") == 1


def test_sample_errors(tmp_path):
    with pytest.raises(ValueError, match="--prompt"):
        sample.main(["--device=cpu"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sample.main([f"--out_dir={tmp_path}", "--prompt=Hi", "--device=cpu"])
    p = run([script("sample.py"), f"--out_dir={tmp_path}", "--prompt=Hi"], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
