"""Who won, on the test part: the target against random subsets of its size and the full pool,
with intervals, costs, and a verdict in words that says so just as plainly when the selection lost.

Test scores are ratios over the test samples: each trial gives an (n, 2) array of a numerator and
a denominator per sample, and its score is ``sum(num) / sum(den)``: accuracy is (correct, 1) per
sample; for instruction tuning the score is minus the response loss per token, (-loss_sum, tokens)
per sample. The interval of a difference comes from a two-level bootstrap: the test samples are
resampled (the same draw for every trial, so the comparison is paired) and, where the other side
is several random seeds, the seeds are resampled too; so it holds both the test set's noise and
the seeds' spread.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .metrics import ratio_score
from .task import Task


def compare(a: np.ndarray, others: list[np.ndarray], rng: np.random.Generator, *, n_boot: int = 2000,
            level: float = 0.95) -> dict:
    """ratio_score(a) minus the mean score of ``others`` (one array or several seeds), and its interval.

    a, others: (n, 2) arrays over the same n test samples. Returns ``diff``, ``low``, ``high``.

    Example:
        >>> a = np.stack([np.r_[np.ones(80), np.zeros(20)], np.ones(100)], axis=1)   # accuracy 0.8
        >>> b = np.stack([np.r_[np.ones(50), np.zeros(50)], np.ones(100)], axis=1)   # accuracy 0.5
        >>> r = compare(a, [b], np.random.default_rng(0))
        >>> round(r["diff"], 2), r["low"] > 0
        (0.3, True)
    """
    stack = np.stack([a] + list(others))  # (1 + k, n, 2)
    k, n = len(others), stack.shape[1]
    diffs = []
    for lo in range(0, n_boot, 256):  # in pieces: (1 + k, 256, n, 2) at most
        b = min(256, n_boot - lo)
        idx = rng.integers(0, n, size=(b, n))
        sums = stack[:, idx].sum(axis=2)  # (1 + k, b, 2)
        scores = sums[..., 0] / np.maximum(sums[..., 1], 1e-12)
        seeds = rng.integers(0, k, size=(b, k))  # the seeds, resampled
        other = np.take_along_axis(scores[1:].T, seeds, axis=1).mean(axis=1)
        diffs.append(scores[0] - other)
    diffs = np.concatenate(diffs)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": ratio_score(a) - float(np.mean([ratio_score(o) for o in others])), "low": float(low), "high": float(high),
            "level": level}


def _word(c: dict, win: str, lose: str, tie: str) -> str:
    return win if c["low"] > 0 else lose if c["high"] < 0 else tie


def judge(task: Task, target: dict, values: dict[str, np.ndarray], randoms: list[dict], full: Optional[dict],
          rng: np.random.Generator) -> dict:
    """The verdict: the target (a trial record) against the random trials of its size and the full
    pool's trial, on the test part. values: trial name -> its (n, 2) test values. Returns the
    comparisons, the cost ratios and ``lines``, the verdict in words."""
    loss, metric = task.is_loss, task.metric
    show = (lambda s: f"{-s:.4f}") if loss else (lambda s: f"{s:.4f}")
    sign = -1.0 if loss else 1.0  # differences are shown in the metric's own direction

    def diff_text(c: dict) -> str:
        lo, hi = sorted([sign * c["low"], sign * c["high"]])
        return (f"{sign * c['diff']:+.4f}{' in loss' if loss else ''} (95% interval {lo:+.4f} to {hi:+.4f})")

    t_score = ratio_score(values[target["name"]])
    out: dict = {"metric": metric, "target": target["name"], "target_test": t_score, "lines": []}
    lines = out["lines"]
    lines.append(f"target {target['name']} ({target['size']:,} samples, chosen on the validation part): "
                 f"{metric} {show(t_score)}")
    if randoms:
        r_scores = [ratio_score(values[r["name"]]) for r in randoms]
        c = compare(values[target["name"]], [values[r["name"]] for r in randoms], rng)
        word = _word(c, "BEAT", "LOST TO", "did not differ clearly from")
        out["vs_random"] = {**c, "word": word, "random_test_mean": float(np.mean(r_scores)),
                            "random_test_std": float(np.std(r_scores)), "seeds": len(randoms)}
        lines.append(f"It {word} random subsets of the same size ({show(float(np.mean(r_scores)))} ± "
                     f"{np.std(r_scores):.4f} over {len(randoms)} seed(s)): {diff_text(c)}.")
    else:
        lines.append("No random subset of the same size finished, so the target is not compared with random.")
    if full is not None and full["name"] in values:
        f_score = ratio_score(values[full["name"]])
        c = compare(values[target["name"]], [values[full["name"]]], rng)
        word = _word(c, "BEAT", "fell short of", "matched")
        cost_key = "gpu_seconds" if "gpu_seconds" in target else "cpu_seconds"
        compute = target.get(cost_key, 0.0) / max(full.get(cost_key, 0.0), 1e-9)
        samples = target.get("samples_seen", 0) / max(full.get("samples_seen", 0), 1)
        of_full = (f_score / t_score if loss else t_score / f_score) if t_score and f_score else float("nan")
        out["vs_full"] = {**c, "word": word, "full_test": f_score, "full_status": full.get("status"),
                          "share_of_full_score": of_full, "share_of_full_compute": compute,
                          "share_of_full_samples_seen": samples}
        capped = (f" (the full pool stopped at its cap after {full.get('epochs', 0):.2f} epochs, not because its "
                  f"validation score stopped improving: more training may raise it)") if full.get("status") == "capped" else ""
        lines.append(f"It {word} the full pool ({show(f_score)}): {diff_text(c)}{capped}.")
        lines.append(f"target: {of_full:.0%} of the full pool's test score"
                     f"{' (inverse loss ratio)' if loss else ''} at {compute:.0%} of its compute "
                     f"({target.get(cost_key, 0.0):.0f} vs {full.get(cost_key, 0.0):.0f} {cost_key.replace('_', '-')}; "
                     f"{samples:.0%} of its samples seen).")
    out["won"] = bool(out.get("vs_random", {}).get("low", -1) > 0)
    out["lost"] = bool(out.get("vs_random", {}).get("high", 1) < 0)
    return out
