"""Reading the data: records streamed from .jsonl / .json / .parquet files (a parquet row is a
record: sources.py) and normalised to [{"role", "content"}, ...], and plain text (.txt files,
{"text"} records, or the --text_column(s) of any record).

Each record is recognised by its keys (see docs/data.md):
    {"user", "assistant"}                 {"instruction", "input", "output"}
    {"prompt", "completion"}              {"question", "answer"}
    {"messages": [{"role", "content"}, ...], optional "system"}
    {"conversations": [{"from", "value"}, ...], optional "system"}
    {"message_tree_id", "prompt": {...}}  an OpenAssistant tree: its best-ranked branch or all paths
    {"text"}                              a plain-text document
A key of CONTENT_KEYS that the record's schema does not use is an error; any other key is metadata,
ignored. A record that cannot be used raises RecordError naming file:line (or file[index] for a
.json array) and field.
"""
import codecs
import hashlib
import json
import os
import re

from . import chat
from .errors import InputError, RecordError
from .sources import iter_parquet

# one record (a .jsonl line, a .json array element) larger than this is refused
MAX_RECORD_BYTES = 64 * 2 ** 20


# --------------------------------------------------------------------------------------------------
# Reading records: streamed, memory bounded by one record


def _lines(f, hasher):
    """(line number, bytes or None) per line of f; None for a line over MAX_RECORD_BYTES, which is
    read past in chunks, never held whole."""
    lineno = 0
    while True:
        raw = f.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        hasher.update(raw)
        lineno += 1
        if len(raw) <= MAX_RECORD_BYTES or raw.endswith(b"\n"):
            yield lineno, raw
            continue
        while raw and not raw.endswith(b"\n"):  # the rest of the oversized line
            raw = f.readline(1 << 20)
            hasher.update(raw)
        yield lineno, None


def iter_jsonl(path, hasher):
    with open(path, "rb") as f:
        for lineno, raw in _lines(f, hasher):
            where = f"{path}:{lineno}"
            if raw is None:
                yield where, RecordError(where, f"record larger than {MAX_RECORD_BYTES >> 20} MiB",
                                         "too large")
                continue
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: tolerate a BOM
            except UnicodeDecodeError as e:
                yield where, RecordError(where, f"invalid UTF-8 at byte {e.start} of the line",
                                         "invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RecordError(where, f"invalid JSON: {e.msg} (column {e.colno})",
                                         "invalid JSON")
                continue
            # integers over 4,300 digits, nesting deeper than Python's stack
            except (ValueError, RecursionError) as e:
                yield where, RecordError(where, f"unreadable JSON: {_why(e)}", "invalid JSON")
                continue
            yield where, record


def _why(error):
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# what surrogateescape makes of a byte that is not UTF-8
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _decode_one(decoder, buf, pos, where):
    """(record, end) for the JSON value at buf[pos]; a RecordError in place of the record when it
    cannot be used (invalid UTF-8, nested too deeply, a number over 4,300 digits), so that it alone
    is refused or skipped; (why, None) when such a value runs past the end of buf.
    json.JSONDecodeError propagates: perhaps just incomplete."""
    try:
        record, end = decoder.raw_decode(buf, pos)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as e:
        end = _value_end(buf, pos)
        return (_why(e) if end is None
                else RecordError(where, f"unreadable JSON: {_why(e)}", "invalid JSON")), end
    if _ESCAPED_BYTE.search(buf, pos, end):
        return RecordError(where, "invalid UTF-8 in the record", "invalid UTF-8"), end
    return record, end


