"""Evaluate a trained model: val loss on a prepared dataset, and its replies to held-out
conversations.

    python eval.py --out_dir=out-demo --data=data/demo/heldout.jsonl  # the demo: share correct
    python eval.py --ckpt=out/finetuned_20260101_120000.pt --dataset=chat --data=heldout.json \
        --out=replies.jsonl
    python eval.py --data=heldout.jsonl --judge_cmd="python my_judge.py"  # plus an external judge

--dataset (a folder written by prepare.py, or its name under data/): the mean loss, perplexity and
bits per byte (the loss in bits over the UTF-8 bytes of those tokens' text: comparable across
tokenizers) on the assistant tokens (loss mask 1) of the whole val split, every token scored once,
each window inside one conversation. The dataset must be tokenized as the model was.

--data (a .jsonl / .json file in any prepare.py schema): per conversation, the prompt is every
message before the last assistant message (rendered with the checkpoint's chat template) and the
reference is that message. Replies are greedy by default and stop at the checkpoint's default stop.
Metrics, averaged over the file:
    exact_match  the reply's first line equals the reference's, whitespace-normalised
    f1           SQuAD-style token F1 on lowercased words with punctuation stripped
    judge_score  optional (off by default): --judge_cmd gets {"prompt", "reference", "response"}
                 as JSON on stdin and prints a number; --judge_url (an OpenAI-compatible /v1 base
                 URL, key from $OPENAI_API_KEY) + --judge_model are asked for a 1-10 score
Rows {prompt, reference, response, exact_match, f1[, judge_score]} go to --out (JSONL, written
atomically); the run ends with one JSON summary line.

--pairs (a preference file in any prepare.py --task=preference layout, rendered with the
checkpoint's template, or a dataset folder prepared with --task=preference: its val split): DPO's
implicit reward of each response, beta x (logp under the model - logp under --reference, a
checkpoint, run folder or pretrained name; none: 0), and over the pairs the reward accuracy
(chosen above rejected) and mean margin; whatever the reference, chosen_likelier (the share of
pairs whose chosen response the model itself finds likelier: a start scored against itself has
reward accuracy 0 and margin 0, but this says what it prefers) and the mean logps/chosen and
logps/rejected (summed over each response's tokens); with a judge also each prompt's reply from
both models, scored against the chosen response: the model's win rate (a tie counts half).

--choices (multiple choice in HellaSwag's layout, .jsonl): the log-likelihood of each ending after
the context; acc and acc_norm (by length in characters) as lm-eval's hellaswag computes them, and
acc_norm_tokens (mean per ending token, the completion style).

A classifier's checkpoint (docs/classification.md) with --data=FILE (labelled, read with the
columns it was trained on): `accuracy: 71.2% (1140/1600)`, then precision / recall / F1 per class
and the confusion matrix.
"""
import json
import math
import os
import time
from collections import Counter

import configurator
from chat_gpt2 import chat
from chat_gpt2.classifier import classify_texts, metrics, report_lines
from chat_gpt2.classify_data import read_labelled
from chat_gpt2.errors import ConfigError
from chat_gpt2.evaluation import (choice_accuracy, choice_scores, generate_all, load_heldout,
                                  read_choices, score_rows, val_scores)
from chat_gpt2.files import write_jsonl
from chat_gpt2.inference import load_engine, sampling_params
from chat_gpt2.sampling import sampling_defaults, sampling_help
from chat_gpt2.judge import make_judge
from chat_gpt2.preference import load_preference, pair_logps, read_pairs, render_pairs

