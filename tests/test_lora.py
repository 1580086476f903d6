"""chat_gpt2/lora.py: LoRA adapters and --trainable_layers: what trains, what a checkpoint holds, resume, merge, PEFT
export, DDP, and the refusals. (--epochs is in test_train_cli.py, the trainable-state memory estimate in
test_memory.py.)"""
import json
import os
import shutil

import pytest
import torch

import export
import train
import helpers
from helpers import (checkpoints, load_ckpt, offline, random_tokens, read_metrics, run, save_hf, script,
                     tiny_hf_model, tiny_train_args, train_inprocess)
from chat_gpt2 import chat
from chat_gpt2.checkpoint import load_checkpoint, load_model, model_from_checkpoint
from chat_gpt2.errors import CheckpointError, ConfigError
from chat_gpt2.lora import LORA_KEYS, TARGETS, apply_lora, freeze_layers, merge_lora
from model import GPT, GPTConfig

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(TARGETS)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    offline(monkeypatch)


def tiny_gpt(n_layer=2, seed=0):
    """helpers.tiny_model with GPT-2's init, as constructed (training mode), a 512-token vocabulary."""
    return helpers.tiny_model(seed, residual_scale=1, train=True, block_size=32, vocab_size=512, n_layer=n_layer)


def one_step(model, seed=0):
    """One AdamW step (train.py's optimizer groups) on random tokens; returns the optimizer."""
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 512, (2, 16), generator=g), torch.randint(0, 512, (2, 16), generator=g)
    model(x, y)[1].backward()
    opt.step()
    return opt


def changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def is_adapter(name):
    return name.rsplit(".", 1)[-1] in LORA_KEYS


def last_ckpt(out):
    return load_ckpt(os.path.join(out, [n for n in checkpoints(out) if n.endswith("_last.pt")][0]))


def best_path(out):
    return os.path.join(out, [n for n in checkpoints(out) if not n.endswith("_last.pt")][0])


# ---------------------------------------------------------------------------------------------------------------
# The model: step 0, what one step changes, merging


@torch.no_grad()
def test_lora_at_step_0_is_the_base():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 512, (2, 16))
    base = model(idx, all_logits=True)[0]
    apply_lora(model, LORA)
    assert torch.equal(model(idx, all_logits=True)[0], base)  # B = 0: exactly the base
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in model.state_dict() if is_adapter(n)}


def test_one_lora_step_changes_only_the_adapters():
    model = apply_lora(tiny_gpt(), LORA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = one_step(model)
    adapters = {k for k in before if is_adapter(k)}
    assert len(adapters) == 2 * len(TARGETS) * 2
    assert changed(before, model) == adapters  # every A and B moved (A by weight decay), no base tensor did
    assert all(p.grad is None for n, p in model.named_parameters() if not is_adapter(n))
    assert len(opt.state) == len(adapters)  # AdamW state for the adapters only


def test_trainable_layers_changes_only_the_last_blocks_and_ln_f():
    model = freeze_layers(tiny_gpt(n_layer=3), 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = one_step(model)
    trainable = {k for k in before if k.startswith(("transformer.h.2.", "transformer.ln_f."))}
    assert changed(before, model) == trainable  # the tied wte / lm_head, wpe and blocks 0-1 untouched
    assert len(opt.state) == sum(p.requires_grad for p in model.parameters()) == len(trainable)
    with pytest.raises(ConfigError, match="trainable_layers=4 exceeds the model's 3 layers"):
        freeze_layers(tiny_gpt(n_layer=3), 4)


@pytest.mark.slow
def test_lora_under_torch_compile_matches_eager():
    """torch.compile traces the adapters (dynamo + AOT autograd; aot_eager skips the minutes of C++ codegen that
    inductor needs on a CPU): the same loss and adapter gradients as eager, and still none for the frozen base."""
    torch.manual_seed(0)
    model = apply_lora(tiny_gpt(), LORA)
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    eager = model(x, y)[1]
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")(x, y)[1]
    compiled.backward()
    assert torch.allclose(compiled, eager, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[name], atol=1e-6), name
        else:
            assert p.grad is None, name


@torch.no_grad()
def test_merged_and_unmerged_logits_match():
    model = apply_lora(tiny_gpt(), LORA).eval()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.normal_(0, 0.05)
    idx = torch.randint(0, 512, (2, 16))
    unmerged = model(idx, all_logits=True)[0]
    plain_keys = set(tiny_gpt().state_dict())
    merge_lora(model)
    assert set(model.state_dict()) == plain_keys  # a plain GPT again, under the base's names
    torch.testing.assert_close(model(idx, all_logits=True)[0], unmerged, atol=1e-5, rtol=0)
    assert model(idx[:, :4], all_logits=True)[0].shape == (2, 4, 512)  # the few-rows CPU path still works


# ---------------------------------------------------------------------------------------------------------------
# Flags: refusals


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank=-1"], "--lora_rank must be a whole number >= 0"),
    (["--lora_rank=4", "--lora_targets=attn.c_attn,attn.q"], "unknown layer 'attn.q'"),
    (["--lora_rank=4", "--lora_alpha=-2"], "--lora_alpha must be a number > 0"),
    (["--lora_rank=4", "--lora_dropout=1"], "--lora_dropout must be in"),
    (["--lora_rank=4", "--trainable_layers=1"], "cannot be combined"),
    (["--trainable_layers=-2"], "--trainable_layers must be -1"),
    (["--epochs=1", "--max_iters=5"], "--epochs and --max_iters were both given"),
    (["--epochs=-1"], "--epochs must be >= 0"),
])
def test_bad_values_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        train.resolve_config(flags)


