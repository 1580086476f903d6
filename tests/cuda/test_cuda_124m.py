"""train.py at GPT-2 124M's shape on the GPU with the device's defaults (a file of its own: the slowest test, which
pytest-xdist then starts first)."""
import math
import re

import pytest

import _lib
import helpers
from _lib import DEVICE, step_losses

pytestmark = [pytest.mark.cuda, _lib.requires_device]


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    """Plain text long enough for windows of 1024 tokens, prepared by prepare.py."""
    root = tmp_path_factory.mktemp("cuda-text")
    words = ["the", "lighthouse", "keeper", "climbed", "stairs", "every", "evening", "with", "a", "lantern"]
    text = "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "." for i in range(800))
    (root / "input.txt").write_text(text + "\n")
    _lib.script("prepare.py", str(root / "input.txt"), f"--out_dir={root / 'data'}", cwd=root)
    return str(root / "data")


def test_the_124m_shape_trains(tmp_path, text_dataset, record_property):
    """A few iterations at GPT-2 124M's shape (12 layers, 12 heads, 768 wide; block 1024) with the defaults."""
    out = tmp_path / "out"
    block, batch = (64, 2) if _lib.TINY else (1024, 8)
    p = _lib.script("train.py", *_lib.train_flags(text_dataset, str(out), **_lib.SHAPE_124M, block_size=block,
                                                  batch_size=batch, max_iters=3, eval_interval=3, eval_iters=1,
                                                  learning_rate=6e-4), cwd=tmp_path, timeout=400)
    if not _lib.TINY:
        assert re.search(r"^12[34]\.\d\dM parameters", p.stdout, re.M), p.stdout[:500]
    assert f"device {DEVICE}, dtype {_lib.default_dtype()}" in p.stdout and "memory estimate" in p.stdout
    losses = step_losses(out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    steps = [r for r in helpers.read_metrics(str(out)) if r["event"] == "step"]
    record_property("last_step", {k: steps[-1][k] for k in ("ms_per_iter", "tokens_per_s", "mfu")})
    assert steps[-1]["mfu"] > 0 and steps[-1]["tokens_per_s"] > 0
