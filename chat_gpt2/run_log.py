"""What a training run reports: console lines, out_dir/metrics.jsonl, optionally wandb, and the
loss (and accuracy) curves."""
import json
import os
import time

from .files import atomic_write
from .training import describe_training


class Logger:
    """Console lines, out_dir/metrics.jsonl and (optionally) wandb; only the master process logs.

    A new run starts a new metrics.jsonl (an older one is kept as metrics.<its time>.jsonl); a
    resumed run first cuts the log back to the iteration it resumes from, so the records of steps
    that are redone appear once."""

    def __init__(self, cfg, run, resume_iter=None):
        self.cfg, self.world, self.enabled = cfg, run.get("world", 1), run["master"]
        self.path, self.wandb = os.path.join(cfg["out_dir"], "metrics.jsonl"), None
        if self.enabled and os.path.exists(self.path):
            if resume_iter is None:
                stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(os.path.getmtime(self.path)))
                kept = os.path.join(cfg["out_dir"], f"metrics.{stamp}.jsonl")
                os.replace(self.path, kept)
                print(f"kept the previous run's log as {kept}")
            else:
                self._cut(resume_iter)
        if self.enabled and cfg["wandb_log"]:
            import wandb
            self.wandb = wandb.init(project=cfg["wandb_project"], config=cfg,
                                    name=cfg["wandb_run_name"] or None,
                                    mode=cfg["wandb_mode"] or None)

    def _cut(self, resume_iter):
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with atomic_write(self.path) as f:
            for record in records:
                if record["iter"] <= resume_iter:
                    f.write(json.dumps(record) + "\n")

    def log(self, record, line=None):
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            values = {k: v for k, v in record.items() if k not in ("event", "iter")}
            self.wandb.log(values, step=record["iter"])

    def step(self, iter_num, loss, lr, epoch, window, peak_flops):
        """The line and record of the train steps since the last one (window): ms/iter, tokens/s
        of all processes (what ran: no padding to block_size), MFU (this process's FLOPs over its
        peak; 0 without one) and the time left."""
        iters = iter_num - window.iter
        dt = (time.time() - window.t0) / iters
        mfu = window.flops / iters / dt / peak_flops if peak_flops and window.tokens else 0.0
        tokens_per_s = window.tokens * self.world / iters / dt
        eta = (self.cfg["max_iters"] - iter_num) * dt / 60
        line = (f"iter {iter_num} (epoch {epoch:.2f}): loss {loss:.4f}, lr {lr:.2e}, "
                f"{dt * 1000:.1f} ms/iter, {tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%}, "
                f"ETA {eta:.1f} min")
        self.log({"event": "step", "iter": iter_num, "epoch": epoch, "loss": loss, "lr": lr,
                  "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_s, "mfu": mfu}, line)

    def eval(self, iter_num, losses, stopper, is_best, fields, text):
        """The line and record of an evaluation: the losses, early stopping's progress (stopper),
        whether the best checkpoint was saved, and the objective's report (fields, text)."""
        line = (f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss "
                f"{losses['val']:.4f} (best {stopper.best:.4f}{', saved' if is_best else ''}; "
                f"{stopper.stale}/{stopper.patience} evals without improvement >= "
                f"{stopper.min_delta}){text}")
        self.log({"event": "eval", "iter": iter_num, "train_loss": losses["train"],
                  "val_loss": losses["val"], "best_val_loss": stopper.best, **fields}, line)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


class Window:
    """The train steps since the last log line, evaluations left out: where and when it began,
    and the tokens and FLOPs its steps ran (Logger.step turns them into tokens/s and MFU)."""

    def __init__(self, iter_num):
        self.iter, self.t0, self.tokens, self.flops = iter_num, time.time(), 0, 0.0

    def add(self, tokens, flops):
        self.tokens += tokens
        self.flops += flops


def _pyplot():
    """matplotlib's pyplot drawing to files, or None without matplotlib (plots are then skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _save(plt, fig, ax, ylabel, path):
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_losses(out_dir):
    """Loss curves from metrics.jsonl as loss.png (None when matplotlib is missing)."""
    plt = _pyplot()
    if plt is None:
        return None
    records = _read_metrics(out_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval"]
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], alpha=0.4,
            label="train (per log step)")
    for split in ("train", "val"):
        ax.plot([r["iter"] for r in evals], [r[f"{split}_loss"] for r in evals], marker="o",
                label=f"{split} (eval)")
    return _save(plt, fig, ax, "loss on the learned tokens", os.path.join(out_dir, "loss.png"))


def plot_accuracy(out_dir):
    """A classifier's train / val accuracy at each eval as accuracy.png (None without accuracies
    or matplotlib)."""
    evals = [r for r in _read_metrics(out_dir) if r["event"] == "eval" and "val_accuracy" in r]
    plt = _pyplot()
    if plt is None or not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for split in ("train", "val"):
        ax.plot([r["iter"] for r in evals], [r[f"{split}_accuracy"] for r in evals], marker="o",
                label=split)
    return _save(plt, fig, ax, "accuracy", os.path.join(out_dir, "accuracy.png"))


def start_lines(model, cfg, run, tokens_per_iter, stamp, peak_flops, peak_source):
    """What a run prints at its start: the model, what is trained, where, and the MFU's peak."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if getattr(model, "trained_rows", None):  # the embedding trains these rows (lora.train_rows)
        weight = model.transformer.wte.weight
        trainable -= weight.numel() - len(model.trained_rows) * weight.size(1)
    total = model.get_num_params(non_embedding=False)
    return (f"{model.get_num_params() / 1e6:.2f}M parameters; trainable {trainable:,} of {total:,} "
            f"({trainable / total:.2%}){describe_training(cfg)}, device {run['device']}, "
            f"dtype {run['dtype']}, {run['world']} process(es), {tokens_per_iter:,} "
            f"tokens/iter, run {stamp}\n"
            f"MFU is against the {peak_source} {run['dtype']} matmul peak of "
            f"{run['device']}: {peak_flops / 1e9:,.0f} GFLOP/s")
