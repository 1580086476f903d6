"""Helpers shared by the test files (import as `helpers`; conftest.py puts tests/ and the repo on sys.path).

Sections: input files, reading a prepared dataset, tiny models and checkpoints, the greedy reference, training,
Hugging Face models, subprocesses."""
import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
EOT = 50256


def script(name):
    return os.path.join(REPO, name)


# ---------------------------------------------------------------------------------------------------------------
# Input files


def write_records(path, records, raw_lines=None):
    """Write records to path: .jsonl one per line, .json as an indented array (records span several lines).
    raw_lines: {position: str} lines inserted verbatim into a .jsonl (for broken input). Returns the path."""
    path = str(path)
    if path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2, ensure_ascii=False)
        return path
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for pos, line in sorted((raw_lines or {}).items()):
        lines.insert(pos, line)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def chat_records(n=40):
    """Deterministic training conversations: single-turn user/assistant and multi-turn messages with a system."""
    records = []
    for i in range(n):
        if i % 4 == 3:
            records.append({"messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Name number {i}."},
                {"role": "assistant", "content": f"{i}"},
                {"role": "user", "content": "And double it?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]})
        else:
            records.append({"user": f"What is {i} plus {i + 1}?", "assistant": f"It is {2 * i + 1}."})
    return records


GOOD = {"user": "a", "assistant": "b"}


def numbered(n):
    return [{"user": f"Question number {i}?", "assistant": f"Answer {i}."} for i in range(n)]


def expected(messages):
    """(text, learned runs, other runs) of a conversation [(role, content)], written out from the template in the
    spec."""
    text, learned, other, cur = "", [], [], ""
    for role, content in messages:
        if role == "assistant":
            other.append(cur + "Assistant:")
            learned.append(f" {content}\n\n")
            cur = ""
        else:
            cur += f"{'System' if role == 'system' else 'Human'}: {content}\n"
    learned[-1] += "<|endoftext|>"
    for o, l in zip(other, learned):
        text += o + l
    return text, learned, other


def prepared(tmp_path, records, name="data.jsonl", **kw):
    """records written to tmp_path/name and built into tmp_path/out. Returns (out_dir, meta)."""
    from chat_gpt2.build import build_dataset
    src = write_records(tmp_path / name, records)
    out = str(tmp_path / "out")
    meta = build_dataset([src], out_dir=out, **kw)
    return out, meta

# ---------------------------------------------------------------------------------------------------------------
# Reading a prepared dataset


def read_split(folder, split):
    """The files prepare.py writes for one split, as numpy arrays (a text dataset's mask: all ones, it has no file)."""
    from chat_gpt2 import dataset
    ids = np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=dataset.stored_dtype(read_meta(folder)))
    mask_path = os.path.join(folder, f"{split}_mask.bin")
    return {
        "ids": ids.astype(np.int64),
        "mask": np.fromfile(mask_path, dtype=np.uint8) if os.path.exists(mask_path) else np.ones(len(ids), np.uint8),
        "turns": np.load(os.path.join(folder, f"{split}_turns.npy")),
        "convs": np.load(os.path.join(folder, f"{split}_convs.npy")),
    }


def conversations(folder, split):
    """[(ids, mask)] per conversation of a split, as lists."""
    d = read_split(folder, split)
    ends = list(d["convs"][1:]) + [len(d["ids"])]
    return [(d["ids"][a:b].tolist(), d["mask"][a:b].tolist()) for a, b in zip(d["convs"], ends)]


def decode(ids):
    from chat_gpt2 import chat
    return chat.get_encoder().decode(list(ids))


def encode(text):
    from chat_gpt2 import chat
    return chat.get_encoder().encode_ordinary(text)


def runs(ids, mask):
    """Decoded text of the maximal runs of mask 1 (learned) and of mask 0 (not learned), in order."""
    learned, other, start = [], [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            (learned if mask[start] else other).append(decode(ids[start:i]))
            start = i
    return learned, other


def rendered(out):
    """Sorted (text, learned runs, other runs) of every conversation in both splits."""
    result = []
    for split in ("train", "val"):
        for ids, mask in conversations(out, split):
            result.append((decode(ids), *runs(ids, mask)))
    return sorted(result)


def all_texts(folder):
    """Decoded text of every conversation of both splits."""
    return [decode(ids) for split in ("train", "val") for ids, _ in conversations(folder, split)]


def records_file(path, n, tag):
    """n single-turn records whose text names tag, written to path. Returns the path."""
    return write_records(path, [{"user": f"{tag} question {i}?", "assistant": f"{tag} answer {i}"} for i in range(n)])


def dataset_text(folder):
    """The decoded conversations of both splits, or the error loading them gives."""
    from chat_gpt2 import dataset
    from chat_gpt2.errors import InputError
    try:
        data, meta = dataset.load_dataset(folder)
    except InputError as e:
        return f"refused: {e}"
    return sorted(decode(data[s].ids[a:b]) for s in dataset.SPLITS
                  for a, b in zip(data[s].convs, list(data[s].convs[1:]) + [len(data[s].ids)]))


def make_legacy(folder):
    """Turn a prepared dataset into the old layout: regular files, no .dataset link, no build folder."""
    import shutil

    from chat_gpt2 import dataset
    for name in dataset.DATASET_FILES:
        real = os.path.realpath(os.path.join(folder, name))
        os.remove(os.path.join(folder, name))
        shutil.copy(real, os.path.join(folder, name))
    shutil.rmtree(os.path.realpath(os.path.join(folder, dataset.CURRENT)))
    os.remove(os.path.join(folder, dataset.CURRENT))


def read_meta(folder):
    with open(os.path.join(folder, "meta.json")) as f:
        return json.load(f)


def snapshot(folder, hidden=False):
    """{relative path: bytes} of every file below folder, as a reader sees it (symlinks followed). A prepared
    dataset's names are symlinks into a hidden build folder (`.dataset` -> `.prepare-<PID>-<random>`), whose name
    differs from build to build: hidden=False leaves hidden entries out (compare two builds' contents); hidden=True
    keeps them and records each symlink's target as "path ->" (compare a folder with itself: nothing changed)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        if not hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if not hidden and name.startswith("."):
                continue
            if os.path.islink(path):
                if hidden:
                    out[rel + " ->"] = os.readlink(path)
                if os.path.isdir(path):
                    continue
            with open(path, "rb") as f:
                out[rel] = f.read()
    return out


def state(folder):
    """Everything about a folder: its top-level names (temporary folders and files included) and snapshot(hidden)."""
    return {"names": sorted(os.listdir(folder)), "files": snapshot(folder, hidden=True)}


# ---------------------------------------------------------------------------------------------------------------
# Training


def tiny_train_args(dataset, out_dir, **overrides):
    """Command-line flags for a tiny, fast from-scratch run (any key can be overridden)."""
    cfg = dict(init_from="scratch", dataset=dataset, out_dir=out_dir, n_layer=2, n_head=2, n_embd=32,
               block_size=32, batch_size=4, gradient_accumulation_steps=1, max_iters=6, eval_interval=3,
               eval_iters=2, log_interval=1, warmup_iters=2, learning_rate=1e-3, min_lr=1e-4, dropout=0.0,
               patience=0, device="cpu", dtype="float32", compile=False, wandb_log=False, sample_max_tokens=0)
    cfg.update(overrides)
    return [f"--{k}={v}" for k, v in cfg.items()]


def train_ddp(tmp_path, dataset, out_dir, **overrides):
    """A tiny run on 2 CPU processes under torchrun (gloo); returns the CompletedProcess."""
    return run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script("train.py"),
                *tiny_train_args(dataset, out_dir, batch_size=2, **overrides)], cwd=tmp_path, timeout=300)


def train_inprocess(argv):
    """Run train.main(argv) in this process and return what it printed. The SIGINT/SIGTERM handlers the training
    loop installs are put back afterwards, so Ctrl-C still reaches pytest."""
    import signal

    import train
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            train.main(list(argv))
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return out.getvalue()


def read_metrics(out_dir, name="metrics.jsonl"):
    with open(os.path.join(out_dir, name)) as f:
        return [json.loads(line) for line in f]


def checkpoints(out_dir):
    return sorted(n for n in os.listdir(out_dir) if n.startswith("finetuned_") and n.endswith(".pt"))


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Tiny models and checkpoints (the one definition: conftest.py's tiny_model / tiny_ckpt fixtures use these)

TINY_GPT = dict(block_size=64, n_layer=2, n_head=2, n_embd=32, vocab_size=50304, dropout=0.0)


def tiny_model(seed=0, residual_scale=10.0, train=False, **config):
    """A small GPT with random weights (TINY_GPT, any key overridden), in eval mode unless train.

    residual_scale multiplies the residual projections (attn.c_proj, mlp.c_proj). The default 10 is for generation
    tests: with GPT-2's init a random model mostly repeats the token it was fed (tied embeddings), and tests of
    cached vs uncached generation need outputs that depend on the whole context. residual_scale=1 keeps GPT-2's
    init (model and training tests)."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY_GPT, **config}))
    if residual_scale != 1:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.mul_(residual_scale)
                block.mlp.c_proj.weight.mul_(residual_scale)
    return model.train(train)


def save_tiny_checkpoint(path, model=None, default_stop="\n"):
    """A checkpoint with the keys sample.py / eval.py read (as train.py writes them); default_stop None: a text
    model's (no stop string). Returns the path."""
    from chat_gpt2 import chat
    from chat_gpt2.checkpoint import save_checkpoint
    model = model or tiny_model()
    save_checkpoint(str(path), {"model": model.state_dict(), "model_args": asdict(model.config),
                                "template": chat.TEMPLATE, "tokenizer": chat.TOKENIZER,
                                "default_stop": default_stop, "multiline_replies": default_stop not in ("\n", None)})
    return str(path)


def save_tiny_classifier(path, labels, model=None):
    """A classifier checkpoint with the keys train.py writes (those read back): model (default: a tiny random GPT,
    GPT-2's init) with a fresh head for labels, read from the columns text / label. Returns the path."""
    from chat_gpt2.checkpoint import save_checkpoint
    from chat_gpt2.classifier import attach_head
    model = attach_head(model or tiny_model(residual_scale=1), labels)
    save_checkpoint(str(path), {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": "gpt2",
                                "template": None, "default_stop": None, "multiline_replies": False,
                                "classify": {"labels": list(labels), "columns": {"text": ["text"], "label": "label",
                                                                                  "header": True, "join": "\n"}}})
    return str(path)


def model_of(ckpt_path):
    """The GPT a checkpoint file holds, rebuilt by hand (not by chat_gpt2.checkpoint), in eval mode."""
    from model import GPT, GPTConfig
    ckpt = load_ckpt(ckpt_path)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The greedy reference: what a reply must be, computed without the engine


def prompt(user, system=None, history=()):
    """The generation prompt ids, written out from the template in the spec. history: earlier (user, reply) pairs.
    The whole text is tokenised at once, as in training (and by a Hugging Face tokenizer): the "\n\n" closing a
    turn becomes "\n", "\n" before the next "Human:"."""
    from chat_gpt2 import chat
    text = f"System: {system}\n" if system else ""
    for question, reply in history:
        text += f"Human: {question}\nAssistant: {reply}\n\n"
    return chat.get_encoder().encode_ordinary(text + f"Human: {user}\nAssistant:")


@torch.no_grad()
def greedy_tokens(model, prompt_ids, max_new_tokens, stops=(), vocab=50257):
    """Argmax decoding by full forward passes over the whole sequence (no KV cache, no cropping). Returns the new
    tokens, ending before the first <|endoftext|>, or with the token whose text completed one of the stop strings."""
    ids, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([ids]))
        token = int(logits[0, -1, :vocab].argmax())
        if token == EOT:
            break
        ids.append(token)
        out.append(token)
        if any(s in decode(out) for s in stops):
            break
    return out


def cut_reply(text, stops):
    """A reply: text cut at the first of the stop strings, stripped."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[:min(cuts)] if cuts else text).strip()


def greedy_reply(model, prompt_ids, max_new_tokens, stops):
    """The reference reply: greedy_tokens' text, cut at the first stop string, stripped. model: a GPT or a
    checkpoint path."""
    if isinstance(model, (str, os.PathLike)):
        model = model_of(model)
    return cut_reply(decode(greedy_tokens(model, prompt_ids, max_new_tokens, stops)), stops)


def fake_complete(monkeypatch, reply):
    """Engine.complete replaced, the model never run: each request's n replies get the text
    reply(engine, request) returns (it may stream something and raise, as a Ctrl-C would), streamed
    whole to its on_text."""
    from chat_gpt2.engine import Completion, Engine

    def complete(engine, requests, cancelled=None):
        for request in requests:
            text = reply(engine, request)
            request.replies = [Completion(engine.enc, request.params.stop) for _ in range(request.n)]
            for choice, row in enumerate(request.replies):
                row.text, row.finish_reason = text, "stop"
                if request.on_text:
                    request.on_text(choice, text)
    monkeypatch.setattr(Engine, "complete", complete)


def counting_prefills(model, monkeypatch):
    """The positions each prefill runs: the engine's calls of GPT.hidden_states (a decode step goes
    through GPT.forward and is not counted)."""
    runs, stepping = [], []
    hidden_states, forward = model.hidden_states, model.forward

    def counted_forward(*args, **kwargs):
        stepping.append(True)
        try:
            return forward(*args, **kwargs)
        finally:
            stepping.pop()

    def counted_hidden_states(idx, kv_cache=None):
        if not stepping:
            runs.append(idx.size(1))
        return hidden_states(idx, kv_cache)
    monkeypatch.setattr(model, "forward", counted_forward)
    monkeypatch.setattr(model, "hidden_states", counted_hidden_states)
    return runs


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face models (need transformers, requirements-dev.txt; nothing here touches the network)

TINY_HF = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64)


def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this process and its subprocesses (huggingface_hub reads it at import, hence both)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def tiny_hf_model(seed=0, **config):
    """A random transformers GPT2LMHeadModel (fp32, eval mode). Every weight is perturbed, so zero-initialised biases
    and unit LayerNorm weights take part in the comparison too."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **{**TINY_HF, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_hf(model, path, **kwargs):
    model.save_pretrained(str(path), **kwargs)
    return str(path)


def random_tokens(T, B=2, seed=1):
    return torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(ours, hf, T, seed=1):
    """Max abs difference of all positions' logits, our GPT vs a transformers model, on random tokens."""
    idx = random_tokens(T, seed=seed)
    a = ours(idx, all_logits=True)[0][..., :50257]
    return (a - hf(idx).logits).abs().max().item()


@torch.no_grad()
def hf_greedy_tokens(hf_model, prompt_ids, max_new_tokens):
    """transformers' own greedy generate: the new tokens, up to (not including) the first <|endoftext|>."""
    out = hf_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOT, pad_token_id=EOT)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(EOT)] if EOT in new else new


# ---------------------------------------------------------------------------------------------------------------
# Subprocesses


def env():
    e = dict(os.environ)
    e["WANDB_MODE"] = "offline"
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(args, cwd, timeout=240, check=True):
    """Run `python args...` (args[0] a script or -m) with this interpreter; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, *args], cwd=str(cwd), env=env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p