DEFAULTS = dict(  # `python eval.py --help` prints these comments and the sampling options' help
    out_dir="out",  # the run's folder: its newest best checkpoint is used unless --ckpt says which
    ckpt="",  # a checkpoint file (finetuned_*.pt); "" = the newest best one in out_dir
    # instead: our .pt file or a run's out_dir, or gpt2..gpt2-xl, a HF repo id or a local HF dir
    init_from="",
    dataset="",  # a prepared dataset (name under data/ or folder): val loss and perplexity
    # held-out conversations (.jsonl / .json, any prepare.py schema): replies and their metrics
    data="",
    # preference pairs (.jsonl / .json, any --task=preference layout, or a prepared preference
    # dataset: its val split): reward accuracy and margin
    pairs="",
    # multiple choice in HellaSwag's layout (.jsonl): acc, acc_norm (lm-eval's), acc_norm_tokens
    choices="",
    reference="",  # --pairs: the reference (our .pt, a run's out_dir, a pretrained name); "" = none
    beta=0.1,  # --pairs: the rewards' scale, as DPO's beta
    out="",  # where the replies go; "" = eval_replies.jsonl in out_dir
    batch_size=32,  # windows per forward for the val loss; prompts of one length generated together
    # the sampling options (sampling.SamplingParams): greedy by default, for scoring
    **sampling_defaults(temperature=0.0, max_new_tokens=64, seed=1337, stop=None),
    # a command that reads {prompt, reference, response} as JSON on stdin and prints a score
    judge_cmd="",
    # or an OpenAI-compatible /v1 base URL asked for a 1-10 score (key: $OPENAI_API_KEY, https only)
    judge_url="",
    judge_model="",  # the model name the judge endpoint serves
    judge_timeout=120.0,  # seconds per judge call
    device="auto",  # auto, cpu, cuda, cuda:N or mps
    # fp32 so that scores compare across machines; bfloat16 / float16 / int8 / auto convert weights
    dtype="float32",
)


def evaluate_replies(engine, ckpt, cfg):
    judge = make_judge(cfg)  # configuration errors before the slow part
    params = sampling_params(cfg, ckpt.get("default_stop", chat.NEWLINE_STOP))
    examples = load_heldout(cfg["data"], ckpt.get("template", chat.TEMPLATE), engine.enc)
    t0 = time.time()
    replies = generate_all(engine, [ids for ids, _ in examples], params, cfg["batch_size"])
    seconds = time.time() - t0
    rows = score_rows(examples, replies, engine.enc, judge)
    out = cfg["out"] or os.path.join(cfg["out_dir"], "eval_replies.jsonl")
    write_jsonl(out, rows)
    n, correct = len(rows), sum(r["exact_match"] for r in rows)
    empty = sum(not r["response"] for r in rows)
    summary = {"n": n, "exact_match": correct / n, "f1": sum(r["f1"] for r in rows) / n, "out": out,
               "generate_seconds": round(seconds, 2), "empty_replies": empty}
    print(f"exact match: {100 * correct / n:.1f}% ({correct}/{n})")
    if empty:
        print(f"note: {empty} of {n} replies are empty: the model ended its turn at once "
              f"(an undertrained model, or a stop string that matches at the start of the reply)")
    print(f"token F1: {summary['f1']:.3f}")
    if judge is not None:
        summary["judge_score"] = sum(r["judge_score"] for r in rows) / n
        print(f"judge score: {summary['judge_score']:.2f}")
    print(f"wrote {n} replies to {out} ({seconds:.1f}s)")
    return summary


def read_pair_ids(path, template):
    """[(prompt, chosen, rejected) ids] of a preference file rendered with template, or of the val
    split of a dataset folder prepared with --task=preference (its pairs as DPO validated on)."""
    if os.path.isdir(path):
        val = load_preference(path)[0]["val"]
        return [val.pair(i) for i in range(len(val))]
    return render_pairs(read_pairs([path], template, False, Counter())[0], template)


def evaluate_pairs(engine, ckpt, cfg):
    """--pairs: DPO's rewards against --reference, their accuracy and margin; a judge's win rate."""
    judge = make_judge(cfg)
    template, model = ckpt.get("template", chat.TEMPLATE), engine.model
    pairs = read_pair_ids(cfg["pairs"], template)
    reference = load_engine({**cfg, "init_from": cfg["reference"]})[0] if cfg["reference"] else None
    block = min(e.model.config.block_size for e in (engine, reference) if e is not None)
    logps = pair_logps(model, pairs, block, cfg["batch_size"], engine.device)  # (pairs, 2)
    ratios = logps if reference is None else \
        logps - pair_logps(reference.model, pairs, block, cfg["batch_size"], reference.device)
    rewards = cfg["beta"] * ratios
    chosen, rejected = rewards.T
    summary = {"pairs": len(pairs), "rewards/accuracies": (chosen > rejected).float().mean().item(),
               "rewards/margins": (chosen - rejected).mean().item(),
               "rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
               # the model's own preference, whatever the reference: its chosen reply the likelier
               "chosen_likelier": (logps[:, 0] > logps[:, 1]).float().mean().item(),
               "logps/chosen": logps[:, 0].mean().item(),
               "logps/rejected": logps[:, 1].mean().item()}
    print(f"{len(pairs)} pairs against {cfg['reference'] or 'no reference'}: reward accuracy "
          f"{summary['rewards/accuracies']:.1%}, mean margin {summary['rewards/margins']:.4f}; "
          f"chosen likelier under the model {summary['chosen_likelier']:.1%} (mean logp chosen "
          f"{summary['logps/chosen']:.2f}, rejected {summary['logps/rejected']:.2f})")
    if judge is not None and reference is not None:
        summary["win_rate"] = judge_win_rate(engine, reference, pairs, ckpt, cfg, judge)
        print(f"win rate against the reference under the judge: {summary['win_rate']:.1%}")
    return summary


