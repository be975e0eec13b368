"""The ``ray-pipeline`` command.

``ray-pipeline select [CONFIG.yaml] [flags]`` reads a pool, embeds it (or takes precomputed
vectors), clusters, selects and writes the run directory. Flags override config fields;
``--set section.field=value`` overrides any field. Bad input exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

from .config import Config
from .errors import InputError, Interrupted, OutputError, PipelineError
from .runtime.console import Logs

log = logging.getLogger("ray_pipeline")

# The demo's pool when none is given: the public banking77 intents that ship with the project.
DEMO_DATA = Path(__file__).resolve().parents[1] / "examples" / "banking77" / "train.csv"
RUNS = ("select", "tune", "run")  # the commands that keep a run.json
DEMO_FIELDS = {"data.text_column": "text", "data.label_column": "category"}


def _add_common(s: argparse.ArgumentParser) -> None:
    s.add_argument("config", nargs="?", help="YAML config file (fields as in configs/example.yaml)")
    s.add_argument("--data", help="pool file: .jsonl, .json, .csv or .parquet")
    s.add_argument("--text-column", help="column holding each sample's text")
    s.add_argument("--text-template", help="text built from fields, e.g. '{instruction}\\n{input}'")
    s.add_argument("--image-column", help="column holding an image path (relative to the data file) or bytes")
    s.add_argument("--audio-column", help="column holding a recording (wav, flac, ogg, mp3): a path or bytes")
    s.add_argument("--video-column", help="column holding a clip (mp4, webm, avi, mkv): a path or bytes")
    s.add_argument("--label-column", help="column holding each sample's label")
    s.add_argument("--id-column", help="column holding unique ids (default: row-<n>)")
    s.add_argument("--engine", choices=["ray", "local"], help="embedding engine (default: ray)")
    s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    s.add_argument("--out", help="output directory (default: runs/latest)")
    s.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set cluster.niter=30 (repeatable)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("-v", "--verbose", action="store_true",
                   help="show everything on the console (Ray, its workers, Tune's tables, the libraries' "
                        "warnings) and our debug lines; by default these go to <out>/logs/run.log only")


def _add_run_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--embeddings", help="precomputed vectors: .npy (n, d), .parquet (id, embedding), "
                                        "or a directory written by `ray-pipeline embed`")
    s.add_argument("--k", nargs="+", help="numbers of clusters (--k 50 100) or ratios of each budget (--k M/2 M)")
    s.add_argument("--budgets", nargs="+", help="subset sizes: counts (200) or fractions (0.01, 1%%)")
    s.add_argument("--seed", type=int, help="seed for k-means, the random baselines and training")
    s.add_argument("--overwrite", action="store_true", help="replace a different or unfinished run in --out")
    s.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    s.add_argument("--check", action="store_true", help="check every input and the config, then stop: nothing is "
                                                        "computed or written")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-pipeline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("select", help="embed, cluster and select candidate subsets",
                       description="Read a pool, embed it (or load --embeddings), run k-means for each K, "
                                   "pick key samples and k-center greedy subsets for each budget M, and "
                                   "write selection.parquet, clusters.parquet and run.json.")
    _add_common(s)
    _add_run_flags(s)
    e = sub.add_parser("embed", help="only embed the pool (Ray Data; resumable)",
                       description="Embed every sample into <out>/embeddings/<key>/shard-*.parquet "
                                   "(id, embedding). A rerun skips finished shards.")
    _add_common(e)
    t = sub.add_parser("tune", help="select, then fine-tune every candidate with Ray Tune + DeepSpeed",
                       description="Run the selection, then fine-tune each candidate (and the random and "
                                   "full baselines) under Ray Tune with ASHA; write candidates.json and "
                                   "target/ (subset ids and model), and print the comparison.")
    _add_common(t)
    t.add_argument("--eval", help="held-out set (same columns as the pool): finetune.heldout.eval_path")
    _add_run_flags(t)
    r = sub.add_parser("run", help="the whole job: embed, select, tune, report",
                       description="Embed -> select -> fine-tune every candidate (when finetune.heldout.eval_path "
                                   "is set) -> report.html. Stages are cached by a hash of their inputs and "
                                   "config; --resume continues a run that was interrupted.")
    _add_common(r)
    r.add_argument("--eval", help="held-out set (same columns as the pool): finetune.heldout.eval_path")
    _add_run_flags(r)
    x = sub.add_parser("export", help="write a candidate subset's samples, every original field, for a trainer",
                       description="Write the samples of a run's candidate (NAME from select.json, or target: the "
                                   "tune stage's choice) with every field of the pool's records, as JSONL, JSON, "
                                   "CSV, Parquet or text, in pool order or in greedy order (the order the "
                                   "selection picked them).")
    x.add_argument("run", help="a run directory (the --out of select or run)")
    x.add_argument("--candidate", default="target", help="candidate name (e.g. k100_m200) or target (default)")
    x.add_argument("--output", required=True, help="output file; its suffix picks the format unless --format")
    x.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "csv", "parquet", "text"],
                   help="auto: from --output's suffix, else the pool's own format")
    x.add_argument("--order", default="pool", choices=["pool", "greedy"], help="pool order, or the greedy's picks")
    x.add_argument("-v", "--verbose", action="store_true")
    pr = sub.add_parser("predict", help="apply a tuned model to new samples",
                        description="Classify (or generate for) every sample of --input with --model; "
                                    "write JSONL with the sample's id and the prediction.")
    pr.add_argument("--model", required=True, help="a model directory, e.g. <run>/target/model")
    pr.add_argument("--input", required=True, help="samples: .jsonl, .json, .csv, .parquet or .txt")
    pr.add_argument("--text-column", help="column holding the text (default: text)")
    pr.add_argument("--text-template", help="text built from fields, e.g. '{instruction}\\n{input}\\n'")
    pr.add_argument("--audio-column", help="column holding a recording (a path relative to --input, or bytes): "
                                           "for a model tuned on speech")
    pr.add_argument("--image-column", help="column holding an image (a path relative to --input, or bytes): "
                                           "for a model tuned on images")
    pr.add_argument("--id-column", help="column holding ids (default: row-<n>)")
    pr.add_argument("--output", help="output JSONL (default: <input>.predictions.jsonl)")
    pr.add_argument("-v", "--verbose", action="store_true")
    return p


def _overrides(args: argparse.Namespace) -> dict:
    """The config fields the command-line flags set (``--set`` comes on top of these)."""
    get = lambda name: getattr(args, name, None)  # noqa: E731  (select has flags embed lacks)
    flags = {"data.path": get("data"), "data.embeddings": get("embeddings"),
             "data.text_column": get("text_column"), "data.text_template": get("text_template"),
             "data.image_column": get("image_column"), "data.label_column": get("label_column"),
             "data.audio_column": get("audio_column"), "data.video_column": get("video_column"),
             "data.id_column": get("id_column"), "embed.engine": get("engine"), "ray_address": get("address"),
             "cluster.k": [int(k) if k.isdigit() else k for k in args.k] if get("k") else None,
             "seed": get("seed"), "output_dir": get("out"),
             "finetune.heldout.eval_path": get("eval"),
             "select.budgets": [yaml.safe_load(b) for b in args.budgets] if get("budgets") else None}
    return {k: v for k, v in flags.items() if v is not None}


def build_config(args: argparse.Namespace) -> Config:
    cfg = Config.from_yaml(args.config) if args.config else Config()
    cfg = cfg.with_fields(_overrides(args)).override(args.set)
    if cfg.data.path is None and cfg.data.embeddings is None:
        if not DEMO_DATA.is_file():
            raise PipelineError("no data given: pass --data FILE (jsonl, json, csv or parquet) or "
                                "--embeddings FILE, or a config with data.path "
                                f"(the demo pool {DEMO_DATA} is not here)")
        log.info("no data given: using the demo pool %s", DEMO_DATA)
        cfg = cfg.with_fields({"data.path": str(DEMO_DATA), **DEMO_FIELDS})
    return cfg


def print_sweep(result: dict, run_dir: Path) -> None:
    """Every trial's validation and test score, status and cost, then the verdict in words, then
    where the target's files are (candidates.json records them relative to the run directory)."""
    from .io.run_dir import in_run

    s = result["summary"]
    cost = "gpu_seconds" if any("gpu_seconds" in t for t in result["trials"]) else "cpu_seconds"
    print(f"{'candidate':26s} {'size':>6s} {'status':>14s} {'steps':>6s} {'epochs':>6s} {'validation':>10s} "
          f"{'test':>8s} {cost.replace('_seconds', '-s'):>7s}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for t in sorted(result["trials"], key=lambda t: (t["kind"], t.get("m") or 0, t["name"])):
        print(f"{t['name']:26s} {t['size']:6d} {t['status']:>14s} {t['steps']:6d} {t.get('epochs', 0):6.1f} "
              f"{fmt(t.get('validation_score')):>10s} {fmt(t.get('test_score')):>8s} {t.get(cost, 0):7.0f}")
    split = s.get("split")
    if split:
        print(f"\nheld-out: {split['validation']['rows']} validation rows choose, {split['test']['rows']} test rows "
              f"report ({split['how']})")
    tg = s["target"]
    if tg is None:
        print("no selection candidate finished: see candidates.json for the errors")
        return
    verdict = s.get("verdict")
    if verdict:
        print("\n".join(verdict["lines"]))
    else:  # no test part scored (no model saved): validation figures only, and said so
        print(f"target {tg['name']}: validation {tg['validation_score']:.4f}; not scored on a test part")
    print(f"target model: {in_run(run_dir, tg['model'])}\n"
          f"target subset: {in_run(run_dir, tg.get('subset', tg['ids']))}")


def _prompts(path: str, pool) -> list:
    """What the model answers: each sample's conversation when the file has a chat column (rendered
    with the chat template), else its text."""
    from .io.chat import chat_column
    from .io.pool import read_chats

    columns = pool.records.column_names
    chat = None if pool.texts is None else chat_column(columns, None, has_text=False)
    if chat is None or "text" in columns:
        return pool.texts.tolist()
    return read_chats(pool.records, chat, path)


def _predict(args: argparse.Namespace) -> int:
    from .io.run_dir import atomic_path
    from .config import DataConfig
    from .io.pool import read_pool
    from .finetune.infer import predict

    from .finetune.task import saved_task

    modality = saved_task(args.model).modality
    column = {"audio": args.audio_column, "image": args.image_column}
    for kind, given in column.items():
        if (modality == kind) != bool(given):
            raise InputError(f"--model {args.model!r} was tuned on {modality} samples: " + (
                f"name the column that holds them with --{kind}-column" if modality == kind else
                f"leave --{kind}-column out"))
    pool = read_pool(DataConfig(path=args.input, text_column=args.text_column, text_template=args.text_template,
                                audio_column=args.audio_column, image_column=args.image_column,
                                id_column=args.id_column))
    out = Path(args.output or f"{args.input}.predictions.jsonl")
    if out.is_dir():
        raise OutputError(f"--output {str(out)!r} is a directory; give a file name such as predictions.jsonl")
    media = {"audio": pool.audios, "image": pool.images}.get(modality)
    rows = predict(args.model, list(media) if media is not None else _prompts(args.input, pool))
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps({"id": i, **r}) + "\n" for i, r in zip(pool.ids, rows)))
    print(f"{len(rows)} predictions written to {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .runtime.interrupt import interruptible

    with Logs(args.verbose) as logs, interruptible():  # the console policy, decided here once; undone after
        return _command(args, logs)


def _interrupted(out: Optional[str], e: Interrupted, logs: Logs) -> int:
    """SIGINT / SIGTERM: the run stops unfinished (``run.json``: interrupted), --resume continues it."""
    from .io.run_dir import mark_interrupted

    stage = mark_interrupted(out, e.signal_name) if out else None
    where = f" during the {stage} stage; the run in {out} is unfinished: rerun with --resume to continue" \
        if stage else ""
    print(f"ray-pipeline: interrupted by {e.signal_name}{where}", file=sys.stderr)
    logs.failed(e)
    return e.exit_code


def _command(args: argparse.Namespace, logs: Logs) -> int:
    cfg = None
    try:
        if args.command == "predict":
            return _predict(args)
        if args.command == "export":
            from .io.export import export_run

            done = export_run(Path(args.run), args.candidate, Path(args.output), fmt=args.format, order=args.order)
            print(f"{done['rows']} samples of {done['candidate']} ({done['order']} order) written to {done['output']} "
                  f"as {done['format']}")
            return 0
        cfg = build_config(args)
        if getattr(args, "check", False):
            from .pipeline import check

            tune = args.command == "tune" or (args.command == "run" and bool(cfg.finetune.heldout.eval_path))
            found = check(cfg, tune=tune, overwrite=args.overwrite, resume=args.resume)
            print("input checked, nothing written: " + "; ".join(f"{k} {v}" for k, v in found.items()))
            return 0
        console = logs.run_console(cfg.output_dir, progress=not args.no_progress)
        if args.command == "select":
            from .pipeline import run_select

            out = run_select(cfg, overwrite=args.overwrite, resume=args.resume, console=console)
            print(f"selection written to {out}")
        elif args.command == "embed":
            from .pipeline import run_embed

            out = run_embed(cfg, console=console)
            print(f"embeddings written to {out}")
        elif args.command == "tune":
            from .pipeline import run_tune

            print_sweep(run_tune(cfg, overwrite=args.overwrite, resume=args.resume, console=console),
                        Path(cfg.output_dir))
        elif args.command == "run":
            from .pipeline import run_all

            out = run_all(cfg, overwrite=args.overwrite, resume=args.resume, console=console)
            cand = out / "candidates.json"
            if cand.is_file():
                print_sweep(json.loads(cand.read_text()), out)
            print(f"report: {out / 'report.html'}")
    except PipelineError as e:
        print(f"ray-pipeline: error: {e}", file=sys.stderr)
        logs.failed(e)
        return e.exit_code
    except Interrupted as e:
        return _interrupted(cfg.output_dir if cfg is not None and args.command in RUNS else None, e, logs)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
