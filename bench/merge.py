"""``python -m mtlfast.bench.merge DIR... --out DIR``: one report from several runs on one device
(gpu_check.sh runs each workload in its own process)."""

from __future__ import annotations

import argparse
import json
import os

from . import report


def merge(paths: list[str]) -> dict:
    docs = []
    for path in paths:
        file = os.path.join(path, "results.json") if os.path.isdir(path) else path
        if os.path.exists(file):
            with open(file) as f:
                docs.append(json.load(f))
    if not docs:
        raise SystemExit(f"no results.json under {paths}")
    merged = dict(docs[0])
    merged["results"] = [row for doc in docs for row in doc["results"]]
    merged["command"] = " ; ".join(doc["command"] for doc in docs)
    runs = [doc for doc in docs if doc.get("ceilings")]
    if runs:
        # each run measured its own ceilings (its rows' floor ratios use them): keep them all
        merged["ceilings"] = [dict(doc["ceilings"], workloads=sorted({r["workload"] for r in doc["results"]}))
                              for doc in runs]  # fmt: skip
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mtlfast.bench.merge")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    doc = merge(args.runs)
    report.write(doc, args.out)
    print(report.markdown(doc))


if __name__ == "__main__":
    main()
