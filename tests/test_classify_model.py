"""The classifier: the head reads each example's last real token (right padding never read), the metrics' arithmetic,
and train.py on a classification dataset (a tiny model learns a separable task to 100%, the test report, accuracy
logs and plot, checkpoints that keep the label names, --trainable_layers, resume, the logged MFU, DDP)."""
import contextlib
import io
import os

import pytest
import torch
import torch.nn.functional as F

import helpers
import prepare
from chat_gpt2.checkpoint import load_checkpoint, model_from_checkpoint
from chat_gpt2.classifier import GPTClassifier, attach_head, metrics, report_lines
from chat_gpt2.classify_data import as_targets
from chat_gpt2.errors import ConfigError
from chat_gpt2.lora import freeze_layers

LABELS = ["neg", "pos"]


def test_head_reads_the_last_real_token_and_never_the_padding():
    torch.manual_seed(0)
    model = attach_head(helpers.tiny_model(residual_scale=1), ["a", "b", "c"]).eval()
    a, b = torch.randint(0, 50000, (7,)), torch.randint(0, 50000, (3,))
    alone = torch.cat([model.classify(a[None], torch.tensor([7])), model.classify(b[None], torch.tensor([3]))])
    for pad in (0, 123, 49999):  # whatever the padding holds
        x = torch.full((2, 7), pad)
        x[0], x[1, :3] = a, b
        x[1, 3:] = torch.randint(0, 50000, (4,))
        batched = model.classify(x, torch.tensor([7, 3]))
        assert torch.allclose(batched, alone, atol=1e-5)
        # reading the last position of the padded row would give something else
        assert not torch.allclose(model.classify(x, torch.tensor([7, 7]))[1], alone[1], atol=1e-3)
    labels = torch.tensor([2, 0])
    logits, loss = model(*as_targets(x, torch.tensor([7, 3]), labels))
    assert torch.allclose(loss, F.cross_entropy(alone, labels), atol=1e-5)
    with pytest.raises(TypeError):
        model(x)