def _value_end(buf, pos):
    """Where the JSON value starting at buf[pos] ends (brackets and strings followed, nothing
    decoded), or None when it runs past the end of buf."""
    depth, i = 0, pos
    while i < len(buf):
        char = buf[i]
        # a bare value (a long number) ends at the next separator
        if depth == 0 and char in ",]" and i > pos:
            return i
        if char == '"':
            i += 1
            while i < len(buf) and buf[i] != '"':
                i += 2 if buf[i] == "\\" else 1
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def iter_json_array(path, hasher, chunk_size=1 << 20):
    """Records of a JSON array, decoded incrementally (a large file never sits in memory whole).
    Structural errors (not an array, broken JSON) end the file: no record boundary to go on from."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")(
        errors="surrogateescape")  # a BOM is fine; a bad byte fails only its own record (skippable)
    # state: start, first, value, sep, end
    buf, pos, index, line, state, eof = "", 0, 0, 1, "start", False
    with open(path, "rb") as f:
        def read_more():  # append the next chunk to what is left of buf; False at end of file
            nonlocal buf, pos
            raw = f.read(chunk_size)
            hasher.update(raw)
            buf, pos = buf[pos:] + utf8.decode(raw, final=not raw), 0
            return bool(raw)

        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                line += buf[pos] == "\n"
                pos += 1
            if pos == len(buf):
                if eof:
                    break
                eof = not read_more()
                continue
            char, where = buf[pos], f"{path}[{index}] (line {line})"
            if state == "start" or state == "end":
                if state == "end" or char != "[":
                    raise InputError(f"{path}:{line}: a .json input must hold one array of records")
                state, pos = "first", pos + 1
            elif char == "]" and state in ("first", "sep"):
                state, pos = "end", pos + 1
            elif state == "sep":
                if char != ",":
                    raise InputError(f"{where}: invalid JSON: "
                                     "expected ',' or ']' after the previous record")
                state, pos = "value", pos + 1
            else:
                if len(buf) - pos > MAX_RECORD_BYTES:
                    raise InputError(f"{where}: record larger than {MAX_RECORD_BYTES >> 20} MiB")
                try:
                    record, end = _decode_one(decoder, buf, pos, where)
                except json.JSONDecodeError as e:
                    if eof:
                        error_line = line + e.lineno - 1 - buf.count("\n", 0, pos)
                        raise InputError(f"{where}: invalid JSON: {e.msg} "
                                         f"(line {error_line})") from None
                    eof = not read_more()  # the record may just be incomplete
                    continue
                if end is None or end == len(buf) and not eof:  # may go on in the next chunk
                    if eof:
                        raise InputError(f"{where}: unreadable JSON: {record}") from None
                    eof = not read_more()
                    continue
                line += buf.count("\n", pos, end)
                yield where, record
                index, pos, state = index + 1, end, "sep"
    if state != "end":
        raise InputError(f"{path}: "
                         f"{'empty file' if state == 'start' else 'the array is not closed'}: "
                         "a .json input must hold one array of records")


# --------------------------------------------------------------------------------------------------
# Plain text: a .txt file is one document, read in chunks cut where GPT-2's tokenizer would cut
# anyway

TEXT_CHUNK_BYTES = 1 << 20
# characters held while looking for a safe cut; past this a cut may change a token or two
MAX_TEXT_CARRY = 16 << 20
_WS = " \t\n\r\x0b\x0c"  # whitespace GPT-2's pre-tokenizer splits on (\s) for certain


def safe_cut(text, i):
    """True when text[:i] and text[i:] tokenise to exactly the tokens of text (GPT-2's
    pre-tokenizer pieces never cross i): one whitespace char after a non-space, then a non-space
    (not after a plain space, which joins the word that follows), or two whitespace chars cut
    between them with non-spaces around."""
    if i < 2 or i >= len(text) or text[i - 2].isspace() or text[i - 1] not in _WS:
        return False
    if not text[i].isspace():
        return text[i - 1] != " "
    return text[i] in _WS and i + 1 < len(text) and not text[i + 1].isspace()


def last_safe_cut(text):
    """The largest i with safe_cut(text, i), looking only around newlines (one per line is plenty);
    0 if none."""
    pos = len(text)
    while True:
        pos = text.rfind("\n", 0, pos)
        if pos < 1:
            return 0
        for i in (pos + 1, pos):  # just after the newline, or between it and the char before
            if safe_cut(text, i):
                return i


def iter_text(path, hasher, chunk_bytes=TEXT_CHUNK_BYTES, max_carry=MAX_TEXT_CARRY):
    """The text of a .txt file (UTF-8) as pieces of about chunk_bytes, cut only where
    tokenising the pieces one by one gives the tokens of the whole file; memory is bounded by
    max_carry characters."""
    check_input_file(path)
    utf8, buf, line = codecs.getincrementaldecoder("utf-8-sig")(), "", 1  # -sig: tolerate a BOM
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            hasher.update(raw)
            try:
                buf += utf8.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                line += buf.count("\n") + raw[:e.start].count(b"\n")
                raise InputError(f"{path}:{line}: invalid UTF-8 near byte "
                                 f"{f.tell() - len(raw) + e.start}") from None
            if not raw:
                break
            cut = last_safe_cut(buf) or (len(buf) if len(buf) > max_carry else 0)
            if cut:
                line += buf.count("\n", 0, cut)
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield buf


CHAT_KEYS = {"user", "assistant", "messages", "conversations", "instruction", "output", "prompt",
             "completion", "question", "answer", "message_tree_id"}


def is_document(record):
    """A {"text": ...} record (plain-text data) rather than a conversation."""
    return isinstance(record, dict) and "text" in record and not CHAT_KEYS & record.keys()


def document_text(record, where):
    """The text of a {"text": ...} record (plain-text data, learned whole)."""
    _check_keys(record, where, {"text"})
    return _text(record, "text", where)


JOIN = "\n"  # between the text columns (--text_column) of one example or document


def split_names(value):
    """'a,b' -> ['a', 'b']; a list stays a list (config files); '' -> [] (--text_column)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return ([v.strip() for v in str(value).split(",") if v.strip()]
            if value not in (None, "") else [])


