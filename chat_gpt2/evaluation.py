"""Scoring a model: the loss on a prepared dataset's val split (every learned token scored once),
replies to held-out conversations, and the reply metrics (exact match of the first line, SQuAD-style
token F1); multiple choice in HellaSwag's layout by the log-likelihood of each ending."""
import json
import math
import re
import string
import sys
import time

import numpy as np
import torch

from . import chat
from .dataset import load_dataset
from .device import autocast
from .engine import Request, not_tokens
from .errors import InputError
from .records import read_conversations
from .tokenizer import check_same


# --------------------------------------------------------------------------------------------------
# Val loss on assistant tokens


def conversation_windows(ids, mask, conv_starts, turn_starts, block_size):
    """Yield (start, tokens, scored): windows of at most block_size + 1 tokens inside one
    conversation, where they start in the split, and the loss mask on their targets, zeroed where an
    earlier window scored the target: every token is scored exactly once. A long conversation
    continues in a window that starts at the latest turn start already covered (the new targets keep
    their turn's context), else half a window back."""
    ends = list(conv_starts[1:]) + [len(ids)]
    for a, b in zip(conv_starts, ends):
        turns = turn_starts[np.searchsorted(turn_starts, a):np.searchsorted(turn_starts, b)]
        # targets at positions <= scored_until are scored (position a is no target)
        start, scored_until = a, a
        while scored_until < b - 1:
            end = min(start + block_size + 1, b)
            scored = mask[start + 1:end].astype(np.float32)
            scored[:scored_until - start] = 0
            yield start, ids[start:end].astype(np.int64), scored
            scored_until = end - 1
            later = turns[(turns > start) & (turns <= scored_until)]
            start = int(later[-1]) if len(later) else max(start + 1, scored_until - block_size // 2)


def padded_batches(windows, batch_size, max_tokens=8192, pad=chat.EOT):
    """(x, y, mask) batches of windows sorted by length (little padding), at most batch_size rows
    and about max_tokens positions each (bounds the logits' memory on GPUs); padding has input pad
    (the tokenizer's <|endoftext|>), target -1 and mask 0."""
    # longest first: a batch's first row sets its width
    windows = sorted(windows, key=lambda w: -len(w[0]))
    i = 0
    while i < len(windows):
        rows = max(1, min(batch_size, max_tokens // len(windows[i][0])))
        batch, i = windows[i:i + rows], i + rows
        width = len(batch[0][0]) - 1
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)
        m = torch.zeros((len(batch), width))
        for row, (tokens, scored) in enumerate(batch):
            n = len(tokens) - 1
            x[row, :n], y[row, :n], m[row, :n] = (torch.from_numpy(a)
                                                  for a in (tokens[:-1], tokens[1:], scored))
        yield x, y, m


@torch.no_grad()
def val_scores(model, folder, batch_size, device, dtype, tokenizer=None):
    """{loss, tokens, bytes, bpb} over the assistant tokens of the whole val split: the
    token-weighted mean loss, how many tokens that is, the UTF-8 bytes of their text (a special
    token counts 0) and the loss in bits per byte. tokenizer: the model's (checkpoint's), when
    known; the dataset must be prepared with it."""
    data, meta = load_dataset(folder)
    if tokenizer is not None:
        check_same(meta["tokenizer"], tokenizer, f"--dataset={folder} is tokenized with {{ours}}, "
                   "but the model was trained with {theirs}")
    data = data["val"]
    windows = [(tokens, scored) for _, tokens, scored in conversation_windows(
        data.ids, data.mask, data.convs, data.starts, model.config.block_size) if scored.any()]
    sizes = torch.as_tensor(text_bytes(chat.run_encoder(meta)))
    total, count, n_bytes = 0.0, 0.0, 0
    for x, y, m in padded_batches(windows, batch_size, pad=data.eot):
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device), m.to(device))
        total += loss.item() * m.sum().item()
        count += m.sum().item()
        n_bytes += int((sizes[y.clamp(min=0)] * m).sum().item())
    return {"loss": total / max(count, 1.0), "tokens": int(count), "bytes": n_bytes,
            "bpb": total / math.log(2) / max(n_bytes, 1)}


def val_loss(model, folder, batch_size, device, dtype):
    """(token-weighted mean loss over the assistant tokens of the whole val split, how many tokens
    that is): val_scores' loss and tokens."""
    scores = val_scores(model, folder, batch_size, device, dtype)
    return scores["loss"], scores["tokens"]


# --------------------------------------------------------------------------------------------------
# Replies to held-out conversations


def load_heldout(path, template, enc):
    """[(prompt_ids, reference)] per conversation; a bad record raises an error naming file:line."""
    examples = []
    # each ends with an assistant message
    for _, messages in read_conversations(path, template=template):
        examples.append((chat.render_prompt(messages[:-1], template, enc),
                         messages[-1]["content"].strip()))
    if not examples:
        raise InputError(f"{path}: no conversations")
    return examples


