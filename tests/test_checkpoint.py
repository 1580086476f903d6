"""chat_gpt2/checkpoint.py: what a training checkpoint holds (a finished run's files load weights-only into GPT),
the newest run's checkpoint, atomic save, clear load errors, and a model rebuilt from wrapped (compiled / DDP)
weights."""
import os

import pytest
import torch

import helpers
from chat_gpt2.checkpoint import (checkpoint_path, clean_state_dict, find_checkpoint, load_checkpoint, load_model,
                                  model_from_checkpoint, save_checkpoint, unused_stamp)
from chat_gpt2.errors import CheckpointError, MissingFileError
from model import GPT, GPTConfig
from helpers import checkpoints, load_ckpt


def test_checkpoint_round_trip(finished_run):
    out, _ = finished_run
    for name in checkpoints(out):
        ckpt = load_ckpt(os.path.join(out, name))  # weights_only=True
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])  # strict: every key, no extra
        assert ckpt["model_args"]["n_embd"] == 32 and ckpt["model_args"]["block_size"] == 32
        assert ckpt["tokenizer"] == "gpt2" and ckpt["template"]["user"] == "Human: {content}\n"
        assert ckpt["default_stop"] == "\n" and ckpt["config"]["max_iters"] == 7
        assert ("optimizer" in ckpt) == name.endswith("_last.pt")


def test_find_checkpoint_takes_the_newest_run(tmp_path):
    for stamp in ("20250101_000000", "20250102_000000"):
        for last in (False, True):
            save_checkpoint(checkpoint_path(str(tmp_path), stamp, last), {"stamp": stamp})
    (tmp_path / "finetuned_20991231_000000.pt.tmp123").write_bytes(b"")  # a write in progress is no checkpoint
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / "finetuned_20250102_000000.pt")
    assert find_checkpoint(str(tmp_path), last=True) == str(tmp_path / "finetuned_20250102_000000_last.pt")
    with pytest.raises(MissingFileError, match="no checkpoint finetuned_YYYYMMDD_HHMMSS_last.pt"):
        find_checkpoint(str(tmp_path / "empty"), last=True)


def test_unused_stamp_skips_a_taken_second(tmp_path, monkeypatch):
    import time
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    first = unused_stamp(str(tmp_path))
    save_checkpoint(checkpoint_path(str(tmp_path), first, last=True), {})
    second = unused_stamp(str(tmp_path))
    assert second != first and len(second) == len(first) == 15


def test_save_is_atomic_and_load_is_weights_only(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "iter_num": 3})
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left beside it
    assert load_checkpoint(path)["iter_num"] == 3
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        load_checkpoint(path)
    torch.save({"thing": GPTConfig()}, path)  # a pickled class: refused by the weights-only loader
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(MissingFileError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_model_from_checkpoint_drops_wrapper_prefixes():
    model = helpers.tiny_model(n_layer=1)
    state = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}
    assert clean_state_dict(state).keys() == model.state_dict().keys()
    ckpt = {"model": state, "model_args": vars(model.config)}
    rebuilt = model_from_checkpoint(ckpt, dropout=0.1)
    assert rebuilt.config.dropout == 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="lacks model_args"):
        model_from_checkpoint({"model": state})
    with pytest.raises(CheckpointError, match="do not fit its model_args"):
        model_from_checkpoint({**ckpt, "model_args": {**vars(model.config), "n_embd": 64}})


def test_load_model_from_a_file_or_the_newest_run(tiny_ckpt, tmp_path):
    model, info = load_model(ckpt=tiny_ckpt)
    assert not model.training and info["default_stop"] == "\n"
    os.makedirs(tmp_path / "out")
    newest = helpers.save_tiny_checkpoint(tmp_path / "out" / "finetuned_20250101_000000.pt",
                                          helpers.tiny_model(seed=4, n_layer=1), default_stop="\nHuman:")
    model, info = load_model(out_dir=str(tmp_path / "out"))
    assert model.config.n_layer == 1 and info["default_stop"] == "\nHuman:"
    assert torch.equal(model.lm_head.weight, load_ckpt(newest)["model"]["lm_head.weight"])
    with pytest.raises(CheckpointError, match="means nothing to sample from"):
        load_model(init_from="scratch")
