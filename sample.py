"""Talk to a trained model.

    python sample.py --prompt "What is 3 plus 4?"  # newest run's best checkpoint in out_dir
    python sample.py --ckpt=out/finetuned_20260101_120000.pt --prompt "Hi" --temperature=0 \
        --system "Be brief."
    python sample.py --raw --prompt "Once upon a time"  # continue plain text, no chat template
    python sample.py --init_from=gpt2 --raw --prompt "Hello"  # Hugging Face GPT-2 or a local HF dir
    python sample.py --interactive --system "Be brief."  # multi-turn chat; /help lists commands
    python sample.py --interactive --raw --out_dir=out-shakespeare  # each line continues the text

The prompt is rendered with the chat template stored in the checkpoint (chat.py), and only the
assistant's reply is printed. Generation stops at the first newline by default (or at the end of
the turn when the training data had multi-line replies, as recorded in the checkpoint; a model
trained on plain text has none); `--stop` overrides it, and <|endoftext|> always stops. With --raw
there is no template and no stop string unless --stop gives one.
"""
import dataclasses
import signal
import sys

import torch

import configurator
from chat_gpt2 import chat
from chat_gpt2.engine import PromptCache, Request
from chat_gpt2.errors import ConfigError
from chat_gpt2.inference import load_engine, sampling_params
from chat_gpt2.sampling import SAMPLING_KEYS, sampling_defaults, sampling_help

DEFAULTS = dict(  # `python sample.py --help` prints these comments and the sampling options' help
    out_dir="out",  # the run's folder: its newest best checkpoint is used unless --ckpt says which
    ckpt="",  # a checkpoint file (finetuned_*.pt); "" = the newest best one in out_dir
    # instead: our .pt file or a run's out_dir, or gpt2..gpt2-xl, a HF repo id or a local HF dir
    init_from="",
    prompt="",  # the user's message (or, with --raw, the text to continue)
    system="",  # a system message before the conversation
    raw=False,  # continue plain text: no chat template, no stop string by default
    **sampling_defaults(top_k=200, seed=1337, stop=None),  # temperature, ... (SamplingParams)
    num_samples=1,  # replies to the prompt, generated as one batch
    device="auto",  # auto, cpu, cuda, cuda:N or mps
    # auto (bf16 where it decodes faster), float32, bfloat16, float16 or int8: weights converted
    dtype="auto",
    use_cache=True,  # kept for old commands: decoding always uses the KV cache (same tokens)
    interactive=False,  # a multi-turn chat on the terminal (or piped stdin) instead of one --prompt
)


# --------------------------------------------------------------------------------------------------
# Interactive chat

CHAT_HELP = """commands:
  /set KEY=VALUE ...  change sampling options for the next replies, e.g.
                      /set temperature=0.5 top_k=50; /set alone shows them. Keys:
{keys}
  /reset              forget the conversation (the --system message stays)
  /help               this text
  /quit               leave (so does end of input, Ctrl-D)
Ctrl-C stops a reply; the interrupted exchange is left out of the conversation.""".format(
    keys="\n".join(f"    {key:<20}{sampling_help()[key]}" for key in SAMPLING_KEYS))


def apply_set(args, params):
    """`/set temperature=0.5 top_k=50`: new SamplingParams, parsed and checked like
    command-line flags."""
    if any(a.partition("=")[0] not in SAMPLING_KEYS for a in args):
        raise ConfigError(f"/set takes {', '.join(SAMPLING_KEYS)} (e.g. /set temperature=0.5)")
    settings = {k: getattr(params, k) for k in SAMPLING_KEYS}
    new, _ = configurator.parse(settings, [f"--{a}" for a in args])
    return dataclasses.replace(params, **new)


def run_command(line, params, output):
    """Handle a /command. Returns (action: 'quit', 'reset' or None, the sampling params
    for the next replies)."""
    name, *args = line.split()
    if name in ("/quit", "/exit"):
        return "quit", params
    if name == "/reset":
        output.write("(conversation cleared)\n")
        return "reset", params
    if name == "/set":
        try:
            params = apply_set(args, params) if args else params
            output.write(" ".join(f"{k}={getattr(params, k)}" for k in SAMPLING_KEYS) + "\n")
        except ConfigError as e:
            output.write(f"error: {e}\n")
    elif name == "/help":
        output.write(CHAT_HELP + "\n")
    else:
        output.write(f"unknown command {name}: /help lists them\n")
    return None, params


EMPTY_REPLY = "(empty reply: the model ended its turn at once)"


