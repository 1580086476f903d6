"""Tests for configurator.py: config files + --key=value overrides, applied left to right."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ConfigError, load, parse  # noqa: E402
from helpers import REPO  # noqa: E402

DEFAULTS = {
    "out_dir": "out",
    "prompt": "\n",
    "init_from": "scratch",
    "max_iters": 5000,
    "batch_size": 12,
    "learning_rate": 6e-4,
    "min_lr": 6e-5,
    "dropout": 0.1,
    "compile": True,
    "wandb_log": False,
    "device": None,
    "betas": (0.9, 0.95),
    "layers": [1, 2],
    "extra": {"a": 1},
}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- basics

def test_no_args_returns_copy_of_defaults():
    config, explicit = parse(DEFAULTS, [])
    assert config == DEFAULTS and config is not DEFAULTS
    assert explicit == {}


def test_defaults_not_mutated():
    before = dict(DEFAULTS)
    parse(DEFAULTS, ["--max_iters=1", "--dropout=0.3"])
    assert DEFAULTS == before


def test_key_equals_value_and_key_space_value():
    config, explicit = parse(DEFAULTS, ["--batch_size=8", "--out_dir", "runs/x"])
    assert config["batch_size"] == 8 and config["out_dir"] == "runs/x"
    assert explicit == {"batch_size": 8, "out_dir": "runs/x"}


def test_explicit_is_in_order_applied_and_later_wins(tmp_path):
    cfg = write(tmp_path, "c.py", "batch_size = 4\ndropout = 0.2\n")
    config, explicit = parse(DEFAULTS, ["--batch_size=1", cfg, "--max_iters=7"])
    assert config["batch_size"] == 4
    assert list(explicit.items()) == [("batch_size", 4), ("dropout", 0.2), ("max_iters", 7)]
    config, explicit = parse(DEFAULTS, [cfg, "--batch_size=99"])
    assert config["batch_size"] == 99 and list(explicit) == ["dropout", "batch_size"]


def test_parse_prints_nothing(tmp_path, capsys):
    cfg = write(tmp_path, "c.py", "batch_size = 4\n")
    parse(DEFAULTS, [cfg, "--dropout=0", "--compile"])
    out, err = capsys.readouterr()
    assert out == "" and err == ""


# ---------------------------------------------------------------- the nanoGPT bugs that must not come back

def test_dropout_zero_is_float():
    config, _ = parse(DEFAULTS, ["--dropout=0"])
    assert config["dropout"] == 0.0 and type(config["dropout"]) is float


def test_min_lr_zero_is_float():
    config, _ = parse(DEFAULTS, ["--min_lr=0"])
    assert config["min_lr"] == 0.0 and type(config["min_lr"]) is float


def test_max_iters_scientific_notation_is_int():
    config, _ = parse(DEFAULTS, ["--max_iters=1e4"])
    assert config["max_iters"] == 10000 and type(config["max_iters"]) is int


def test_compile_false_lowercase():
    config, _ = parse(DEFAULTS, ["--compile=false"])
    assert config["compile"] is False


def test_value_containing_equals_splits_on_first_only():
    config, _ = parse(DEFAULTS, ["--prompt=a=b"])
    assert config["prompt"] == "a=b"
    config, _ = parse(DEFAULTS, ["--prompt", "x=1=2"])
    assert config["prompt"] == "x=1=2"


def test_typo_in_config_file_is_an_error(tmp_path):
    cfg = write(tmp_path, "typo.py", "learning_rat = 1e-3\n")
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, [cfg])
    msg = str(e.value)
    assert "learning_rat" in msg and "typo.py" in msg and "did you mean 'learning_rate'" in msg


# ---------------------------------------------------------------- unknown keys

def test_unknown_flag_suggests_closest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse(DEFAULTS, ["--learning_rat=1e-3"])


def test_unknown_flag_without_close_match_has_no_hint():
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, ["--zzzzzz=1"])
    assert "'zzzzzz'" in str(e.value) and "did you mean" not in str(e.value)


def test_bare_double_dash_is_an_error():
    with pytest.raises(ConfigError, match="malformed"):
        parse(DEFAULTS, ["--"])


# ---------------------------------------------------------------- str values

def test_str_value_is_raw_text():
    config, _ = parse(DEFAULTS, ["--prompt", "42", "--init_from=hi there", "--out_dir=None"])
    assert config["prompt"] == "42" and config["init_from"] == "hi there" and config["out_dir"] == "None"


def test_str_empty_value_and_value_ending_in_py():
    config, _ = parse(DEFAULTS, ["--prompt=", "--init_from", "model.py"])
    assert config["prompt"] == "" and config["init_from"] == "model.py"


def test_str_value_starting_with_dashes_needs_equals():
    config, _ = parse(DEFAULTS, ["--prompt=--x"])
    assert config["prompt"] == "--x"
    with pytest.raises(ConfigError, match="missing value for --prompt"):
        parse(DEFAULTS, ["--prompt", "--x"])


def test_negative_number_as_separate_arg():
    config, _ = parse(DEFAULTS, ["--max_iters", "-1", "--dropout", "-0.5"])
    assert config["max_iters"] == -1 and config["dropout"] == -0.5


# ---------------------------------------------------------------- bool values

@pytest.mark.parametrize("text,expected", [
    ("True", True), ("False", False), ("true", True), ("false", False), ("1", True), ("0", False),
    ("yes", True), ("no", False), ("on", True), ("off", False), ("FALSE", False),
])
def test_bool_literals(text, expected):
    assert parse(DEFAULTS, [f"--compile={text}"])[0]["compile"] is expected
    assert parse(DEFAULTS, ["--wandb_log", text])[0]["wandb_log"] is expected


def test_bool_bad_literal_is_error():
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, ["--compile=maybe"])
    assert "--compile" in str(e.value) and "'maybe'" in str(e.value) and "bool" in str(e.value)
    with pytest.raises(ConfigError):
        parse(DEFAULTS, ["--compile="])


def test_bare_bool_flag_sets_true():
    config, explicit = parse(DEFAULTS, ["--wandb_log"])
    assert config["wandb_log"] is True and explicit == {"wandb_log": True}


def test_bare_bool_flag_followed_by_flag():
    config, _ = parse(DEFAULTS, ["--wandb_log", "--batch_size=3"])
    assert config["wandb_log"] is True and config["batch_size"] == 3


def test_bare_bool_flag_does_not_consume_config_file(tmp_path):
    cfg = write(tmp_path, "c.py", "batch_size = 4\n")
    config, _ = parse(DEFAULTS, ["--wandb_log", cfg])
    assert config["wandb_log"] is True and config["batch_size"] == 4


def test_bool_flag_does_not_consume_non_bool_next_arg():
    # 'maybe' is not a bool literal, so it is left alone and then treated as a (missing) config file
    with pytest.raises(ConfigError, match="maybe"):
        parse(DEFAULTS, ["--compile", "maybe"])


def test_bare_non_bool_flag_is_error():
    with pytest.raises(ConfigError, match=r"missing value for --max_iters \(expected int\)"):
        parse(DEFAULTS, ["--max_iters"])
    with pytest.raises(ConfigError, match="missing value for --device"):
        parse(DEFAULTS, ["--device", "--compile"])


# ---------------------------------------------------------------- int / float values

def test_int_values():
    assert parse(DEFAULTS, ["--max_iters=300"])[0]["max_iters"] == 300
    assert parse(DEFAULTS, ["--max_iters=2.0"])[0]["max_iters"] == 2
    assert parse(DEFAULTS, ["--max_iters=1_000"])[0]["max_iters"] == 1000


@pytest.mark.parametrize("text", ["1.5", "abc", "1e-4", "inf", "nan", "", "True"])
def test_int_bad_values(text):
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, [f"--max_iters={text}"])
    msg = str(e.value)
    assert "--max_iters" in msg and repr(text) in msg and "int" in msg


def test_float_values():
    config, _ = parse(DEFAULTS, ["--learning_rate=3e-4", "--dropout", "1", "--min_lr=.5"])
    assert config["learning_rate"] == 3e-4 and config["min_lr"] == 0.5
    assert config["dropout"] == 1.0 and type(config["dropout"]) is float


def test_float_bad_value():
    with pytest.raises(ConfigError, match=r"invalid value 'fast' for --learning_rate \(expected float\)"):
        parse(DEFAULTS, ["--learning_rate=fast"])


# ---------------------------------------------------------------- None / list / tuple / dict values

def test_none_default_uses_literal_eval_with_fallback():
    assert parse(DEFAULTS, ["--device=42"])[0]["device"] == 42
    assert parse(DEFAULTS, ["--device=None"])[0]["device"] is None
    assert parse(DEFAULTS, ["--device=cuda:0"])[0]["device"] == "cuda:0"
    assert parse(DEFAULTS, ["--device='cpu'"])[0]["device"] == "cpu"


def test_container_defaults():
    config, _ = parse(DEFAULTS, ["--betas=(0.8, 0.9)", "--layers=[3]", "--extra={'b': 2}"])
    assert config["betas"] == (0.8, 0.9) and config["layers"] == [3] and config["extra"] == {"b": 2}


def test_list_vs_tuple_follows_default():
    config, _ = parse(DEFAULTS, ["--betas=[0.8, 0.9]", "--layers=(4, 5)"])
    assert config["betas"] == (0.8, 0.9) and config["layers"] == [4, 5]


def test_container_unparseable_falls_back_to_string():
    assert parse(DEFAULTS, ["--layers=[1,"])[0]["layers"] == "[1,"


# ---------------------------------------------------------------- config files

def test_config_file_sets_keys_and_ignores_private_imports_functions_classes(tmp_path):
    cfg = write(tmp_path, "c.py", (
        "import math\n"
        "from os import path\n"
        "_scale = 2\n"
        "def helper(x):\n    return x * 2\n"
        "class Thing:\n    pass\n"
        "batch_size = helper(_scale)\n"
        "learning_rate = math.sqrt(4) * 1e-4\n"
        "init_from = 'gpt2'\n"
    ))
    config, explicit = parse(DEFAULTS, [cfg])
    assert explicit == {"batch_size": 4, "learning_rate": 2e-4, "init_from": "gpt2"}
    assert config["batch_size"] == 4


def test_config_file_runs_in_fresh_namespace(tmp_path):
    cfg = write(tmp_path, "c.py", "batch_size = max_iters\n")  # defaults are not visible to the file
    with pytest.raises(ConfigError, match="NameError"):
        parse(DEFAULTS, [cfg])


def test_config_file_values_are_coerced(tmp_path):
    cfg = write(tmp_path, "c.py", "dropout = 0\nmin_lr = 0\nmax_iters = 1e4\nbetas = [0.5, 0.6]\n")
    config, _ = parse(DEFAULTS, [cfg])
    assert type(config["dropout"]) is float and config["dropout"] == 0.0
    assert type(config["min_lr"]) is float
    assert type(config["max_iters"]) is int and config["max_iters"] == 10000
    assert config["betas"] == (0.5, 0.6)


@pytest.mark.parametrize("line,key", [
    ("max_iters = 1.5", "max_iters"),
    ("max_iters = '100'", "max_iters"),
    ("compile = 'false'", "compile"),
    ("compile = 1", "compile"),
    ("dropout = True", "dropout"),
    ("out_dir = 3", "out_dir"),
])
def test_config_file_bad_types(tmp_path, line, key):
    cfg = write(tmp_path, "bad.py", line + "\n")
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, [cfg])
    assert "bad.py" in str(e.value) and f"'{key}'" in str(e.value) and "expected" in str(e.value)


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(ConfigError, match="nope.py"):
        parse(DEFAULTS, [missing])


def test_config_file_raising_exception(tmp_path):
    cfg = write(tmp_path, "boom.py", "batch_size = 1 / 0\n")
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, [cfg])
    assert "boom.py" in str(e.value) and "ZeroDivisionError" in str(e.value)


def test_config_file_syntax_error(tmp_path):
    cfg = write(tmp_path, "syntax.py", "batch_size = = 3\n")
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, [cfg])
    assert "syntax.py" in str(e.value) and "SyntaxError" in str(e.value)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- positional input files (inputs=KEY)

FILE_DEFAULTS = {"inputs": [], "out_dir": "data/chat", "seed": 1337, "skip_invalid": False, "dedupe": False}


def test_inputs_collect_the_positional_arguments_in_order():
    argv = ["a.jsonl", "--out_dir=data/x", "b.json", "--seed", "3", "c.txt"]
    config, explicit = parse(FILE_DEFAULTS, argv, inputs="inputs")
    assert config["inputs"] == ["a.jsonl", "b.json", "c.txt"] and FILE_DEFAULTS["inputs"] == []
    assert config["out_dir"] == "data/x" and config["seed"] == 3
    assert list(explicit) == ["out_dir", "seed", "inputs"] and explicit["inputs"] == ["a.jsonl", "b.json", "c.txt"]


def test_inputs_a_py_positional_is_still_a_config_file(tmp_path):
    cfg = write(tmp_path, "prep.py", "seed = 7\ninputs = ['from_config.jsonl']\n")
    config, _ = parse(FILE_DEFAULTS, [cfg, "more.jsonl"], inputs="inputs")
    assert config["seed"] == 7 and config["inputs"] == ["from_config.jsonl", "more.jsonl"]


def test_inputs_bare_bool_flags_do_not_consume_an_input():
    config, _ = parse(FILE_DEFAULTS, ["--skip_invalid", "a.jsonl", "--dedupe"], inputs="inputs")
    assert config["skip_invalid"] is True and config["dedupe"] is True and config["inputs"] == ["a.jsonl"]
    config, _ = parse(FILE_DEFAULTS, ["--skip_invalid", "false", "a.jsonl"], inputs="inputs")
    assert config["skip_invalid"] is False and config["inputs"] == ["a.jsonl"]


def test_without_inputs_every_positional_is_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file 'a.jsonl'.*config files are .py files"):
        parse(FILE_DEFAULTS, ["a.jsonl"])
    cfg = write(tmp_path, "c.py", "seed = 2\n")
    assert parse(FILE_DEFAULTS, [cfg])[0]["seed"] == 2  # train.py's `config/x.py` positionals


def test_inputs_must_name_a_list_key():
    with pytest.raises(TypeError, match="list key"):
        parse(FILE_DEFAULTS, ["a.jsonl"], inputs="out_dir")


def test_load_help_with_inputs_names_them_in_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        load(FILE_DEFAULTS, ["--help"], prog="prepare.py", inputs="inputs",
             meanings={"inputs": "the files to read", "seed": "the seed"})
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prepare.py [config.py ...] [INPUTS ...] [--key=value")
    assert "  --inputs=[]  (list)  the files to read" in out and "  --seed=1337  (int)  the seed" in out
    assert "  --dedupe=False  (bool)\n" in out  # no meaning given: none shown


# ---------------------------------------------------------------- load()

def test_load_success_uses_given_argv():
    config, explicit = load(DEFAULTS, ["--batch_size=2"], prog="train.py")
    assert config["batch_size"] == 2 and explicit == {"batch_size": 2}


def test_load_defaults_to_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--dropout=0"])
    config, explicit = load(DEFAULTS)
    assert explicit == {"dropout": 0.0}


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_load_help_exits_zero_and_lists_every_key(capsys, flag):
    with pytest.raises(SystemExit) as e:
        load(DEFAULTS, ["--batch_size=2", flag], prog="train.py")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: train.py" in out
    for key, default in DEFAULTS.items():
        assert f"  --{key}={default!r}  (" in out
    assert "  --max_iters=5000  (int)" in out
    assert "  --prompt='\\n'  (str)" in out
    assert "  --device=None  (any)" in out


def test_load_error_exits_two_without_traceback(capsys):
    with pytest.raises(SystemExit) as e:
        load(DEFAULTS, ["--learning_rat=1"], prog="train.py")
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: unknown config key 'learning_rat'")
    assert "did you mean 'learning_rate'" in captured.err
    assert "Traceback" not in captured.err


def test_load_bad_config_file_exits_two(tmp_path, capsys):
    cfg = write(tmp_path, "typo.py", "batchsize = 3\n")
    with pytest.raises(SystemExit) as e:
        load(DEFAULTS, [cfg])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "typo.py" in err and "batch_size" in err


@pytest.mark.parametrize("name", ["train", "sample", "eval", "export", "serve", "bench", "prepare"])
def test_every_key_has_a_meaning_in_help(name):
    """--help shows each key's meaning: the comment beside its default in the script, or for keys
    built elsewhere (the sampling options, from SamplingParams) the help the script passes to load."""
    import importlib
    from configurator import key_meanings
    script = os.path.join(REPO, f"{name}.py")
    defaults = importlib.import_module(name).DEFAULTS
    meanings = key_meanings(script)
    assert set(meanings) <= set(defaults) and all(len(m) > 8 for m in meanings.values())
    p = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0
    lines = {ln.split("=", 1)[0].strip()[2:]: ln for ln in p.stdout.splitlines() if ln.startswith("  --")}
    assert set(lines) == set(defaults)
    shown = {key: line.split(")  ", 1)[1] if ")  " in line else "" for key, line in lines.items()}
    assert all(len(m) > 8 for m in shown.values()), sorted(k for k, m in shown.items() if len(m) <= 8)
    assert all(shown[key] == meaning for key, meaning in meanings.items())
