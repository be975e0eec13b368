"""Selection cost, ours against the obvious alternatives, side by side in one run.

On random unit vectors (default 1M x 384) and on real MiniLM embeddings of a shared dataset:

- k-means: our FAISS spherical k-means against scikit-learn ``KMeans`` (Lloyd, one init) and
  ``MiniBatchKMeans`` on the same rows (``--compare-n`` rows, ``--compare-k`` clusters: scikit-learn's
  KMeans on 1M x 384 with K = 1000 takes hours here), plus FAISS with K on all rows;
- center/key samples;
- k-center greedy: ours (``select.kernels.k_center_greedy``, all clusters at once in torch) against
  (a) the obvious per-cluster numpy loop (``tests/reference.py: k_center_greedy_reference``) and
  (b) a per-cluster loop written the way Google's active-learning ``kcenter_greedy.py`` does it
  (for each pick, ``sklearn.metrics.pairwise_distances(features, [new center])`` then a running
  ``np.minimum``; reimplemented here from that file's published description), on the same
  assignments, budgets and start samples; and whether the selections agree index for index;
- the whole selection (k-means + key samples + greedy) against a *global* k-center greedy with no
  clusters, on the same ``--global-n`` rows and the same M, written as (a) Google's active-learning
  ``sampling_methods/kcenter_greedy.py`` does it (random first center, then for each pick
  ``pairwise_distances(features, [center])`` over the whole pool, running ``np.minimum``, argmax)
  and (b) as DeepCore's ``methods/k_center_greedy.py`` does it (torch, a (M-1) x N matrix holding
  each center's distances to the pool, ``torch.min`` into ``mins``, argmax; its ``euclidean_dist``).
  Both reimplemented here from those published files. DeepCore's matrix is M x N floats (40 GB at
  1M with M = 1%), which is why the global comparison runs on a subsample of the rows.

Each stage's wall time and peak RSS are printed and written to
``benchmarks/results/selection-{cpu,gpu}.json`` with the machine's description.

    .venv/bin/python -m benchmarks.bench_selection                 # 1M x 384, K=1000, M=1%
    .venv/bin/python -m benchmarks.bench_selection --n 100000 --k 300 --no-real
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import machine, save, timed

from ray_pipeline.select.kmeans import kmeans
from ray_pipeline.select.kernels import center_and_key_samples, k_center_greedy, proportional_budgets

from tests.reference import k_center_greedy_reference  # the tests' slow, obvious loop

ROOT = Path(__file__).resolve().parents[1]


def google_style_greedy(x: np.ndarray, assign: np.ndarray, budgets: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per cluster, Google active-learning's kcenter_greedy update: pairwise_distances to the new
    center over all the cluster's features, min into the running distances, argmax."""
    from sklearn.metrics import pairwise_distances

    rank = np.full(len(x), -1, dtype=np.int64)
    for c in np.flatnonzero(budgets):
        members = np.flatnonzero(assign == c)
        feats = x[members]
        min_d = None
        ind = int(np.flatnonzero(members == starts[c])[0])
        for t in range(int(budgets[c])):
            if t > 0:
                ind = int(np.argmax(min_d))
            rank[members[ind]] = t
            dist = pairwise_distances(feats, feats[ind:ind + 1], metric="euclidean")
            min_d = dist if min_d is None else np.minimum(min_d, dist)
            min_d[ind] = -1.0  # Google asserts a pick is new; mask it so duplicates cannot repeat
    return rank


