"""Shared test setup: offline tokenizer, repo on sys.path, wandb offline, and the shared fixtures.

Fixtures (session-scoped ones are built once and must only be read):
    tiny_model           a tiny random GPT (helpers.tiny_model); parametrize indirectly with a dict of its keywords
    make_tiny_ckpt       session: a saved checkpoint of helpers.tiny_model(**kwargs), one file per set of kwargs
    tiny_ckpt            session: make_tiny_ckpt() (block_size 64, a newline stop)
    tiny_dataset         session: a prepared dataset from helpers.chat_records()
    tiny_val_dataset     session: the same, with a val split shorter than a training window
    existing_dataset     a dataset already prepared in tmp_path/out, and its helpers.state (names and files)
    finished_run         session: a tiny in-process train.py run (out_dir, stdout)
    cli_run              session: prepare.py and train.py run as commands from a fresh folder
    untrained_ckpt       session: cli_run's checkpoint with freshly initialised weights
    hf_model, hf_dir     session: a tiny random transformers GPT-2, and its save_pretrained folder
    exported             session: {bias: (our model, its export.py directory)}
"""
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")

_cache = os.path.join(SHARED, "tiktoken_cache")
if not os.environ.get("TIKTOKEN_CACHE_DIR") and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = _cache
os.environ["WANDB_MODE"] = "offline"
for _path in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import helpers  # noqa: E402  (needs sys.path above)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end test (still part of the default run)")
    # the tests' models are tiny: one thread is faster than several fighting over 2 shared cores
    import torch
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# Tiny models and checkpoints


@pytest.fixture
def tiny_model(request):
    """helpers.tiny_model(**param): `@pytest.mark.parametrize("tiny_model", [dict(block_size=16)], indirect=True)`."""
    return helpers.tiny_model(**getattr(request, "param", {}))


@pytest.fixture(scope="session")
def make_tiny_ckpt(tmp_path_factory):
    """make_tiny_ckpt(**kwargs) -> path of a checkpoint of helpers.tiny_model(**kwargs), saved once per kwargs."""
    saved = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in saved:
            path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
            saved[key] = helpers.save_tiny_checkpoint(path, helpers.tiny_model(**kwargs))
        return saved[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(make_tiny_ckpt):
    return make_tiny_ckpt()


# ---------------------------------------------------------------------------------------------------------------
# Prepared datasets


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared dataset (folder path) from helpers.chat_records(): read it, never write to it."""
    from chat_gpt2.build import build_dataset
    root = tmp_path_factory.mktemp("tiny")
    src = helpers.write_records(root / "chat.jsonl", helpers.chat_records())
    build_dataset([str(src)], out_dir=str(root / "data"), val_fraction=0.2, seed=1)
    return str(root / "data")


@pytest.fixture(scope="session")
def tiny_val_dataset(tmp_path_factory):
    """A prepared dataset whose val split is one short conversation, far fewer tokens than a training window."""
    from chat_gpt2.build import build_dataset
    root = tmp_path_factory.mktemp("tinyval")
    train = helpers.write_records(root / "train.jsonl", helpers.chat_records())
    val = helpers.write_records(root / "val.jsonl", [{"user": "Hi", "assistant": "Hello"}])
    build_dataset([str(train)], out_dir=str(root / "data"), val_file=str(val))
    return str(root / "data")


@pytest.fixture
def existing_dataset(tmp_path):
    """out_dir already holding a prepared dataset; returns (out_dir, its helpers.state: names and files)."""
    from chat_gpt2.build import build_dataset
    src = helpers.write_records(tmp_path / "good.jsonl", helpers.numbered(5))
    out = str(tmp_path / "out")
    build_dataset([src], out_dir=out)
    return out, helpers.state(out)


# ---------------------------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_val_dataset):
    """7 iters, eval every 3, 2 micro-batches, a val split shorter than block_size. Returns (out_dir, stdout)."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    stdout = helpers.train_inprocess(helpers.tiny_train_args(tiny_val_dataset, out, max_iters=7, eval_interval=3,
                                                             gradient_accumulation_steps=2, sample_max_tokens=4))
    return out, stdout


CLI_RECORDS = [{"user": f"What is {i} plus {j}?", "assistant": f"{i + j}"} for i in range(8) for j in range(4)]


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """prepare.py and train.py run as a user would, from a fresh folder. Returns a dict: cwd, best (the best
    checkpoint's path), prepare and train (their stdout)."""
    cwd = tmp_path_factory.mktemp("cli")
    helpers.write_records(cwd / "chat.jsonl", CLI_RECORDS)
    prepared = helpers.run([helpers.script("prepare.py"), "chat.jsonl", "--out_dir=data/chat", "--seed=3"], cwd)
    trained = helpers.run([helpers.script("train.py"), helpers.script("config/finetune_chat.py"),
                           "--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=32", "--max_iters=12",
                           "--dataset=chat", "--eval_interval=6", "--eval_iters=2", "--log_interval=3",
                           "--batch_size=4", "--block_size=64", "--learning_rate=3e-3", "--warmup_iters=2",
                           "--dropout=0", "--device=cpu", "--sample_max_tokens=4"], cwd)
    best = [n for n in helpers.checkpoints(cwd / "out") if re.fullmatch(r"finetuned_\d{8}_\d{6}\.pt", n)]
    return {"cwd": cwd, "best": str(cwd / "out" / best[0]) if len(best) == 1 else None,
            "prepare": prepared.stdout, "train": trained.stdout}


@pytest.fixture(scope="session")
def untrained_ckpt(cli_run):
    """The run's checkpoint with freshly initialised weights: its greedy replies are long and never stop early (a
    briefly trained model tends to answer <|endoftext|> at once, which would make reply comparisons vacuous)."""
    import torch

    from model import GPT, GPTConfig
    ckpt = helpers.load_ckpt(cli_run["best"])
    torch.manual_seed(0)
    ckpt["model"] = GPT(GPTConfig(**ckpt["model_args"])).state_dict()
    path = str(cli_run["cwd"] / "untrained.pt")
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face models (the tests using these skip without transformers)


@pytest.fixture(scope="session")
def hf_model():
    pytest.importorskip("transformers")
    return helpers.tiny_hf_model()


@pytest.fixture(scope="session")
def hf_dir(hf_model, tmp_path_factory):
    return helpers.save_hf(hf_model, tmp_path_factory.mktemp("hf") / "tiny-gpt2")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """{bias: (our model, export directory)} for a tiny padded-vocabulary scratch model with and without biases."""
    import export
    root = tmp_path_factory.mktemp("export")
    result = {}
    for bias in (True, False):
        model = helpers.tiny_model(seed=3, bias=bias)
        out = str(root / f"bias-{bias}")
        export.export(model, out)
        result[bias] = model, out
    return result
