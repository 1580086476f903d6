"""chat_gpt2/run_log.py: a run's metrics.jsonl and loss plot (conftest's finished_run), and the log of a resumed run."""
import os

import numpy as np

from chat_gpt2.run_log import Logger, plot_losses
from helpers import read_metrics


def test_metrics_and_loss_plot(finished_run):
    out, _ = finished_run
    metrics = read_metrics(out)
    for r in metrics:
        if r["event"] == "step":
            assert np.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0
        else:
            assert np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) and r["best_val_loss"] <= r["val_loss"]
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_logger_appends_on_resume_and_only_the_master_writes(tmp_path, capsys):
    cfg = {"out_dir": str(tmp_path), "wandb_log": False}
    master, other = {"master": True}, {"master": False}
    Logger(cfg, master).log({"event": "step", "iter": 1, "loss": 2.0}, "iter 1")
    Logger(cfg, other).log({"event": "step", "iter": 1, "loss": 9.0}, "rank 1")
    Logger(cfg, master, resume_iter=1).log({"event": "eval", "iter": 2, "train_loss": 1.5, "val_loss": 1.7})
    assert [r["iter"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert capsys.readouterr().out == "iter 1\n"
    Logger(cfg, master).log({"event": "step", "iter": 1, "loss": 3.0})  # a new run: a new log, the old one kept
    assert read_metrics(str(tmp_path)) == [{"event": "step", "iter": 1, "loss": 3.0}]
    kept = [n for n in os.listdir(tmp_path) if n.startswith("metrics.") and n != "metrics.jsonl"]
    assert len(kept) == 1 and [r["iter"] for r in read_metrics(str(tmp_path), kept[0])] == [1, 2]
    assert "kept the previous run's log as" in capsys.readouterr().out
    assert plot_losses(str(tmp_path)) == os.path.join(str(tmp_path), "loss.png")


def test_resumed_log_is_cut_back_to_the_resumed_iteration(tmp_path):
    cfg = {"out_dir": str(tmp_path), "wandb_log": False}
    log = Logger(cfg, {"master": True})
    for i in range(1, 7):  # a run killed after logging iteration 6, its last checkpoint at 4
        log.log({"event": "step", "iter": i, "loss": 1.0})
    log.log({"event": "eval", "iter": 4, "train_loss": 1.0, "val_loss": 1.0})
    Logger(cfg, {"master": True}, resume_iter=4)
    assert [r["iter"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 4]
