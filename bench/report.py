"""Turn a pytest-benchmark JSON into a Markdown table and a PNG plot.

python bench/report.py bench/results/cpu.json            # writes cpu.md and cpu.png beside it
python bench/report.py --site docs/benchmarks.md bench/results/*.json   # the docs' benchmarks page
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


def dmd_table(benches: list[dict]) -> str:
    """The DMD2 update: one row per (case, dtype), one column per implementation."""
    picked = [b for b in benches if b["name"].startswith("test_dmd2_update")]
    if not picked:
        return ""
    impls = list(dict.fromkeys(b["extra_info"]["impl"] for b in picked))
    rows = defaultdict(dict)
    for b in picked:
        e = b["extra_info"]
        rows[(e["case"], e["dtype"].replace("torch.", ""))][e["impl"]] = (b["stats"]["median"], e)
    out = ["| update | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
    for (case, dtype), cells in rows.items():
        row = []
        for impl in impls:
            if impl not in cells:
                row.append("–")
                continue
            median, e = cells[impl]
            ratio = e.get("speedup_vs_modelopt_eager")
            row.append(
                f"{fmt_time(median)}"
                + (f" ({ratio:.2f}×)" if ratio is not None else "")
                + f", {e['peak_mib']:.1f} MiB"
            )
        out.append(f"| {case}, {dtype} | " + " | ".join(row) + " |")
    return "\n".join(out)


CONSISTENCY_NOTE = """\
Forward: the JVP by forward-mode AD (`torch.func.jvp`), eager or inside the compiled graph
(`fullgraph=True`, inductor); finite difference: two plain student calls in its place. Compiled /
eager divides the compiled median by the eager one of the same JVP; × forward mode divides the
finite difference's median by forward mode's in the same mode. The optimizer step is eager in
every variant; the teacher has no guidance.

