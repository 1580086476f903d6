"""Classify text with a trained classifier (a checkpoint of train.py
on a dataset prepared with --task=classify).

    python classify.py --out_dir=out-spam --text "WINNER!! Claim your prize now"  # spam 0.993
    python classify.py --out_dir=out-spam --file=messages.txt [--out=predictions.jsonl]
    python classify.py --out_dir=out-spam --interactive  # type a text, see its class

--file: a .txt (one text per non-empty line), or a .csv / .tsv / .jsonl / .json read with the
columns the model was trained on. Each prediction is a JSON line {"text", "label", "probability",
"probabilities": {label: p}} in --out (default: the input's name with .predictions.jsonl, written
atomically). See docs/classification.md.
"""
import json
import os
import sys

import configurator
from chat_gpt2.checkpoint import load_classifier
from chat_gpt2.classifier import classify_texts
from chat_gpt2.classify_data import read_texts
from chat_gpt2.device import resolve_device
from chat_gpt2.errors import ConfigError
from chat_gpt2.files import write_jsonl

DEFAULTS = dict(
    out_dir="out", ckpt="",  # ckpt "": the newest run's best checkpoint in out_dir
    text="", file="", out="", interactive=False,
    batch_size=64, device="auto",
)


def predictions(model, texts, device, batch_size):
    probs = classify_texts(model, texts, device, batch_size)
    return [{"text": text, "label": model.labels[p.argmax()],
             "probability": round(float(p.max()), 6),
             "probabilities": {label: round(float(q), 6) for label, q in zip(model.labels, p)}}
            for text, p in zip(texts, probs)]


def interactive(model, device):
    """One text per line (stdin or the terminal) -> its label and
    probability; /quit or end of input leaves."""
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return
        if line.strip():
            row = predictions(model, [line.rstrip("\r\n")], device, 1)[0]
            print(f"{row['label']} {row['probability']:.3f}", flush=True)


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="classify.py")
    if sum(map(bool, (cfg["text"], cfg["file"], cfg["interactive"]))) != 1:
        raise ConfigError("pass one of --text=\"...\", --file=FILE or --interactive")
    device = resolve_device(cfg["device"])
    model, info = load_classifier(cfg["out_dir"], cfg["ckpt"], device)
    if cfg["interactive"]:
        return interactive(model, device)
    if cfg["text"]:
        row = predictions(model, [str(cfg["text"])], device, 1)[0]
        print(f"{row['label']} {row['probability']:.3f}")
        return row
    rows = predictions(model, read_texts(cfg["file"], info["classify"]["columns"]), device,
                       cfg["batch_size"])
    out = cfg["out"] or os.path.splitext(cfg["file"])[0] + ".predictions.jsonl"
    write_jsonl(out, rows)
    counts = {label: sum(r["label"] == label for r in rows) for label in model.labels}
    print(f"wrote {len(rows)} predictions to {out}: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(json.dumps({"n": len(rows), "out": out, "counts": counts}))
    return rows


if __name__ == "__main__":
    configurator.run(main)
