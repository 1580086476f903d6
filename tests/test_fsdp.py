"""train.py --parallel=fsdp under torchrun with 2 CPU processes (gloo): the losses equal DDP's for the same seed, the
initial weights are a single process's (or a checkpoint's), the checkpoint is the full state dict one process loads,
resume is exact, a classifier with frozen layers trains, and what FSDP cannot shard (LoRA, preference pairs) is
refused in one line; and torchrun's 2 nodes on loopback equal 1 node of 2."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import helpers
from chat_gpt2.checkpoint import load_model
from chat_gpt2.errors import ConfigError
from chat_gpt2.parallel import check_parallel
from model import GPT, GPTConfig
from test_classify_model import LABELS, classify_data  # noqa: F401 (a fixture)

# dropout and gradient accumulation on, so the RNG streams and the deferred gradient reduction are both exercised
RUN = dict(max_iters=4, eval_interval=2, gradient_accumulation_steps=2, dropout=0.1, n_layer=2, lr_decay_iters=4)


def fsdp(tmp_path, dataset, out, **overrides):
    return helpers.train_ddp(tmp_path, dataset, out, **{**RUN, "parallel": "fsdp", **overrides})


def last_state(out):
    return helpers.load_ckpt(os.path.join(out, next(n for n in helpers.checkpoints(out) if n.endswith("_last.pt"))))


def step_losses(out):
    return [r["loss"] for r in helpers.read_metrics(out) if r["event"] == "step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dataset):
    """The same 4-iteration run with DDP and with FSDP: {parallel: (out_dir, stdout)}."""
    tmp = tmp_path_factory.mktemp("fsdp")
    done = {}
    for parallel in ("ddp", "fsdp"):
        out = str(tmp / parallel)
        done[parallel] = out, helpers.train_ddp(tmp, tiny_dataset, out, **RUN, parallel=parallel).stdout
    return done


def test_fsdp_losses_and_weights_equal_ddp(runs):
    (ddp, _), (fsdp_out, stdout) = runs["ddp"], runs["fsdp"]
    assert "2 process(es)" in stdout and "reached max_iters=4" in stdout
    assert step_losses(fsdp_out) == pytest.approx(step_losses(ddp), rel=1e-5)
    assert len(step_losses(ddp)) == 4
    evals = [[r["val_loss"] for r in helpers.read_metrics(out) if r["event"] == "eval"] for out in (ddp, fsdp_out)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5)
    ddp_state, fsdp_state = last_state(ddp), last_state(fsdp_out)
    assert fsdp_state["model"].keys() == ddp_state["model"].keys()  # the tied lm_head too, no wrapper prefixes
    for name, tensor in ddp_state["model"].items():
        assert torch.allclose(fsdp_state["model"][name], tensor, atol=1e-5), name
    assert fsdp_state["config"]["parallel"] == "fsdp" and fsdp_state["iter_num"] == 4


def test_an_fsdp_checkpoint_loads_in_one_process(runs):
    out, _ = runs["fsdp"]
    model, info = load_model(out_dir=out)
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives the round trip
    x = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(x)[0]).all()


def test_fsdp_starts_from_a_single_process_init_and_from_a_checkpoint(runs, tmp_path, tiny_dataset):
    """Rank 0 alone builds the model (rank 1 its shape on the meta device) and its weights are broadcast into the
    shards: a run stopped at iteration 0 saves exactly the weights one process draws for the seed, and a new run
    from a checkpoint exactly that checkpoint's."""
    fresh, started = str(tmp_path / "fresh"), str(tmp_path / "started")
    fsdp(tmp_path, tiny_dataset, fresh, max_iters=0)
    saved = last_state(fresh)
    torch.manual_seed(saved["config"]["seed"])
    single = GPT(GPTConfig.from_dict(saved["model_args"])).state_dict()
    assert saved["iter_num"] == 0 and saved["model"].keys() == single.keys()
    assert all(torch.equal(saved["model"][name], tensor) for name, tensor in single.items())
    source = os.path.join(runs["fsdp"][0], next(n for n in helpers.checkpoints(runs["fsdp"][0])
                                                if n.endswith("_last.pt")))
    fsdp(tmp_path, tiny_dataset, started, max_iters=0, init_from=source)
    loaded, trained = last_state(started)["model"], helpers.load_ckpt(source)["model"]
    assert all(torch.equal(loaded[name], tensor) for name, tensor in trained.items())


