"""Turn a pytest-benchmark JSON into a Markdown table and a PNG plot.

python bench/report.py bench/results/cpu.json            # writes cpu.md and cpu.png beside it
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def load(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data, data["benchmarks"]


def header(data: dict) -> str:
    info = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", info.get("processor", "?"))
    lines = [
        f"- date: {data.get('datetime', '?')}",
        f"- machine: {cpu}, {info.get('cpu', {}).get('count', '?')} logical cores",
        f"- python {info.get('python_version', '?')}; commit {commit.get('id', '?')[:10]}"
        f"{' (dirty)' if commit.get('dirty') else ' (clean checkout)'}",
    ]
    extra = data["benchmarks"][0].get("extra_info", {}) if data["benchmarks"] else {}
    if "torch" in extra:
        lines.append(f"- torch {extra['torch']}, {extra.get('device_name', '')}")
    return "\n".join(lines)


def elementwise_table(benches: list[dict]) -> tuple[str, dict]:
    rows = defaultdict(dict)
    for b in benches:
        e = b.get("extra_info", {})
        if "op" in e and "numel" in e and not b["name"].startswith("test_training_step"):
            rows[(e["op"], e["dtype"], e["numel"])][e["mode"]] = (b["stats"]["median"], e)
    out = [
        "| op | dtype | elements | eager | compiled | speedup | compiled GB/s | of copy BW | vs anchor | peak extra mem eager / compiled (× output) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    series = defaultdict(list)
    for (op, dtype, numel), modes in sorted(
        rows.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])
    ):
        eager = modes.get("eager")
        comp = modes.get("compiled")
        best = comp or eager
        e = best[1]
        mem_e = eager[1].get("peak_extra_over_output") if eager else None
        mem_c = comp[1].get("peak_extra_over_output") if comp else None
        out.append(
            f"| {op} | {dtype.replace('torch.', '')} | {numel:,} | "
            f"{fmt_time(eager[0]) if eager else '–'} | {fmt_time(comp[0]) if comp else '–'} | "
            f"{fmt(e.get('speedup_vs_eager') if comp else None, '.1f')}{'×' if comp else ''} | "
            f"{fmt(e.get('gb_per_s'), '.1f')} | {fmt(e.get('fraction_of_copy_bw'), '.0%')} | "
            f"{fmt(e.get('speedup_vs_fastgen_anchor') if comp else None, '.1f')}{'×' if comp and 'speedup_vs_fastgen_anchor' in e else ''} | "
            f"{fmt(mem_e, '.1f')} / {fmt(mem_c, '.1f')} |"
        )
        if comp:
            series[(op, dtype)].append((numel, e.get("speedup_vs_eager"), e.get("gb_per_s")))
        elif op.startswith("clone"):
            series[(op, dtype)].append((numel, None, e.get("gb_per_s")))
    return "\n".join(out), series


def simple_table(benches: list[dict], prefix: str, columns: list[tuple[str, str, str]]) -> str:
    picked = [b for b in benches if b["name"].startswith(prefix)]
    if not picked:
        return ""
    head = "| case | median | " + " | ".join(c[0] for c in columns) + " |"
    sep = "|---|---:|" + "---:|" * len(columns)
    lines = [head, sep]
    for b in picked:
        e = b.get("extra_info", {})
        cells = [fmt(e.get(key), spec) for _, key, spec in columns]
        lines.append(
            f"| {b['name'].removeprefix(prefix).strip('[]')} | {fmt_time(b['stats']['median'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def plot(series: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (op, dtype), points in sorted(series.items()):
        points.sort()
        sizes = [p[0] for p in points]
        label = f"{op} {dtype.replace('torch.', '')}"
        if not op.startswith("clone"):
            ax1.plot(sizes, [p[1] for p in points], marker="o", label=label)
        style = dict(color="black", linestyle="--", linewidth=2) if op.startswith("clone") else {}
        ax2.plot(sizes, [p[2] for p in points], marker="o", label=label, **style)
    for ax, ylabel in (
        (ax1, "compiled speedup over eager (×)"),
        (ax2, "GB/s (compiled; dashed: clone)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements per tensor")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax2.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--title", default=None)
    parser.add_argument(
        "--compact",
        action="store_true",
        help="rewrite the JSON without the per-round timings (stats stay): MBs -> KBs, for committing",
    )
    args = parser.parse_args()
    data, benches = load(args.json)
    if args.compact:
        for b in benches:
            b["stats"].pop("data", None)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    table, series = elementwise_table(benches)
    sampling = simple_table(
        benches,
        "test_sample_timesteps",
        [("µs/call", "us_per_call", ".1f"), ("speedup", "speedup_vs_eager", ".1f")],
    )
    step = simple_table(
        benches,
        "test_training_step[",
        [
            ("overhead % (medians)", "helpers_overhead_percent", ".1f"),
            ("overhead % (minima)", "helpers_overhead_percent_min", ".1f"),
        ],
    )
    dmd = simple_table(
        benches,
        "test_dmd2_update",
        [("peak MiB", "peak_mib", ".1f"), ("× modelopt eager", "speedup_vs_modelopt_eager", ".2f")],
    )
    inter = [b for b in benches if b["name"].startswith("test_training_step_overhead_interleaved")]
    if inter:
        e = inter[0]["extra_info"]
        step += (
            f"\n\nInterleaved, {e['rounds']} rounds of (precomputed, with helpers, with helpers given "
            f"the noise): medians {e['precomputed_ms']:.1f} / {e['with_helpers_ms']:.1f} / "
            f"{e['given_noise_ms']:.1f} ms; median per-round overhead "
            f"**{e['helpers_overhead_percent_given_noise']:.1f}%** for the helpers, "
            f"{e['helpers_overhead_percent']:.1f}% when the step also draws its noise (`randn`)."
        )
    md = [
        f"## {args.title or args.json.stem}",
        "",
        header(data),
        "",
        "### Elementwise primitives",
        "",
        table,
    ]
    if sampling:
        md += ["", "### Timestep sampling", "", sampling]
    if step:
        md += ["", "### Compiled training step", "", step]
    if dmd:
        md += ["", "### DMD2 update (student + fake score), toy DiT", "", dmd]
    out_md = args.json.with_suffix(".md")
    out_md.write_text("\n".join(md) + "\n")
    plot(series, args.json.with_suffix(".png"), args.title or args.json.stem)
    print(f"wrote {out_md} and {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