def column_text(record, columns, where):
    """The text of a record's columns (keys) joined with JOIN: a plain-text document
    (--text_column). Each must be a string and the text not empty, else RecordError naming it."""
    if not isinstance(record, dict):
        raise RecordError(where, f"a record must be a JSON object, got {type(record).__name__}",
                          "wrong type")
    for name in columns:
        if record.get(name) is None:
            raise RecordError(where, f"field '{name}' is {'null' if name in record else 'missing'}",
                              "missing field")
        if not isinstance(record[name], str):
            raise RecordError(where, f"field '{name}' must be a string, got "
                              f"{type(record[name]).__name__}", "wrong type")
    text = JOIN.join(record[name] for name in columns)
    if not text.strip():
        raise RecordError(where, f"field '{'+'.join(columns)}' is empty", "empty content")
    return text


def check_input_file(path):
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory: pass the .jsonl / .json / .parquet / .txt files "
                         "in it")
    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")


def iter_records(path, hasher, columns=None):
    """(where, record or the RecordError it is) per record of a .jsonl / .json / .parquet file.
    A parquet file's rows hold only its columns (all must exist), or without columns those named
    like a record's content keys (other columns are metadata: not read)."""
    check_input_file(path)
    if path.endswith(".jsonl"):
        return iter_jsonl(path, hasher)
    if path.endswith(".json"):
        return iter_json_array(path, hasher)
    if path.endswith(".parquet"):
        return iter_parquet(path, hasher, columns, CONTENT_KEYS | CHAT_KEYS)
    raise InputError(f"{path}: unsupported extension (expected .jsonl, .json, .parquet or .txt)")


# --------------------------------------------------------------------------------------------------
# Schemas: every record becomes [{"role", "content"}, ...]

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
                "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
                "bot": "assistant", "model": "assistant"}


def _text(record, key, where, field=None):
    field = field or key
    if key not in record:
        raise RecordError(where, f"field '{field}' is missing", "missing field")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(where, f"field '{field}' must be a string, got {type(value).__name__}",
                          "wrong type")
    if not value.strip():
        raise RecordError(where, f"field '{field}' is empty", "empty content")
    return value


