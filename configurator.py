"""Command-line / config-file configuration shared by every script (train.py, prepare.py, ...).

Convention (as in nanoGPT): a script defines a dict of defaults, then the command line is applied to
it left to right, later items overriding earlier ones:

    python train.py config/finetune.py --batch_size=8 --compile false

* A positional argument (not starting with ``--``) is a config file: a Python file executed in a
  fresh namespace. Every name it assigns must be a key of the defaults, except names starting with
  ``_`` and imported modules / functions / classes, which are ignored.
* A script that reads input files names the list key that holds them (``inputs="inputs"``,
  prepare.py): then a positional argument that does not end in ``.py`` is an input file, appended to
  that list in order (``python prepare.py a.jsonl b.json --out_dir=data/chat``); one ending in
  ``.py`` is still a config file.
* ``--key=value`` or ``--key value`` overrides one key (the value is split off at the first ``=``,
  so ``--prompt=a=b`` gives ``"a=b"``). A bare ``--flag`` sets a bool key to True; ``--flag value``
  only consumes ``value`` if it is a bool literal. A value that itself starts with ``--`` needs the
  ``=`` form.
* Values are converted to the type of the default: str is taken raw, bool accepts
  true/false/1/0/yes/no/on/off, int accepts integral numbers (``1e4``), float accepts any number
  (``0``), and None / list / tuple / dict defaults go through ``ast.literal_eval`` (falling back to
  the raw string).

Unlike nanoGPT's configurator, unknown keys (with a "did you mean" hint), bad values and broken
config files raise ConfigError instead of being silently accepted, and nothing is printed while
parsing.
"""
import ast
import difflib
import inspect
import io
import os
import sys
import tokenize

from chat_gpt2.errors import ConfigError, UserError

_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False,
          "no": False, "off": False}


def _type_name(default):
    return "any" if default is None else type(default).__name__


def _unknown_key(key, defaults, where=""):
    close = difflib.get_close_matches(key, list(defaults), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def parse_bool(text):
    """True/False for a boolean word (true/false/1/0/yes/no/on/off, any case), else None."""
    return _BOOLS.get(text.strip().lower())


def _from_text(text, default):
    """Command-line text as a Python value guided by the default's type (checked by _fit later)."""
    if isinstance(default, bool):
        value = parse_bool(text)
        if value is None:
            raise ValueError(text)
        return value
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            return float(text)  # '1e4' -> 10000.0, accepted by _fit if integral
    if isinstance(default, float):
        return float(text)
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _fit(value, default):
    """Return the Python value coerced to the default's type; raise ValueError if it doesn't fit."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = is_number and (isinstance(value, int) or value.is_integer())
        value = int(value) if ok else value
    elif isinstance(default, float):
        ok = is_number
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # None / list / tuple / dict / anything else: free-form, keep list vs tuple as given
        ok = True
        if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
            value = type(default)(value)
    if not ok:
        raise ValueError(value)
    return value


def _convert(key, value, defaults, where, from_cli):
    default = defaults[key]
    try:
        return _fit(_from_text(value, default) if from_cli else value, default)
    except (ValueError, OverflowError):
        expected = _type_name(default)
        raise ConfigError(f"invalid value {value!r} for {where} (expected {expected})") from None


def _read_config_file(path, defaults):
    """Exec a config file in a fresh namespace; the {key: value} pairs it assigns, in order."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        hint = ("" if path.endswith(".py")
                else " (config files are .py files; options go as --key=value)")
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}{hint}") from None
    namespace = {"__file__": path, "__name__": "__config__"}
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:
        raise ConfigError(f"error in config file '{path}': {type(e).__name__}: {e}") from e
    items = {}
    for name, value in namespace.items():
        code = inspect.ismodule(value) or inspect.isroutine(value) or inspect.isclass(value)
        if name.startswith("_") or code:
            continue
        if name not in defaults:
            raise _unknown_key(name, defaults, f" in config file '{path}'")
        items[name] = _convert(name, value, defaults, f"'{name}' in config file '{path}'",
                               from_cli=False)
    return items


def _read_flag(argv, i, defaults):
    """Parse the flag at argv[i]; return (key, value, index of the next unread arg)."""
    body = argv[i][2:]
    key, eq, text = body.partition("=")
    if not key:
        raise ConfigError(f"malformed argument '{argv[i]}' (expected --key=value)")
    if key not in defaults:
        raise _unknown_key(key, defaults)
    nxt = argv[i + 1] if i + 1 < len(argv) else None
    if eq:
        i += 1
    elif isinstance(defaults[key], bool):
        if nxt is not None and parse_bool(nxt) is not None:
            text, i = nxt, i + 2
        else:
            text, i = "true", i + 1
    elif nxt is None or nxt.startswith("--"):
        raise ConfigError(f"missing value for --{key} (expected {_type_name(defaults[key])})")
    else:
        text, i = nxt, i + 2
    return key, _convert(key, text, defaults, f"--{key}", from_cli=True), i