@pytest.mark.slow
def test_trainable_layers_above_n_layer_is_refused_on_the_command_line(tmp_path, tiny_dataset):
    p = run([script("train.py"), *tiny_train_args(tiny_dataset, str(tmp_path / "o"), trainable_layers=3)],
            cwd=tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "error: --trainable_layers=3 exceeds the model's 2 layers (n_layer)"


# ---------------------------------------------------------------------------------------------------------------
# Whole LoRA runs on a tiny Hugging Face base: checkpoints, resume, sampling, export, wrong base

COMMON = dict(max_iters=6, eval_interval=3, lr_decay_iters=6, learning_rate=1e-2, gradient_accumulation_steps=2,
              lora_rank=4, lora_alpha=8, lora_targets="attn.c_attn,mlp.c_proj")


@pytest.fixture(scope="module")
def hf_base(hf_dir):
    """The LoRA runs' base: conftest's tiny Hugging Face GPT-2 folder (read only)."""
    return hf_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dataset, hf_base):
    out = str(tmp_path_factory.mktemp("lora") / "out")
    mp = pytest.MonkeyPatch()
    offline(mp)
    try:
        stdout = train_inprocess(tiny_train_args(tiny_dataset, out, init_from=hf_base, **COMMON))
    finally:
        mp.undo()
    return out, stdout


def test_lora_checkpoint_holds_adapters_and_the_base_record(lora_run, hf_base):
    out, stdout = lora_run
    assert "trainable 2,304 of " in stdout and "LoRA rank 4, alpha 8" in stdout
    best = load_ckpt(best_path(out))
    assert best["model"] and all(is_adapter(k) for k in best["model"])  # no base tensor
    assert len(best["model"]) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)
    assert best["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attn.c_attn", "mlp.c_proj"]}
    assert best["base"]["init_from"] == os.path.abspath(hf_base) and len(best["base"]["fingerprint"]) == 64
    assert best["base"]["model_args"]["block_size"] == 32
    assert "optimizer" in last_ckpt(out) and len(last_ckpt(out)["optimizer"]["state"]) == 8
    assert os.path.getsize(best_path(out)) < 64 * 1024  # the base (~1.7M parameters, 7 MB) is not in it


@torch.no_grad()
def test_lora_checkpoint_loads_merged_for_sampling(lora_run, hf_base):
    out, _ = lora_run
    model, info = load_model(out_dir=out)
    assert not any(is_adapter(k) for k in model.state_dict())  # merged: a plain GPT
    unmerged = model_from_checkpoint(info, merge=False).eval()
    base = model_from_checkpoint({**info, "lora": {**info["lora"], "alpha": 0.0001}}).eval()
    idx = random_tokens(16)
    ours = model(idx, all_logits=True)[0]
    torch.testing.assert_close(ours, unmerged(idx, all_logits=True)[0], atol=1e-4, rtol=0)
    assert (ours - base(idx, all_logits=True)[0]).abs().max() > 1e-3  # the adapters do something


