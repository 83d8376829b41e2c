"""Issue 13's check that the layering refactor changed no figure: `bench_preprocess` and `bench_recipes` from the
tree before it and from this one, on the same GPU in one run, in alternating rounds (before, after, before, ...).

    git archive d01b6e4 | tar -x -C .before          # here: the tree the refactor started from
    python benchmarks/before_after.py .before --out OUT --rounds 2

Each tree is installed into its own folder and runs its own copy of both scripts (the scripts changed with the
package), each in a fresh process. `bench_preprocess` runs without its torch.compile column (that baseline is
torch's, not torchopt's, and takes most of the script's time). Writes `before_after.{json,md}`: per figure, the
before and after values of every round, and after / before of the medians, with the rounds' spread beside it, so
a difference inside the round-to-round spread reads as noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import write_results

from torchopt.environment import environment

ROOT = Path(__file__).resolve().parent.parent
TREES = ("before", "after")


def install(tree: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, tree],
        check=True,
    )


def run_bench(tree: Path, site: Path, script: str, args: list[str], out: Path, timeout: float) -> Path:
    """Run `tree`'s own benchmarks/<script> against the package in `site`; returns the folder its results are in."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    cmd = [sys.executable, str(tree / "benchmarks" / script), *args]
    log = (out / f"{script}.log").open("w")
    subprocess.run(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=True)
    return out


def preprocess_figures(folder: Path) -> dict[str, float]:
    data = json.loads(next(folder.glob("preprocess_*.json")).read_text())
    return {f"preprocess {c['case']} µs": c["ours_us"] for c in data["cases"]}


def recipes_figures(folder: Path) -> dict[str, float]:
    data = json.loads(next(folder.glob("recipes_*.json")).read_text())
    return {f"recipes b{r['batch']} {r['variant']} p50 ms": r["p50_ms"] for r in data["rows"] if "p50_ms" in r}


def one_round(trees: dict[str, Path], sites: dict[str, Path], out: Path, rnd: int, timeout: float) -> dict:
    figures: dict[str, dict[str, float]] = {}
    for name in TREES:
        folder = out / name / f"round{rnd}"
        run_bench(
            trees[name], sites[name], "bench_preprocess.py", ["--no-compile", "--out", str(folder)], folder, timeout
        )
        started = time.time()
        run_bench(trees[name], sites[name], "bench_recipes.py", [], folder, timeout)
        for written in (trees[name] / "benchmarks" / "results").glob("recipes_*.*"):
            if written.stat().st_mtime >= started:
                shutil.move(written, folder / written.name)
        figures[name] = {**preprocess_figures(folder), **recipes_figures(folder)}
        print(f"[before_after] round {rnd} {name}: {len(figures[name])} figures", file=sys.stderr, flush=True)
    return figures


def summarize(rounds: list[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for key in rounds[0]["after"]:
        before = [r["before"][key] for r in rounds if key in r["before"]]
        after = [r["after"][key] for r in rounds]
        if not before:
            continue
        ratio = statistics.median(after) / statistics.median(before)
        spread = [max(v) / min(v) for v in (before, after) if len(v) > 1]
        rows.append(
            {
                "figure": key,
                "before": before,
                "after": after,
                "after_over_before": ratio,
                "round_spread": max(spread) if spread else None,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], n_rounds: int) -> str:
    lines = [
        "# Before / after the layering refactor (issue 13)",
        "",
        f"{env.get('gpu')} · torch {env['torch']} · triton {env.get('triton')} · {env['date']} · {n_rounds} round(s),"
        " trees alternating within each round",
        "",
        "| figure | before | after | after / before | max / min within a tree across rounds |",
        "|---|---|---|---:|---:|",
    ]
    for r in rows:
        fmt = ", ".join
        spread = f"{r['round_spread']:.3f}" if r["round_spread"] else "one round"
        lines.append(
            f"| {r['figure']} | {fmt(f'{v:.3f}' for v in r['before'])} | {fmt(f'{v:.3f}' for v in r['after'])} |"
            f" {r['after_over_before']:.3f} | {spread} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the earlier tree, unpacked (git archive REV | tar -x -C DIR)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per benchmark process")
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": ROOT}
    site_root = Path(tempfile.mkdtemp(prefix="torchopt_before_after_"))
    sites = {name: site_root / name for name in TREES}
    for name in TREES:
        install(trees[name], sites[name])
    env = environment()  # the run's start, as the other benchmarks date theirs
    rounds = []
    for rnd in range(args.rounds):
        rounds.append(one_round(trees, sites, args.out, rnd, args.timeout))
        rows = summarize(rounds)  # written after every round: a run cut short keeps what it measured
        write_results(
            {"environment": env, "rounds": rounds, "rows": rows},
            markdown(rows, env, len(rounds)),
            args.out,
            "before_after",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
