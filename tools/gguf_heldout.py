"""Held-out replies in llama.cpp vs here: export a checkpoint to GGUF and ask llama.cpp's chat endpoint (the GGUF's
own chat template, the checkpoint's stop string, greedy) every held-out question that eval.py answered.

    python eval.py --out_dir=out-demo --data=data/demo/heldout.jsonl --out=out-demo/heldout_replies.jsonl
    python tools/gguf_heldout.py --out_dir=out-demo --data=data/demo/heldout.jsonl \\
        --replies=out-demo/heldout_replies.jsonl --types=f16,q8_0

Needs llama-cpp-python (requirements-dev.txt). Prints, per GGUF type, the share of replies identical to eval.py's
(greedy, fp32) and the exact-match score of both against the references, then one JSON line.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from chat_gpt2 import chat  # noqa: E402  (needs sys.path above)
from chat_gpt2.checkpoint import load_model  # noqa: E402
from chat_gpt2.evaluation import exact_match  # noqa: E402
from chat_gpt2.gguf_export import export_gguf  # noqa: E402
from chat_gpt2.records import read_conversations  # noqa: E402


def llama_replies(path, conversations, stops, block_size, max_tokens):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=block_size, n_batch=block_size, verbose=False)
    replies = []
    for messages in conversations:
        reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=max_tokens, stop=list(stops))
        replies.append(reply["choices"][0]["message"]["content"].strip())
    return replies


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out-demo")
    p.add_argument("--ckpt", default="")
    p.add_argument("--data", default="data/demo/heldout.jsonl")
    p.add_argument("--replies", default="out-demo/heldout_replies.jsonl", help="eval.py --out's file")
    p.add_argument("--types", default="f16,q8_0")
    p.add_argument("--max_tokens", type=int, default=64, help="eval.py's max_new_tokens")
    args = p.parse_args()
    model, ckpt = load_model(args.out_dir, args.ckpt)
    template, stop = ckpt.get("template", chat.TEMPLATE), ckpt.get("default_stop", chat.NEWLINE_STOP)
    conversations = [m for _, m in read_conversations(args.data, template=template)]
    with open(args.replies, encoding="utf-8") as f:
        ours = [json.loads(line) for line in f if line.strip()]
    if len(ours) != len(conversations):
        sys.exit(f"{args.replies}: {len(ours)} replies for {len(conversations)} conversations in {args.data}")
    references = [m[-1]["content"].strip() for m in conversations]
    ours_em = sum(exact_match(r["response"], ref) for r, ref in zip(ours, references)) / len(ours)
    print(f"{len(ours)} held-out conversations; ours (eval.py): exact match {ours_em:.1%}")
    result = {"conversations": len(ours), "ours_exact_match": ours_em}
    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type in args.types.split(","):
            t0 = time.time()
            path = export_gguf(model, os.path.join(tmp, gguf_type), template, ckpt.get("tokenizer", chat.TOKENIZER),
                               (stop,) if stop else (), gguf_type)
            theirs = llama_replies(path, [m[:-1] for m in conversations], (stop,) if stop else (),
                                   model.config.block_size, args.max_tokens)
            same = sum(a == b["response"].strip() for a, b in zip(theirs, ours)) / len(ours)
            em = sum(exact_match(a, ref) for a, ref in zip(theirs, references)) / len(ours)
            print(f"{gguf_type}: {same:.1%} of llama.cpp's replies identical to ours, exact match {em:.1%} "
                  f"({os.path.getsize(path) / 1e6:.1f} MB, {time.time() - t0:.0f}s)")
            result[gguf_type] = {"identical": same, "exact_match": em, "bytes": os.path.getsize(path)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
