"""Shared test setup: offline tokenizer, repo on sys.path, wandb offline, and small prepared datasets."""
import os
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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared dataset (folder path) from helpers.chat_records(): read it, never write to it."""
    from chat_gpt2.dataset import build_dataset
    root = tmp_path_factory.mktemp("tiny")
    src = helpers.write_records(root / "chat.jsonl", helpers.chat_records())
    build_dataset([str(src)], out_dir=str(root / "data"), val_fraction=0.2, seed=1)
    return str(root / "data")


@pytest.fixture(scope="session")
def tiny_val_dataset(tmp_path_factory):
    """A prepared dataset whose val split is one short conversation, far fewer tokens than a training window."""
    from chat_gpt2.dataset import build_dataset
    root = tmp_path_factory.mktemp("tinyval")
    train = helpers.write_records(root / "train.jsonl", helpers.chat_records())
    val = helpers.write_records(root / "val.jsonl", [{"user": "Hi", "assistant": "Hello"}])
    build_dataset([str(train)], out_dir=str(root / "data"), val_file=str(val))
    return str(root / "data")
