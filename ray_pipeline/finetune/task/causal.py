"""A causal LM tuned on responses (``finetune.task: instruction``), and its batches: prompt +
response pairs, or conversations through the chat template, loss on the response tokens only."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ...errors import InputError
from ...io.chat import chat_tokens
from ...io.models import loads_with
from .base import Task, _load_kwargs, _tokenizer


class CausalLM(Task):
    """A causal LM (``AutoModelForCausalLM``) tuned on responses: prompt + response pairs, or
    conversations rendered with the chat template (loss on the assistant turns). Score = minus
    the token-weighted response loss, also perplexity. Test values: (-loss summed over a sample's
    response tokens, tokens)."""

    name = "instruction"
    default_model, default_proxy = "smollm2", "coverage"
    lora_by_default, lora_task_type = True, "CAUSAL_LM"
    metric, is_loss = "test loss", True
    loss_takes_num_items = True  # token-weighted over the accumulated micro-batches

    def read(self, pool, data, ft):
        """Each sample's turns (a chat column: ``data.chat_column``, or ``messages`` /
        ``conversations``: trained on whatever is embedded), else its prompt
        (``finetune.instruction.prompt_template`` over the record's fields) and response
        (``finetune.instruction.response_field``)."""
        from dataclasses import replace

        from ...io.chat import chat_column, check_trainable
        from ...io.pool import read_chats

        table = pool.records
        if table is None:
            raise InputError("instruction tuning needs the samples' records; give data.path, not only embeddings")
        chat = chat_column(table.column_names, data.chat_column, has_text=False)
        if chat is not None:
            chats = read_chats(table, chat, str(data.path))
            for i, conv in enumerate(chats):
                check_trainable(conv, f"{data.path}, row {i} ({chat})")
            return replace(pool, extra={"chats": np.array(chats + [None], dtype=object)[:-1]})  # lists, not 2-d
        ins = ft.instruction
        if ins.response_field not in table.column_names:
            raise InputError(f"{data.path} has no response column {ins.response_field!r}; set "
                             f"finetune.instruction.response_field")
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        prompts = [ins.prompt_template.format(**{c: ("" if v[i] is None else v[i]) for c, v in cols.items()})
                   for i in range(table.num_rows)]
        responses = ["" if v is None else str(v) for v in cols[ins.response_field]]
        return replace(pool, extra={"prompts": np.array(prompts, dtype=object),
                                    "responses": np.array(responses, dtype=object)})

    def arrays(self, pool, label_names: Optional[list] = None) -> dict:
        if "chats" in pool.extra:
            return {"chats": list(pool.extra["chats"])}
        return {"prompts": list(pool.extra["prompts"]), "responses": list(pool.extra["responses"])}

    def batch(self, tok, data: dict, idx, max_length: int, *, labels: bool = True) -> dict:
        if "chats" in data:
            return padded(tok, [chat_tokens(tok, data["chats"][i], max_length) for i in idx])
        return instruction_batch(tok, [data["prompts"][i] for i in idx], [data["responses"][i] for i in idx],
                                 max_length)

    def load(self, path: str, label_names: Optional[list] = None, *, precision: str = "fp32",
             quantization: str = "none", trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        return (AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(precision, quantization, trust_remote_code)),
                _tokenizer(path, trust_remote_code))

    def check_model(self, config, model: str) -> None:
        """A causal LM: a ``...ForCausalLM`` (or a base model whose type ``AutoModelForCausalLM``
        maps); a saved classifier cannot generate."""
        heads = [a for a in config.architectures or [] if a.endswith(CLASSIFIER_HEADS)]
        if heads:
            raise InputError(f"finetune.model {model!r} is a saved classifier ({heads[0]}), which cannot generate; "
                             f"finetune.task: instruction needs a causal LM (a ...ForCausalLM model, e.g. "
                             f"finetune.model: default or HuggingFaceTB/SmolLM2-135M-Instruct), or tune this one "
                             f"with finetune.task: classification")
        if not loads_with(config, "AutoModelForCausalLM"):
            raise InputError(f"finetune.model {model!r} (model_type {config.model_type!r}) is not a causal LM "
                             f"(AutoModelForCausalLM has no model for it); finetune.task: instruction needs one, "
                             f"e.g. finetune.model: default or Qwen/Qwen2.5-0.5B-Instruct")

    def eval_sums(self, out, batch: dict):
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        return float(out.loss) * tokens, tokens, None

    def eval_metrics(self, loss, preds, trues, n_labels):
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "score": -loss}

    def sample_values(self, model, tok, data, lo, hi, max_length, device):
        import torch

        batch = self.batch(tok, data, range(lo, hi), max_length)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none")  # (b, t-1), 0 where ignored
        tokens = (labels != -100).sum(dim=1)
        return np.stack([-nll.sum(dim=1).cpu().numpy(), tokens.cpu().numpy()], axis=1)

    def predict(self, model, tok, chunk, max_length, max_new_tokens):
        out = []
        for prompt in chunk:
            enc = tok(chat_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False) \
                if isinstance(prompt, list) else tok(prompt, return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append({"generation": tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)})
        return out

    def test_fields(self, score):
        return {"test_loss": -score}


# Heads of a saved model that are not a causal LM's: such a model cannot generate.
CLASSIFIER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                    "ForMultipleChoice")

# ----------------------------------------------------------------------------------------------
# causal-LM batches


def instruction_batch(tok, prompts: list, responses: list, max_length: int) -> dict:
    """Prompt + response + EOS, right-padded; labels -100 on prompt and padding, so the loss
    covers the response tokens only."""
    pairs = []
    for p, r in zip(prompts, responses):
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ri = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pairs.append(((pi + ri)[:max_length], ([-100] * len(pi) + ri)[:max_length]))
    return padded(tok, pairs)


def padded(tok, pairs: list[tuple[list[int], list[int]]]) -> dict:
    """(ids, labels) per sample as right-padded tensors (labels -100 on the padding)."""
    import torch

    ids, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    width = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(ids, labels)):
        input_ids[i, :len(s)] = torch.as_tensor(s)
        label_t[i, :len(lab)] = torch.as_tensor(lab)
        mask[i, :len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def chat_prompt(tok, conv: list[dict]) -> str:
    """The conversation through its last user turn, rendered for the model to answer."""
    last = max((i for i, t in enumerate(conv) if t["role"] == "user"), default=None)
    if last is None:
        raise InputError("a conversation to answer needs a user turn")
    return tok.apply_chat_template(conv[:last + 1], tokenize=False, add_generation_prompt=True)
