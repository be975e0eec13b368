"""10M through the shard engine: the default select at 1M, 3M, 10M on a two-node Ray cluster.

384-d float16 clustered unit vectors (N/100 random directions plus noise, as bench_clustering's)
are written once as Parquet shards in the embedding stage's layout (``id``, ``row``,
``embedding``; ``--shard-rows`` rows a file, as ``embed.shard_size``), nested so that the pool of
N is the first N / shard-rows files (the rows 0..N-1, shuffled over them). Then, for each N, the
default selection (``--budgets 1%``: K in {M/2, M}, k-center and centroid candidates; random
seeds off) runs through ``select.sharded.Sharded`` from this process (the driver, which never
holds the vectors) on two ``ray start`` nodes of ``--cpus`` CPUs each, started here with
``--memory`` / ``--object-store-memory`` limits and stopped here by their pids. Sampled once a
second: the driver's RSS, and per node the PSS (shared object-store pages divided among the
processes mapping them) of its raylet and every process under it; the head also counts its GCS;
at each node's peak, the PSS by process title split into heap (``anon``), object-store pages
(``shmem``) and mapped files. The object store's spilled and restored GiB over the run, with
its I/O workers' seconds (Ray's counters, as ``ray memory --stats-only``). Wall time and the
driver's CPU seconds per N, the growth exponent,
and per-stage seconds go to ``benchmarks/results/{--name}-{cpu,gpu}.json`` (``tenm``). ``--driver-upto N`` also runs the driver engine on
the same vectors up to that N and checks the two selections agree index for index;
``--driver-only`` runs the driver engine alone (no cluster), to ``tenm-driver-{cpu,gpu}.json``.

    .venv/bin/python -m benchmarks.bench_tenm --ns 1000000 3000000 10000000 --dir /work/tmp_tenm/data
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks._common import machine, save, timed

from ray_pipeline.config import Config
from ray_pipeline.embed.stage import shard_table
from ray_pipeline.io.run_dir import write_parquet
from ray_pipeline.runtime.devices import Devices
from ray_pipeline.select.engine import select_candidates
from ray_pipeline.select.sharded import Sharded, read_shard

D = 384


def write_nested_shards(ns: list[int], shard_rows: int, folder: Path, seed: int = 0) -> None:
    """Shards for the largest N, tier by tier: the shards of tier (N_prev, N] hold its rows shuffled,
    around their own (N - N_prev) / 100 centers. Files already there are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    lo_n, shard = 0, 0
    for n in ns:
        if n % shard_rows:
            raise SystemExit(f"--ns must be multiples of --shard-rows ({shard_rows})")
        rng = np.random.default_rng([seed, n])
        centers = rng.standard_normal(((n - lo_n) // 100, D), dtype=np.float32)
        perm = lo_n + rng.permutation(n - lo_n)
        for lo in range(0, n - lo_n, shard_rows):
            path = folder / f"shard-{shard:05d}.parquet"
            shard += 1
            if path.exists():
                continue
            rows = np.sort(perm[lo:lo + shard_rows])
            r = np.random.default_rng([seed, shard])
            x = centers[r.integers(0, len(centers), len(rows))] * 2.0
            x += r.standard_normal(x.shape, dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            write_parquet(shard_table([str(i) for i in rows], rows.tolist(), x, "float16", []), path)
        lo_n = n


class NodeMemory:
    """Peak PSS (GiB) of each node's raylet and its descendants (+ extra pids), and the driver's RSS."""

    def __init__(self, raylets: dict[str, int], extra: dict[str, list[int]]):
        self.raylets, self.extra = raylets, extra
        self.peak = {name: 0.0 for name in raylets} | {"driver": 0.0}
        self.at_peak: dict = {}  # per node, at its peak: GiB by process name (the raylet holds the object store)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _pss(self, pid: int) -> dict:
        """GiB of ``pid``'s PSS in all (``pss``) and its parts (``/proc/PID/smaps_rollup``): ``anon``
        (the process's own heap), ``shmem`` (its share of shared memory: the object store's pages it
        has touched), ``file`` (mapped files, libraries); all 0 for a process gone."""
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line)
                      if k in _PARTS}
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            return dict.fromkeys(_PARTS.values(), 0.0)
        return {name: kb.get(k, 0) / 2 ** 20 for k, name in _PARTS.items()}

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for name, pid in self.raylets.items():
                try:
                    pids = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                each = {p: self._pss(p) for p in pids + self.extra.get(name, [])}
                total = sum(e["pss"] for e in each.values())
                if total > self.peak[name]:
                    self.peak[name] = total
                    self.at_peak[name] = _by_name(each)
            self.peak["driver"] = max(self.peak["driver"], me.memory_info().rss / 2 ** 30)
            self._stop.wait(1.0)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


_PARTS = {"Pss": "pss", "Pss_Anon": "anon", "Pss_Shmem": "shmem", "Pss_File": "file"}


def _by_name(pss: dict) -> dict:
    """GiB by process title (``raylet``, ``gcs_server``, ``ray::<task>``), largest first: for each,
    its PSS and the parts of it (:meth:`NodeMemory._pss`), summed over processes of that title."""
    out: dict = {}
    for pid, parts in pss.items():
        try:
            name = psutil.Process(pid).name()
        except psutil.NoSuchProcess:
            continue
        mine = out.setdefault(name, dict.fromkeys(parts, 0.0))
        for k, v in parts.items():
            mine[k] += v
    return {name: {k: round(v, 3) for k, v in parts.items()}
            for name, parts in sorted(out.items(), key=lambda kv: -kv[1]["pss"])}


def ours(tmp: Path) -> list[int]:
    """The pids whose command lines name our temp dir: the processes of our nodes, no one else's."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if str(tmp) in " ".join(p.info["cmdline"] or []):
            out.append(p.pid)
    return out


def start_nodes(tmp: Path, cpus: int, memory_gib: float, store_gib: float, port: int) -> tuple[dict, dict, list]:
    """Two ``ray start`` nodes on this machine; returns raylet pids by node, GCS pids, every pid started.
    A failed start stops what it had started."""
    try:
        return _start_nodes(tmp, cpus, memory_gib, store_gib, port)
    except subprocess.CalledProcessError as e:
        stop_nodes(ours(tmp))
        raise SystemExit(f"ray start failed: {e.stderr.decode()[-2000:]}") from e


def _start_nodes(tmp: Path, cpus: int, memory_gib: float, store_gib: float, port: int) -> tuple[dict, dict, list]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    ray = str(Path(os.sys.executable).parent / "ray")
    common = [f"--num-cpus={cpus}", f"--memory={int(memory_gib * 2 ** 30)}",
              f"--object-store-memory={int(store_gib * 2 ** 30)}"]
    before = set(psutil.pids())
    subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
                    f"--temp-dir={tmp}", f"--ray-client-server-port={port + 1}", f"--node-manager-port={port + 2}",
                    f"--dashboard-agent-listen-port={port + 3}", f"--dashboard-agent-grpc-port={port + 4}",
                    f"--metrics-export-port={port + 5}", f"--runtime-env-agent-port={port + 6}",
                    f"--min-worker-port={port + 100}", f"--max-worker-port={port + 199}", *common],
                   env=env, check=True, capture_output=True)
    subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={tmp}", f"--node-manager-port={port + 12}",
                    f"--dashboard-agent-listen-port={port + 13}", f"--dashboard-agent-grpc-port={port + 14}",
                    f"--metrics-export-port={port + 15}", f"--runtime-env-agent-port={port + 16}",
                    f"--min-worker-port={port + 200}", f"--max-worker-port={port + 299}", *common],
                   env=env, check=True, capture_output=True)
    raylets, gcs, started = {}, [], []
    for pid in set(psutil.pids()) - before:  # only ours: their command lines name our temp dir
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        if str(tmp) not in cmd:
            continue
        started.append(pid)
        if "raylet" in cmd.split(" ")[0]:
            raylets["head" if f"--node_manager_port={port + 2}" in cmd else "worker"] = pid
        elif "gcs_server" in cmd.split(" ")[0]:
            gcs.append(pid)
    return raylets, {"head": gcs}, started


def stop_nodes(started: list[int]) -> None:
    """SIGTERM, then SIGKILL, to the processes this benchmark started (and their children)."""
    procs = []
    for pid in started:
        try:
            p = psutil.Process(pid)
            procs += [p] + p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


def load_all(paths: list[str], n: int) -> np.ndarray:
    x = np.empty((n, D), dtype=np.float32)
    for p in paths:
        rows, xs = read_shard(p)
        x[rows] = xs
    return x


def store_totals() -> dict:
    """The cluster's object-store spill and restore totals so far (every node; Ray's own counters,
    the ones ``ray memory --stats-only`` prints): GiB and the I/O workers' seconds."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    st = get_memory_info_reply(get_state_from_address(None)).store_stats
    return {"spilled_gib": st.spilled_bytes_total / 2 ** 30, "spill_s": st.spill_time_total_s,
            "restored_gib": st.restored_bytes_total / 2 ** 30, "restore_s": st.restore_time_total_s}


