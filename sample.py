"""Talk to a trained model.

    python sample.py --prompt "What is 7 plus 5?"              # newest run's best checkpoint in out_dir
    python sample.py --ckpt=out/finetuned_20260101_120000.pt --prompt "Hi" --temperature=0 --system "Be brief."
    python sample.py --raw --prompt "Once upon a time"          # continue plain text, no chat template

The prompt is rendered with the chat template stored in the checkpoint (chat.py), and only the assistant's reply
is printed. Generation stops at the first newline by default (or at the end of the turn when the training data
had multi-line replies, as recorded in the checkpoint); `--stop` overrides it, and <|endoftext|> always stops.
"""
import sys

import torch

import chat
import configurator
from model import autocast, find_checkpoint, generate, load_checkpoint, model_from_checkpoint, resolve_device, \
    resolve_dtype

DEFAULTS = dict(
    out_dir="out", ckpt="",  # ckpt "": the newest run's best checkpoint in out_dir
    prompt="", system="", raw=False,
    temperature=0.8, top_k=200, top_p=1.0, repetition_penalty=1.0, max_new_tokens=150, num_samples=1, seed=1337,
    stop=None,  # a string or a list of strings; None: the checkpoint's default stop
    device="auto", dtype="auto", use_cache=True,
)


def unescape(text):
    """`\\n` typed on a command line means a newline (other non-ASCII text is kept as it is)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _held_back(text, stops):
    """Length of text that can be shown while streaming: hold back a tail that may be the start of a stop string
    and an incomplete multi-byte character (decoded as U+FFFD until its last byte arrives)."""
    keep = len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, keep), 0, -1):
            if text[:keep].endswith(stop[:n]):
                keep = min(keep, len(text[:keep]) - n)
                break
    return keep


def generate_replies(model, prompt_ids, max_new_tokens, stop=(), num_samples=1, on_text=None, device="cpu",
                     generator=None, use_cache=True, temperature=0.8, top_k=None, top_p=1.0, repetition_penalty=1.0):
    """Generate num_samples replies to prompt_ids as one batch; each row stops on its own at <|endoftext|> or at
    the first of the stop strings (which may span several tokens), which is cut off. on_text(row, new_text) streams
    text as it becomes final. Returns the replies, whitespace-stripped."""
    enc = chat.get_encoder()
    stops = [s for s in stop if s]
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    tokens, texts = [[] for _ in range(num_samples)], [""] * num_samples
    done, shown = [False] * num_samples, [0] * num_samples
    steps = generate(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, use_cache, generator,
                     vocab_limit=chat.VOCAB_SIZE)
    for step in steps:
        for row, token in enumerate(step.tolist()):
            if done[row]:
                continue
            if token == chat.EOT:
                done[row] = True
            else:
                tokens[row].append(token)
                texts[row] = enc.decode(tokens[row])
                cuts = [i for i in (texts[row].find(s) for s in stops) if i >= 0]
                if cuts:
                    texts[row], done[row] = texts[row][:min(cuts)], True
            if on_text:
                visible = len(texts[row]) if done[row] else _held_back(texts[row], stops)
                if visible > shown[row]:
                    on_text(row, texts[row][shown[row]:visible])
                    shown[row] = visible
        if all(done):
            break
    return [t.strip() for t in texts]


def load_model(cfg):
    """The model and checkpoint named by --ckpt (or the newest best one in out_dir), on cfg's device."""
    device = resolve_device(cfg["device"])
    path = cfg["ckpt"] or find_checkpoint(cfg["out_dir"])
    ckpt = load_checkpoint(path, device)
    model = model_from_checkpoint(ckpt, device)
    model.eval()
    return model, ckpt, device


def resolve_stops(cfg, ckpt):
    stop = cfg["stop"]
    if stop is None:
        return [] if cfg["raw"] else [ckpt.get("default_stop", chat.NEWLINE_STOP)]
    return [unescape(s) for s in ([stop] if isinstance(stop, str) else list(stop))]


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="sample.py")
    if not cfg["prompt"]:
        raise ValueError("nothing to answer: pass --prompt \"...\"")
    model, ckpt, device = load_model(cfg)
    template = ckpt.get("template", chat.TEMPLATE)
    messages = ([{"role": "system", "content": cfg["system"]}] if cfg["system"] else []) + \
        [{"role": "user", "content": cfg["prompt"]}]
    enc = chat.get_encoder(ckpt.get("tokenizer", chat.TOKENIZER))
    prompt_ids = enc.encode_ordinary(cfg["prompt"]) if cfg["raw"] else chat.render_prompt(messages, template, enc)
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    stream = cfg["num_samples"] == 1 and sys.stdout.isatty()
    on_text = (lambda row, text: print(text, end="", flush=True)) if stream else None
    with autocast(device, resolve_dtype(cfg["dtype"], device)):
        replies = generate_replies(model, prompt_ids, cfg["max_new_tokens"], resolve_stops(cfg, ckpt),
                                   cfg["num_samples"], on_text, device, generator, cfg["use_cache"],
                                   cfg["temperature"], cfg["top_k"], cfg["top_p"], cfg["repetition_penalty"])
    if stream:
        print()
        return
    for i, reply in enumerate(replies):
        if i:
            print("---")
        print(reply)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