def judge_win_rate(engine, reference, pairs, ckpt, cfg, judge):
    """The share of prompts where the judge scores the model's reply above the reference model's
    (ties half), each scored against the chosen response."""
    params = sampling_params(cfg, ckpt.get("default_stop", chat.NEWLINE_STOP))
    prompts = [p.tolist() for p, _, _ in pairs]
    chosen = [engine.enc.decode(c.tolist()).replace(chat.EOT_TEXT, "").strip() for _, c, _ in pairs]
    scores = []
    for e in (engine, reference):
        replies = generate_all(e, prompts, params, cfg["batch_size"])
        scores.append([judge({"prompt": engine.enc.decode(p), "reference": c, "response": reply})
                       for p, c, reply in zip(prompts, chosen, replies)])
    return sum((a > b) + 0.5 * (a == b) for a, b in zip(*scores)) / len(pairs)


def evaluate_classifier(engine, ckpt, cfg):
    if cfg["dataset"] or not cfg["data"]:
        raise ConfigError("a classifier is evaluated on a labelled file: pass --data=FILE "
                          "(no --dataset; train.py reports the prepared test split)")
    model, labels = engine.model, ckpt["classify"]["labels"]
    texts, true = read_labelled(cfg["data"], ckpt["classify"]["columns"], labels)
    pred = classify_texts(model, texts, engine.device, cfg["batch_size"]).argmax(1)
    m = metrics(true, pred, len(labels))
    print("\n".join(report_lines(m, labels)))
    summary = {"n": m["total"], "accuracy": m["accuracy"], "f1": dict(zip(labels, m["f1"]))}
    print(json.dumps(summary))
    return summary


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="eval.py", meanings=sampling_help())
    if not any(cfg[key] for key in ("dataset", "data", "pairs", "choices")):
        raise ConfigError("nothing to evaluate: pass --dataset=NAME_OR_DIR (val loss), --data=FILE "
                          "(replies), --pairs=FILE (preference pairs) and/or --choices=FILE "
                          "(multiple choice)")
    engine, ckpt = load_engine(cfg)
    if "classify" in ckpt:
        return evaluate_classifier(engine, ckpt, cfg)
    summary = {}
    if cfg["dataset"]:
        scores = val_scores(engine.model, cfg["dataset"], cfg["batch_size"], engine.device,
                            engine.dtype, ckpt.get("tokenizer", chat.TOKENIZER))
        loss, n_tokens = scores["loss"], scores["tokens"]
        summary.update(val_loss=loss, perplexity=math.exp(min(loss, 700.0)), val_tokens=n_tokens,
                       val_bpb=scores["bpb"], val_bytes=scores["bytes"])
        print(f"val loss {loss:.4f}, perplexity {summary['perplexity']:.2f}, "
              f"{scores['bpb']:.4f} bits per byte ({n_tokens:,} learned tokens, "
              f"{scores['bytes']:,} bytes)")
    if cfg["data"]:
        summary.update(evaluate_replies(engine, ckpt, cfg))
    if cfg["pairs"]:
        summary.update(evaluate_pairs(engine, ckpt, cfg))
    if cfg["choices"]:
        items = read_choices(cfg["choices"])
        scores = choice_scores(engine.model, engine.enc, items, engine.device)
        summary.update(choice_accuracy(items, scores))
        print(f"{len(items)} items: acc {summary['acc']:.4f}, acc_norm {summary['acc_norm']:.4f} "
              f"(lm-eval's protocol), acc_norm_tokens {summary['acc_norm_tokens']:.4f}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    configurator.run(main)