def top_functions(prof, count: int = 25) -> list[dict]:
    """The ``count`` functions of a cProfile run with the most time of their own (not their
    callees'): where the driver's CPU went."""
    import pstats

    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:count]
    return [{"fn": f"{Path(f).name}:{line}({name})", "calls": nc, "own_s": round(tt, 2), "cum_s": round(ct, 2)}
            for (f, line, name), (_, nc, tt, ct, _) in rows]


def run_one(paths: list[str], n: int, cfg: Config, raylets: dict, extra: dict,
            profile: bool = False) -> tuple[dict, object]:
    import cProfile
    from contextlib import nullcontext

    r: dict = {"n": n, "shards": len(paths)}
    cpu0 = time.process_time()
    before = store_totals()
    prof = cProfile.Profile()
    with NodeMemory(raylets, extra) as mem, timed(r, "select"), prof if profile else nullcontext():
        sel = select_candidates(Sharded(paths, n, cfg, Devices()), cfg, rng=np.random.default_rng(0))
    r["driver_cpu_s"] = round(time.process_time() - cpu0, 1)
    if profile:
        r["driver_profile"] = top_functions(prof)  # own seconds, cProfile's overhead included
    r["store"] = {k: round(v - before[k], 2) for k, v in store_totals().items()}  # this run's spilling
    r["peak_gib"] = {k: round(v, 2) for k, v in mem.peak.items()}
    r["at_peak_gib"] = mem.at_peak  # what each node's peak was made of
    r["k"] = sorted({s.k for s in sel.per_k})
    r["stages_s"] = {f"{s.method}_k{s.k}": {k: round(v, 1) for k, v in s.seconds.items()} for s in sel.per_k}
    print(f"  n={n:>11,} K={r['k']}: select {r['select_s']:8.1f}s (driver CPU {r['driver_cpu_s']}s), "
          f"peak GiB {r['peak_gib']}, spilled/restored {r['store']}, stages {r['stages_s']}", flush=True)
    return r, sel


