"""chat_gpt2/hf_gpt2.py: loading Hugging Face GPT-2 checkpoints (the name mapping, layouts, overrides) and its
one-line errors. The tiny transformers model and its folder are conftest.py's hf_model / hf_dir.

Run with -s to see the parity figures (max abs logit difference, ours vs transformers, fp32)."""
import json
import os
import shutil

import pytest
import torch

import helpers
from chat_gpt2.errors import PretrainedError
from chat_gpt2.hf_gpt2 import from_pretrained, pretrained_config, resolve_pretrained
from model import GPT
from helpers import max_logit_diff, save_hf

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    helpers.offline(monkeypatch)


def copy_dir(src, dst, skip=()):
    os.makedirs(dst)
    for name in os.listdir(src):
        if name not in skip:
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("block_size,flash", [(None, True), (None, False), (16, True)])
def test_logits_match_transformers(hf_model, hf_dir, block_size, flash):
    overrides = {"flash": flash, **({"block_size": block_size} if block_size else {})}
    model = from_pretrained(hf_dir, overrides).eval()
    T = block_size or 64
    assert model.config.block_size == T and model.config.vocab_size == 50257
    assert model.transformer.wpe.weight.shape == (T, 32)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading
    diff = max_logit_diff(model, hf_model, T)
    print(f"\nparity init_from=DIR vs transformers (block_size={T}, flash={flash}): max abs logit diff {diff:.3g}")
    assert diff < 1e-5


def test_pytorch_model_bin_with_unprefixed_names_and_mask_buffers(hf_model, tmp_path):
    """The layout of OpenAI's original checkpoints: no 'transformer.' prefix, causal-mask buffers, lm_head."""
    folder = tmp_path / "openai-style"
    folder.mkdir()
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    hf_model.config.to_json_file(str(folder / "config.json"))
    model = from_pretrained(str(folder)).eval()
    diff = max_logit_diff(model, hf_model, 64)
    print(f"\nparity pytorch_model.bin vs transformers: max abs logit diff {diff:.3g}")
    assert diff < 1e-5


def test_sharded_safetensors(hf_model, tmp_path):
    folder = save_hf(hf_model, tmp_path / "sharded", max_shard_size="2MB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    assert max_logit_diff(from_pretrained(folder).eval(), hf_model, 32) < 1e-5


def test_overrides(hf_dir):
    model = from_pretrained(hf_dir, {"dropout": 0.2, "n_layer": 2, "n_embd": 32, "bias": True})
    assert model.config.dropout == 0.2 and model.transformer.drop.p == 0.2
    for key, value in [("n_layer", 3), ("n_head", 4), ("n_embd", 64), ("vocab_size", 50304), ("bias", False)]:
        with pytest.raises(PretrainedError, match=f"{key}={value!r} was requested .* has {key}="):
            from_pretrained(hf_dir, {key: value})
    with pytest.raises(PretrainedError, match="block_size 65 exceeds the 64 positions"):
        from_pretrained(hf_dir, {"block_size": 65})
    with pytest.raises(PretrainedError, match="cannot override 'learning_rate'"):
        pretrained_config(resolve_pretrained(hf_dir), {"learning_rate": 1.0})


def test_loading_skips_random_init(hf_dir, monkeypatch):
    """The model is built on the meta device: no time (or memory) for weights that are overwritten anyway."""
    calls, real = [], GPT._init_weights

    def spy(self, module):
        calls.extend(p.device.type for p in module.parameters(recurse=False))
        real(self, module)

    monkeypatch.setattr(GPT, "_init_weights", spy)
    from_pretrained(hf_dir)
    assert calls and set(calls) == {"meta"}


# ---------------------------------------------------------------------------------------------------------------
# Clear errors


def one_line(e):
    text = str(e.value)
    assert "\n" not in text and len(text) < 600, text
    return text


def test_missing_paths_and_files(hf_dir, tmp_path):
    with pytest.raises(PretrainedError) as e:
        from_pretrained(str(tmp_path / "nope"))
    assert "no such directory" in one_line(e)
    with pytest.raises(PretrainedError) as e:
        from_pretrained(os.path.join(hf_dir, "config.json"))
    assert "is a file" in one_line(e)
    with pytest.raises(PretrainedError) as e:
        from_pretrained(copy_dir(hf_dir, tmp_path / "noconfig", skip=("config.json",)))
    assert "has no config.json" in one_line(e)
    with pytest.raises(PretrainedError) as e:
        from_pretrained(copy_dir(hf_dir, tmp_path / "noweights", skip=("model.safetensors",)))
    assert "no weights" in one_line(e) and "model.safetensors" in str(e.value)


def test_unknown_name_offline_says_what_was_tried():
    with pytest.raises(PretrainedError) as e:
        from_pretrained("gpt2")
    text = one_line(e)
    assert "'gpt2'" in text and "'openai-community/gpt2'" in text and "HF_HUB_OFFLINE" in text
    assert "`hf download gpt2 config.json model.safetensors --local-dir gpt2-local`" in text
    assert "--init_from=/path/to/gpt2-local" in text
    assert "HF_HUB_OFFLINE=1 skips the Hub's retries" in text and "--init_from=scratch trains without" in text
    with pytest.raises(PretrainedError) as e:
        from_pretrained("someone/no-such-model-xyz")
    assert "someone/no-such-model-xyz" in one_line(e)
    with pytest.raises(PretrainedError) as e:
        from_pretrained("scrach")  # a typo of 'scratch' ends here: the message lists what init_from takes
    assert "init_from takes 'scratch'" in one_line(e)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "llama"}, "model_type 'llama', not 'gpt2'"),
    ({"vocab_size": 32000}, "vocab_size 32000, not GPT-2's 50257"),
    ({"n_inner": 100}, "n_inner=100"),
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
])
def test_non_gpt2_configs_are_refused(hf_dir, tmp_path, changes, message):
    folder = copy_dir(hf_dir, tmp_path / "model")
    edit_config(folder, **changes)
    with pytest.raises(PretrainedError) as e:
        from_pretrained(folder)
    assert message in one_line(e)


def test_broken_files(hf_dir, hf_model, tmp_path):
    folder = copy_dir(hf_dir, tmp_path / "badjson")
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(PretrainedError) as e:
        from_pretrained(folder)
    assert "unreadable config.json" in one_line(e)
    folder = copy_dir(hf_dir, tmp_path / "truncated")
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(PretrainedError) as e:
        from_pretrained(folder)
    assert "could not read model.safetensors" in one_line(e)
    folder = tmp_path / "missing-tensor"
    folder.mkdir()
    state = {k: v for k, v in hf_model.state_dict().items() if k != "transformer.h.1.mlp.c_fc.bias"}
    torch.save(state, folder / "pytorch_model.bin")
    hf_model.config.to_json_file(str(folder / "config.json"))
    with pytest.raises(PretrainedError) as e:
        from_pretrained(str(folder))
    assert "lack 1 tensors" in one_line(e) and "h.1.mlp.c_fc.bias" in str(e.value)
    state = {**hf_model.state_dict(), "score.weight": torch.zeros(2, 32)}  # a classification head
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(PretrainedError) as e:
        from_pretrained(str(folder))
    assert "unexpected tensor 'score.weight'" in one_line(e)
