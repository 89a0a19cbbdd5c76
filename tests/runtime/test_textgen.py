"""The Python API (runtime/textgen.py): one loaded model, completions as iterators of text pieces, the same
text `moeplan run` prints, stop strings, cancelling, the context limit, and chat prompts."""
from __future__ import annotations

import threading

import pytest

from runtime.chat import FALLBACK_STOP, fallback_text
from runtime.errors import ContextLengthError, PlanError
from runtime.plan import Plan
from runtime.textgen import TextGenerator

PLAN = """version: 1
model: {{name: t, path: {path}, dtype: float32}}
hardware: {{accelerator: cpu, cpu_threads: 1}}
cache: {{slots: 2, policy: lru, preload: none}}
miss: {{compute: cpu, transfer_min_tokens: 0, promote: true}}
prefetch: {{lookahead: 0}}
"""


@pytest.fixture(scope="module")
def model(checkpoint, tmp_path_factory) -> TextGenerator:
    folder, _ = checkpoint("mixtral")
    plan = tmp_path_factory.mktemp("textgen") / "plan.yaml"
    plan.write_text(PLAN.format(path=folder))
    return TextGenerator.load(Plan.load(plan))


def test_pieces_and_text_equal_what_generate_streams(model):
    streamed: list[str] = []
    result = model.session.generate("def main", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3,
                                    on_text=streamed.append)
    completion = model.complete("def main", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    pieces = list(completion)
    assert all(pieces) and "".join(pieces) == "".join(streamed) == completion.text
    assert completion.result is not None and completion.result.generated_ids == result.generated_ids
    assert completion.prompt_tokens == result.prompt_tokens
    assert completion.completion_tokens == len(result.generated_ids)
    ended_early = result.generated_ids[-1] in model.session.end_token_ids
    assert completion.finish_reason == ("stop" if ended_early else "length")
    assert (completion.completion_tokens == 12) or ended_early


def test_token_ids_are_taken_as_they_are(model):
    ids = model.encode("import os")
    assert model.complete(ids, max_new_tokens=5).text == model.complete("import os", max_new_tokens=5).text


def test_stop_string_ends_the_completion_before_it(model):
    # a random model: take the first prompt whose greedy text is long enough to hold a stop string inside
    prompt, free = next((p, t) for p in ("class Cache", "def main", "import os", "x")
                        if len(t := "".join(model.complete(p, max_new_tokens=16))) >= 8)
    stop = free[3:6]
    stopped = model.complete(prompt, max_new_tokens=16, stop=[stop])
    assert stopped.text == "" and stopped.finish_reason is None  # nothing runs until iterated
    assert "".join(stopped) == free[:free.find(stop)] and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < 16


def test_cancel_stops_before_the_next_token(model):
    completion = model.complete("def main", max_new_tokens=40)
    next(completion)
    done = completion.completion_tokens
    cancelled_from = threading.Thread(target=completion.cancel)  # any thread may cancel
    cancelled_from.start()
    cancelled_from.join()
    assert list(completion) == []
    assert completion.finish_reason == "cancelled" and completion.completion_tokens == done
    again = model.complete("def main", max_new_tokens=3)  # the model is free for the next one
    assert len(list(again)) >= 1 and again.completion_tokens >= 1


def test_a_prompt_that_does_not_fit_names_the_numbers(model):
    ids = model.encode("def main") * 100
    with pytest.raises(ContextLengthError, match=rf"holds 256 tokens, but {len(ids) + 10} were asked for "
                                                 rf"\({len(ids)} in the prompt, 10 to generate\)"):
        model.complete(ids, max_new_tokens=10)
    with pytest.raises(PlanError, match="outside the vocabulary"):
        model.complete([1, 10**6])


def test_chat_without_a_template_uses_the_fallback_and_stops_at_the_next_turn(model):
    messages = [{"role": "user", "content": "def main"}]
    assert not model.has_chat_template
    assert model.encode_chat(messages) == model.encode(fallback_text(messages))
    assert fallback_text(messages) == "User: def main\n\nAssistant:"
    reply = model.chat(messages, max_new_tokens=4)
    assert FALLBACK_STOP in reply.stop_strings


def test_chat_with_a_template_encodes_what_the_template_writes(model):
    tokenizer = model.tokenizer
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    try:
        ids = model.encode_chat([{"role": "user", "content": "import os"}])
        assert ids == tokenizer("<s>user\nimport os</s><s>assistant\n", add_special_tokens=False)["input_ids"]
        assert ids.count(tokenizer.bos_token_id) == 2  # the template's own, none added on top
        assert model.chat([{"role": "user", "content": "x"}]).max_new_tokens == 256 - len(
            model.encode_chat([{"role": "user", "content": "x"}]))
    finally:
        tokenizer.chat_template = None


def test_a_context_beyond_the_model_is_refused_before_loading(model):
    with pytest.raises(PlanError, match=r"--context: 100000 tokens is more than the model's max_position_embeddings "
                                        r"\(256\)"):
        TextGenerator.load(model.session.plan, model.session.loaded.model_dir, context_tokens=100_000)