These figures come from a 2-core CPU shared with other work (the 1-minute load average after
each case is in the JSON; here at most {load:.2f}): they compare the four forms on small networks
(the parameters trained are in the table, sCM's with its adaptive weighting; batch 8), where
Python dispatch and per-op overhead weigh far more than on a GPU. They do not show GPU times,
large models, bf16, or the compile time itself (spent in the warm-up, outside the timed region);
the peak is what one update allocates beyond what was live before it, by the profiler's
allocation events, not the CUDA allocator's peak."""


def consistency_table(benches: list[dict]) -> str:
    """The sCM and MeanFlow updates: one row per (update, network, JVP), eager beside compiled."""
    picked = [b for b in benches if b["name"].startswith("test_consistency_update")]
    if not picked:
        return ""
    rows = defaultdict(dict)
    for b in picked:
        e = b["extra_info"]
        jvp, mode = e["impl"].split("-")
        rows[(e["method"], e["model"], jvp)][mode] = (b["stats"]["median"], e)
    names = {"scm": "sCM", "meanflow": "MeanFlow", "dit": "toy DiT", "sd3": "SD3"}
    out = [
        "| update, network (parameters trained) | JVP | eager | compiled | compiled / eager | "
        "× forward mode (eager, compiled) | peak memory eager / compiled |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (method, model, jvp), modes in rows.items():
        eager, comp = modes.get("eager"), modes.get("compiled")
        times = [fmt_time(m[0]) if m else "–" for m in (eager, comp)]
        ratio = comp[1].get("compiled_over_eager") if comp else None
        over = [m[1].get("fd_over_forward") if m else None for m in (eager, comp)]
        peaks = [fmt(m[1]["peak_mib"] if m else None, ".1f") for m in (eager, comp)]
        params = (eager or comp)[1]["student_params"]
        out.append(
            f"| {names[method]}, {names[model]} ({params:,}) | "
            f"{'forward' if jvp == 'forward' else 'finite difference'} | {times[0]} | "
            f"{times[1]} | {fmt(ratio, '.2f')} | "
            f"{'–' if jvp == 'forward' else ', '.join(fmt(r, '.2f') for r in over)} | "
            f"{peaks[0]} / {peaks[1]} MiB |"
        )
    load = max(b["extra_info"].get("load_avg_1min", float("nan")) for b in picked)
    return "\n".join(out) + "\n\n" + CONSISTENCY_NOTE.format(load=load)


def checkpoint_table(benches: list[dict]) -> str:
    picked = [b for b in benches if b["name"].startswith("test_checkpoint")]
    if not picked:
        return ""
    out = [
        "| case | median | × the torch.save / torch.load reference | peak extra memory (× state) |",
        "|---|---:|---:|---:|",
    ]
    for b in picked:
        e = b.get("extra_info", {})
        ratio = e.get("time_over_torch_save", e.get("time_over_torch_load"))
        out.append(
            f"| {b['name'].removeprefix('test_checkpoint_')} | {fmt_time(b['stats']['median'])} | "
            f"{fmt(ratio, '.2f')} | {fmt(e.get('peak_extra_over_state'), '.2f')} |"
        )
    return "\n".join(out)


def trainer_table(benches: list[dict]) -> str:
    picked = [b for b in benches if b["name"].startswith("test_trainer_overhead")]
    if not picked:
        return ""
    e = picked[0]["extra_info"]
    return "\n".join(
        [
            "| bare compiled losses (median per iteration) | through the Trainer | overhead |",
            "|---:|---:|---:|",
            f"| {e['bare_median_ms']:.1f} ms | {e['trainer_median_ms']:.1f} ms | "
            f"{e['overhead_median']:.1%} |",
        ]
    )


def lora_table(benches: list[dict]) -> str:
    picked = [b for b in benches if b["name"].startswith("test_lora_memory")]
    if not picked:
        return ""
    e = picked[0]["extra_info"]
    full, lora = e["full"], e["lora"]
    rows = [
        ("trainable parameters (student)", "trainable_params", lambda v: f"{v:,}", "trainable_ratio"),
        ("gradients + AdamW state", "grad_and_optimizer_bytes", lambda v: f"{v / 2**20:.1f} MiB", "state_ratio"),
        ("peak resident memory of the process", "peak_rss_bytes", lambda v: f"{v / 2**20:.0f} MiB", "peak_rss_ratio"),
        ("time per iteration", "seconds_per_iteration", lambda v: f"{v * 1e3:.0f} ms", "time_ratio"),
    ]  # fmt: skip
    out = ["| | full fine-tuning | LoRA | LoRA / full |", "|---|---:|---:|---:|"]
    for label, key, show, ratio in rows:
        out.append(f"| {label} | {show(full[key])} | {show(lora[key])} | {e[ratio]:.3f} |")
    return "\n".join(out)


def memory_table(benches: list[dict]) -> str:
    picked = [b for b in benches if b["name"].startswith("test_memory_per_teacher_parameter")]
    if not picked:
        return ""
    out = []
    for bench in picked:
        e = bench["extra_info"]
        allocators = list(e["modes"])
        blocks = f", {e['blocks']} blocks" if "blocks" in e else ""
        out += [
            *([""] if out else []),
            f"Bytes per teacher parameter ({e['teacher_params']:,}{blocks}), per rank (rank 0 "
            "first):",
            "",
            "| mode | " + " | ".join(allocators) + " |",
            "|---|" + "---|" * len(allocators),
        ]
        for mode in e["modes"][allocators[0]]:
            cells = []
            for allocator in allocators:
                r = e["modes"][allocator].get(mode)
                if r is None:
                    cells.append("")
                elif "bytes_per_param" in r:  # the fixed bytes
                    cells.append(f"{r['bytes_per_param']:.2f}")
                elif "replicated" in r:
                    cells.append(f"{r['replicated']:.1f} + {r['sharded']:.1f} / N")
                else:
                    cells.append(" / ".join(f"{v:.1f}" for v in r["bytes_per_param_by_rank"]))
            out.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def render(data: dict, title: str, level: int = 2) -> tuple[str, dict]:
    """The Markdown for one results JSON (its headings at ``level``) and the plot's series."""
    benches = data["benchmarks"]
    h = "#" * level
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
    sections = [
        ("Elementwise primitives", table if series else ""),
        ("Timestep sampling", sampling),
        ("Compiled training step", step),
        (
            "DMD2 update (student + fake score), toy DiT: median, × modelopt eager, peak",
            dmd_table(benches),
        ),
        (
            "sCM and MeanFlow distillation updates (loss, backward, AdamW step): median, peak",
            consistency_table(benches),
        ),
        ("Checkpoints, ~100M parameters", checkpoint_table(benches)),
        ("Trainer overhead", trainer_table(benches)),
        (
            "LoRA against full fine-tuning (SD3 transformer, 55M parameters, rank 16)",
            lora_table(benches),
        ),
        ("Memory of fastgen distill per teacher parameter", memory_table(benches)),
    ]
    md = [f"{h} {title}", "", header(data)]
    for name, body in sections:
        if body:
            md += ["", f"{h}# {name}", "", body]
    return "\n".join(md) + "\n", series


SITE_INTRO = """# Benchmarks

Generated by `python bench/report.py --site docs/benchmarks.md bench/results/*.json` from the
committed runs in `bench/results/`; every figure below is read from those JSON files (one
pytest-benchmark run each, ratios measured within the run). `tests/test_docs.py` checks that
this page matches them.

What is timed (`bench/`, pytest-benchmark; compile and warm-up outside the timed region):

- `test_elementwise.py`: every primitive, eager and compiled, against a `clone()` of the same
  bytes (the copy-bandwidth reference) and an eager FastGen-style `forward_process` (the anchor);
  GB/s, fraction of copy bandwidth, speedups and the peak extra memory of one call.
- `test_sampling.py`: `sample_timesteps` per call, eager and compiled.
- `test_step.py`: a compiled DiT-style training step with and without fastgen's helpers.
- `test_dmd_step.py`: one student and one fake-score update of a toy DiT (4 layers, width 64,
  batch 8, latents 4×16×16, CFG 3), modelopt eager beside fastgen eager and compiled, with
  batched CFG, the float32 policy and stratified rungs.
- `test_consistency_step.py`: one sCM (with its adaptive weighting) and one MeanFlow
  distillation update (loss, backward, AdamW step) of the toy DiT above and of a small SD3
  transformer (2 joint blocks, width 64, batch 8, latents 4×16×16), the JVP by forward-mode AD
  (eager, and compiled inside the graph) and by finite differences (eager and compiled).
- `test_checkpoint.py`: `save_checkpoint`/`load_checkpoint` of ~100M parameters against
  `torch.save` + `fsync` / `torch.load` of the same state.
- `test_trainer.py`: the Trainer's cost over the bare compiled losses.
- `test_lora.py`: LoRA (rank 16 on the attention projections) against full fine-tuning of an
  SD3 transformer through the Trainer, each in its own process: trainable parameters, gradient
  and optimizer bytes, peak resident memory, time per iteration.
- `test_memory.py`: `fastgen distill` on an SD3 transformer folder (55M parameters) in each
  way to run it (1 process, FSDP2 on 1/2/4 gloo ranks, activation checkpointing, LoRA), each
  rank's peak resident memory per teacher parameter, with glibc's default allocator and with
  large blocks returned when freed (the live tensors); and on a teacher of the same size in 24
  blocks, beside the same 24 blocks at the smoke folder's widths (the `narrow` rows, in bytes
  per parameter of the 24-block teacher: what a run of that structure holds whatever its
  width); see the memory guide.

Run them:

    python -m pytest bench --benchmark-json bench/results/cpu.json     # full run
    python bench/report.py bench/results/cpu.json --compact            # -> cpu.md, cpu.png
    python -m pytest bench --benchmark-disable                         # smoke mode (CI)
    bash bench/run_gpu.sh                                              # the same suite on a GPU

No GPU run is committed: the GPU figures (fraction of copy bandwidth on an H200, the sampler
under CUDA graphs) are not measured.
"""


def site(paths: list[Path]) -> str:
    """The benchmarks page: the intro, then each results file's tables."""
    parts = [SITE_INTRO]
    for path in sorted(paths):
        data, _ = load(path)
        body, _ = render(data, f"`{path.name}`")
        parts.append(body)
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+")
    parser.add_argument("--title", default=None)
    parser.add_argument(
        "--compact",
        action="store_true",
        help="rewrite the JSON without the per-round timings (stats stay): MBs -> KBs, for committing",
    )
    parser.add_argument("--site", type=Path, help="write the benchmarks page of all the JSONs here")
    args = parser.parse_args()
    if args.site:
        args.site.write_text(site(args.json))
        print(f"wrote {args.site}")
        return
    for path in args.json:
        data, benches = load(path)
        if args.compact:
            for b in benches:
                b["stats"].pop("data", None)
            path.write_text(json.dumps(data, indent=1) + "\n")
        md, series = render(data, args.title or path.stem)
        path.with_suffix(".md").write_text(md)
        if series:
            plot(series, path.with_suffix(".png"), args.title or path.stem)
        print(f"wrote {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
