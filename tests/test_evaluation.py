"""chat_gpt2/evaluation.py: exact match and token F1, and the val-loss windows (every assistant token scored once)."""
import pytest

import helpers
from chat_gpt2 import evaluation


@pytest.mark.parametrize("response, reference, expected", [
    ("Paris", "Paris", True),
    ("  Paris \n and more", "Paris", True),  # first line only, surrounding whitespace ignored
    ("Buenos   Aires", "Buenos Aires", True),  # inner whitespace normalised
    ("\n\nParis", "Paris", True),  # the first non-empty line
    ("paris", "Paris", False),  # case matters
    ("Paris.", "Paris", False),
    ("", "Paris", False),
])
def test_exact_match(response, reference, expected):
    assert evaluation.exact_match(response, reference) is expected


@pytest.mark.parametrize("response, reference, expected", [
    ("The cat sat.", "the cat sat", 1.0),  # lowercased, punctuation stripped
    ("a b c d", "a b", 2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2)),  # precision 1/2, recall 1 -> 2/3
    ("a a b", "a b b", 2 / 3),  # bags: min counts a:1 b:1 -> 2 common of 3 and 3
    ("x y", "a b", 0.0),
    ("", "", 1.0),
    ("...", "a", 0.0),
])
def test_token_f1(response, reference, expected):
    assert evaluation.token_f1(response, reference) == pytest.approx(expected)


@pytest.mark.parametrize("block_size", [4, 9, 64])
def test_windows_score_every_assistant_token_once(tiny_dataset, block_size):
    d = helpers.read_split(tiny_dataset, "val")
    ends = list(d["convs"][1:]) + [len(d["ids"])]
    scored = []
    for start, tokens, mask in evaluation.conversation_windows(d["ids"], d["mask"], d["convs"], d["turns"], block_size):
        assert len(tokens) <= block_size + 1 and (tokens == d["ids"][start:start + len(tokens)]).all()
        conv = max(i for i, a in enumerate(d["convs"]) if a <= start)
        assert start + len(tokens) <= ends[conv]  # inside one conversation
        scored += [start + 1 + j for j in mask.nonzero()[0]]
    assert sorted(scored) == sorted(set(scored))  # no token twice
    expected = [i for i in range(len(d["ids"])) if d["mask"][i] and i not in set(d["convs"])]
    assert sorted(scored) == expected
