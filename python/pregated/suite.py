"""The standard benchmark suite of scripts/gpu-check.sh.

    python -m pregated.suite --results DIR [--dry-run] [--quick] [--only 0,2]

Runs `pregated bench` for each model of the suite in its own process (one failure does not
stop the others), merges the results into DIR/<date>-<gpu>.json with a plot next to it, and
rewrites the table in benchmarks/README.md. --dry-run runs the same steps on the CPU with tiny
shapes, so the script is exercised between GPU runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys

BUDGETS = "10%,25%,50%"
# (synthetic model, extra bench arguments, seconds allowed): full depth where the machine allows,
# enough layers for stable numbers otherwise. The slow HF-offloading baseline runs last.
SUITE = [
    ("mixtral-8x7b", ["--layers", "8", "--timeline"], 150),
    ("qwen3-30b-a3b", ["--layers", "12", "--timeline"], 120),
    # quantized experts against the model's own at the same device memory, and the host lane
    # (issues 14 and 15: int4 vs bf16, hybrid vs pregated and on-demand at 10% and 25%)
    ("mixtral-8x7b", ["--layers", "4", "--expert-dtype", "model", "int4", "--policy", "on-demand,pregated,hybrid",
                      "--expert-memory", "10%,25%"], 360),
    ("olmoe-1b-7b", ["--baseline", "hf-accelerate", "--baseline", "hf-gpu", "--baseline-tokens", "8", "--timeline"], 330),
]
# The issues' headline ratios inside a 15-minute device lease (--quick): gpu-only against hf-gpu
# and host time per MoE block (timeline), pregated at 50% against gpu-only on two shapes, hybrid
# against pregated and on-demand in bf16 and int4.
QUICK_SUITE = [
    ("olmoe-1b-7b", ["--baseline", "hf-gpu", "--baseline-tokens", "8", "--timeline", "--policy", "pregated",
                     "--expert-memory", "50%"], 180),
    ("qwen3-30b-a3b", ["--layers", "12", "--policy", "pregated", "--expert-memory", "50%"], 100),
    ("mixtral-8x7b", ["--layers", "4", "--expert-dtype", "model", "int4", "--policy", "on-demand,pregated,hybrid",
                      "--expert-memory", "10%,25%"], 240),
]
DRY_SUITE = [
    ("tiny", ["--baseline", "hf-accelerate", "--baseline", "hf-gpu", "--timeline"], 300),
    ("tiny", ["--layers", "2"], 300),
    ("tiny", ["--layers", "2", "--expert-dtype", "model", "int4", "--policy", "on-demand,pregated,hybrid",
              "--expert-memory", "10%,25%"], 300),
]
COMMON = ["--policy", "on-demand,prefetch-all,pregated,hybrid", "--expert-memory", BUDGETS,
          "--prompt-len", "32", "--new-tokens", "24"]
MARK_BEGIN, MARK_END = "<!-- results:begin -->", "<!-- results:end -->"


def suite_entries(dry_run: bool, quick: bool, only: str | None) -> list:
    """The suite to run, entries not picked by `only` ("0,2") left as None so that each keeps
    its number (and its output file's name) across calls."""
    suite = (DRY_SUITE[:2] if dry_run else QUICK_SUITE) if quick else DRY_SUITE if dry_run else SUITE
    if only is None:
        return list(suite)
    try:
        picked = {int(x) for x in only.split(",") if x.strip()}
    except ValueError:
        picked = set()
    if not picked or any(not 0 <= k < len(suite) for k in picked):
        raise ValueError(f"--only takes entry numbers from 0 to {len(suite) - 1}, comma-separated (got {only!r})")
    return [entry if k in picked else None for k, entry in enumerate(suite)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="folder for the JSON, logs and plot")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--readme", default=os.path.join("benchmarks", "README.md"),
                    help="README whose results section is rewritten ('' = none)")
    ap.add_argument("--quick", action="store_true",
                    help="the headline ratios only, for a short device lease (with --dry-run: the dry suite's first two)")
    ap.add_argument("--only", default=None,
                    help="entries of the suite by number, e.g. 0,2 (to split it over several calls; the README is left alone)")
    args = ap.parse_args(argv)
    try:
        suite = suite_entries(args.dry_run, args.quick, args.only)
    except ValueError as e:
        ap.error(str(e))
    if args.only is not None:
        args.readme = ""
    os.makedirs(args.results, exist_ok=True)
    device = ["--device", "cpu"] if args.dry_run else []
    results, commands = [], []
    for k, entry in enumerate(suite):
        if entry is None:  # not picked by --only
            continue
        model, extra, timeout = entry
        out = os.path.join(args.results, f"bench-{k}-{model}.json")
        args_ = ["bench", "--synthetic", model, *COMMON, *extra, *device, "--out", out]
        cmd = [sys.executable, "-m", "pregated", *args_]
        commands.append(shlex.join(["pregated", *args_]))
        print(f"\n$ {commands[-1]}", flush=True)
        try:
            code = subprocess.run(cmd, text=True, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout} s"
        if code != 0 or not os.path.isfile(out):
            print(f"suite: {model} failed ({code})", file=sys.stderr)
            results.append({"model": model, "error": f"pregated bench: {code}", "command": commands[-1]})
            continue
        with open(out, encoding="utf-8") as f:
            res = json.load(f)
        res["command"] = commands[-1]
        results.append(res)
    good = [r for r in results if "runs" in r]
    if not good:
        print("suite: every benchmark failed", file=sys.stderr)
        return 1
    machine = good[0]["machine"]
    gpu = re.sub(r"[^A-Za-z0-9.-]+", "-", machine["gpu"] or "cpu").strip("-")
    stem = f"{datetime.date.today().isoformat()}-{gpu}" + ("-dry-run" if args.dry_run else "")
    merged = {"machine": machine, "commands": commands, "date": good[0]["date"],
              "runs": [run for r in good for run in r["runs"]],
              "timelines": [r["timeline"] for r in good if "timeline" in r],
              "failed": [r for r in results if "runs" not in r]}
    path = os.path.join(args.results, stem + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1)
    from .bench import format_table, plot

    png = os.path.join(args.results, stem + ".png")
    try:
        plot(good, png)
    except ImportError:
        png = None
    table = format_table(merged)
    print("\n" + table)
    if args.readme and os.path.isfile(args.readme) and not args.dry_run:
        write_readme(args.readme, merged, table, path, png)
    print(f"\nsuite: wrote {path}" + (f" and {png}" if png else ""))
    return 0 if not merged["failed"] else 1


def write_readme(readme: str, merged: dict, table: str, path: str, png: str | None) -> None:
    base = os.path.dirname(os.path.abspath(readme))
    rel = lambda p: os.path.relpath(os.path.abspath(p), base)  # noqa: E731
    section = [MARK_BEGIN, f"Latest run: {merged['date']} on {merged['machine']['gpu']} "
               f"(driver {merged['machine']['driver']}, CUDA {merged['machine']['cuda']}, torch "
               f"{merged['machine']['torch']}); pinned host-to-device {merged['machine']['h2d_gbps']:.1f} GB/s. "
               f"Produced by `scripts/gpu-check.sh`, which ran:", "", "```"]
    section += merged["commands"] + ["```", "", "```", table, "```", ""]
    section.append(f"Full figures: [{os.path.basename(path)}]({rel(path)})")
    if png:
        section += ["", f"![tokens/s and device memory per policy and budget]({rel(png)})"]
    section.append(MARK_END)
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    if MARK_BEGIN in text and MARK_END in text:
        text = text[:text.index(MARK_BEGIN)] + "\n".join(section) + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text += "\n" + "\n".join(section) + "\n"
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