def test_fsdp_resume_is_exact(runs, tmp_path, tiny_dataset):
    straight, _ = runs["fsdp"]
    split = str(tmp_path / "split")
    fsdp(tmp_path, tiny_dataset, split, max_iters=2)
    assert last_state(split)["iter_num"] == 2
    helpers.run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", helpers.script("train.py"),
                 f"--out_dir={split}", "--init_from=resume", "--max_iters=4"], cwd=tmp_path, timeout=300)
    a, b = last_state(straight), last_state(split)
    assert a["iter_num"] == b["iter_num"] == 4 and a["val_loss"] == b["val_loss"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert step_losses(split) == step_losses(straight)  # the resumed half logs iters 3-4 only once


def test_fsdp_trains_a_classifier_with_frozen_layers(classify_data, tmp_path):  # noqa: F811
    out = str(tmp_path / "out")
    p = fsdp(tmp_path, classify_data, out, trainable_layers=1, learning_rate=3e-3)
    assert "trainable" in p.stdout and p.stdout.count("test accuracy: ") == 1
    best = helpers.load_ckpt(os.path.join(out, helpers.checkpoints(out)[0]))
    last = last_state(out)
    assert best["classify"]["labels"] == LABELS and "score.weight" in best["model"]
    assert last["optimizer"]["state"]  # AdamW's state, gathered by parameter name
    # the frozen first block never moves: every checkpoint holds the same weights
    frozen = [n for n in last["model"] if n.startswith("transformer.h.0.")]
    assert frozen and all(torch.equal(best["model"][n], last["model"][n]) for n in frozen)


def test_fsdp_refuses_lora_and_unknown_choices():
    cfg = dict(parallel="fsdp", lora_rank=4, lora_alpha=0.0, lora_dropout=0.0, lora_targets="attn.c_attn",
               trainable_layers=-1, sample_max_tokens=0)
    with pytest.raises(ConfigError, match="--parallel=fsdp does not train LoRA"):
        check_parallel(cfg, rank=0)
    assert check_parallel(cfg, rank=-1) is False  # one process: --parallel means nothing
    with pytest.raises(ConfigError, match="--parallel must be one of ddp, fsdp"):
        check_parallel({**cfg, "parallel": "zero3"}, rank=-1)
    sampled = {**cfg, "lora_rank": 0, "sample_max_tokens": 32}
    assert check_parallel(sampled, rank=1) is True and sampled["sample_max_tokens"] == 0
    with pytest.raises(ConfigError, match="does not train on preference pairs"):
        check_parallel({**cfg, "lora_rank": 0, "preference_loss": "dpo"}, rank=0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_equal_one_node(runs, tmp_path, tiny_dataset):
    """torchrun --nnodes=2, one process a node, as two launches meeting at a c10d rendezvous on 127.0.0.1: the
    same world of 2 ranks as `--standalone --nproc_per_node=2`, so the same losses for the same seed."""
    single, _ = runs["ddp"]
    out, port = str(tmp_path / "two_nodes"), free_port()
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=two-nodes-test"]
    args = helpers.tiny_train_args(tiny_dataset, out, batch_size=2, **RUN)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rdzv, f"--node_rank={rank}",
                               helpers.script("train.py"), *args], cwd=tmp_path, env=helpers.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(logs)
    assert "2 process(es)" in "".join(logs) and "reached max_iters=4" in "".join(logs)
    assert step_losses(out) == step_losses(single)
    ours, theirs = last_state(out)["model"], last_state(single)["model"]
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_a_signal_to_one_rank_stops_both_at_one_step_and_saves(tmp_path, tiny_dataset):
    """SIGTERM to rank 1 alone (a node's scheduler may reach one process first): the ranks agree on it, stop at the
    same step, gather and save the sharded state, and both exit 143."""
    out = str(tmp_path / "out")
    args = helpers.tiny_train_args(tiny_dataset, out, batch_size=2, max_iters=100000, eval_interval=100000,
                                   parallel="fsdp")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             helpers.script("train.py"), *args], cwd=tmp_path, env=helpers.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("iter "):
                workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
                rank1 = sorted(int(pid) for pid in workers.stdout.split())[1]  # started after rank 0
                os.kill(rank1, signal.SIGTERM)
                break
        stdout = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted by signal 15" in stdout, stdout
    ckpt = last_state(out)
    steps = [r["iter"] for r in helpers.read_metrics(out) if r["event"] == "step"]
    assert 1 <= ckpt["iter_num"] == steps[-1] < 100000 and ckpt["optimizer"]["state"]
