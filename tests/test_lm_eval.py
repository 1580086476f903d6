"""lm-evaluation-harness on our exports, offline: its own hellaswag task (definition and preprocessing) on a
local file in HellaSwag's layout (tests/fixtures/hellaswag_mini.jsonl, made-up items), scored with its `hf`
model on an export.py directory and with its `local-completions` model against serve.py on the same weights.
Both must pick, item by item, the ending that the export's own log-likelihoods pick."""
import json
import os

import pytest
import torch

import configurator
import export
import helpers
import serve
from test_serve import Server

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks.hellaswag import utils as hellaswag_utils  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hellaswag_mini.jsonl")
TASK = "hellaswag_mini"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(export directory, checkpoint path) of one tiny random model."""
    root = tmp_path_factory.mktemp("lm_eval")
    model = helpers.tiny_model(seed=5, block_size=128)
    out = str(root / "export")
    export.export(model, out)
    return out, helpers.save_tiny_checkpoint(root / "ckpt.pt", model)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A TaskManager holding one task: lm-eval's own hellaswag.yaml with only the data swapped for the
    local file."""
    folder = tmp_path_factory.mktemp("tasks")
    official = os.path.join(os.path.dirname(hellaswag_utils.__file__), "hellaswag.yaml")
    (folder / f"{TASK}.yaml").write_text(
        f"include: {official}\ntask: {TASK}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {FIXTURE}\ntraining_split: null\n")
    # lm-eval's built-in tasks are not indexed (seconds): the include above is a path
    return TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def run_lm_eval(tasks, model, model_args):
    """(acc, acc_norm, {doc_id: [log-likelihood of each ending]}) from lm_eval.simple_evaluate."""
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], device="cpu",
                                  task_manager=tasks, log_samples=True,
                                  batch_size=4)
    metrics = out["results"][TASK]
    scores = {s["doc_id"]: [resp[0] for resp in s["filtered_resps"]] for s in out["samples"][TASK]}
    return metrics["acc,none"], metrics["acc_norm,none"], scores


def reference(export_dir):
    """Per item: (gold, log-likelihood of " " + each ending after the query), with the query and endings
    preprocessed as lm-eval's hellaswag does, computed with transformers on the export."""
    tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
    items = []
    for line in open(FIXTURE):
        doc = json.loads(line)
        text = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()}"
        query = hellaswag_utils.preprocess(f"{doc['activity_label']}: {text}")
        endings = [hellaswag_utils.preprocess(e) for e in doc["endings"]]
        ctx = tok(query)["input_ids"]
        lls = []
        for ending in endings:
            cont = tok(" " + ending)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
            lls.append(sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont)))
        items.append((int(doc["label"]), lls, [len(e) for e in endings]))
    return items


def picks(lls, lengths=None):
    return max(range(len(lls)), key=lambda i: lls[i] / (lengths[i] if lengths else 1))


@pytest.fixture(scope="module")
def hf_run(weights, tasks):
    return run_lm_eval(tasks, "hf", f"pretrained={weights[0]},dtype=float32")


def test_lm_eval_hf_on_an_export_matches_our_log_likelihoods(weights, hf_run):
    acc, acc_norm, scores = hf_run
    print(f"lm-eval hf on a random tiny export: acc {acc:.4f}, acc_norm {acc_norm:.4f}")
    items = reference(weights[0])
    assert len(scores) == len(items) == 12 and 0 <= acc <= 1 and 0 <= acc_norm <= 1
    for i, (gold, lls, lengths) in enumerate(items):
        assert scores[i] == pytest.approx(lls, abs=1e-3)
        assert picks(scores[i]) == picks(lls)
        # acc_norm: log-likelihood over the ending's length in characters (lm-eval's protocol)
        assert picks(scores[i], lengths) == picks(lls, lengths)
    assert acc == sum(picks(lls) == gold for gold, lls, _ in items) / len(items)
    assert acc_norm == sum(picks(lls, n) == gold for gold, lls, n in items) / len(items)


def test_lm_eval_local_completions_against_serve_matches_hf(weights, tasks, hf_run):
    export_dir, ckpt = weights
    cfg, _ = configurator.load(serve.DEFAULTS, [f"--ckpt={ckpt}", "--device=cpu", "--dtype=float32"])
    server = Server(serve.build_app(cfg)).start()
    try:
        acc, acc_norm, scores = run_lm_eval(
            tasks, "local-completions",
            f"base_url={server.url}/v1/completions,model=tiny,tokenizer_backend=huggingface,"
            f"tokenizer={export_dir},tokenized_requests=True,num_concurrent=1,max_retries=1")
    finally:
        server.stop()
    hf_acc, hf_acc_norm, hf_scores = hf_run
    assert (acc, acc_norm) == (hf_acc, hf_acc_norm)
    for i in hf_scores:
        assert scores[i] == pytest.approx(hf_scores[i], abs=1e-3)
        assert picks(scores[i]) == picks(hf_scores[i])


def test_eval_py_choices_equal_lm_eval(weights, hf_run):
    """eval.py --choices on the checkpoint behind the export: lm-eval's acc and acc_norm exactly."""
    import eval as eval_script
    summary = eval_script.main([f"--ckpt={weights[1]}", f"--choices={FIXTURE}", "--device=cpu"])
    assert (summary["acc"], summary["acc_norm"]) == hf_run[:2]
    items = reference(weights[0])  # the completion style: mean log-likelihood per ending token
    tok = transformers.AutoTokenizer.from_pretrained(weights[0])
    with open(FIXTURE) as f:
        docs = [json.loads(line) for line in f]
    n_tokens = [[len(tok(" " + hellaswag_utils.preprocess(e))["input_ids"]) for e in d["endings"]]
                for d in docs]
    right = sum(picks(lls, n) == gold for (gold, lls, _), n in zip(items, n_tokens))
    assert summary["acc_norm_tokens"] == right / len(items)


def test_choices_file_errors_name_the_line(tmp_path):
    from chat_gpt2.errors import InputError
    from chat_gpt2.evaluation import read_choices
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(FIXTURE).readline() + '{"ctx_a": "no endings"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not a HellaSwag-layout item \(KeyError"):
        read_choices(str(bad))