def stream_reply(engine, ids, params, generator, output, raw=False, prompt_cache=None):
    """Generate one reply, writing it to output as it comes. Returns the reply, or None when Ctrl-C
    stopped it. raw: the continuation as generated, not stripped (its leading space or newline
    belongs to the text).
    prompt_cache: an engine.PromptCache holding the conversation's earlier turns."""
    write = lambda choice, text: (output.write(text), output.flush())  # noqa: E731
    request = Request(ids, params, 1, generator, write, prompt_cache)
    try:
        engine.complete([request])
        reply = request.replies[0].text if raw else request.replies[0].text.strip()
    except KeyboardInterrupt:
        output.write(" [interrupted]\n")
        return None
    output.write(f"{EMPTY_REPLY}\n" if not reply else "\n")
    return reply


def raw_context(history, enc, budget):
    """--raw: the text so far (each typed line after a newline, each continuation right after its
    line) as ids, its oldest tokens dropped to fit budget. Returns (ids, history)."""
    text = "".join(("\n" if i and m["role"] == "user" else "") + m["content"]
                   for i, m in enumerate(history))
    return enc.encode_ordinary(text)[-budget:], history


def chat_loop(engine, ckpt, cfg, input_fn=input, output=sys.stdout):
    """A multi-turn chat: each line typed is a user message, each reply is streamed. The
    conversation is rendered with the checkpoint's template and trimmed (oldest turns first) to
    block_size minus the room for a reply. With --raw there is no template: each line continues the
    text (raw_context). Returns the conversation."""
    template = ckpt.get("template", chat.TEMPLATE)
    params = sampling_params(cfg, None if cfg["raw"]
                             else ckpt.get("default_stop", chat.NEWLINE_STOP))
    # one stream for the whole chat
    generator = torch.Generator(device=engine.device).manual_seed(cfg["seed"])
    prompt_cache = PromptCache(engine.model.config, engine.device)  # a turn runs only what is new
    history = []
    output.write(("text: each line continues the text" if cfg["raw"] else "chat: type a message") +
                 ", /help for commands, /quit or Ctrl-D to leave\n")
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
            action, params = run_command(line, params, output)
            if action == "quit":
                return history
            history = [] if action == "reset" else history
            continue
        if not line:
            continue
        block_size = engine.model.config.block_size
        budget = block_size - min(params.max_new_tokens, block_size // 2)  # keep room for the reply
        new = history + [{"role": "user", "content": line}]
        ids, kept = raw_context(new, engine.enc, budget) if cfg["raw"] else \
            chat.fit_context(cfg["system"], new, template, engine.enc, budget)
        if len(kept) < len(history) + 1:
            output.write(f"(dropped the {(len(history) + 1 - len(kept)) // 2} oldest turn(s) "
                         "to fit the context)\n")
        reply = stream_reply(engine, ids, params, generator, output, cfg["raw"], prompt_cache)
        history = ((kept + [{"role": "assistant", "content": reply}]) if reply is not None
                   else kept[:-1])


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="sample.py", meanings=sampling_help())
    if not cfg["prompt"] and not cfg["interactive"]:
        raise ConfigError("nothing to answer: pass --prompt \"...\" (or --interactive)")
    if cfg["raw"] and cfg["system"]:
        raise ConfigError("--system needs the chat template: leave it out with --raw "
                          "(plain text has no roles)")
    engine, ckpt = load_engine(cfg, one_row=cfg["num_samples"] == 1)
    if cfg["interactive"]:
        if sys.stdin.isatty():
            import readline  # noqa: F401  (line editing and history for input())
            # Ctrl-C stops a reply. Python raises KeyboardInterrupt only if SIGINT was not ignored
            # when it started, and a shell starts its background jobs (and what they run) with
            # SIGINT ignored.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        chat_loop(engine, ckpt, cfg)
        return
    messages = ([{"role": "system", "content": cfg["system"]}] if cfg["system"] else []) + \
        [{"role": "user", "content": cfg["prompt"]}]
    prompt_ids = engine.enc.encode_ordinary(cfg["prompt"]) if cfg["raw"] else \
        chat.render_prompt(messages, ckpt.get("template", chat.TEMPLATE), engine.enc)
    params = sampling_params(cfg, None if cfg["raw"]
                             else ckpt.get("default_stop", chat.NEWLINE_STOP))
    stream = cfg["num_samples"] == 1 and sys.stdout.isatty()
    on_text = (lambda row, text: print(text, end="", flush=True)) if stream else None
    request = Request(prompt_ids, params, cfg["num_samples"], on_text=on_text)
    engine.complete([request])
    replies = [reply.text.strip() for reply in request.replies]
    if stream:
        print("" if replies[0] else EMPTY_REPLY)
        return
    for i, reply in enumerate(replies):
        if i:
            print("---")
        print(reply)
    if not all(replies):
        print(EMPTY_REPLY, file=sys.stderr)


if __name__ == "__main__":
    configurator.run(main)
