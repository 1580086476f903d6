"""Serving many requests with one model: a bounded queue and one worker thread that owns the model.

Requests (Job: prompt ids, SamplingParams, n choices) wait in a FIFO queue. The worker decodes the
running jobs together with an engine.Decoder (continuous batching): before every step, the oldest
waiting jobs join as long as their rows fit (max_rows rows in all; a job's n choices are n rows),
whatever their prompt lengths and sampling options; after it, every job whose replies are all done
leaves, freeing its rows. A job that arrives while others decode starts at the next step, not when
they end. Each row gives what it gives alone: the Decoder masks the other rows' keys, and a seeded
request draws from its own generator (tests/test_serve.py checks greedy and seeded replies alone and
batched; a batched matmul may sum in another order, which could only matter on a near-tie).

Events go to each job's emit callback from the worker thread: ("text", choice, text) while
generating, then ("done", [Completion, ...]) or ("error", message[, HTTP status]). A job whose
client left is cancelled: dropped from the queue, or, when decoding, its rows leave before the next
step. abort() ends every job with an error (a shutdown's grace period is over).

A job that asks for log-probabilities (logprobs: the number of alternatives; echo: the prompt's too)
has its replies scored once they are done (token_logprobs: one forward pass over prompt + reply, the
LM head in fp32), before its "done" event; job.scores then holds each reply's.
"""
import collections
import threading

import torch
import torch.nn.functional as F

from .device import autocast
from .engine import Decoder, Request
from .errors import UserError


class QueueFull(UserError):
    """Too many requests waiting: the client should retry later."""


class Job(Request):
    """A client's request: its events go to emit; cancelled once the client left."""

    def __init__(self, prompt, params, n, emit, logprobs=None, echo=False):
        super().__init__(prompt, params, n, on_text=self._text)
        self.emit, self.cancelled = emit, False
        self.logprobs, self.echo, self.scores = logprobs, echo, None

    def _text(self, choice, text):
        if not self.cancelled:
            self.emit("text", choice, text)


class Batcher:
    def __init__(self, engine, max_waiting=64, max_rows=8):
        self.engine, self.max_waiting, self.max_rows = engine, max_waiting, max_rows
        self.cond = threading.Condition()
        self.waiting = collections.deque()
        self.running = []  # the jobs being decoded
        self.rows = 0  # their rows
        # jobs decoded together, each time one joined (/health)
        self.batch_sizes = collections.deque(maxlen=100)
        self.closing = False
        self.thread = threading.Thread(target=self._work, name="batcher", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        with self.cond:
            self.closing = True
            for job in self.running:
                job.cancelled = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def submit(self, prompt, params, n, emit, logprobs=None, echo=False):
        """Queue a job; QueueFull when max_waiting jobs are already waiting."""
        job = Job(prompt, params, n, emit, logprobs, echo)
        with self.cond:
            if self.closing:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already; retry later")
            self.waiting.append(job)
            self.cond.notify()
        return job

    def cancel(self, job):
        """The client left: forget the job if it still waits, stop decoding it if it runs."""
        with self.cond:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)

    def busy(self):
        with self.cond:
            return bool(self.waiting or self.running)

    def abort(self, message, status=503):
        """End every waiting and running job with ("error", message, status) and take no more;
        returns how many there were."""
        with self.cond:
            jobs = [*self.waiting, *(job for job in self.running if not job.cancelled)]
            self.waiting.clear()
            self.closing = True
            for job in jobs:
                job.cancelled = True
                job.emit("error", message, status)
            self.cond.notify_all()
        return len(jobs)

    def stats(self):
        with self.cond:
            return {"waiting": len(self.waiting), "running": len(self.running), "rows": self.rows,
                    "max_rows": self.max_rows, "recent_batch_sizes": list(self.batch_sizes)[-10:]}

    def _admit(self):
        """Wait for work, then move the oldest waiting jobs that fit into running (in order: none
        overtakes a job that waits for room). The jobs that joined; None when closing."""
        with self.cond:
            while not self.waiting and not self.running and not self.closing:
                self.cond.wait()
            if self.closing:
                return None
            joining = []
            while self.waiting and self.rows + self.waiting[0].n <= self.max_rows:
                joining.append(self.waiting.popleft())
                self.rows += joining[-1].n
            self.running += joining
            if joining:
                self.batch_sizes.append(len(self.running))
            return joining

    def _work(self):
        decoder = Decoder(self.engine, self.max_rows)
        self.engine.model.eval()
        while (joining := self._admit()) is not None:
            try:
                for job in joining:
                    decoder.add(job)
                for job in self.running:
                    if job.cancelled:
                        decoder.remove(job)
                ended = decoder.step() if decoder.rows else []
            # the worker must outlive a failed step; the clients hear why
            except Exception as e:  # noqa: BLE001
                decoder, ended = Decoder(self.engine, self.max_rows), list(self.running)
                for job in ended:
                    job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            else:
                for job in ended:
                    if not job.cancelled:
                        self._score(job)
                        job.emit("done", job.replies)
            self._forget(ended)

    def _score(self, job):
        if job.logprobs is not None:
            start = 1 if job.echo else len(job.prompt)
            job.scores = [token_logprobs(self.engine, job.prompt + scored_tokens(reply), start,
                                         job.logprobs) for reply in job.replies]

    def _forget(self, ended):
        """Jobs that ended or were cancelled leave running, freeing their rows for the next ones."""
        with self.cond:
            gone = set(ended) | {job for job in self.running if job.cancelled and job.left == 0}
            self.running = [job for job in self.running if job not in gone]
            self.rows = sum(job.n for job in self.running)


def scored_tokens(reply):
    """A reply's tokens, with the special token (<|endoftext|>, <|im_end|>) that ended it."""
    return reply.tokens + ([reply.stop_token] if reply.stop_token is not None else [])


@torch.inference_mode()
def token_logprobs(engine, tokens, start, top):
    """[(token, log P(token | the tokens before it), [(alternative, its log-probability), ...
    the top most likely])] for tokens[start:] (start >= 1), from the model in windows of block_size
    (the first and the last: a reply that overflowed the context), the LM head in fp32."""
    model, block = engine.model, engine.model.config.block_size
    scores = {}
    for lo in sorted({0, max(0, len(tokens) - block)}):
        window = tokens[lo:lo + block]
        with autocast(engine.device, engine.autocast_dtype):
            hidden = model.hidden_states(torch.tensor([window], device=engine.device))[0]
        logits = F.linear(hidden.float(), model.lm_head.dense_weight().float())  # int8: scaled
        logits.masked_fill_(engine.not_tokens, float("-inf"))  # the padded vocabulary
        first = max(start, lo + 1)
        if first >= lo + len(window):
            continue
        logp = logits[first - lo - 1:-1].log_softmax(dim=-1)  # position i predicts token i + 1
        targets = torch.tensor(window[first - lo:], device=logp.device)
        chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
        best = torch.topk(logp, top) if top else None
        for k, i in enumerate(range(first, lo + len(window))):
            alternatives = (list(zip(best.indices[k].tolist(), best.values[k].tolist()))
                            if top else [])
            scores.setdefault(i, (tokens[i], chosen[k], alternatives))  # the first window sees more
    return [scores[i] for i in range(start, len(tokens))]
