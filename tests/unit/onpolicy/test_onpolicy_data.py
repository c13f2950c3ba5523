"""``PromptCollator``: TRL-style rows to left-padded prompts and right-padded completions."""

import pytest

from kdistill.onpolicy import PromptCollator


class Chars:
    """A tokenizer stand-in: one id per lowercase letter (a = 1), EOS 0, a toy chat template."""

    eos_token_id = 0
    pad_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 96 for c in text if c.isalpha()]}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        ids = []
        for message in messages:
            ids += [27 if message["role"] == "user" else 28] + self(message["content"])["input_ids"]
        return {"input_ids": ids + ([28] if add_generation_prompt else [])}


def test_text_rows_truncation_and_eos():
    collate = PromptCollator(Chars(), max_prompt_length=2, max_completion_length=3)
    batch = collate([{"prompt": "abc", "completion": "de"}, {"prompt": "f", "completion": "ghij"}])
    assert batch["prompt_input_ids"].tolist() == [[2, 3], [0, 6]]  # the last prompt tokens
    assert batch["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    # EOS appended, then cut to the first 3 completion tokens
    assert batch["completion_input_ids"].tolist() == [[4, 5, 0], [7, 8, 9]]
    assert batch["completion_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]


def test_no_second_eos_and_prompt_only_rows():
    collate = PromptCollator(Chars())
    batch = collate([{"prompt": "a", "completion": "b"}])
    assert batch["completion_input_ids"].tolist() == [[2, 0]]
    assert PromptCollator(Chars(), add_eos=False)([{"prompt": "a", "completion": "b"}])[
        "completion_input_ids"
    ].tolist() == [[2]]
    prompts_only = collate([{"prompt": "ab"}, {"prompt": "c", "completion": None}])
    assert set(prompts_only) == {"prompt_input_ids", "prompt_attention_mask"}


def test_chat_rows_render_with_the_template():
    rows = [
        {
            "prompt": [{"role": "user", "content": "ab"}],
            "completion": [{"role": "assistant", "content": "c"}],
        }
    ]
    batch = PromptCollator(Chars())(rows)
    assert batch["prompt_input_ids"].tolist() == [[27, 1, 2, 28]]  # with the generation prompt
    # the template renders "assistant" then "c": the completion is what follows the prompt
    assert batch["completion_input_ids"].tolist() == [[3]]


def test_errors():
    collate = PromptCollator(Chars())
    with pytest.raises(ValueError, match="needs a 'prompt'"):
        collate([{"text": "a"}])
    with pytest.raises(ValueError, match="every row of a batch"):
        collate([{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match="no tokens"):
        collate([{"prompt": "123"}])
    with pytest.raises(ValueError, match="text or chat messages"):
        collate([{"prompt": 5}])
    with pytest.raises(ValueError, match="needs a chat 'prompt'"):
        collate([{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}])

    class Reordering(Chars):
        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
            ids = super().apply_chat_template(messages, add_generation_prompt, tokenize)
            return {"input_ids": ids["input_ids"][::-1]}

    chat = [{"role": "user", "content": "ab"}]
    with pytest.raises(ValueError, match="different beginning"):
        PromptCollator(Reordering())(
            [{"prompt": chat, "completion": [{"role": "assistant", "content": "c"}]}]
        )
    with pytest.raises(ValueError, match="max_prompt_length"):
        PromptCollator(Chars(), max_prompt_length=0)
    with pytest.raises(TypeError, match="add_eos"):
        PromptCollator(Chars(), add_eos=1)
