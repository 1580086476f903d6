"""chat_gpt2/chat.py: the chat template's exact text and training mask, and its Jinja chat_template."""
import pytest

from chat_gpt2 import chat
from helpers import EOT, decode, runs


def test_exact_text_and_mask_with_system_and_two_turns():
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, mask, turns = chat.render_conversation(messages)
    assert decode(ids) == ("System: You are helpful.\nHuman: Hi!\nAssistant: Hello.\n\n"
                           "Human: 2+2?\nAssistant: 4\n\n<|endoftext|>")
    assert len(ids) == len(mask) and ids[-1] == EOT and ids.count(EOT) == 1
    learned, other = runs(ids, mask)
    assert learned == [" Hello.\n\n", " 4\n\n<|endoftext|>"]
    assert other == ["System: You are helpful.\nHuman: Hi!\nAssistant:", "Human: 2+2?\nAssistant:"]
    # the second turn starts at its "Human:" (the system message belongs to the first turn)
    assert turns[0] == 0 and len(turns) == 2 and decode(ids[turns[1]:]).startswith("Human: 2+2?")


def test_chat_template_follows_a_custom_template():
    jinja2 = pytest.importorskip("jinja2")
    template = {**chat.TEMPLATE, "user": "<user>{content}</user>\n", "assistant_label": "<bot>"}
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What's 2+2?"}, {"role": "assistant", "content": " 4 "}]
    rendered = jinja2.Environment().from_string(chat.chat_template(template)).render(
        messages=messages, add_generation_prompt=False)
    enc = chat.get_encoder()
    assert rendered == enc.decode(chat.render_conversation(messages, template)[0])


def test_a_batch_less_some_conversations_is_the_batch_of_the_others():
    """Rendered.select (how --dedupe drops repeats): ids, mask, conversation and turn offsets exactly those of
    rendering the kept conversations alone; and a batch renders each conversation as it renders alone."""
    a = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    b = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}]
    c = [{"role": "user", "content": "ünïcödé 😀?"}, {"role": "assistant", "content": "Yes: 😀."},
         {"role": "user", "content": "More"}, {"role": "assistant", "content": "No"}]
    batch = chat.render_batch([a, b, a, c, b])
    assert [batch.conversation(i) for i in range(5)] == [chat.render_conversation(m) for m in (a, b, a, c, b)]
    kept, alone = batch.select([True, False, False, True, True]), chat.render_batch([a, c, b])
    for field in ("ids", "mask", "starts", "turns"):
        assert getattr(kept, field).tolist() == getattr(alone, field).tolist(), field


def test_unicode_and_lone_surrogates_keep_the_mask_exact():
    """The mask comes from byte offsets: multi-byte characters, and a lone surrogate (valid JSON, "\\ud800"), which
    tiktoken encodes as U+FFFD, leave it exactly on the reply."""
    messages = [{"role": "user", "content": "ünï \ud800 😀"}, {"role": "assistant", "content": "é\udfffz 😀"},
                {"role": "user", "content": "ok"}, {"role": "assistant", "content": "ß"}]
    ids, mask, turns = chat.render_conversation(messages)
    assert runs(ids, mask)[0] == [" é\ufffdz 😀\n\n", " ß\n\n<|endoftext|>"]
    assert decode(ids[turns[1]:]).startswith("Human: ok")
    prompt = chat.render_prompt(messages[:3])
    assert ids[:len(prompt)] == prompt and mask[len(prompt) - 1:len(prompt) + 1] == [0, 1]