def generate_all(engine, prompts, params, batch_size):
    """Replies to every prompt. Prompts of the same token length are generated together as one batch
    (exact, as there is no padding), which makes many short prompts fast on a CPU. One generator
    seeded from params.seed runs through all batches."""
    by_length = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    generator = params.generator(engine.device)
    replies, last_report, t0 = [None] * len(prompts), time.time(), time.time()
    groups = [g[i:i + batch_size] for g in by_length.values() for i in range(0, len(g), batch_size)]
    for group in groups:
        requests = [Request(prompts[i], params, generator=generator) for i in group]
        engine.complete(requests)
        for i, request in zip(group, requests):
            replies[i] = request.replies[0].text.strip()
        if time.time() - last_report > 5:
            last_report = time.time()
            done = sum(r is not None for r in replies)
            print(f"  ... {done}/{len(prompts)} replies, {last_report - t0:.0f}s", file=sys.stderr,
                  flush=True)
    return replies


# --------------------------------------------------------------------------------------------------
# Metrics


def first_line(text):
    """The first non-empty line, whitespace-normalised: what the exact match compares."""
    for line in text.strip().splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def exact_match(response, reference):
    return first_line(response) == first_line(reference)


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def words(text):
    return _PUNCTUATION.sub(" ", text.lower()).split()


def token_f1(response, reference):
    """SQuAD-style F1 over the bag of words (lowercased, punctuation stripped); 1.0 when
    both have no words."""
    got, want = words(response), words(reference)
    if not got or not want:
        return float(got == want)
    common = sum(min(got.count(w), want.count(w)) for w in set(got))
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def score_rows(examples, replies, enc, judge=None):
    rows = []
    for (prompt_ids, reference), response in zip(examples, replies):
        row = {"prompt": enc.decode(prompt_ids), "reference": reference, "response": response,
               "exact_match": exact_match(response, reference), "f1": token_f1(response, reference)}
        if judge is not None:
            row["judge_score"] = judge(row)
        rows.append(row)
    return rows



# --------------------------------------------------------------------------------------------------
# Multiple choice in HellaSwag's layout, scored by the log-likelihood of each ending


def hellaswag_text(text):
    """lm-eval's hellaswag preprocessing: WikiHow's bracketed markers out, " [title]" as a
    sentence end."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def read_choices(path):
    """[(query, endings, gold)] from a .jsonl in HellaSwag's layout (activity_label, ctx_a, ctx_b,
    endings, label), the query and endings as lm-eval's hellaswag task builds them."""
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ctx = f"{d['ctx_a']} {d['ctx_b'].capitalize()}"
                query = hellaswag_text(f"{d['activity_label']}: {ctx}")
                items.append((query, [hellaswag_text(e) for e in d["endings"]], int(d["label"])))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{path}:{n}: not a HellaSwag-layout item "
                                 f"({type(e).__name__}: {e})")
    if not items:
        raise InputError(f"{path}: no items")
    return items


def text_bytes(enc):
    """The UTF-8 bytes of the text each token stands for, as an int64 array by token id: special
    tokens are no text and count 0 (bits per byte: val_scores, objectives)."""
    sizes = chat.token_bytes(enc).copy()
    sizes[list(enc._special_tokens.values())] = 0
    return sizes


def choice_scores(model, enc, items, device):
    """Per item, per ending: (sum of log P(token), tokens) of " " + ending after the query (fp32)."""
    scores, masked = [], not_tokens(enc, model.config.vocab_size, device)
    for query, endings, _ in items:
        ctx = enc.encode_ordinary(query)
        row = []
        for ending in endings:
            cont = enc.encode_ordinary(" " + ending)
            ids = torch.tensor([(ctx + cont)[-model.config.block_size - 1:]], device=device)
            with torch.no_grad():
                logits = model.lm_head(model.hidden_states(ids[:, :-1]))[0].float()
            logits.masked_fill_(masked, float("-inf"))  # the padded vocabulary is no token
            n = min(len(cont), ids.size(1) - 1)  # an ending longer than the context: its last n
            logp = logits.log_softmax(-1)[-n:].gather(1, ids[0, -n:, None])
            row.append((logp.sum().item(), n))
        scores.append(row)
    return scores


def choice_accuracy(items, scores):
    """lm-eval's protocol: acc (highest log-likelihood) and acc_norm (over the ending's length in
    characters); and acc_norm_tokens (mean log-likelihood per ending token, the completion style)."""
    def share(key):
        return sum(max(range(len(e)), key=lambda i: key(s[i], e[i])) == gold
                   for (_, e, gold), s in zip(items, scores)) / len(items)
    return {"acc": share(lambda s, e: s[0]), "acc_norm": share(lambda s, e: s[0] / len(e)),
            "acc_norm_tokens": share(lambda s, e: s[0] / s[1])}
