"""Worst-case error of the float32 precision policy, per function: ``python bench/precision_table.py``.

For each function and output dtype: the largest distance (in ulps of the output) between the
float32 policy's output and the float64 policy's on random inputs with t uniform, within 1e-5
of 0 and within 1e-5 of 1 (200k elements each), and the share of outputs that are equal.
Writes ``bench/results/precision.md``.
"""

from __future__ import annotations

import pathlib

import torch

import fastgen

N = 200_000
FUNCTIONS = {
    "add_noise": lambda a, b, t: fastgen.add_noise(a, b, t),
    "pred_noise_to_pred_x0 (eps->x0)": lambda a, b, t: fastgen.pred_noise_to_pred_x0(a, b, t),
    "pred_x0_from_flow (flow->x0)": lambda a, b, t: fastgen.pred_x0_from_flow(a, b, t),
    "x0_to_eps": lambda a, b, t: fastgen.x0_to_eps(a, b, t),
    "x0_to_flow": lambda a, b, t: fastgen.x0_to_flow(a, b, t),
    "convert_prediction flow->eps": lambda a, b, t: fastgen.convert_prediction(
        a, b, t, src="flow", dst="eps"
    ),
    "convert_prediction eps->flow": lambda a, b, t: fastgen.convert_prediction(
        a, b, t, src="eps", dst="flow"
    ),
    "rf_alpha": lambda a, b, t: fastgen.rf_alpha(t.to(a.dtype)),
    "classifier_free_guidance (s=3)": lambda a, b, t: fastgen.classifier_free_guidance(a, b, 3.0),
}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    as_int = torch.int32 if a.dtype == torch.float32 else torch.int16
    top = 2 ** (32 if a.dtype == torch.float32 else 16) // 2
    ia, ib = (x.view(as_int).to(torch.int64) for x in (a, b))
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return (ia - ib).abs()


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows = ["| function | dtype | worst ulp | equal to float64 policy |", "|---|---|---:|---:|"]
    for name, f in FUNCTIONS.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            worst, equal = 0, 1.0
            for scale, shift in ((1.0, 0.0), (1e-5, 0.0), (-1e-5, 1.0)):
                a = torch.randn(N, generator=g).to(dtype)
                b = torch.randn(N, generator=g).to(dtype)
                t = shift + scale * torch.rand(N, generator=g)
                with fastgen.use_precision("float64"):
                    ref = f(a, b, t)
                with fastgen.use_precision("float32"):
                    got = f(a, b, t)
                finite = torch.isfinite(ref)
                d = ulps(got[finite], ref[finite])
                worst = max(worst, int(d.max()))
                equal = min(equal, float((d == 0).double().mean()))
            rows.append(f"| {name} | {str(dtype)[6:]} | {worst} | {100 * equal:.3f}% |")
    text = "\n".join(rows) + "\n"
    out = pathlib.Path(__file__).parent / "results" / "precision.md"
    out.write_text(
        f"float32 policy vs float64 policy, torch {torch.__version__}, {N} inputs per t range "
        "(uniform, within 1e-5 of 0, within 1e-5 of 1); worst case over the three.\n\n" + text
    )
    print(text)


if __name__ == "__main__":
    main()
