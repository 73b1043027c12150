"""How many training tokens the thinking model needs, whatever the machine's speed:
`python tests/learn.py [--seeds 1337 1 2] [--steps 2600] [--stop-after N] [-- EXTRA TRAIN FLAGS]`.

Trains the built-in corpus by steps, not minutes (`train --max-minutes 0 --max-iters STEPS`), so the
learning-rate schedule and every number here are the same on a fast and a slow machine; only the
wall time differs. `--stop-after N` stops each run after N of its STEPS, as a 9-minute default run
is still at its high learning rate after the same tokens (`--steps 8000` is about the schedule of a
default run with bf16 units: 12M tokens). For each seed it prints the training tokens at which the probe (the share of the
200 validation problems whose working greedy decoding writes exactly) first reached 50%, 90% and
95%, the probe and validation loss at the end, then the medians. A benchmark prints numbers; the
tests never time anything."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first(rows, share):
    return next((r["tokens"] for r in rows if r.get("accuracy", 0) >= share), None)


def millions(v):
    return "not reached" if v is None else f"{v / 1e6:.2f}M"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    p.add_argument("--steps", type=int, default=2600, help="steps of batch 8 x 192 (2,600: 4.0M tokens)")
    p.add_argument("--stop-after", type=int, default=0, help="stop each run after this many steps (0: at --steps)")
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("extra", nargs="*", help="more train flags, after --")
    a = p.parse_args()
    stop = ["--stop-after", str(a.stop_after)] if a.stop_after else []
    print(f"train --max-minutes 0 --max-iters {a.steps} --eval-interval {a.eval_interval} {' '.join(stop + a.extra)}\n")
    print("| seed | probe 50% | probe 90% | probe 95% | probe at the end | val loss | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            out = os.path.join(tmp, f"s{seed}.pt")
            cmd = [sys.executable, os.path.join(ROOT, "tinyllm.py"), "train", "--max-minutes", "0",
                   "--max-iters", str(a.steps), "--eval-interval", str(a.eval_interval), "--seed", str(seed),
                   "--out", out, *stop, *a.extra]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode not in (0, 130 if stop else 0):   # 130: stopped by --stop-after, as by Ctrl-C
                sys.exit(f"seed {seed} failed:\n{r.stderr[-2000:]}")
            rows = [json.loads(line) for line in open(out.replace(".pt", ".log.jsonl"))]
            res = {"50": first(rows, 0.5), "90": first(rows, 0.9), "95": first(rows, 0.95),
                   "end": rows[-1]["accuracy"], "val": rows[-1]["val_loss"], "wall": rows[-1]["elapsed"]}
            results.append(res)
            print(f"| {seed} | {millions(res['50'])} | {millions(res['90'])} | {millions(res['95'])} | "
                  f"{100 * res['end']:.1f}% | {res['val']:.4f} | {res['wall']:.0f} |", flush=True)
    unreached = float("inf")
    med = {k: statistics.median(r[k] if r[k] is not None else unreached for r in results) for k in ("50", "90", "95")}
    print(f"| median | " + " | ".join(millions(None if v == unreached else v) for v in med.values()) +
          f" | {100 * statistics.median(r['end'] for r in results):.1f}% | "
          f"{statistics.median(r['val'] for r in results):.4f} | |")


if __name__ == "__main__":
    main()
