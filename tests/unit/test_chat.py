"""Chat data as users have it: OpenAI/TRL ``messages`` and ShareGPT ``conversations`` pools, the
text embedded from them, and the assistant-only loss mask of the chat template (by hand)."""

import json

import numpy as np
import pytest

from ray_pipeline.io.chat import chat_tokens, check_trainable, embed_text, turns
from ray_pipeline.config import Config, DataConfig
from ray_pipeline.io.pool import read_pool
from ray_pipeline.errors import ConfigError, InputError
from ray_pipeline.finetune.heldout import read_task_pool
from ray_pipeline.finetune.task import CausalLM, size

TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
SHAREGPT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"}]


def test_turns_by_hand_in_both_forms_and_content_parts():
    assert turns(TWO_TURNS, "r") == TWO_TURNS
    assert turns(SHAREGPT, "r") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello!"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert turns(parts, "r") == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize("value, match", [
    ([], "empty"),
    ("hello", "str"),
    ([{"role": "narrator", "content": "x"}], "unknown role 'narrator'"),
    ([{"role": "user", "content": 3}], "not text"),
    (["hi"], "not a record"),
])
def test_bad_turns_name_the_sample_and_the_fix(value, match):
    with pytest.raises(InputError, match=match) as e:
        turns(value, "pool.jsonl, row 7")
    assert "row 7" in str(e.value)


def test_a_conversation_to_train_on_needs_an_assistant_turn_after_a_user_turn():
    check_trainable(turns(SHAREGPT, "r"), "r")
    with pytest.raises(InputError, match="no assistant turn"):
        check_trainable([{"role": "user", "content": "x"}], "row 3")
    with pytest.raises(InputError, match="before any user turn"):
        check_trainable([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "row 3")


def test_embed_text_whole_conversation_or_user_turns():
    assert embed_text(TWO_TURNS) == "user: Hi\nassistant: Hello!\nuser: 2+2?\nassistant: 4"
    assert embed_text(TWO_TURNS, "user") == "Hi\n2+2?"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_messages_pool_is_embedded_from_its_turns(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}, {"messages": turns(SHAREGPT, "r")}])
    pool = read_pool(DataConfig(path=path))
    assert pool.texts.tolist() == [embed_text(TWO_TURNS), "system: Be brief.\nuser: Hi\nassistant: Hello!"]
    assert read_pool(DataConfig(path=path, chat_text="user")).texts.tolist() == ["Hi\n2+2?", "Hi"]


def test_a_sharegpt_pool_is_found_by_its_column_and_trains_on_its_turns(tmp_path):
    path = write_jsonl(tmp_path / "sg.jsonl", [{"id": "a", "conversations": SHAREGPT}])
    cfg = Config.from_dict({"data": {"path": path, "id_column": "id"}, "finetune": {"task": "instruction"}})
    pool = read_task_pool(cfg.data, cfg)
    assert pool.texts.tolist() == ["system: Be brief.\nuser: Hi\nassistant: Hello!"]
    arrays = CausalLM().arrays(pool.take(np.array([0])))
    assert arrays == {"chats": [turns(SHAREGPT, "r")]} and size(arrays) == 1


def test_chat_errors_name_the_row_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": TWO_TURNS}, {"messages": [{"role": "user", "content": "?"}]}])
    cfg = Config.from_dict({"data": {"path": path}, "finetune": {"task": "instruction"}})
    with pytest.raises(InputError, match=r"c.jsonl, row 1 \(messages\): the conversation has no assistant turn"):
        read_task_pool(cfg.data, cfg)
    with pytest.raises(InputError, match="no chat column 'dialog'.*Set data.chat_column"):
        read_pool(DataConfig(path=path, chat_column="dialog"))
    with pytest.raises(ConfigError, match="data.chat_column"):
        DataConfig(path=path, chat_column="messages", text_column="text")


# ---------------------------------------------------------------------------------------------
# the loss mask, with the packaged SmolLM2 tokenizer and its ChatML template


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from ray_pipeline.io.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.mark.slow
def test_loss_covers_the_assistant_turns_only_by_hand(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, labels = chat_tokens(tok, TWO_TURNS, max_length=512)
    assert tok.decode(ids) == tok.apply_chat_template(TWO_TURNS, tokenize=False)
    trained = [i for i, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(trained) == "Hello!<|im_end|>\n4<|im_end|>\n"  # both answers and their end of turn
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    # the batch: right-padded, labels -100 on the padding, cut at max_length
    batch = CausalLM().batch(tok, {"chats": [TWO_TURNS, TWO_TURNS[:2]]}, [0, 1], max_length=512)
    short = chat_tokens(tok, TWO_TURNS[:2], 512)[0]
    assert batch["input_ids"].shape == (2, len(ids)) and int(batch["attention_mask"][1].sum()) == len(short)
    assert (batch["labels"][1, len(short):] == -100).all()
    cut_ids, cut_labels = chat_tokens(tok, TWO_TURNS, max_length=10)
    assert len(cut_ids) == len(cut_labels) == 10


@pytest.mark.slow
def test_a_tokenizer_without_a_chat_template_is_refused(smollm2_tokenizer):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        chat_tokens(tok, TWO_TURNS, 64)


@pytest.mark.slow
def test_a_conversation_is_answered_from_its_last_user_turn(smollm2_tokenizer):
    """predict's prompt for a conversation: the chat template through the last user turn, the
    assistant's header opened, the reply after it left out (by hand, SmolLM2's ChatML)."""
    from ray_pipeline.finetune.task import chat_prompt

    prompt = chat_prompt(smollm2_tokenizer, TWO_TURNS)
    assert prompt.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "Hello!" in prompt and "4<|im_end|>" not in prompt
    assert chat_prompt(smollm2_tokenizer, TWO_TURNS[:3]) == prompt
    with pytest.raises(InputError, match="user turn"):
        chat_prompt(smollm2_tokenizer, [{"role": "assistant", "content": "Hi"}])