def _turns(turns, where, list_key, role_key, content_key):
    if not isinstance(turns, list) or not turns:
        raise RecordError(where, f"field '{list_key}' must be a non-empty list", "wrong type")
    messages = []
    for i, turn in enumerate(turns):
        field = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"field '{field}' must be an object", "wrong type")
        role = ROLE_ALIASES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise RecordError(where, f"field '{field}.{role_key}' has unknown role "
                                     f"{turn.get(role_key)!r}", "unknown role")
        messages.append({"role": role,
                         "content": _text(turn, content_key, where, f"{field}.{content_key}")})
    # order: an optional system message, then user/assistant alternating, ending with the assistant
    expected = "user"
    for i, m in enumerate(messages):
        if m["role"] == "system" and i == 0:
            continue
        if m["role"] != expected:
            raise RecordError(where, f"field '{list_key}[{i}].{role_key}' is {m['role']!r} "
                                     f"where {expected!r} was expected "
                                     "(roles must be: optional system, then user/assistant "
                                     "alternating)", "roles out of order")
        expected = "assistant" if expected == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise RecordError(where, f"field '{list_key}' must end with an assistant message",
                          "roles out of order")
    return messages


# Keys that carry conversation content. One that the record's schema does not use is an error (it
# would be silently lost); every other key (id, source, category, lang, metadata, ...) is metadata
# and ignored.
CONTENT_KEYS = {"user", "assistant", "messages", "conversations", "system", "instruction", "input",
                "output", "prompt", "completion", "question", "answer", "text", "chosen",
                "rejected", "context", "response", "history", "query", "conversation", "dialogue",
                "turns", "replies"}
# ignored beside instruction/output and prompt/completion (one warning)
PREFERENCE_KEYS = {"chosen", "rejected"}
PAIRS = [("user", "assistant"), ("prompt", "completion"), ("question", "answer")]


def _check_keys(record, where, used):
    """A content key that the record's schema (used) has no place for is an error naming the key."""
    extra = sorted((record.keys() & CONTENT_KEYS) - used)
    if extra:
        raise RecordError(where, f"field '{extra[0]}' is not understood beside "
                                 f"{', '.join(sorted(used))} (it would carry conversation content "
                                 f"that this schema has no place for): remove it or convert the "
                                 f"record", "unknown field")


def _with_system(record, where, list_key, messages):
    """A top-level "system" beside messages/conversations becomes the system message (an
    empty one is none)."""
    system = record.get("system", "")
    if not isinstance(system, str):
        raise RecordError(where, f"field 'system' must be a string, got {type(system).__name__}",
                          "wrong type")
    if not system.strip():
        return messages
    if messages[0]["role"] == "system":
        raise RecordError(where, f"field 'system' and a system message in '{list_key}[0]': "
                                 "give one or the other", "roles out of order")
    return [{"role": "system", "content": system}] + messages


def to_conversations(record, where, template=chat.TEMPLATE, oasst_paths="best"):
    """Recognise a record's schema by its keys and normalise it to a list of conversations (lists of
    messages): one, except for an OpenAssistant tree with oasst_paths="all" (every root-to-leaf path
    ending on an assistant reply). template["input"] says how an instruction record's input joins
    its instruction (so a renderer that sees only messages renders it too)."""
    if not isinstance(record, dict):
        raise RecordError(where, f"a record must be a JSON object, got {type(record).__name__}",
                          "wrong type")
    for list_key, role_key, content_key in (("messages", "role", "content"),
                                            ("conversations", "from", "value")):
        if list_key in record:
            _check_keys(record, where, {list_key, "system"})
            return [_with_system(record, where, list_key,
                                 _turns(record[list_key], where, list_key, role_key, content_key))]
    if "message_tree_id" in record or isinstance(record.get("prompt"), dict):
        _check_keys(record, where, {"prompt"})
        return oasst_conversations(record, where, oasst_paths)
    for user_key, assistant_key in PAIRS:
        if user_key in record or assistant_key in record:
            preference = PREFERENCE_KEYS if user_key == "prompt" else set()
            _check_keys(record, where, {user_key, assistant_key} | preference)
            return [[{"role": "user", "content": _text(record, user_key, where)},
                     {"role": "assistant", "content": _text(record, assistant_key, where)}]]
    if "instruction" in record or "output" in record:
        _check_keys(record, where, {"instruction", "input", "output"} | PREFERENCE_KEYS)
        user = _text(record, "instruction", where)
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise RecordError(where, f"field 'input' must be a string, got {type(extra).__name__}",
                              "wrong type")
        if extra.strip():
            user = user.strip() + chat.fill(template.get("input", chat.TEMPLATE["input"]),
                                            extra.strip())
        return [[{"role": "user", "content": user},
                 {"role": "assistant", "content": _text(record, "output", where)}]]
    if "text" in record:
        _check_keys(record, where, {"text"})
        raise RecordError(where, "a plain-text record ({\"text\"}) "
                                 "where a conversation is expected", "text record")
    raise RecordError(where, f"unrecognised schema, keys seen: {sorted(record)}; "
                             "expected one of user/assistant, messages, instruction/input/output, "
                             "conversations, prompt/completion, question/answer, an OpenAssistant "
                             "tree (message_tree_id, prompt) or text", "unknown schema")


