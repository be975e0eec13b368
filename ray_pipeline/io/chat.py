"""Chat data as users have it: a list of turns per sample, in the OpenAI / TRL ``messages`` form
(``role`` / ``content``) or the ShareGPT ``conversations`` form (``from`` / ``value``).

- :func:`turns`: one sample's turns, checked and normalised to ``{"role", "content"}`` with the
  roles ``system``, ``user``, ``assistant``, ``tool``;
- :func:`embed_text`: the text a sample is embedded from (the whole conversation, or the user
  turns only: ``data.chat_text``);
- :func:`chat_tokens`: the training tokens, rendered with the tokenizer's own chat template, and
  labels that are -100 everywhere but on the assistant turns, so the loss covers what the model
  is to say and nothing it is told.
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import InputError

# ShareGPT and other dumps name the roles in several ways
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "tool": "tool",
         "function": "tool", "observation": "tool", "ipython": "tool"}
CHAT_COLUMNS = ("messages", "conversations")  # looked for, in this order, when data.chat_column is empty


def chat_column(columns: list[str], configured: Optional[str], *, has_text: bool) -> Optional[str]:
    """The column holding the turns: ``configured``, else ``messages`` or ``conversations`` when
    the table has one and no text is configured (``has_text``: a text column or template)."""
    if configured:
        return configured
    if has_text:
        return None
    return next((c for c in CHAT_COLUMNS if c in columns), None)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type", "text") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise InputError(f"{where}: a turn's content is {type(value).__name__}, not text; give each turn a string "
                     f"'content' (or 'value'), or a list of {{'type': 'text', 'text': ...}} parts")


def turns(value: Any, where: str) -> list[dict]:
    """One sample's turns as ``[{"role": ..., "content": ...}]``. value: a list of dicts with
    ``role`` + ``content`` or ``from`` + ``value``; where: names the sample in errors.

    Example:
        >>> turns([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "row 0")
        [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(f"{where}: the conversation is {'empty' if value in ([], ()) else type(value).__name__}; "
                         f"give a non-empty list of turns such as [{{'role': 'user', 'content': '...'}}, "
                         f"{{'role': 'assistant', 'content': '...'}}]")
    out = []
    for j, t in enumerate(value):
        if not isinstance(t, dict):
            raise InputError(f"{where}, turn {j}: a turn is {type(t).__name__}, not a record with role and content")
        role_key, content_key = ("role", "content") if "role" in t else ("from", "value")
        raw = t.get(role_key)
        role = ROLES.get(str(raw).lower()) if raw is not None else None
        if role is None:
            raise InputError(f"{where}, turn {j}: unknown role {raw!r} (keys {sorted(t)}); use 'role' with one of "
                             f"system, user, assistant, tool (or ShareGPT's 'from': human, gpt, system)")
        out.append({"role": role, "content": _content(t.get(content_key), f"{where}, turn {j}")})
    return out


def check_trainable(conv: list[dict], where: str) -> None:
    """A conversation to train on has an assistant turn, after the first user turn."""
    roles = [t["role"] for t in conv]
    if "assistant" not in roles:
        raise InputError(f"{where}: the conversation has no assistant turn, so there is nothing to train on; "
                         f"remove it or add the answer as a turn with role 'assistant'")
    if "user" not in roles or roles.index("assistant") < roles.index("user"):
        raise InputError(f"{where}: the conversation's first assistant turn comes before any user turn; "
                         f"start it with the user's turn (a system turn may come first)")


def embed_text(conv: list[dict], which: str = "all") -> str:
    """The text embedded for selection: ``all`` turns as ``role: content`` lines, or ``user``:
    the user turns' contents only."""
    if which == "user":
        return "\n".join(t["content"] for t in conv if t["role"] == "user")
    return "\n".join(f"{t['role']}: {t['content']}" for t in conv)


def chat_tokens(tok, conv: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation rendered with ``tok``'s chat template; labels
    equal the ids on the assistant turns (their content and end-of-turn tokens), -100 elsewhere;
    both cut at ``max_length``.

    Each assistant turn's characters are found by rendering the conversation up to it (with the
    generation prompt) and through it; a template that does not render conversations prefix by
    prefix is refused rather than trained on wrong labels.
    """
    if not getattr(tok, "chat_template", None):
        raise InputError("the model's tokenizer has no chat template, so chat data cannot be rendered; use a chat "
                         "model (such as the default SmolLM2-135M-Instruct) or instruction/output columns")
    text = tok.apply_chat_template(conv, tokenize=False)
    spans = []
    for i, t in enumerate(conv):
        if t["role"] != "assistant":
            continue
        before = tok.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True)
        through = tok.apply_chat_template(conv[:i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise InputError("the model's chat template does not render a conversation prefix by prefix, so the "
                             "assistant turns cannot be told apart; use a ChatML-style template")
        spans.append((len(before), len(through)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [i if any(s <= a < e for s, e in spans) else -100
              for i, (a, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels
