"""A GPT that classifies text: a linear head (n_embd -> classes) on the final-LayerNorm hidden state
of each text's last real token, its loss, predictions, and the metrics (accuracy, per-class
precision / recall / F1, confusion).

The last real token is the <|endoftext|> prepare.py appends to every text: with causal attention its
hidden state has seen the whole text and nothing after it, so right padding is never read. The head
is named `score` and has no bias, like transformers' GPT2ForSequenceClassification (an export maps
one to one).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from . import chat
from .errors import ConfigError
from model import GPT, Linear


class GPTClassifier(GPT):
    """GPT + `score`; `labels` are the class names in head order. Training calls forward(x, y, m)
    like the language model's (training.masked_loss): y holds the label at the one position per row
    where m is 1."""

    def classify(self, idx, lengths):
        """Class logits (B, n_classes), float32, read at position lengths - 1 of each row of idx."""
        h = self.hidden_states(idx)
        return self.score(h[torch.arange(len(idx), device=idx.device), lengths - 1]).float()

    def forward(self, idx, targets=None, loss_mask=None, kv_cache=None, all_logits=False):
        """(logits (B, n_classes), mean cross-entropy): each row's label is targets where loss_mask
        is 1 (one position per row, classify_data.as_targets); argmax finds it with no host sync."""
        if targets is None or loss_mask is None or kv_cache is not None:
            raise TypeError("a classifier has no language-model head: call classify(ids, lengths)")
        last = loss_mask.argmax(dim=1)
        rows = torch.arange(len(idx), device=idx.device)
        logits = self.classify(idx, last + 1)
        return logits, F.cross_entropy(logits, targets[rows, last])

    def matmul_weights(self):
        """(weights every token runs through, the head's): wte is a lookup here (the LM head never
        runs), and `score` runs on one token per example."""
        head = self.score.weight.numel()
        return self.get_num_params() - self.transformer.wte.weight.numel() - head, head

    def head_weight(self):
        return self.score.weight


def attach_head(model, labels, lora=None):
    """model (a GPT) made a GPTClassifier for labels, in place: the same parameters, trainable or
    frozen, on their device. A fresh head (normal, std 0.02), always trainable, unless it already
    has one for the same labels."""
    if lora:  # a LoRA checkpoint stores only the adapters: the head would be lost
        raise ConfigError("LoRA (lora_rank > 0) is not supported for classification: use "
                          "--trainable_layers=N")
    labels = [str(label) for label in labels]
    if isinstance(model, GPTClassifier) and getattr(model, "labels", None) == labels:
        return model
    weight = model.transformer.wte.weight
    model.__class__ = GPTClassifier  # a subclass that adds methods only: parameters stay put
    head = Linear(model.config.n_embd, len(labels), bias=False)
    model.score = head.to(device=weight.device, dtype=weight.dtype)
    torch.nn.init.normal_(model.score.weight, mean=0.0, std=0.02)
    model.labels = labels
    return model


# --------------------------------------------------------------------------------------------------
# Evaluation during training, predictions, metrics


def eval_sums(model, batch):
    """(loss x examples, correct predictions, examples) of one (x, y, m) batch, for
    training.eval_totals: the mean loss and the accuracy over an evaluation's batches in the end."""
    x, y, m = batch
    logits, loss = model(x, y, m)
    target = y.gather(1, m.argmax(dim=1, keepdim=True)).squeeze(1)
    examples = torch.tensor(float(len(x)), device=x.device)
    correct = (logits.argmax(1) == target).sum().float()
    return torch.stack([loss.float() * len(x), correct, examples])


@torch.no_grad()
def predict_batches(model, batches, device="cpu"):
    """Class probabilities (N, n_classes) of (ids, lengths) batches, in order."""
    model.eval()
    probs = [F.softmax(model.classify(x.to(device), lengths.to(device)), dim=-1).cpu()
             for x, lengths in batches]
    return torch.cat(probs).numpy() if probs else np.zeros((0, len(model.labels)))


def split_batches(data, block_size, batch_size=64):
    """(ids, lengths) batches over every example of a ClassifyData split, in order, and the true
    labels."""
    batches = [data.batch(range(a, min(a + batch_size, len(data))), block_size)
               for a in range(0, len(data), batch_size)]
    return [(x, lengths) for x, lengths, _ in batches], np.asarray(data.labels, dtype=np.int64)


def text_batches(texts, block_size, batch_size=64):
    """(ids, lengths) batches of raw texts, tokenised as prepare.py does (+ <|endoftext|>, the end
    kept)."""
    enc = chat.get_encoder()
    ids = [(t + [chat.EOT])[-block_size:] for t in enc.encode_ordinary_batch(list(texts))]
    return [pad_batch(ids[a:a + batch_size]) for a in range(0, len(ids), batch_size)]


def classify_texts(model, texts, device="cpu", batch_size=64):
    """Class probabilities (N, n_classes) of raw texts."""
    return predict_batches(model, text_batches(texts, model.config.block_size, batch_size), device)


def pad_batch(texts):
    """Token id sequences -> (ids (B, T) right-padded with <|endoftext|>, lengths (B,))."""
    lengths = torch.as_tensor([len(t) for t in texts], dtype=torch.long)
    x = torch.full((len(texts), int(lengths.max())), chat.EOT, dtype=torch.long)
    for row, t in enumerate(texts):
        x[row, :len(t)] = torch.as_tensor(np.asarray(t, dtype=np.int64))
    return x, lengths


def metrics(true, pred, n_classes):
    """Accuracy, the confusion matrix (rows: true class, columns: predicted) and per-class
    precision, recall, F1 (0 where undefined: no predictions / no examples of the class)."""
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n_classes), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(n_classes), where=both > 0)
    correct, total = int(tp.sum()), int(confusion.sum())
    return {"accuracy": correct / total if total else math.nan, "correct": correct, "total": total,
            "confusion": confusion.tolist(), "precision": precision.tolist(),
            "recall": recall.tolist(), "f1": f1.tolist(), "support": actual.tolist()}


def report_lines(m, labels, title="accuracy"):
    """`{title}: 96.3% (288/299)`, then precision / recall / F1 per class, then the confusion."""
    width = max(8, *(len(label) for label in labels))
    lines = [f"{title}: {100 * m['accuracy']:.1f}% ({m['correct']}/{m['total']})",
             f"{'class':<{width}}  precision  recall     F1  support"]
    for i, label in enumerate(labels):
        lines.append(f"{label:<{width}}  {m['precision'][i]:9.3f}  {m['recall'][i]:6.3f}  "
                     f"{m['f1'][i]:5.3f}  {m['support'][i]:7d}")
    lines.append("confusion matrix (rows: true label, columns: predicted):")
    cell = max(7, width)
    lines.append(" " * width + "".join(f"{label:>{cell}}" for label in labels))
    for label, row in zip(labels, m["confusion"]):
        lines.append(f"{label:<{width}}" + "".join(f"{n:>{cell}d}" for n in row))
    return lines