def global_greedy_google(x: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Google active-learning's kCenterGreedy.select_batch_ over the whole pool: a random first
    center, then M-1 times pairwise_distances to the newest center, running minimum, argmax."""
    from sklearn.metrics import pairwise_distances

    picks = [int(np.random.default_rng(seed).integers(len(x)))]
    min_d = pairwise_distances(x, x[picks[0]:picks[0] + 1], metric="euclidean")
    for _ in range(m - 1):
        ind = int(np.argmax(min_d))
        picks.append(ind)
        min_d = np.minimum(min_d, pairwise_distances(x, x[ind:ind + 1], metric="euclidean"))
    return np.array(picks)


def _deepcore_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DeepCore's methods_utils.euclidean_dist: ||x||^2 + ||y||^2 - 2 x y^T, clamped, square root."""
    xx = x.pow(2).sum(1, keepdim=True).expand(x.shape[0], y.shape[0])
    yy = y.pow(2).sum(1, keepdim=True).expand(y.shape[0], x.shape[0]).t()
    return (xx + yy - 2 * x @ y.t()).clamp(min=1e-12).sqrt()


def global_greedy_deepcore(x: np.ndarray, m: int, seed: int) -> np.ndarray:
    """DeepCore's k_center_greedy over the whole pool: a random first center, a (M-1) x N matrix
    whose row j holds center j's distances to the rows not yet selected, ``mins`` its running
    column minimum."""
    with torch.no_grad():
        matrix = torch.from_numpy(x)
        n = len(x)
        selected = np.zeros(n, dtype=bool)
        first = int(np.random.default_rng(seed).integers(n))
        selected[first] = True
        picks = [first]
        dis = -1 * torch.ones([m - 1, n])
        rest = torch.from_numpy(~selected)
        dis[0, rest] = _deepcore_euclidean(matrix[[first]], matrix[rest])
        mins = dis[:1].min(dim=0).values
        for i in range(m - 1):
            p = int(torch.argmax(mins))
            selected[p] = True
            picks.append(p)
            if i == m - 2:
                break
            mins[p] = -1
            rest = torch.from_numpy(~selected)
            dis[1 + i, rest] = _deepcore_euclidean(matrix[[p]], matrix[rest])
            mins = torch.min(mins, dis[1 + i])
    return np.array(picks)


def bench_global(name: str, x: np.ndarray, k: int, budget: float, global_n: int, seed: int) -> dict:
    """Ours (k-means with K clusters, key samples, greedy) against the two global k-center greedies
    on the same rows and the same M."""
    rows = x if len(x) <= global_n else x[np.sort(np.random.default_rng(seed).choice(len(x), global_n,
                                                                                     replace=False))]
    rows = np.ascontiguousarray(rows)
    n, d = rows.shape
    m = max(2, int(round(budget * n)))
    r: dict = {"data": name, "n": n, "d": d, "k": k, "m": m}
    print(f"\n== global k-center vs ours on {name}: n={n:,} d={d} M={m:,} (ours with K={k}) ==", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with timed(r, "ours_total"):
        km = kmeans(rows, k, seed=seed, gpus=torch.cuda.device_count() if device.type == "cuda" else 0)
        xt, at = torch.from_numpy(rows).to(device), torch.from_numpy(km.assign).to(device)
        _, key = center_and_key_samples(xt, at, torch.from_numpy(km.sim).to(device), k)
        ours = k_center_greedy(xt, at, torch.from_numpy(proportional_budgets(km.sizes, m)).to(device), key)
        ours = ours.cpu().numpy()
    with timed(r, "global_google_style"):
        goog = global_greedy_google(rows, m, seed)
    with timed(r, "global_deepcore_style"):
        deep = global_greedy_deepcore(rows, m, seed)
    r["global_styles_same_subset_share"] = round(len(np.intersect1d(goog, deep)) / m, 4)
    r["ours_selected"] = int((ours >= 0).sum())
    r["ratio_global_google_vs_ours_total"] = round(r["global_google_style_s"] / r["ours_total_s"], 2)
    r["ratio_global_deepcore_vs_ours_total"] = round(r["global_deepcore_style_s"] / r["ours_total_s"], 2)
    for key_, value in r.items():
        print(f"  {key_:42s} {value}", flush=True)
    return r


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def real_embeddings(dataset: str) -> np.ndarray:
    """MiniLM embeddings of a shared dataset, cached under benchmarks/.cache."""
    from ray_pipeline.config import DataConfig, EmbedConfig
    from ray_pipeline.io.pool import normalize, read_pool
    from _common import embed_texts

    cache = ROOT / "benchmarks" / ".cache" / f"{dataset}-minilm.npy"
    if cache.is_file():
        return np.load(cache)
    shared = ROOT.parent / "shared" / "data"
    cfgs = {"banking77": DataConfig(path=str(shared / "banking77" / "train.csv"), text_column="text"),
            "20newsgroups": DataConfig(path=str(shared / "20newsgroups" / "20ng_bydate_train.jsonl"))}
    pool = read_pool(cfgs[dataset])
    x = normalize(embed_texts(pool.texts, EmbedConfig(device="cpu"), progress=True))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, x)
    return x


def bench(name: str, x: np.ndarray, k: int, budget: float, compare_n: int, compare_k: int, seed: int,
          loops: bool) -> dict:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n, d = x.shape
    m = max(1, int(round(budget * n)))
    r: dict = {"data": name, "n": n, "d": d, "k": k, "m": m}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\n== {name}: n={n:,} d={d} K={k} M={m:,} (greedy on {device}) ==", flush=True)

    # -- k-means: faiss on all rows, then faiss vs scikit-learn on the same subset
    with timed(r, "kmeans_faiss_all"):
        km = kmeans(x, k, seed=seed, gpus=torch.cuda.device_count() if device.type == "cuda" else 0)
    sub = x[np.random.default_rng(seed).choice(n, min(n, compare_n), replace=False)]
    kc = min(compare_k, len(sub))
    r["kmeans_compare_n"], r["kmeans_compare_k"] = len(sub), kc
    with timed(r, "kmeans_faiss_subset"):
        kmeans(sub, kc, seed=seed, max_points_per_centroid=len(sub))  # all rows, like scikit-learn
    with timed(r, "kmeans_sklearn_subset"):
        KMeans(kc, n_init=1, max_iter=20, tol=0.0, random_state=seed, algorithm="lloyd").fit(sub)
    with timed(r, "kmeans_sklearn_minibatch_subset"):
        MiniBatchKMeans(kc, n_init=1, max_iter=20, random_state=seed, batch_size=4096).fit(sub)

    # -- key samples and greedy
    xt = torch.from_numpy(x).to(device)
    at = torch.from_numpy(km.assign).to(device)
    with timed(r, "key_samples"):
        _, key = center_and_key_samples(xt, at, torch.from_numpy(km.sim).to(device), k)
        if device.type == "cuda":
            torch.cuda.synchronize()
    budgets = proportional_budgets(km.sizes, m)
    r["max_cluster_budget"] = int(budgets.max())
    with timed(r, "greedy_ours"):
        ours = k_center_greedy(xt, at, torch.from_numpy(budgets).to(device), key).cpu().numpy()
    if loops:
        key_np = key.cpu().numpy()
        with timed(r, "greedy_loop_numpy"):
            ref = k_center_greedy_reference(x, km.assign, budgets, key_np)
        with timed(r, "greedy_loop_google_style"):
            goog = google_style_greedy(x, km.assign, budgets, key_np)
        chosen = ours >= 0
        r["agree_numpy_loop_index_for_index"] = bool((ours == ref).all())
        r["agree_numpy_loop_same_subset_share"] = round(float((chosen & (ref >= 0)).sum() / max(1, chosen.sum())), 4)
        r["agree_google_loop_same_subset_share"] = round(float((chosen & (goog >= 0)).sum() / max(1, chosen.sum())), 4)
        r["ratio_greedy_vs_numpy_loop"] = round(r["greedy_loop_numpy_s"] / r["greedy_ours_s"], 2)
        r["ratio_greedy_vs_google_loop"] = round(r["greedy_loop_google_style_s"] / r["greedy_ours_s"], 2)
    r["ratio_kmeans_faiss_vs_sklearn"] = round(r["kmeans_sklearn_subset_s"] / r["kmeans_faiss_subset_s"], 2)
    r["ratio_kmeans_faiss_vs_minibatch"] = round(r["kmeans_sklearn_minibatch_subset_s"] / r["kmeans_faiss_subset_s"], 2)
    r["selection_total_s"] = round(r["kmeans_faiss_all_s"] + r["key_samples_s"] + r["greedy_ours_s"], 3)
    for key_, value in r.items():
        print(f"  {key_:42s} {value}", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_selection", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--budget", type=float, default=0.01, help="M as a fraction of n")
    p.add_argument("--compare-n", type=int, default=100_000, help="rows for faiss vs scikit-learn k-means")
    p.add_argument("--compare-k", type=int, default=100, help="K for faiss vs scikit-learn k-means")
    p.add_argument("--real", default="banking77", help="shared dataset to embed with MiniLM (banking77, 20newsgroups)")
    p.add_argument("--real-k", type=int, default=100)
    p.add_argument("--real-budget", type=float, default=0.05)
    p.add_argument("--no-real", action="store_true")
    p.add_argument("--no-loops", action="store_true", help="skip the slow per-cluster loops")
    p.add_argument("--global-n", type=int, default=100_000,
                   help="rows for ours vs the global k-center greedies (DeepCore's M x N matrix bounds it)")
    p.add_argument("--no-global", action="store_true", help="skip the global k-center comparison")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    runs = []
    t0 = time.perf_counter()
    x = random_unit(args.n, args.d, args.seed)
    print(f"generated {args.n:,} x {args.d} random unit vectors in {time.perf_counter() - t0:.1f}s")
    runs.append(bench(f"random-{args.n}x{args.d}", x, args.k, args.budget, args.compare_n, args.compare_k, args.seed,
                      not args.no_loops))
    if not args.no_global:
        runs.append(bench_global(f"random-{args.n}x{args.d}", x, max(10, args.global_n // 1000), args.budget, args.global_n, args.seed))
    del x
    if not args.no_real:
        x = real_embeddings(args.real)
        runs.append(bench(f"{args.real}-minilm", x, args.real_k, args.real_budget, args.compare_n,
                          args.compare_k, args.seed, not args.no_loops))
        if not args.no_global:
            runs.append(bench_global(f"{args.real}-minilm", x, args.real_k, args.real_budget, args.global_n, args.seed))
    path = save("selection", {"machine": machine(), "args": vars(args), "runs": runs})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
