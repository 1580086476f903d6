"""Serving many requests with one model: a bounded queue and one worker thread that owns the model.

Requests (Job: prompt ids, SamplingParams, n choices) wait in a FIFO queue. The worker takes the oldest job and,
with it, every other waiting job that can share its batch: the same prompt length and the same SamplingParams,
and greedy or unseeded (a seeded sampler draws from one generator per batch, so a seeded request batched with
others would not repeat what it gives alone). The batch is decoded by Engine.complete_batch, step by step for all
its rows together; new requests wait for the next batch. Greedy rows give the same tokens alone or batched: rows
of one length need no padding or mask, so a row sees exactly the context it sees alone (tests/test_serve.py checks
the replies; a batched matmul may sum in another order, which could only matter on a near-tie of two logits).

Events go to each job's emit callback from the worker thread: ("text", choice, text) while generating, then
("done", [Completion, ...]) or ("error", message). A job whose client left is cancelled: dropped from the queue,
or, when decoding, its batch ends at the next step once every job in it is cancelled.
"""
import collections
import threading

from .errors import UserError


class QueueFull(UserError):
    """Too many requests waiting: the client should retry later."""


class Job:
    def __init__(self, prompt, params, n, emit):
        self.prompt, self.params, self.n, self.emit = list(prompt), params, n, emit
        self.cancelled = False

    def key(self):
        """Jobs with equal keys can be decoded as one batch; None: this job runs alone."""
        if self.params.temperature > 0 and self.params.seed is not None:
            return None
        return len(self.prompt), self.params


class Batcher:
    def __init__(self, engine, max_waiting=64, max_rows=8):
        self.engine, self.max_waiting, self.max_rows = engine, max_waiting, max_rows
        self.cond = threading.Condition()
        self.waiting = collections.deque()
        self.running = []  # the jobs of the batch being decoded
        self.batch_sizes = collections.deque(maxlen=100)  # jobs per recent batch, shown by /health
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

    def submit(self, prompt, params, n, emit):
        """Queue a job; QueueFull when max_waiting jobs are already waiting."""
        job = Job(prompt, params, n, emit)
        with self.cond:
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

    def stats(self):
        with self.cond:
            return {"waiting": len(self.waiting), "running": len(self.running),
                    "recent_batch_sizes": list(self.batch_sizes)[-10:]}

    def _take_batch(self):
        """The oldest waiting job and those that can join it (up to max_rows rows); None when closing."""
        with self.cond:
            while not self.waiting and not self.closing:
                self.cond.wait()
            if self.closing:
                return None
            first = self.waiting.popleft()
            jobs, rows = [first], first.n
            if first.key() is not None:
                for job in list(self.waiting):
                    if job.key() == first.key() and rows + job.n <= self.max_rows:
                        self.waiting.remove(job)
                        jobs.append(job)
                        rows += job.n
            self.running = jobs
            self.batch_sizes.append(len(jobs))
            return jobs

    def _work(self):
        while True:
            jobs = self._take_batch()
            if jobs is None:
                return
            try:
                self._decode(jobs)
            finally:
                with self.cond:
                    self.running = []

    def _decode(self, jobs):
        """Decode the jobs as one batch and send each its events."""
        owners = [(job, choice) for job in jobs for choice in range(job.n)]  # batch row -> (job, choice index)

        def on_text(row, text):
            job, choice = owners[row]
            if not job.cancelled:
                job.emit("text", choice, text)

        params = jobs[0].params
        generator = params.generator(self.engine.device) if len(jobs) == 1 else None
        try:
            rows = self.engine.complete_batch([job.prompt for job, _ in owners], params, on_text, generator,
                                              cancelled=lambda: all(job.cancelled for job in jobs))
        except Exception as e:  # noqa: BLE001  (the worker must outlive a failed batch; the clients hear why)
            for job in jobs:
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            return
        start = 0
        for job in jobs:
            if not job.cancelled:
                job.emit("done", rows[start:start + job.n])
            start += job.n
