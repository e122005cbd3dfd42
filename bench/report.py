"""results.json -> results.md (a table with ratios to eager) and results.png (bar charts)."""

from __future__ import annotations

import json
import os


def _by_workload(results: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in results:
        grouped.setdefault(row["workload"], []).append(row)
    return grouped


# Extra peak memory below this is measurement noise on a CPU (peak RSS growth can even come
# out negative): no memory ratio is given against such a baseline, or for a negative figure.
MEMORY_RATIO_MIN_MB = 1.0


def _memory_ratio(row: dict, eager: dict | None) -> float | None:
    peak, base = row.get("peak_mb"), eager.get("peak_mb") if eager else None
    if peak is None or base is None or base < MEMORY_RATIO_MIN_MB or peak < 0:
        return None
    return peak / base


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def markdown(doc: dict) -> str:
    lines = [
        f"# mtlfast benchmark: {doc['device']}",
        "",
        f"torch {doc['torch']}, triton {doc['triton']}, commit {doc['commit']}, {doc['date']}",
        "",
        f"Command: `{doc['command']}`",
        "",
    ]
    peers = [f"{name} {version}" for name, version in doc.get("peers", {}).items() if version]
    if peers:
        lines += [f"Peers installed: {', '.join(peers)}.", ""]
    ceilings = doc.get("ceilings")
    for c in [ceilings] if isinstance(ceilings, dict) else ceilings or []:
        where = f" ({', '.join(c['workloads'])} run)" if c.get("workloads") else ""
        lines += [f"Measured ceilings{where}: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
                  f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.", ""]  # fmt: skip
    lines += [
        "| workload | provider | ms | speed vs eager | kernels ms | kernels vs eager | extra peak MB | memory vs eager "
        "| tokens/s | time / floor | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for workload, rows in _by_workload(doc["results"]).items():
        eager = next((r for r in rows if r["provider"] == "eager" and r.get("ms")), None)
        for r in rows:
            speed = eager["ms"] / r["ms"] if eager and r.get("ms") else None
            kernels = eager["device_ms"] / r["device_ms"] if eager and eager.get("device_ms") and r.get("device_ms") else None
            memory = _memory_ratio(r, eager)
            status = r["status"] + (f"; kernels alone: {r['device_status']}" if r.get("device_status") else "")
            lines.append(
                f"| {workload} | {r['provider']} | {_fmt(r.get('ms'), '.3f')} | {_fmt(speed, '.2f')}x | "
                f"{_fmt(r.get('device_ms'), '.3f')} | {_fmt(kernels, '.2f')}x | "
                f"{_fmt(r.get('peak_mb'), '.1f')} | {_fmt(memory, '.2f')}x | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
                f"{_fmt(r.get('floor_ratio'), '.1f')} | {status} |"
            )
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> bool:
    """Bar charts of time and extra peak memory per provider and workload; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    grouped = _by_workload(doc["results"])
    fig, axes = plt.subplots(2, len(grouped), figsize=(5 * len(grouped), 7), squeeze=False)
    for col, (workload, rows) in enumerate(grouped.items()):
        rows = [r for r in rows if r.get("ms")]
        names = [r["provider"] for r in rows]
        for row, (key, label) in enumerate((("ms", "ms per step"), ("peak_mb", "extra peak MB"))):
            ax = axes[row][col]
            ax.bar(names, [r.get(key) or 0 for r in rows], color="tab:blue" if row == 0 else "tab:orange")
            ax.set_title(f"{workload}: {label}", fontsize=9)
            ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.suptitle(f"mtlfast heads, fwd+bwd ({doc['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(doc: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(doc))
    plot(doc, os.path.join(out_dir, "results.png"))
