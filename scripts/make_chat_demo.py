"""Write the shipped chat demo pool (examples/gpteacher_chat/) from GPTeacher's Toolformer file.

    python scripts/make_chat_demo.py [--shared ../shared]

A seeded sample of the 7,673 records of `gpteacher_toolformer_dedupe.json` (MIT, Teknium),
each turned into one `messages` conversation: the user turn is the instruction (with its input
after a blank line, when there is one), the assistant turn the output. 400 conversations form
the pool and 100 others the held-out file. The same seed writes the same files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

POOL, HELD_OUT, SEED = 400, 100, 0


def conversation(i: int, r: dict) -> dict:
    user = r["instruction"].strip() + (("\n\n" + r["input"].strip()) if r["input"].strip() else "")
    return {"id": f"gpteacher-{i}", "messages": [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": r["output"].strip()}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    args = ap.parse_args()
    src = args.shared / "data" / "instruct"
    records = json.loads((src / "gpteacher_toolformer_dedupe.json").read_text())
    order = np.random.default_rng(SEED).permutation(len(records))
    out = Path(__file__).resolve().parents[1] / "examples" / "gpteacher_chat"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("chats.jsonl", order[:POOL]), ("held_out.jsonl", order[POOL:POOL + HELD_OUT])):
        lines = [json.dumps(conversation(int(i), records[int(i)]), ensure_ascii=False) for i in rows]
        (out / name).write_text("\n".join(lines) + "\n")
    shutil.copyfile(src / "GPTeacher_LICENSE", out / "LICENSE")
    print(f"wrote {POOL} + {HELD_OUT} conversations to {out}")


if __name__ == "__main__":
    main()
