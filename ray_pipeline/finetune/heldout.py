"""The held-out set: a seeded, label-stratified sample of it, and its split into the part that
chooses (validation) and the part that reports (test).

Why: the choice of a target among candidates is a maximum over noisy scores, biased upward on the
data it was made on (the winner's curse). Only a part that took no part in the choice (no proxy,
no early stopping, no patience, no pick) gives an honest score. Files are often sorted by label
(banking77's are), so any limit or split is a seeded draw, stratified by label where there are
labels, never the first rows.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

from ..config import Config, DataConfig
from ..io.chat import chat_column, check_trainable
from ..io.pool import Pool, read_chats, read_pool
from ..errors import InputError

log = logging.getLogger(__name__)


def stratified_sample(labels: Optional[np.ndarray], n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` of ``n`` rows, sorted, drawn so that every label keeps its share (largest remainder;
    a label with a share below one row may get none). labels: (n,) or None for a plain draw.

    Example:
        >>> labels = np.array(["a"] * 6 + ["b"] * 3 + ["c"] * 1)
        >>> rows = stratified_sample(labels, 10, 5, np.random.default_rng(0))
        >>> sorted(labels[rows].tolist())
        ['a', 'a', 'a', 'b', 'b']
    """
    from ..select.kernels import proportional_budgets

    if size >= n:
        return np.arange(n)
    if labels is None:
        return np.sort(rng.choice(n, size=size, replace=False))
    names, code = np.unique(np.asarray([str(v) for v in labels]), return_inverse=True)
    counts = np.bincount(code, minlength=len(names))
    share = proportional_budgets(counts, size)
    picked = [rng.choice(np.flatnonzero(code == c), size=int(share[c]), replace=False) for c in range(len(names))]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def split(labels: Optional[np.ndarray], n: int, validation_fraction: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, test rows), sorted, disjoint, covering all ``n`` rows: the validation part
    a stratified sample of ``round(n * validation_fraction)`` rows (at least one row each side)."""
    size = min(n - 1, max(1, int(round(n * validation_fraction))))
    val = stratified_sample(labels, n, size, rng)
    test = np.setdiff1d(np.arange(n), val)
    return val, test


def label_counts(labels: Optional[np.ndarray]) -> Optional[dict[str, int]]:
    if labels is None:
        return None
    names, counts = np.unique(np.asarray([str(v) for v in labels]), return_counts=True)
    return {str(k): int(v) for k, v in zip(names, counts)}


# ----------------------------------------------------------------------------------------------
# reading the held-out set


def task_arrays(pool: Pool, cfg: Config, labels: Optional[list] = None) -> dict:
    """What the training function needs of a pool: texts + label indices (classification) or
    prompts + responses (instruction)."""
    ft = cfg.finetune
    if ft.task == "classification":
        if pool.labels is None:
            raise InputError("classification needs labels: set data.label_column (or data.labels_path)")
        if pool.texts is None:
            raise InputError("fine-tuning needs the samples' texts; give data.path, not only embeddings")
        labels = labels or sorted({str(v) for v in pool.labels})
        index = {v: i for i, v in enumerate(labels)}
        missing = sorted({str(v) for v in pool.labels} - set(index))
        if missing:
            raise InputError(f"the held-out set has label(s) {missing[:5]} that the pool does not have; "
                             f"a classifier cannot learn them")
        return {"texts": pool.texts.tolist(), "labels": np.array([index[str(v)] for v in pool.labels]),
                "label_names": labels}
    if "chats" in pool.extra:
        return {"chats": list(pool.extra["chats"])}
    prompts, responses = pool.extra["prompts"], pool.extra["responses"]
    return {"prompts": list(prompts), "responses": list(responses)}


def read_task_pool(data: DataConfig, cfg: Config) -> Pool:
    """The pool (or held-out set) with what the task needs; for instruction tuning each sample's
    turns (a chat column: ``data.chat_column``, or ``messages`` / ``conversations``), else the
    prompt (``finetune.prompt_template``) and the response (``finetune.response_field``)."""
    pool = read_pool(data)
    if cfg.finetune.task == "instruction":
        from ..io.pool import read_table

        table = read_table(data.path, data.format)
        if data.limit:
            table = table.slice(0, data.limit)
        chat = chat_column(table.column_names, data.chat_column, has_text=False)  # trains on it, whatever is embedded
        if chat is not None:
            chats = read_chats(table, chat, str(data.path))
            for i, conv in enumerate(chats):
                check_trainable(conv, f"{data.path}, row {i} ({chat})")
            pool.extra = {"chats": np.array(chats + [None], dtype=object)[:-1]}  # an array of lists, not 2-d
            return pool
        rf = cfg.finetune.response_field
        if rf not in table.column_names:
            raise InputError(f"{data.path} has no response column {rf!r}; set finetune.response_field")
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        prompts = [cfg.finetune.prompt_template.format(**{c: ("" if v[i] is None else v[i]) for c, v in cols.items()})
                   for i in range(table.num_rows)]
        responses = ["" if v is None else str(v) for v in cols[rf]]
        pool.extra = {"prompts": np.array(prompts, dtype=object), "responses": np.array(responses, dtype=object)}
    return pool


def eval_data_config(cfg: Config, which: str = "eval") -> DataConfig:
    """The held-out file ``finetune.eval_path`` (``which="test"``: ``finetune.test_path``), read
    with the pool's column settings (the pool's config, whole), its own path and labels file, and
    no limit: a limit is a stratified sample drawn after reading (:func:`read_parts`)."""
    ft = cfg.finetune
    path, labels_path = (ft.eval_path, ft.eval_labels_path) if which == "eval" else (ft.test_path, ft.test_labels_path)
    if not ft.eval_path:
        raise InputError("fine-tuning needs a held-out set: set finetune.eval_path (same columns as the pool)")
    if cfg.data.labels_path and not labels_path:
        raise InputError(f"the pool's labels come from data.labels_path; give the held-out set's labels the same way "
                         f"with finetune.{which}_labels_path (one label per line of finetune.{which}_path)")
    return dataclasses.replace(cfg.data, path=path, format="auto", labels_path=labels_path, embeddings=None,
                               limit=None)


def read_parts(cfg: Config) -> tuple[Pool, Pool, dict]:
    """(validation part, test part, what ``run.json`` records of them) as task pools.

    Seeded by ``cfg.seed``; each file limited to ``finetune.eval_limit`` by a stratified sample;
    ``finetune.test_path`` given: it is the test part and all of ``eval_path`` validates;
    otherwise ``eval_path`` is split, stratified by label, ``validation_fraction`` to validation."""
    ft = cfg.finetune
    rng = np.random.default_rng([cfg.seed, 7])  # its own stream: the selection's draws stay as they were

    def limited(p: Pool) -> Pool:
        if ft.eval_limit is None or len(p) <= ft.eval_limit:
            return p
        return p.take(stratified_sample(p.labels, len(p), ft.eval_limit, rng))

    held = limited(read_task_pool(eval_data_config(cfg), cfg))
    if ft.test_path:
        val, test = held, limited(read_task_pool(eval_data_config(cfg, "test"), cfg))
        how = f"validation = {ft.eval_path}; test = {ft.test_path} (given)"
    else:
        if len(held) < 2:
            raise InputError(f"the held-out set {ft.eval_path} has {len(held)} sample(s); it needs at least 2 to "
                             f"split into a validation and a test part (or give finetune.test_path)")
        v, t = split(held.labels, len(held), ft.validation_fraction, rng)
        val, test = held.take(v), held.take(t)
        how = (f"{ft.eval_path} split {ft.validation_fraction:g} / {1 - ft.validation_fraction:g}, seeded"
               f"{', stratified by label' if held.labels is not None else ''}")
    overlap = set(val.ids.tolist()) & set(test.ids.tolist()) if ft.test_path and cfg.data.id_column else set()
    if overlap:
        raise InputError(f"{len(overlap)} id(s) are in both finetune.eval_path and finetune.test_path, e.g. "
                         f"{sorted(overlap)[0]!r}; the parts must be disjoint")
    info = {"how": how, "seed": cfg.seed, "eval_limit": ft.eval_limit,
            "validation": {"rows": len(val), "labels": label_counts(val.labels)},
            "test": {"rows": len(test), "labels": label_counts(test.labels)}}
    log.info("held-out set: %d validation (chooses) / %d test (reports only): %s", len(val), len(test), how)
    return val, test, info
