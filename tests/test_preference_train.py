"""Training on preference pairs (objectives.Preference): DPO starts at log 2 (the reference is the starting
weights), resumes exactly, precomputed reference log-probabilities change nothing, LoRA's reference is the
adapters off, SimPO trains, TRL's names are logged, the SFT term (sft_weight) adds the chosen tokens' mean NLL and
resumes exactly, the memory estimate counts the reference, and the wrong objective for a dataset is a one-line
error."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import helpers
from chat_gpt2 import memory
from chat_gpt2.errors import ConfigError
from chat_gpt2.lora import apply_lora
from chat_gpt2.objectives import Preference
from chat_gpt2.preference import adapters_off, build_preference_dataset, load_preference
from model import GPTConfig
from helpers import load_ckpt, read_metrics, tiny_model, tiny_train_args, train_inprocess, write_records

DPO = dict(preference_loss="dpo", beta=0.5, block_size=48, batch_size=2, learning_rate=3e-3)
NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A tiny preference dataset: a polite answer chosen over a rude one."""
    folder = tmp_path_factory.mktemp("pairs")
    records = [{"prompt": f"What is {i} plus {i + 1}?", "chosen": f"It is {2 * i + 1}.",
                "rejected": "Figure it out yourself."} for i in range(24)]
    out = str(folder / "data")
    build_preference_dataset([write_records(folder / "p.jsonl", records)], out, val_fraction=0.25)
    return out


def run(pairs, out, **overrides):
    return train_inprocess(tiny_train_args(pairs, out, **{**DPO, **overrides}))


def last_state(out):
    (path,) = [p for p in helpers.checkpoints(out) if p.endswith("_last.pt")]
    return load_ckpt(f"{out}/{path}")


@pytest.fixture(scope="module")
def dpo_run(pairs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpo") / "out")
    return out, run(pairs, out)


def test_dpo_starts_at_log_2_logs_trl_names_and_learns(dpo_run):
    out, stdout = dpo_run
    evals = [r for r in read_metrics(out) if r["event"] == "eval"]
    assert evals[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference
    assert evals[0]["val_rewards/margins"] == pytest.approx(0, abs=1e-6)
    for split in ("train", "val"):
        assert all(f"{split}_{name}" in evals[-1] for name in NAMES)
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] and evals[-1]["train_rewards/margins"] > 0
    assert "val reward accuracy" in stdout


def test_dpo_resume_continues_exactly(dpo_run, pairs, tmp_path):
    a, _ = dpo_run
    b = str(tmp_path / "b")
    run(pairs, b, max_iters=3)
    assert "resuming" in train_inprocess(["--init_from=resume", f"--out_dir={b}", "--max_iters=6"])
    last_a, last_b = last_state(a), last_state(b)
    assert last_a["iter_num"] == last_b["iter_num"] == 6
    for k in last_a["model"]:
        torch.testing.assert_close(last_a["model"][k], last_b["model"][k], atol=1e-6, rtol=0)
    losses = [[r.get("loss", r.get("val_loss")) for r in read_metrics(d)] for d in (a, b)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_precomputed_reference_log_probabilities_change_nothing(dpo_run, pairs, tmp_path):
    a, _ = dpo_run
    b = str(tmp_path / "b")
    run(pairs, b, precompute_ref=True)
    records = [read_metrics(d) for d in (a, b)]
    for ra, rb in zip(*records):
        for key in ("loss", "val_loss", "val_rewards/chosen", "train_logps/rejected"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-5), key


def test_lora_reference_is_the_model_with_its_adapters_off():
    model = apply_lora(tiny_model(residual_scale=1), {"rank": 2, "alpha": 4.0, "dropout": 0.0,
                                                      "targets": ["attn.c_attn", "mlp.c_fc"]})
    base = tiny_model(residual_scale=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
        idx = torch.randint(0, 1000, (2, 12))
        assert (model(idx, all_logits=True)[0] - base(idx, all_logits=True)[0]).abs().max() > 1e-3
        with adapters_off(model):
            torch.testing.assert_close(model(idx, all_logits=True)[0], base(idx, all_logits=True)[0])
        assert (model(idx, all_logits=True)[0] - base(idx, all_logits=True)[0]).abs().max() > 1e-3  # restored


def test_dpo_with_lora_trains_the_adapters_only_and_resumes_exactly(pairs, tmp_path):
    lora = dict(lora_rank=4, lora_alpha=8, lora_targets="attn.c_attn,mlp.c_proj")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    stdout = run(pairs, a, **lora)
    assert "LoRA rank 4" in stdout
    evals = [r for r in read_metrics(a) if r["event"] == "eval"]
    assert evals[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    run(pairs, b, max_iters=3, **lora)
    train_inprocess(["--init_from=resume", f"--out_dir={b}", "--max_iters=6"])
    last_a, last_b = last_state(a), last_state(b)
    assert set(last_a["model"]) == set(last_b["model"]) and all("lora_" in k for k in last_a["model"])
    for k in last_a["model"]:
        torch.testing.assert_close(last_a["model"][k], last_b["model"][k], atol=1e-6, rtol=0)


def test_simpo_trains_without_a_reference(pairs, tmp_path):
    out = str(tmp_path / "out")
    run(pairs, out, preference_loss="simpo", beta=2.0, simpo_gamma=0.5, trainable_layers=1)
    evals = [r for r in read_metrics(out) if r["event"] == "eval"]
    # no reference: the rewards are beta x the mean log-probability per response token from the start
    assert evals[0]["train_rewards/chosen"] < 0 and evals[-1]["train_loss"] < evals[0]["train_loss"]


def test_the_wrong_objective_for_the_data_is_a_one_line_error(pairs, tiny_dataset, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"holds preference pairs: train on it with `python train.py "
                                          r"config/dpo.py`"):
        run(pairs, out, preference_loss="")
    with pytest.raises(ConfigError, match=r"--preference_loss=dpo needs preference pairs.*--task=preference"):
        train_inprocess(tiny_train_args(tiny_dataset, out, preference_loss="dpo"))
    with pytest.raises(ConfigError, match="--precompute_ref is for DPO"):
        run(pairs, out, preference_loss="simpo", precompute_ref=True)


@pytest.mark.slow
def test_dpo_under_ddp(pairs, tmp_path):
    out = str(tmp_path / "out")
    p = helpers.train_ddp(tmp_path, pairs, out, max_iters=2, eval_interval=2,
                          **{k: v for k, v in DPO.items() if k != "batch_size"})
    assert "2 process(es)" in p.stdout
    evals = [r for r in read_metrics(out) if r["event"] == "eval"]
    assert evals[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5) and len(evals) == 2


def test_sft_weight_adds_the_mean_nll_of_the_chosen_tokens(pairs):
    """TRL's SFT term: the loss is DPO's + sft_weight x the chosen tokens' NLL, a token mean over the batch."""
    import train
    data, meta = load_preference(pairs)
    model = tiny_model(residual_scale=1)
    x, y, m, index = batch = data["train"].batch([0, 3, 5], block_size=48)
    rows = len(index)
    losses = {}
    for weight in (0.0, 0.7):
        cfg = {**train.DEFAULTS, **DPO, "dataset": pairs, "sft_weight": weight}
        objective = Preference(data, meta, cfg, {"device": "cpu", "dtype": "float32", "master": True})
        objective.policy, objective.reference = model, copy.deepcopy(model).requires_grad_(False)
        losses[weight] = objective.loss(model, batch)
    with torch.no_grad():
        logits = model(x[:rows], all_logits=True)[0]
        token_nll = F.cross_entropy(logits.flatten(0, 1), y[:rows].clamp(min=0).flatten(), reduction="none")
        nll = (token_nll * m[:rows].flatten()).sum() / m[:rows].sum()
    assert losses[0.0].item() == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference
    assert losses[0.7].item() == pytest.approx(math.log(2) + 0.7 * nll.item(), abs=1e-5)
    assert nll.item() > 1  # a random model: the term is not negligible


def test_dpo_with_sft_weight_trains_and_resumes_exactly(pairs, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(pairs, a, sft_weight=1.0)
    run(pairs, b, sft_weight=1.0, max_iters=3)
    train_inprocess(["--init_from=resume", f"--out_dir={b}", "--max_iters=6"])
    evals = [r for r in read_metrics(a) if r["event"] == "eval"]
    assert evals[0]["train_loss"] > math.log(2) + 1  # DPO's log 2 plus the chosen tokens' NLL
    assert evals[-1]["train_logps/chosen"] > evals[0]["train_logps/chosen"]
    last_a, last_b = last_state(a), last_state(b)
    assert last_a["config"]["sft_weight"] == last_b["config"]["sft_weight"] == 1.0
    for k in last_a["model"]:
        torch.testing.assert_close(last_a["model"][k], last_b["model"][k], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="--sft_weight must be >= 0"):
        run(pairs, str(tmp_path / "c"), sft_weight=-1)


def test_the_memory_estimate_counts_dpos_reference():
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32)
    sft = {"batch_size": 2, "block_size": 64}
    dpo = {**sft, "preference_loss": "dpo"}
    logits = 2 * 2 * 64 * 512 * (4 + 4)  # 2 x batch_size rows of fp32 logits and their fp32 log-softmax
    assert memory.estimate_memory(config, sft, "float32")["reference"] == 0
    assert memory.estimate_memory(config, dpo, "float32")["reference"] == 4 * memory.count_params(config) + logits
    for free in ({"precompute_ref": True}, {"lora_rank": 4, "lora_targets": "attn.c_attn"},
                 {"preference_loss": "simpo"}):
        assert memory.estimate_memory(config, {**dpo, **free}, "float32")["reference"] == 0, free
    # a pair is two rows: the activations of batch_size pairs are those of 2 x batch_size sequences
    assert memory.estimate_memory(config, {**dpo, "precompute_ref": True}, "float32")["activations"] == \
        memory.estimate_memory(config, {**sft, "batch_size": 4}, "float32")["activations"]
