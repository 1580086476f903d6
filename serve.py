"""Serve a trained model over HTTP: an OpenAI-compatible API and a chat page (docs/serving.md).

    python serve.py                   # newest run's best checkpoint in out_dir, 127.0.0.1:8000
    python serve.py --ckpt=out/finetuned_20260101_120000.pt --port=8080 --temperature=0.7
    python serve.py --init_from=gpt2  # Hugging Face GPT-2 weights
then open http://127.0.0.1:8000/ or point an OpenAI client at http://127.0.0.1:8000/v1.

The sampling options are the defaults for requests that do not set them; the stop string defaults
to the checkpoint's, as in sample.py. One worker thread decodes the requests together, each joining
the running batch at the next token (continuous batching, chat_gpt2/batcher.py).
"""
import os

import configurator
from chat_gpt2.inference import load_engine
from chat_gpt2.sampling import sampling_defaults, sampling_help
from chat_gpt2.server import Limits, create_app

# `python serve.py --help` prints these comments; the sampling keys are per-request defaults
DEFAULTS = dict(
    out_dir="out",  # the run's folder: its newest best checkpoint is used unless --ckpt says which
    ckpt="",  # a checkpoint file (finetuned_*.pt); "" = the newest best one in out_dir
    # instead of a checkpoint: gpt2..gpt2-xl, a Hugging Face repo id or a local HF directory
    init_from="",
    host="127.0.0.1",  # loopback by default: put a proxy with authentication in front to expose it
    port=8000,  # the TCP port
    # the sampling options (SamplingParams) but stop, which a request sets (default: the
    # checkpoint's). No default seed: it would make unseeded requests repeat themselves
    **sampling_defaults(top_k=200, leave_out=("stop",)),
    device="auto",  # auto, cpu, cuda, cuda:N or mps
    # auto (bf16 where the device has native bf16), float32, bfloat16, float16 or int8: converted
    dtype="auto",
    use_cache=True,  # kept for old commands: decoding always uses the KV cache (same tokens)
    max_body_bytes=Limits.max_body_bytes,  # the largest request body (413 above)
    max_messages=Limits.max_messages,  # the most messages in one request (400 above)
    max_chars=Limits.max_chars,  # the most characters of content in one request (400 above)
    # requests that may wait for the model; more get 503 with Retry-After
    max_waiting=Limits.max_waiting,
    # rows decoded together, joining and leaving at every token (n choices = n rows)
    max_rows=Limits.max_rows,
)


def build_app(cfg):
    """The app for a script's cfg: the model loaded, the engine and the limits set."""
    engine, ckpt = load_engine(cfg)
    name = cfg["init_from"] or os.path.splitext(os.path.basename(cfg["ckpt"]))[0] or "chat-gpt2"
    limits = Limits(*(cfg[key] for key in ("max_body_bytes", "max_messages", "max_chars",
                                           "max_waiting", "max_rows")))
    return create_app(engine, ckpt, cfg, model_name=name, limits=limits)


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="serve.py", meanings=sampling_help())
    app = build_app(cfg)
    import uvicorn  # only the server needs it
    uvicorn.run(app, host=cfg["host"], port=cfg["port"], log_level="info")


if __name__ == "__main__":
    configurator.run(main)