def test_metrics_arithmetic_by_hand():
    true = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    m = metrics(true, pred, 3)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert (m["correct"], m["total"]) == (4, 6) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx([1.0, 0.5, 0.5])
    assert m["recall"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert m["f1"] == pytest.approx([0.8, 0.5, 2 / 3])
    empty = metrics([0, 0], [0, 0], 2)  # class 1: no examples, no predictions: 0, not NaN
    assert empty["precision"][1] == empty["recall"][1] == empty["f1"][1] == 0.0
    lines = report_lines(metrics([0] * 288 + [1] * 11, [0] * 299, 2), ["ham", "spam"], "test accuracy")
    assert lines[0] == "test accuracy: 96.3% (288/299)"
    assert lines[-2].split() == ["ham", "288", "0"] and lines[-1].split() == ["spam", "11", "0"]


def test_the_head_always_trains():
    model = freeze_layers(attach_head(helpers.tiny_model(residual_scale=1), LABELS), 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and "transformer.h.0.attn.c_attn.weight" not in trainable
    frozen_first = attach_head(freeze_layers(helpers.tiny_model(residual_scale=1), 0), LABELS)
    assert {n for n, p in frozen_first.named_parameters() if p.requires_grad} == {
        "transformer.ln_f.weight", "transformer.ln_f.bias", "score.weight"}
    with pytest.raises(ConfigError, match="LoRA"):
        attach_head(helpers.tiny_model(), LABELS, lora={"rank": 4})


def separable_csv(tmp_path, n=80):
    """A task a tiny model gets right every time: the text's words say its class."""
    rows = ["text,label"] + [f"{'apple banana cherry' if i % 2 else 'zebra yak walrus'} {i % 7},"
                             f"{LABELS[i % 2]}" for i in range(n)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def classify_data(tmp_path_factory):
    """A prepared classification dataset of separable_csv (folder path): read it, never write to it."""
    tmp = tmp_path_factory.mktemp("clsdata")
    with contextlib.redirect_stdout(io.StringIO()):
        assert prepare.main([separable_csv(tmp), "--task=classify", f"--out_dir={tmp / 'data'}"]) == 0
    return str(tmp / "data")


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, classify_data):
    data, out = classify_data, str(tmp_path_factory.mktemp("cls") / "out")
    stdout = helpers.train_inprocess(helpers.tiny_train_args(data, out, max_iters=40, eval_interval=20,
                                                             batch_size=8, learning_rate=3e-3, warmup_iters=5))
    return data, out, stdout


def test_train_learns_a_separable_task_and_reports_the_test_split(classify_run):
    data, out, stdout = classify_run
    lines = stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "test" in line and "acc" in line)
    assert lines[first] == "test accuracy: 100.0% (16/16)"
    assert lines[first + 1].split() == ["class", "precision", "recall", "F1", "support"]
    assert lines[first + 2].split() == ["neg", "1.000", "1.000", "1.000", "8"]
    assert lines[first + 6].split() == ["neg", "8", "0"] and lines[first + 7].split() == ["pos", "0", "8"]
    evals = [r for r in helpers.read_metrics(out) if r["event"] == "eval"]
    assert all(0 <= r["train_accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1 for r in evals)
    assert evals[-1]["val_accuracy"] == 1.0 and "val accuracy 100.0%" in stdout
    assert os.path.exists(os.path.join(out, "accuracy.png")) and os.path.exists(os.path.join(out, "loss.png"))


def test_the_classification_objective(classify_data):
    """Chosen by the dataset's kind; its model is a GPTClassifier; its evaluation is the mean loss and the accuracy
    over the examples of fixed batches; its report is the accuracy of each split."""
    from chat_gpt2.classify_data import load_prepared
    from chat_gpt2.objectives import Classification, objective_for
    data, meta = load_prepared(classify_data)
    cfg = {"seed": 3, "eval_iters": 2, "batch_size": 4, "block_size": 64, "lora_rank": 0, "trainable_layers": -1}
    run = {"device": "cpu", "dtype": "float32", "ddp": False, "rank": 0, "master": True}
    task = objective_for(meta, data, cfg, run)
    assert type(task) is Classification and task.epoch_tokens == len(data["train"]) * 64
    model = task.prepare(helpers.tiny_model(residual_scale=1))
    assert isinstance(model, GPTClassifier) and model.labels == LABELS
    losses = task.evaluate(model)
    for i, split in enumerate(("train", "val")):
        generator = torch.Generator().manual_seed(3 + i)
        batches = [data[split].get_batch(4, 64, generator) for _ in range(2)]
        with torch.no_grad():
            logits = torch.cat([model(*b)[0] for b in batches])
        labels = torch.cat([y[m > 0] for _, y, m in batches])
        assert losses[split] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        assert losses[f"{split}_acc"] == (logits.argmax(1) == labels).float().mean().item()
    fields, text = task.report(model, losses)
    assert fields == {"train_accuracy": losses["train_acc"], "val_accuracy": losses["val_acc"]}
    assert text == f", train accuracy {losses['train_acc']:.1%}, val accuracy {losses['val_acc']:.1%}"


def test_checkpoint_round_trip_keeps_label_names(classify_run):
    data, out, _ = classify_run
    best = os.path.join(out, helpers.checkpoints(out)[0])
    ckpt = load_checkpoint(best)
    assert ckpt["classify"]["labels"] == LABELS
    assert ckpt["classify"]["columns"]["text"] == ["text"] and ckpt["classify"]["columns"]["label"] == "label"
    model = model_from_checkpoint(ckpt).eval()
    assert isinstance(model, GPTClassifier) and model.labels == LABELS
    ids = torch.tensor([[50256, 50256]])
    assert model.classify(ids, torch.tensor([1])).shape == (1, 2)


def test_resume_and_init_from_a_classifier(classify_run, tmp_path):
    data, out, _ = classify_run
    resumed = helpers.train_inprocess(["--init_from=resume", f"--out_dir={out}", "--max_iters=44"])
    assert "test accuracy: " in resumed and "after 44 iters" in resumed
    # a new run from the classifier with only the last block (and the head) training
    stdout = helpers.train_inprocess(helpers.tiny_train_args(data, str(tmp_path / "o2"), max_iters=2, eval_interval=2,
                                                             init_from=out, trainable_layers=1))
    assert "(the last 1 blocks + ln_f)" in stdout and "test accuracy: " in stdout
    with pytest.raises(ConfigError, match="LoRA"):
        helpers.train_inprocess(helpers.tiny_train_args(data, str(tmp_path / "o3"), lora_rank=2))


def test_logged_mfu_counts_what_a_classifier_runs(classify_data, tmp_path, monkeypatch):
    """The step's FLOPs, recomputed from the replayed batches: 6 per weight and token for the transformer's
    matmuls, 12LHQT attention with T the batch's length (the longest example, not block_size), the head on one
    token per example; the token embedding is a lookup, and the LM head (6 * vocab * n_embd per token) never runs."""
    import train
    from chat_gpt2.classify_data import ClassifyData
    monkeypatch.setattr(train, "peak_flops", lambda *args: (1e9, "fixed"))
    out = str(tmp_path / "out")
    helpers.train_inprocess(helpers.tiny_train_args(classify_data, out, max_iters=3, eval_interval=3, eval_iters=1,
                                                    block_size=64))
    steps = [r for r in helpers.read_metrics(out) if r["event"] == "step"]
    state = helpers.load_ckpt(os.path.join(out, helpers.checkpoints(out)[0]))["model"]
    body = sum(t.numel() for k, t in state.items() if k not in ("transformer.wte.weight", "lm_head.weight",
                                                                 "transformer.wpe.weight", "score.weight"))
    L, C, batch_size = 2, 32, 4  # tiny_train_args
    generator = torch.Generator().manual_seed(train.DEFAULTS["seed"])
    data = ClassifyData(classify_data, "train")
    assert [r["iter"] for r in steps] == [1, 2, 3]
    for r in steps:
        x, _, _ = data.get_batch(batch_size, 64, generator)
        B, T = x.shape
        assert T < 64  # the texts are short: no padding to block_size is computed
        flops = 6 * body * B * T + 6 * C * len(LABELS) * B + 12 * L * C * T * B * T
        seconds = r["ms_per_iter"] / 1000
        assert r["mfu"] == pytest.approx(flops / seconds / 1e9, rel=1e-6)
        assert r["tokens_per_s"] == pytest.approx(B * T / seconds, rel=1e-6)
        nanogpt = helpers.tiny_model(block_size=64).flops_per_token() * B * 64  # the LM head on every position
        assert flops < nanogpt / 100


@pytest.mark.slow
def test_train_a_classifier_with_ddp(classify_data, tmp_path):
    """torchrun, 2 CPU processes (gloo): training and the evaluations (all-reduced) run on both ranks, rank 0
    logs, saves and reports the test split once."""
    out = str(tmp_path / "out")
    p = helpers.train_ddp(tmp_path, classify_data, out, max_iters=4, eval_interval=2, learning_rate=3e-3)
    assert "2 process(es)" in p.stdout and p.stdout.count("test accuracy: ") == 1
    evals = [r for r in helpers.read_metrics(out) if r["event"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 2, 4]
    assert all(0 <= r[f"{s}_accuracy"] <= 1 for r in evals for s in ("train", "val"))
    best = load_checkpoint(os.path.join(out, helpers.checkpoints(out)[0]))
    assert best["classify"]["labels"] == LABELS and "score.weight" in best["model"]
