"""Talk to a trained model.

    python sample.py --prompt "What is 7 plus 5?"              # newest run's best checkpoint in out_dir
    python sample.py --ckpt=out/finetuned_20260101_120000.pt --prompt "Hi" --temperature=0 --system "Be brief."
    python sample.py --raw --prompt "Once upon a time"          # continue plain text, no chat template
    python sample.py --init_from=gpt2 --raw --prompt "Hello"    # Hugging Face GPT-2 weights (or a local HF dir)
    python sample.py --interactive --system "Be brief."         # multi-turn chat; /help lists the commands

The prompt is rendered with the chat template stored in the checkpoint (chat.py), and only the assistant's reply
is printed. Generation stops at the first newline by default (or at the end of the turn when the training data
had multi-line replies, as recorded in the checkpoint); `--stop` overrides it, and <|endoftext|> always stops.
"""
import sys

import torch

import chat
import configurator
from model import autocast, find_checkpoint, from_pretrained, generate, load_checkpoint, model_from_checkpoint, \
    resolve_device, resolve_dtype

DEFAULTS = dict(
    out_dir="out", ckpt="",  # ckpt "": the newest run's best checkpoint in out_dir
    init_from="",  # instead of a checkpoint: 'gpt2' .. 'gpt2-xl', a Hugging Face repo id or a local HF directory
    prompt="", system="", raw=False,
    temperature=0.8, top_k=200, top_p=1.0, repetition_penalty=1.0, max_new_tokens=150, num_samples=1, seed=1337,
    stop=None,  # a string or a list of strings; None: the checkpoint's default stop
    device="auto", dtype="auto", use_cache=True,
    interactive=False,  # a multi-turn chat on the terminal (or piped stdin) instead of one --prompt
)


def unescape(text):
    """`\\n` typed on a command line means a newline (other non-ASCII text is kept as it is)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _held_back(text, stops):
    """Length of text that can be shown while streaming: hold back a tail that may be the start of a stop string
    and an incomplete multi-byte character (decoded as U+FFFD until its last byte arrives)."""
    end = len(text.rstrip("\ufffd"))
    keep = end
    for stop in stops:  # the longest proper prefix of each stop that the (complete) text ends with
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:n], 0, end):
                keep = min(keep, end - n)
                break
    return keep


class _Reply:
    """One row of a batch: its tokens, its text (cut at the first stop string) and how much of it was streamed."""

    def __init__(self, enc, stops):
        self.enc, self.stops = enc, stops
        self.tokens, self.text, self.done, self.shown = [], "", False, 0

    def add(self, token):
        if token == chat.EOT:
            self.done = True
            return
        self.tokens.append(token)
        self.text = self.enc.decode(self.tokens)  # whole-text decode: merges multi-byte characters split over tokens
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.done = self.text[:min(cuts)], True

    def new_text(self, final=False):
        """The text that became final since the last call. Leading whitespace is never shown (replies are
        returned stripped and start with the space after `Assistant:`)."""
        visible = len(self.text) if self.done or final else _held_back(self.text, self.stops)
        start = max(self.shown, len(self.text) - len(self.text.lstrip()))
        if visible <= start:
            return ""
        self.shown = visible
        return self.text[start:visible]


def generate_batch(model, prompts, max_new_tokens, stop=(), on_text=None, device="cpu", generator=None,
                   use_cache=True, temperature=0.8, top_k=None, top_p=1.0, repetition_penalty=1.0):
    """Generate one reply per prompt as one batch (the prompts must have the same length: there is no padding).
    Each row stops on its own at <|endoftext|> or at the first of the stop strings (which may span several tokens),
    which is cut off. on_text(row, new_text) streams text as it becomes final. Returns the replies, stripped."""
    if not prompts or len({len(p) for p in prompts}) != 1 or not prompts[0]:
        raise ValueError("generate_batch needs non-empty prompts of one length")
    enc = chat.get_encoder()
    rows = [_Reply(enc, [s for s in stop if s]) for _ in prompts]
    idx = torch.tensor(prompts, dtype=torch.long, device=device)
    steps = generate(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, use_cache, generator,
                     vocab_limit=chat.VOCAB_SIZE)
    try:
        for step in steps:
            for i, (row, token) in enumerate(zip(rows, step.tolist())):
                if not row.done:
                    row.add(token)
                    _emit(on_text, i, row.new_text())
            if all(row.done for row in rows):
                break
    finally:
        steps.close()
    for i, row in enumerate(rows):  # out of tokens: the held-back tail was no stop string after all
        _emit(on_text, i, row.new_text(final=True))
    return [row.text.strip() for row in rows]


def _emit(on_text, row, text):
    if on_text and text:
        on_text(row, text)


def generate_replies(model, prompt_ids, max_new_tokens, stop=(), num_samples=1, on_text=None, device="cpu",
                     generator=None, use_cache=True, temperature=0.8, top_k=None, top_p=1.0, repetition_penalty=1.0):
    """num_samples replies to one prompt, generated as one batch (see generate_batch)."""
    return generate_batch(model, [list(prompt_ids)] * num_samples, max_new_tokens, stop, on_text, device, generator,
                          use_cache, temperature, top_k, top_p, repetition_penalty)


def load_model(cfg):
    """The model and checkpoint named by --ckpt (or the newest best one in out_dir), on cfg's device. With a
    non-empty cfg["init_from"] (eval.py), OpenAI's GPT-2 weights instead, with the default template and stop."""
    device = resolve_device(cfg["device"])
    if cfg.get("init_from"):
        return _load_pretrained(cfg["init_from"], device)
    path = cfg["ckpt"] or find_checkpoint(cfg["out_dir"])
    ckpt = load_checkpoint(path, device)
    model = model_from_checkpoint(ckpt, device)
    model.eval()
    return model, ckpt, device


