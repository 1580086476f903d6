"""What a training run optimises, chosen once from the dataset's kind (meta.json) by objective_for:
the only place where train.py learns what kind of task it trains. Each objective is a plain class
with the same methods, the only ones train.py calls:

    epoch_tokens           the tokens of one pass over the train split (--epochs, the log's epoch)
    prepare(model)         the model to train, made from the built GPT (a classifier gets its head)
    batch(generator)       one random micro-batch of the train split (CPU tensors)
    weight(batch)          its weight in the step's mean loss, counted on the host (no device sync)
    loss(model, batch)     its mean loss (the batch on the device, under autocast)
    work(model, batches)   (tokens, FLOPs) of a step over these batches: the log's tokens/s and MFU
    evaluate(model)        {"train": loss, "val": loss, ...} on fixed batches, every DDP rank too
    report(model, losses)  (record fields, console text) added to an evaluation's log line
    test(path)             after training: the best checkpoint on held-out data, if the task has any

Another objective (preference pairs, say) is one more such class and one more line in
objective_for, where a config key may also pick among the objectives of one kind."""
from . import chat
from .checkpoint import load_checkpoint, model_from_checkpoint
from .classifier import (attach_head, eval_sums, metrics, predict_batches, report_lines,
                         split_batches)
from .engine import Engine, Request
from .lora import lora_settings
from .sampling import SamplingParams
from .training import eval_totals, learned, loss_sums, masked_loss, step_flops


def objective_for(meta, data, cfg, run):
    """The objective of a prepared dataset ({split: data} and its meta.json) for this run."""
    kind = meta.get("kind") or "chat"  # datasets prepared before plain text existed are chat
    if kind == "classify":
        return Classification(data, meta, cfg, run)
    return LanguageModelling(data, meta, cfg, run)  # chat and text


def greedy_reply(model, prompt, max_tokens, stop, run):
    """The model's greedy reply (text) to prompt (token ids), ending at stop: an eval's sample."""
    request = Request(prompt, SamplingParams(temperature=0.0, max_new_tokens=max_tokens,
                                             stop=(stop,)))
    Engine(model, device=run["device"], dtype=run["dtype"]).complete([request])
    return request.replies[0].text.strip()


class LanguageModelling:
    """Next-token prediction on the learned tokens: a chat dataset's replies, all of plain text."""

    def __init__(self, data, meta, cfg, run):
        self.data, self.meta, self.cfg, self.run = data, meta, cfg, run
        self.epoch_tokens = max(1, int(meta["tokens"]["train"]))

    def prepare(self, model):
        return model

    def batch(self, generator):
        return self.data["train"].get_batch(self.cfg["batch_size"], self.cfg["block_size"],
                                            generator)

    def weight(self, batch):
        return learned(batch)  # the token-weighted mean over the step's micro-batches

    def loss(self, model, batch):
        return masked_loss(model, batch)

    def work(self, model, batches):
        """Off CUDA the LM head runs on the learned tokens only (GPT._masked_loss): nanoGPT's
        count, the head on every token, would overstate the work on chat data (past 100% MFU)."""
        return step_flops(model, batches, head_on_all=self.run["device"].startswith("cuda"))

    def evaluate(self, model):
        """The token-weighted mean loss of each split."""
        totals = eval_totals(model, self.data, self.cfg, self.run, loss_sums)
        return {split: (t[0] / t[1].clamp(min=1)).item() for split, t in totals.items()}

    def report(self, model, losses):
        """The master's greedy reply to the val split's first prompt (sample_max_tokens long)."""
        if not self.run["master"] or self.cfg["sample_max_tokens"] <= 0:
            return {}, ""
        prompt = self.data["val"].first_prompt()
        reply = greedy_reply(model, prompt, self.cfg["sample_max_tokens"],
                             self.meta["default_stop"], self.run)
        return {}, f"\n  sample: {chat.get_encoder().decode(prompt)!r} -> {reply!r}"

    def test(self, path):
        """Nothing here: eval.py scores a chat model's replies to held-out conversations."""


class Classification:
    """One label per text, read at its last real token (classifier.py), the head trained with the
    body; an epoch is every example once (one example per window, docs/classification.md)."""

    def __init__(self, data, meta, cfg, run):
        self.data, self.meta, self.cfg, self.run = data, meta, cfg, run
        self.epoch_tokens = len(data["train"]) * cfg["block_size"]

    def prepare(self, model):
        return attach_head(model, self.meta["labels"], lora_settings(self.cfg))

    def batch(self, generator):
        return self.data["train"].get_batch(self.cfg["batch_size"], self.cfg["block_size"],
                                            generator)

    def weight(self, batch):
        return learned(batch)  # one learned position per example: the mean over the examples

    def loss(self, model, batch):
        return masked_loss(model, batch)

    def work(self, model, batches):
        """The head runs on one token per example, and the LM head never."""
        return step_flops(model, batches, head_on_all=False)

    def evaluate(self, model):
        """The mean loss of each split and its accuracy (split_acc)."""
        losses = {}
        for split, t in eval_totals(model, self.data, self.cfg, self.run, eval_sums).items():
            losses[split], losses[f"{split}_acc"] = (t[0] / t[2]).item(), (t[1] / t[2]).item()
        return losses

    def report(self, model, losses):
        """The train and val accuracy."""
        fields = {f"{split}_accuracy": losses[f"{split}_acc"] for split in ("train", "val")}
        return fields, "".join(f", {k.replace('_', ' ')} {v:.1%}" for k, v in fields.items())

    def test(self, path):
        """The checkpoint at path on the test split: accuracy, precision / recall / F1, errors."""
        if not len(self.data["test"]):
            print("no test split (prepared with --test_fraction=0)")
            return
        model = model_from_checkpoint(load_checkpoint(path), self.run["device"])
        batches, true = split_batches(self.data["test"], self.cfg["block_size"])
        pred = predict_batches(model, batches, self.run["device"]).argmax(1)
        scores = metrics(true, pred, len(model.labels))
        print("\n".join(report_lines(scores, model.labels, "test accuracy")))
