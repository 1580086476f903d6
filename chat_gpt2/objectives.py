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
                           (a language model's: --eval_choices's accuracy, a sample reply)
    test(path)             after training: the best checkpoint on held-out data, if the task has any

Another objective (preference pairs, say) is one more such class and one more line in
objective_for, where a config key may also pick among the objectives of one kind."""
import math
from contextlib import contextmanager
from dataclasses import asdict

import torch

from . import chat
from .checkpoint import build_base, find_checkpoint, load_checkpoint, model_from_checkpoint
from .classifier import (attach_head, eval_sums, metrics, predict_batches, report_lines,
                         split_batches)
from .device import autocast
from .engine import Engine, Request
from .errors import ConfigError
from .evaluation import choice_accuracy, choice_scores, read_choices, text_bytes
from .lora import lora_settings
from .preference import adapters_off, pair_logps, preference_loss, sequence_logps
from .sampling import SamplingParams
from .training import add_special_tokens, eval_totals, learned, loss_sums, masked_loss, step_flops


def objective_for(meta, data, cfg, run):
    """The objective of a prepared dataset ({split: data} and its meta.json) for this run."""
    kind = meta.get("kind") or "chat"  # datasets prepared before plain text existed are chat
    if cfg.get("eval_choices") and (kind in ("preference", "classify") or cfg.get("preference_loss")):
        raise ConfigError(f"--eval_choices scores a language model's endings, but {cfg['dataset']} "
                          f"trains a {'preference' if kind != 'classify' else 'classification'} "
                          "run: drop eval_choices (or score a checkpoint with eval.py --choices)")
    if kind == "preference" or cfg.get("preference_loss"):
        check_preference_run(kind, cfg)
        return Preference(data, meta, cfg, run)
    if kind == "classify":
        return Classification(data, meta, cfg, run)
    return LanguageModelling(data, meta, cfg, run)  # chat and text


def eval_choices(cfg, run):
    """The items of --eval_choices (read once, before training: a bad file is an error naming
    file:line), or None without one."""
    if not cfg.get("eval_choices"):
        return None
    if cfg.get("eval_choices_every", 1) < 1:
        raise ConfigError(f"--eval_choices_every must be >= 1, got {cfg['eval_choices_every']}")
    if run.get("fsdp"):
        raise ConfigError("--parallel=fsdp: no eval_choices at evals (the master alone cannot run "
                          "the sharded model): score a checkpoint with eval.py --choices")
    return read_choices(cfg["eval_choices"])


def greedy_reply(model, prompt, max_tokens, stop, run, enc=None):
    """The model's greedy reply (text) to prompt (token ids), ending at stop: an eval's sample."""
    request = Request(prompt, SamplingParams(temperature=0.0, max_new_tokens=max_tokens,
                                             stop=(stop,)))
    Engine(model, enc, device=run["device"], dtype=run["dtype"]).complete([request])
    return request.replies[0].text.strip()


class LanguageModelling:
    """Next-token prediction on the learned tokens: a chat dataset's replies, all of plain text."""

    def __init__(self, data, meta, cfg, run):
        self.data, self.meta, self.cfg, self.run = data, meta, cfg, run
        self.epoch_tokens = max(1, int(meta["tokens"]["train"]))
        self.choices, self.evals = eval_choices(cfg, run), 0
        self.enc = chat.run_encoder(meta)  # the dataset's tokenizer and special tokens

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
        """The token-weighted mean loss of each split, and in bits per byte (split_bpb: the loss's
        bits over the UTF-8 bytes of the learned tokens' text, comparable across tokenizers)."""
        sizes = torch.as_tensor(text_bytes(self.enc), device=self.run["device"])

        def sums(model, batch):  # loss x learned tokens, learned tokens, their bytes
            _, y, m = batch
            return torch.cat([loss_sums(model, batch), (sizes[y.clamp(min=0)] * m).sum()[None]])

        totals = eval_totals(model, self.data, self.cfg, self.run, sums)
        losses = {split: (t[0] / t[1].clamp(min=1)).item() for split, t in totals.items()}
        for split, t in totals.items():
            losses[f"{split}_bpb"] = (t[0] / math.log(2) / t[2].clamp(min=1)).item()
        return losses

    def report(self, model, losses):
        """The master's: the multiple-choice accuracy on --eval_choices (score_choices), and its
        greedy reply to the val split's first prompt (sample_max_tokens long)."""
        self.evals += 1
        if not self.run["master"]:
            return {}, ""
        fields, text = self.score_choices(model)
        if "val_bpb" in losses:  # evaluate's; a scripted evaluation (tests) may leave it out
            fields = {"train_bpb": losses["train_bpb"], "val_bpb": losses["val_bpb"], **fields}
            text = f", val {losses['val_bpb']:.4f} bits/byte" + text
        if self.cfg["sample_max_tokens"] > 0:
            prompt = self.data["val"].first_prompt()
            reply = greedy_reply(model, prompt, self.cfg["sample_max_tokens"],
                                 self.meta["default_stop"], self.run, self.enc)
            text += f"\n  sample: {self.enc.decode(prompt)!r} -> {reply!r}"
        return fields, text

    def score_choices(self, model):
        """At the first eval and every eval_choices_every after it (counted in this process): eval.py
        --choices's acc, acc_norm and acc_norm_tokens as choices_*, the model in eval mode."""
        if self.choices is None or (self.evals - 1) % self.cfg.get("eval_choices_every", 1):
            return {}, ""
        training = model.training
        model.eval()  # no dropout
        try:
            scores = choice_scores(model, self.enc, self.choices, self.run["device"])
        finally:
            model.train(training)
        fields = {f"choices_{k}": v for k, v in choice_accuracy(self.choices, scores).items()}
        return fields, (f", choices acc {fields['choices_acc']:.4f} acc_norm "
                        f"{fields['choices_acc_norm']:.4f}")

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


