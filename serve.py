"""Serve a trained model over HTTP: an OpenAI-compatible API and a chat page (docs/serving.md).

    python serve.py                     # newest run's best checkpoint in out_dir, 127.0.0.1:8000
    python serve.py --ckpt=out/finetuned_20260101_120000.pt --port=8080 --temperature=0.7
    python serve.py --init_from=gpt2    # Hugging Face GPT-2 weights
then open http://127.0.0.1:8000/ or point an OpenAI client at http://127.0.0.1:8000/v1.
    CHAT_GPT2_API_KEY=... python serve.py --host=0.0.0.0   # every API route then needs the key
SIGTERM drains (new requests get 503, those in flight finish within drain_timeout) and exits 0;
/metrics is Prometheus'.

The sampling options are the defaults for requests that do not set them; the stop string defaults to
the checkpoint's, as in sample.py. One worker thread decodes the requests together, each joining the
running batch at the next token (continuous batching, chat_gpt2/batcher.py).
"""
import ipaddress
import os

import configurator
from chat_gpt2.inference import load_engine
from chat_gpt2.sampling import sampling_defaults, sampling_help
from chat_gpt2.server import Limits, create_app, uvicorn_server

# `python serve.py --help` prints these comments; the sampling keys are per-request defaults
DEFAULTS = dict(
    out_dir="out",  # the run's folder: its newest best checkpoint is used unless --ckpt says which
    ckpt="",  # a checkpoint file (finetuned_*.pt); "" = the newest best one in out_dir
    # instead of a checkpoint: gpt2..gpt2-xl, a Hugging Face repo id or a local HF directory
    init_from="",
    host="127.0.0.1",  # loopback by default; to expose it set an api_key (and put TLS in front)
    port=8000,  # the TCP port
    # required as `Authorization: Bearer KEY` on the API ("" = $CHAT_GPT2_API_KEY, else none)
    api_key="",
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
    # seconds a request may take in all (504 past it); 0 = no limit
    request_timeout=Limits.request_timeout,
    # on SIGTERM: seconds queued and running requests get to finish (new ones: 503)
    drain_timeout=30.0,
)


def build_app(cfg):
    """The app for a script's cfg: the model loaded, the engine and the limits set."""
    engine, ckpt = load_engine(cfg)
    name = cfg["init_from"] or os.path.splitext(os.path.basename(cfg["ckpt"]))[0] or "chat-gpt2"
    limits = Limits(*(cfg[key] for key in ("max_body_bytes", "max_messages", "max_chars",
                                           "max_waiting", "max_rows", "request_timeout")))
    return create_app(engine, ckpt, cfg, model_name=name, limits=limits, api_key=api_key(cfg))


KEY_ENV = "CHAT_GPT2_API_KEY"


def api_key(cfg):
    """--api_key, else $CHAT_GPT2_API_KEY, else none: then a warning when the host is reachable from
    other machines."""
    key = cfg["api_key"] or os.environ.get(KEY_ENV, "")
    if not key and not is_loopback(cfg["host"]):
        print(f"warning: serving on {cfg['host']} without an API key: anyone who reaches the port "
              f"can use the model (set --api_key or ${KEY_ENV})", flush=True)
    return key


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="serve.py", meanings=sampling_help())
    app = build_app(cfg)
    server = uvicorn_server(app, cfg["drain_timeout"], host=cfg["host"], port=cfg["port"],
                            log_level="info")
    server.run()


if __name__ == "__main__":
    configurator.run(main)