def driver_only(ns: list[int], args) -> None:
    """The driver engine on the same shards, loaded whole into this process (float32)."""
    cfg = Config.from_dict({"select": {"budgets": ["1%"], "random_seeds": [], "stratify": "none"}})
    out = {"machine": machine(), "d": D, "engine": "driver", "load_average_at_start": os.getloadavg(), "runs": []}
    for i, n in enumerate(ns):
        write_nested_shards(ns[:i + 1], args.shard_rows, args.dir / "shards")
        if n < args.from_n:
            continue
        paths = sorted(str(q) for q in (args.dir / "shards").glob("shard-*.parquet"))[:n // args.shard_rows]
        r: dict = {"n": n}
        with timed(r, "load"):
            x = load_all(paths, n)
        cpu0 = time.process_time()
        with timed(r, "select"):
            sel = select_candidates(x, cfg, rng=np.random.default_rng(0))
        del x
        r["cpu_s"] = round(time.process_time() - cpu0, 1)
        r["stages_s"] = {f"{s.method}_k{s.k}": {k: round(v, 1) for k, v in s.seconds.items()} for s in sel.per_k}
        print(f"  n={n:>11,} driver engine: {r}", flush=True)
        out["runs"].append(r)
        save("tenm-driver", out)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_tenm", description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", nargs="+", type=int, default=[1_000_000, 3_000_000, 10_000_000])
    p.add_argument("--dir", type=Path, required=True, help="where the shards are written (kept for a rerun)")
    p.add_argument("--shard-rows", type=int, default=50_000)
    p.add_argument("--cpus", type=int, default=1, help="CPUs per node")
    p.add_argument("--memory-gib", type=float, default=4.0, help="--memory per node")
    p.add_argument("--store-gib", type=float, default=2.0, help="--object-store-memory per node")
    p.add_argument("--port", type=int, default=6491)
    p.add_argument("--driver-upto", type=int, default=0, help="also run the driver engine up to this N")
    p.add_argument("--driver-only", action="store_true",
                   help="no cluster: the driver engine alone (all vectors in this process), to tenm-driver-*.json")
    p.add_argument("--from-n", type=int, default=0, help="run only the sizes >= this (smaller tiers still written)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the driver: its 25 costliest functions (own time) go to the results")
    p.add_argument("--name", default="tenm", help="results file: benchmarks/results/NAME-{cpu,gpu}.json")
    args = p.parse_args()
    ns = sorted(args.ns)
    if args.driver_only:
        return driver_only(ns, args)
    cfg = Config.from_dict({"select": {"budgets": ["1%"], "random_seeds": [], "stratify": "none"}})
    out = {"machine": machine(), "d": D, "dtype": "float16", "shard_rows": args.shard_rows, "nodes": 2,
           "cpus_per_node": args.cpus, "memory_gib_per_node": args.memory_gib,
           "object_store_gib_per_node": args.store_gib, "load_average_at_start": os.getloadavg(), "runs": []}
    import ray

    raylets, extra, started = start_nodes(args.dir / "ray", args.cpus, args.memory_gib, args.store_gib, args.port)
    try:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=f"127.0.0.1:{args.port}", log_to_driver=False)
        for i, n in enumerate(ns):
            t0 = time.perf_counter()
            write_nested_shards(ns[:i + 1], args.shard_rows, args.dir / "shards")  # the next tier, if not there
            print(f"shards for {n:,} x {D} float16 ready in {time.perf_counter() - t0:.0f}s", flush=True)
            all_paths = sorted(str(q) for q in (args.dir / "shards").glob("shard-*.parquet"))
            if n < args.from_n:
                continue
            r, sel = run_one(all_paths[:n // args.shard_rows], n, cfg, raylets, extra, profile=args.profile)
            if n <= args.driver_upto:
                d: dict = {}
                with timed(d, "select"):
                    ref = select_candidates(load_all(all_paths[:n // args.shard_rows], n), cfg,
                                            rng=np.random.default_rng(0))
                r["driver_engine"] = d
                r["identical_to_driver_engine"] = all(
                    (a.rank == b.rank).all() and (a.assign == b.assign).all() and (a.key == b.key).all()
                    for a, b in zip(sel.per_k, ref.per_k))
                print(f"    driver engine {d}; identical: {r['identical_to_driver_engine']}", flush=True)
            out["runs"].append(r)
            save(args.name, out)
        ray.shutdown()
    finally:
        stop_nodes(started)
    if len(out["runs"]) > 1:
        x, y = np.log([r["n"] for r in out["runs"]]), np.log([r["select_s"] for r in out["runs"]])
        out["exponent"] = round(float(np.polyfit(x, y, 1)[0]), 2)
        out["exponent_last_two"] = round(float((y[-1] - y[-2]) / (x[-1] - x[-2])), 2)
        print(f"time ~ N^{out['exponent']} (last two sizes: N^{out['exponent_last_two']})")
    print(f"wrote {save(args.name, out)}")


if __name__ == "__main__":
    main()
