"""The least work any tokeniser of this data must do, for bench.py --mode=prepare to compare prepare.py with:

    python tools/prepare_bare.py chat RECORDS.jsonl OUT.bin   # {prompt, completion} records: json.loads, the
                                                              # template's text, encode_ordinary_batch, uint16 writes
    python tools/prepare_bare.py text INPUT.txt OUT.bin       # 1 MiB pieces, encode_ordinary_batch, uint16 writes
    python tools/prepare_bare.py parquet IN.parquet OUT.bin   # its "text" column in record batches, each text
                                                              # encode_ordinary + <|endoftext|>, uint16 writes
    python tools/prepare_bare.py text INPUT.txt OUT.bin TOKENIZER_DIR  # a trained tokenizer's (tiktoken) encoder

No validation, no mask, no split, no hashes: prints the number of tokens written. Ids are written in
dataset.token_dtype of the tokenizer's vocabulary (uint16 for GPT-2), as prepare.py writes them.
"""
import itertools
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from chat_gpt2 import chat  # noqa: E402
from chat_gpt2.build import BATCH, TEXT_BATCH  # noqa: E402
from chat_gpt2.dataset import token_dtype  # noqa: E402
from chat_gpt2.sources import PARQUET_BATCH_ROWS  # noqa: E402
from chat_gpt2.tokenizer import load_tokenizer  # noqa: E402


def bare_chat(path, out_path, enc):
    n_tokens = 0
    with open(path, encoding="utf-8") as f, open(out_path, "wb") as out:
        while lines := list(itertools.islice(f, BATCH)):
            texts = [chat.render_text([{"role": "user", "content": r["prompt"]},
                                       {"role": "assistant", "content": r["completion"]}])
                     for r in map(json.loads, lines)]
            ids = np.fromiter(itertools.chain.from_iterable(t + [enc.eot_token] for t in enc.encode_ordinary_batch(texts)),
                              dtype=token_dtype(enc.n_vocab))
            out.write(ids.data)
            n_tokens += len(ids)
    return n_tokens


def bare_text(path, out_path, enc):
    n_tokens = 0
    with open(path, encoding="utf-8") as f, open(out_path, "wb") as out:
        while pieces := [p for p in (f.read(1 << 20) for _ in range(TEXT_BATCH)) if p]:
            ids = np.fromiter(itertools.chain.from_iterable(enc.encode_ordinary_batch(pieces)),
                              dtype=token_dtype(enc.n_vocab))
            out.write(ids.data)
            n_tokens += len(ids)
    return n_tokens


def bare_parquet(path, out_path, enc):
    import pyarrow.parquet as pq
    n_tokens = 0
    with open(out_path, "wb") as out:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
            encoded = enc.encode_ordinary_batch(batch.column(0).to_pylist())
            ids = np.fromiter(itertools.chain.from_iterable(t + [enc.eot_token] for t in encoded),
                              dtype=token_dtype(enc.n_vocab))
            out.write(ids.data)
            n_tokens += len(ids)
    return n_tokens


if __name__ == "__main__":
    kind, path, out_path, *tokenizer = sys.argv[1:]
    enc = chat.get_encoder(load_tokenizer(tokenizer[0] if tokenizer else "gpt2"))
    print({"chat": bare_chat, "text": bare_text, "parquet": bare_parquet}[kind](path, out_path, enc))