def test_lora_resume_continues_exactly(lora_run, tmp_path, tiny_dataset, hf_base):
    a, _ = lora_run
    b = str(tmp_path / "b")
    train_inprocess(tiny_train_args(tiny_dataset, b, init_from=hf_base, **{**COMMON, "max_iters": 3}))
    stdout = train_inprocess(["--init_from=resume", f"--out_dir={b}", "--max_iters=6"])
    assert "resuming" in stdout
    last_a, last_b = last_ckpt(a), last_ckpt(b)
    assert last_a["iter_num"] == last_b["iter_num"] == 6 and last_a["model"].keys() == last_b["model"].keys()
    for k in last_a["model"]:
        torch.testing.assert_close(last_a["model"][k], last_b["model"][k], atol=1e-6, rtol=0)
    losses = [[r.get("loss", r.get("val_loss")) for r in read_metrics(d)] for d in (a, b)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_lora_export_merged_and_peft_adapter(lora_run, tmp_path, hf_base):
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel
    out, _ = lora_run
    model, _ = load_model(out_dir=out)
    idx = random_tokens(16)
    with torch.no_grad():
        ours = model(idx, all_logits=True)[0][..., :chat.VOCAB_SIZE]
    export.main([f"--out_dir={out}", f"--out={tmp_path / 'merged'}"])
    merged = GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    export.main([f"--out_dir={out}", f"--out={tmp_path / 'adapter'}", "--adapter_only"])
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["base_model_name_or_path"] == os.path.abspath(hf_base)
    peft_model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_base),
                                                str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        for hf in (merged, peft_model):
            assert (hf(idx).logits - ours).abs().max().item() < 1e-4
        base_logits = GPT2LMHeadModel.from_pretrained(hf_base).eval()(idx).logits
    assert (base_logits - ours).abs().max().item() > 1e-3  # the comparison can tell base from adapted


def test_wrong_or_missing_base_is_a_clear_error(lora_run, tmp_path):
    out, _ = lora_run
    ckpt = load_checkpoint(best_path(out))
    other = save_hf(tiny_hf_model(seed=1), tmp_path / "other")
    with pytest.raises(CheckpointError, match="trained on other weights than .*other.* restore the base"):
        model_from_checkpoint({**ckpt, "base": {**ckpt["base"], "init_from": other}})
    shutil.rmtree(other)
    with pytest.raises(CheckpointError, match="base .*other.* could not be rebuilt"):
        model_from_checkpoint({**ckpt, "base": {**ckpt["base"], "init_from": other}})


def test_lora_on_a_scratch_base_rebuilds_it_from_the_seed(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    train_inprocess(tiny_train_args(tiny_dataset, out, max_iters=2, n_layer=1, lora_rank=2))
    ckpt = load_checkpoint(best_path(out))
    assert ckpt["base"]["init_from"] == "scratch"
    model_from_checkpoint(ckpt)  # the fingerprint matched
    with pytest.raises(CheckpointError, match="trained on other weights"):
        model_from_checkpoint({**ckpt, "base": {**ckpt["base"], "seed": 1}})


@pytest.mark.slow
def test_trainable_layers_with_ddp(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    p = helpers.train_ddp(tmp_path, tiny_dataset, out, max_iters=2, eval_interval=2, trainable_layers=1)
    assert "2 process(es)" in p.stdout and "(the last 1 blocks + ln_f)" in p.stdout
    final = last_ckpt(out)["model"]
    torch.manual_seed(1337)  # rank 0's initial model, which DDP broadcasts
    start = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).state_dict()
    assert final.keys() == start.keys()  # the whole model
    moved = {k for k in start if not torch.equal(final[k], start[k])}
    assert moved == {k for k in start if k.startswith(("transformer.h.1.", "transformer.ln_f."))}
