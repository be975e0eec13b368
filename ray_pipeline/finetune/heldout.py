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
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..config import Config, DataConfig
from ..io.pool import Pool, label_codes, read_pool
from ..errors import InputError
from .task import task_for

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
    names, code = label_codes(labels)
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
    names, code = label_codes(labels)
    return {k: int(v) for k, v in zip(names, np.bincount(code, minlength=len(names)))}


# ----------------------------------------------------------------------------------------------
# reading the held-out set


def read_task_pool(data: DataConfig, cfg: Config) -> Pool:
    """The pool (or held-out set) with what the task trains on (``Task.read``): for a causal LM
    each sample's turns or its prompt and response."""
    pool = read_pool(data, max_seconds=cfg.embed.max_seconds)
    return task_for(cfg.finetune.task, pool.modality).read(pool, data, cfg.finetune)


def eval_data_config(cfg: Config, which: str = "eval") -> DataConfig:
    """The held-out file ``finetune.heldout.eval_path`` (``which="test"``: ``test_path``), read
    with the pool's column settings (the pool's config, whole), its own path and labels file, and
    no limit: a limit is a stratified sample drawn after reading (:func:`read_parts`)."""
    ho = cfg.finetune.heldout
    path, labels_path = (ho.eval_path, ho.eval_labels_path) if which == "eval" else (ho.test_path, ho.test_labels_path)
    if not ho.eval_path:
        raise InputError("fine-tuning needs a held-out set: set finetune.heldout.eval_path (same columns as the pool)")
    if cfg.data.labels_path and not labels_path:
        raise InputError(f"the pool's labels come from data.labels_path; give the held-out set's labels the same way "
                         f"with finetune.heldout.{which}_labels_path (one label per line of finetune.heldout.{which}_path)")
    return dataclasses.replace(cfg.data, path=path, format="auto", labels_path=labels_path, embeddings=None,
                               limit=None)


@dataclass(frozen=True)
class Parts:
    """The held-out set as task pools: ``validation`` chooses (proxy, ASHA, patience, the target),
    ``test`` only reports; ``info``: what ``run.json`` records of them (how, rows, labels)."""

    validation: Pool
    test: Pool
    info: dict


def read_parts(cfg: Config) -> Parts:
    """The held-out parts (:class:`Parts`) as task pools.

    Seeded by ``cfg.seed``; each file limited to ``finetune.heldout.eval_limit`` by a stratified sample;
    ``finetune.heldout.test_path`` given: it is the test part and all of ``eval_path`` validates;
    otherwise ``eval_path`` is split, stratified by label, ``validation_fraction`` to validation."""
    ft = cfg.finetune.heldout
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
                             f"split into a validation and a test part (or give finetune.heldout.test_path)")
        v, t = split(held.labels, len(held), ft.validation_fraction, rng)
        val, test = held.take(v), held.take(t)
        how = (f"{ft.eval_path} split {ft.validation_fraction:g} / {1 - ft.validation_fraction:g}, seeded"
               f"{', stratified by label' if held.labels is not None else ''}")
    overlap = set(val.ids.tolist()) & set(test.ids.tolist()) if ft.test_path and cfg.data.id_column else set()
    if overlap:
        raise InputError(f"{len(overlap)} id(s) are in both finetune.heldout.eval_path and finetune.heldout.test_path, e.g. "
                         f"{sorted(overlap)[0]!r}; the parts must be disjoint")
    info = {"how": how, "seed": cfg.seed, "eval_limit": ft.eval_limit,
            "validation": {"rows": len(val), "labels": label_counts(val.labels)},
            "test": {"rows": len(test), "labels": label_counts(test.labels)}}
    log.info("held-out set: %d validation (chooses) / %d test (reports only): %s", len(val), len(test), how)
    return Parts(val, test, info)