def _load_pretrained(name, device):
    """init_from: 'gpt2' .. 'gpt2-xl', a Hugging Face repo id or a local Hugging Face GPT-2 directory."""
    if name in ("scratch", "resume"):
        raise ValueError(f"init_from={name!r} means nothing to sample from: name pretrained weights (e.g. gpt2 or a "
                         f"local directory), or leave init_from empty to use --ckpt / the newest checkpoint")
    model = from_pretrained(name).to(device)
    model.eval()
    ckpt = {"template": chat.TEMPLATE, "tokenizer": chat.TOKENIZER, "default_stop": chat.NEWLINE_STOP}
    return model, ckpt, device


def resolve_stops(cfg, ckpt):
    """--stop as a list of strings (`\\n` unescaped); None: the checkpoint's default stop (none with --raw)."""
    stop = cfg["stop"]
    if stop is None:
        return [] if cfg.get("raw") else [ckpt.get("default_stop", chat.NEWLINE_STOP)]
    if not isinstance(stop, (list, tuple)):  # --stop=5 arrives as an int: a number is a stop string too
        stop = [stop]
    return [unescape(str(s)) for s in stop]


# ----------------------------------------------------------------------------------------------------------------
# Interactive chat

SETTABLE = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
CHAT_HELP = """commands:
  /set KEY=VALUE ...  change a sampling option for the next replies, e.g. /set temperature=0.5 top_k=50
                      (keys: temperature, top_k, top_p, repetition_penalty, max_new_tokens); /set alone shows them
  /reset              forget the conversation (the --system message stays)
  /help               this text
  /quit               leave (so does end of input, Ctrl-D)
Ctrl-C stops a reply; the interrupted exchange is left out of the conversation."""


def fit_context(system, history, template, enc, budget):
    """Prompt ids for the conversation: the oldest turns are dropped until it fits budget tokens (the system
    message always stays; a single message too long to fit keeps its end). Returns (ids, kept history)."""
    head = [{"role": "system", "content": system}] if system else []
    while True:
        ids = chat.render_prompt(head + history, template, enc)
        if len(ids) <= budget or len(history) == 1:
            return ids[-budget:], history
        history = history[2:]  # one user message and the assistant's reply