def parse(defaults: dict, argv: list[str], inputs: str | None = None) -> tuple[dict, dict]:
    """Return (config, explicit) where config = defaults updated by argv, and explicit = the
    keys->values that config files or command-line flags set (in order applied). Raises ConfigError
    on bad input. inputs: the key (a list in defaults) that collects the positional arguments not
    ending in .py, in order."""
    if inputs is not None and not isinstance(defaults.get(inputs), (list, tuple)):
        raise TypeError(f"inputs={inputs!r} must name a list key of the defaults")
    config, explicit = dict(defaults), {}
    i = 0
    while i < len(argv):
        if argv[i].startswith("--"):
            key, value, i = _read_flag(argv, i, defaults)
            items = {key: value}
        elif inputs is not None and not argv[i].endswith(".py"):
            items, i = {inputs: [*config[inputs], argv[i]]}, i + 1
        else:
            items, i = _read_config_file(argv[i], defaults), i + 1
        for key, value in items.items():
            config[key] = value
            explicit.pop(key, None)  # re-insert so the order reflects the last application
            explicit[key] = value
    return config, explicit


def check_saved(defaults, saved, where):
    """A config stored earlier (a checkpoint's), checked like a config file: every value must fit
    its default's type (ConfigError naming `where` and the key otherwise). Keys this version does
    not know are dropped, with a note."""
    if not isinstance(saved, dict):
        raise ConfigError(f"{where} is not a dict of settings")
    unknown = sorted(k for k in saved if k not in defaults)
    if unknown:
        print(f"note: ignoring settings unknown to this version in {where}: "
              f"{', '.join(map(str, unknown))}", file=sys.stderr)
    return {k: _convert(k, v, defaults, f"'{k}' in {where}", from_cli=False)
            for k, v in saved.items() if k in defaults}


def key_meanings(path, name="DEFAULTS"):
    """{key: meaning} from the comments beside `NAME = dict(key=value, ...)` in a script's source: a
    key's meaning is the comment ending its line, else the nearest comment line above it. The
    defaults document themselves once, in the code, and --help shows them."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        return {}
    call = next((node.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                 and any(getattr(t, "id", None) == name for t in node.targets)), None)
    if call is None:
        return {}
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("# ").strip()
                for t in tokens if t.type == tokenize.COMMENT}
    meanings = {}
    for kw in call.keywords:
        # **entries built elsewhere: their meanings come with them (load\'s meanings)
        if kw.arg is None:
            continue
        line = kw.value.end_lineno
        trailing = comments.get(line) if not lines[line - 1].lstrip().startswith("#") else None
        above = next((comments[n] for n in range(kw.lineno - 1, call.lineno - 1, -1)
                      if lines[n - 1].lstrip().startswith("#")), None)
        if trailing or above:
            meanings[kw.arg] = trailing or above
    return meanings


def _help_text(defaults, prog, meanings=None, inputs=None):
    files = f" [{inputs.upper()} ...]" if inputs else ""
    lines = [
        f"usage: {prog} [config.py ...]{files} [--key=value | --key value | --flag ...]",
        "",
        "Config files (.py) and --key=value overrides are applied left to right"
        + (f"; the other positional arguments are --{inputs}" if inputs else "")
        + ". Keys, defaults, meanings:",
    ]
    for key, default in defaults.items():
        meaning = (meanings or {}).get(key)
        lines.append(f"  --{key}={default!r}  ({_type_name(default)})"
                     + (f"  {meaning}" if meaning else ""))
    return "\n".join(lines)


def load(defaults: dict, argv: list[str] | None = None, prog: str = "", inputs: str | None = None,
         meanings: dict | None = None) -> tuple[dict, dict]:
    """CLI wrapper: argv defaults to sys.argv[1:]. `--help`/`-h` prints every key with its default,
    type and meaning (the comment beside it in the running script's DEFAULTS, else meanings[key]:
    keys built elsewhere, such as the sampling options or bench.py's modes) and exits 0. A
    ConfigError is printed to stderr as `error: ...` (no traceback) and exits with status 2.
    inputs: as in parse."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not prog and sys.argv:
        prog = os.path.basename(sys.argv[0])
    if "--help" in argv or "-h" in argv:
        script = getattr(sys.modules.get("__main__"), "__file__", None)
        meanings = {**(meanings or {}), **(key_meanings(script) if script else {})}
        print(_help_text(defaults, prog, meanings, inputs))
        sys.exit(0)
    try:
        return parse(defaults, argv, inputs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(main):
    """Entry-point wrapper for the scripts: the project's own errors (errors.UserError: bad config,
    input, files, checkpoints) end in a one-line `error: ...` on stderr with exit status 1; anything
    else is a bug and keeps its traceback. Ctrl-C exits with 130."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