def to_messages(record, where, template=chat.TEMPLATE):
    """The record's conversation (an OpenAssistant tree: its best-ranked branch)."""
    return to_conversations(record, where, template)[0]


# --------------------------------------------------------------------------------------------------
# OpenAssistant trees: {"message_tree_id", "prompt": {"role": "prompter", "text", "replies":
# [{"role": "assistant", "text", "rank", "replies": [...]}, ...]}}


def _oasst_message(node, field, where, expected):
    if not isinstance(node, dict):
        raise RecordError(where, f"field '{field}' must be an object", "wrong type")
    role = ROLE_ALIASES.get(str(node.get("role", "")).lower())
    if role != expected:
        raise RecordError(where, f"field '{field}.role' is {node.get('role')!r} where {expected!r} "
                                 f"(or {'prompter' if expected == 'user' else 'assistant'}) "
                                 "was expected", "roles out of order")
    return {"role": role, "content": _text(node, "text", where, f"{field}.text")}


def _ranked_replies(node, field, where):
    """(reply, its field) of a message's replies that are not deleted: rank 0 first, unranked ones
    after the ranked, ties in their order."""
    replies = node.get("replies", [])
    if not isinstance(replies, list):
        raise RecordError(where, f"field '{field}.replies' must be a list", "wrong type")
    kept = []
    for i, reply in enumerate(replies):
        if isinstance(reply, dict) and reply.get("deleted") is True:
            continue
        rank = reply.get("rank") if isinstance(reply, dict) else None
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
            raise RecordError(where, f"field '{field}.replies[{i}].rank' must be a number",
                              "wrong type")
        kept.append(((rank is None, rank or 0, i), reply, f"{field}.replies[{i}]"))
    return [(reply, f) for _, reply, f in sorted(kept, key=lambda k: k[0])]


def oasst_conversations(record, where, paths="best"):
    """The conversations of an OpenAssistant tree: the best-ranked branch (paths="best"), or every
    root-to-leaf path that ends on an assistant reply (paths="all"). Walked with a stack: a deep
    tree cannot overflow Python's."""
    if not isinstance(record.get("prompt"), dict):
        raise RecordError(where, "field 'prompt' must be an object (an OpenAssistant message tree)",
                          "wrong type")
    found, stack = [], [(record["prompt"], "prompt", [])]
    while stack:
        node, field, before = stack.pop()
        expected = "user" if not before or before[-1]["role"] == "assistant" else "assistant"
        path = before + [_oasst_message(node, field, where, expected)]
        replies = _ranked_replies(node, field, where)
        if paths == "best":
            replies = replies[:1]
        if not replies:
            if paths == "best":
                # the best branch ends on a question: drop it
                while path and path[-1]["role"] != "assistant":
                    path.pop()
            if path and path[-1]["role"] == "assistant":
                found.append(path)
        stack += [(reply, f, path) for reply, f in reversed(replies)]
    if not found:
        raise RecordError(where, "the OpenAssistant tree has no assistant reply",
                          "no assistant reply")
    return found


def read_conversations(path, hasher=None, template=chat.TEMPLATE):
    """Yield (where, messages) for every record of path; a bad record raises RecordError."""
    for where, record in iter_records(path, hasher or hashlib.sha256()):
        if isinstance(record, RecordError):
            raise record
        yield where, to_messages(record, where, template)