def apply_set(args, settings):
    """`/set temperature=0.5 top_k=50`: new settings, parsed and checked like command-line flags."""
    from model import check_sampling
    if any(a.partition("=")[0] not in SETTABLE for a in args):
        raise configurator.ConfigError(f"/set takes {', '.join(SETTABLE)} (e.g. /set temperature=0.5)")
    new, _ = configurator.parse(settings, [f"--{a}" for a in args])
    check_sampling(new["temperature"], new["top_k"], new["top_p"], new["repetition_penalty"])
    if new["max_new_tokens"] < 1:
        raise ValueError("max_new_tokens must be at least 1")
    return new


def run_command(line, settings, output):
    """Handle a /command (settings are updated in place). Returns 'quit', 'reset' or None."""
    name, *args = line.split()
    if name in ("/quit", "/exit"):
        return "quit"
    if name == "/reset":
        output.write("(conversation cleared)\n")
        return "reset"
    if name == "/set":
        try:
            settings.update(apply_set(args, settings) if args else {})
            output.write(" ".join(f"{k}={settings[k]}" for k in SETTABLE) + "\n")
        except ValueError as e:  # ConfigError is a ValueError too
            output.write(f"error: {e}\n")
    elif name == "/help":
        output.write(CHAT_HELP + "\n")
    else:
        output.write(f"unknown command {name}: /help lists them\n")
    return None


def stream_reply(model, ids, settings, ctx, output):
    """Generate one reply, writing it to output as it comes. Returns the reply, or None when Ctrl-C stopped it."""
    write = lambda row, text: (output.write(text), output.flush())  # noqa: E731
    try:
        with autocast(ctx["device"], ctx["dtype"]):
            reply = generate_replies(model, ids, settings["max_new_tokens"], ctx["stops"], 1, write, ctx["device"],
                                     ctx["generator"], ctx["use_cache"], settings["temperature"],
                                     settings["top_k"], settings["top_p"], settings["repetition_penalty"])[0]
    except KeyboardInterrupt:
        output.write(" [interrupted]\n")
        return None
    output.write("\n")
    return reply


def chat_loop(model, ckpt, cfg, device="cpu", input_fn=input, output=sys.stdout):
    """A multi-turn chat: each line typed is a user message, each reply is streamed. The conversation is rendered
    with the checkpoint's template and trimmed (oldest turns first) to block_size minus the room for a reply.
    Returns the conversation (for tests)."""
    template, enc = ckpt.get("template", chat.TEMPLATE), chat.get_encoder(ckpt.get("tokenizer", chat.TOKENIZER))
    settings = {k: cfg[k] for k in SETTABLE}
    ctx = {"device": device, "dtype": resolve_dtype(cfg["dtype"], device), "stops": resolve_stops(cfg, ckpt),
           "generator": torch.Generator(device=device).manual_seed(cfg["seed"]), "use_cache": cfg["use_cache"]}
    history = []
    output.write("chat: type a message, /help for commands, /quit or Ctrl-D to leave\n")
    while True:
        try:
            line = input_fn("> ").strip()
        except EOFError:
            output.write("\n")
            return history
        except KeyboardInterrupt:  # at the prompt: a fresh line, like a shell
            output.write("\n")
            continue
        if line.startswith("/"):
            action = run_command(line, settings, output)
            if action == "quit":
                return history
            history = [] if action == "reset" else history
            continue
        if not line:
            continue
        block_size = model.config.block_size
        budget = block_size - min(settings["max_new_tokens"], block_size // 2)  # keep room for the reply
        ids, kept = fit_context(cfg["system"], history + [{"role": "user", "content": line}], template, enc, budget)
        if len(kept) < len(history) + 1:
            output.write(f"(dropped the {(len(history) + 1 - len(kept)) // 2} oldest turn(s) to fit the context)\n")
        reply = stream_reply(model, ids, settings, ctx, output)
        history = (kept + [{"role": "assistant", "content": reply}]) if reply is not None else kept[:-1]


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="sample.py")
    if not cfg["prompt"] and not cfg["interactive"]:
        raise ValueError("nothing to answer: pass --prompt \"...\" (or --interactive)")
    model, ckpt, device = load_model(cfg)
    if cfg["interactive"]:
        if sys.stdin.isatty():
            import readline  # noqa: F401  (line editing and history for input())
        chat_loop(model, ckpt, cfg, device)
        return
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
    configurator.run(main)