def check_preference_run(kind, cfg):
    """Preference pairs train with --preference_loss (config/dpo.py), and only they do."""
    if kind != "preference":
        raise ConfigError(f"--preference_loss={cfg['preference_loss']} needs preference pairs, but "
                          f"{cfg['dataset']} is a {kind} dataset: prepare pairs with `python "
                          "prepare.py --task=preference FILE ...`, or drop preference_loss for SFT")
    if cfg.get("preference_loss") not in ("dpo", "simpo"):
        raise ConfigError(f"{cfg['dataset']} holds preference pairs: train on it with `python "
                          "train.py config/dpo.py` (--preference_loss=dpo or simpo); for SFT prepare "
                          "the same file with --task=chat")
    if cfg["precompute_ref"] and cfg["preference_loss"] != "dpo":
        raise ConfigError("--precompute_ref is for DPO's reference: simpo has none")
    if cfg.get("sft_weight", 0.0) < 0:
        raise ConfigError(f"--sft_weight must be >= 0 (0 = plain DPO / SimPO), got "
                          f"{cfg['sft_weight']}")


class Preference:
    """DPO or SimPO (--preference_loss) on preference pairs (preference.py): a batch is B pairs,
    their chosen and rejected sequences in one forward; an epoch is every pair once. DPO's
    reference is the starting weights, frozen: rebuilt as the run's base (build_base), or with
    LoRA the same model with its adapters off (no second copy); with --precompute_ref its
    log-probabilities are computed once, before training, and the reference dropped. sft_weight > 0
    adds the mean NLL of the chosen tokens (preference.chosen_nll) to the loss."""

    NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")  # TRL's names for what evaluate reports

    def __init__(self, data, meta, cfg, run):
        self.data, self.meta, self.cfg, self.run = data, meta, cfg, run
        self.epoch_tokens = len(data["train"]) * cfg["block_size"]
        self.loss_kind, self.reference, self.ref_logps = cfg["preference_loss"], None, None

    def prepare(self, model):
        self.policy = model
        rows_train = getattr(model, "trained_rows", None)
        if self.loss_kind == "dpo" and rows_train and not self.cfg["precompute_ref"]:
            # the reference is the policy without adapters, whose new rows train all the same
            raise ConfigError("DPO under LoRA / --trainable_layers with new special tokens needs "
                              "--precompute_ref=true (the reference's log-probabilities from the "
                              "start)")
        if self.loss_kind == "dpo" and not getattr(model, "lora", None):
            self.reference = self.starting_model(model).to(self.run["device"]).eval()
            self.reference.requires_grad_(False)
        if self.loss_kind == "dpo" and self.cfg["precompute_ref"]:
            self.ref_logps = self.precompute()
            self.reference = None  # nothing of it is needed any more
        return model

    def starting_model(self, model):
        """The weights the run started from (a resumed run's, from its saved config)."""
        cfg = self.cfg
        if cfg["init_from"] == "resume":
            cfg = load_checkpoint(find_checkpoint(cfg["out_dir"], last=True))["config"]
        base = build_base({"init_from": cfg["init_from"], "seed": cfg["seed"],
                           "model_args": asdict(model.config)})
        add_special_tokens(base, self.meta, cfg["init_from"] == "scratch")  # as the policy started
        return base

    @contextmanager
    def as_reference(self):
        """with self.as_reference() as model: the reference, in eval mode, without gradients."""
        model = self.policy if self.reference is None else self.reference
        training = self.policy.training
        self.policy.eval()  # no dropout in the reference
        try:
            with torch.no_grad(), adapters_off(model):
                yield model
        finally:
            self.policy.train(training)

    def reference_logps(self, x, y, m, index):
        """(rows,) the reference's log-probability of each row's response."""
        if self.ref_logps is not None:  # (pairs, 2): chosen, rejected
            return self.ref_logps[index].T.flatten()
        with self.as_reference() as model:
            return sequence_logps(model, x, y, m)[0]

    def precompute(self):
        """The reference's (chosen, rejected) log-probabilities of every pair, train then val."""
        run = self.run
        with self.as_reference() as model, autocast(run["device"], run["dtype"]):
            found = [pair_logps(model, [split.pair(i) for i in range(len(split))],
                                self.cfg["block_size"], self.cfg["batch_size"], run["device"])
                     for split in (self.data["train"], self.data["val"])]
        return torch.cat(found).to(run["device"])

    def terms(self, model, batch):
        """Per pair: (loss, chosen reward, rejected reward, chosen logp, rejected logp)."""
        x, y, m, index = batch
        logps, lengths = sequence_logps(model, x, y, m)
        reference = (self.reference_logps(x, y, m, index) if self.loss_kind == "dpo"
                     else torch.zeros_like(logps))
        loss, chosen, rejected = preference_loss(self.loss_kind, logps.chunk(2), reference.chunk(2),
                                                 lengths.chunk(2), self.cfg["beta"],
                                                 self.cfg["simpo_gamma"],
                                                 self.cfg.get("sft_weight", 0.0))
        return (loss, chosen, rejected, *logps.detach().chunk(2))

    def batch(self, generator):
        return self.data["train"].get_batch(self.cfg["batch_size"], self.cfg["block_size"],
                                            generator)

    def weight(self, batch):
        return float(len(batch[3]))  # pairs: the step's loss is the mean over its pairs

    def loss(self, model, batch):
        return self.terms(model, batch)[0].mean()

    def work(self, model, batches):
        """The policy's step (the LM head on every position: the log-probabilities need them all),
        plus the reference's forward when it runs every step."""
        tokens, flops = step_flops(model, [b[:3] for b in batches], head_on_all=True)
        if self.loss_kind == "dpo" and self.ref_logps is None:
            context = sum(b[0].numel() * b[0].size(1) for b in batches) / max(1, tokens)
            c = model.config
            flops += tokens * (2 * sum(model.matmul_weights()) + 4 * c.n_embd * context * c.n_layer)
        return tokens, flops

    def sums(self, model, batch):
        """[loss, chosen reward, rejected reward, accuracy, margin, chosen and rejected logp,
        pairs] summed over a batch's pairs, for eval_totals."""
        loss, chosen, rejected, logp_c, logp_r = (t.float() for t in self.terms(model, batch))
        return torch.stack([loss.sum(), chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                            (chosen - rejected).sum(), logp_c.sum(), logp_r.sum(),
                            torch.tensor(float(len(loss)), device=loss.device)])

    def evaluate(self, model):
        """The mean loss of each split, and TRL's rewards and log-probabilities (split_name)."""
        losses = {}
        for split, t in eval_totals(model, self.data, self.cfg, self.run, self.sums).items():
            means = (t[:-1] / t[-1]).tolist()
            losses[split] = means[0]
            losses.update({f"{split}_{name}": v for name, v in zip(self.NAMES, means[1:])})
        return losses

    def report(self, model, losses):
        """TRL's rewards and log-probabilities, train and val, and a sample reply."""
        fields = {k: v for k, v in losses.items() if "/" in k}
        text = "".join(f", {s} reward accuracy {losses[f'{s}_rewards/accuracies']:.1%} margin "
                       f"{losses[f'{s}_rewards/margins']:.3f}" for s in ("train", "val"))
        if self.run["master"] and self.cfg["sample_max_tokens"] > 0:
            prompt, enc = self.data["val"].pair(0)[0].tolist(), chat.run_encoder(self.meta)
            reply = greedy_reply(model, prompt, self.cfg["sample_max_tokens"],
                                 self.meta["default_stop"], self.run, enc)
            text += f"\n  sample: {enc.decode(prompt)!r} -> {reply!r}"
        return fields, text

    def test(self, path):
        """Nothing here: eval.py scores replies."""
