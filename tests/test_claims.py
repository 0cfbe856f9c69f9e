"""The claims report: verdicts follow the numbers (not hard-coded), missing results say so, stable bytes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from experiments import claims
from precision_lab.lab.results import write_csv


def _eq_rows() -> list[dict[str, str]]:
    """Equivalence rows shaped like the experiment's, with the values the maths predicts (N = 8)."""
    spec = [
        ("C1", "MLP, digits", "accumulated vs large batch", "equal", 1.7e-16),
        ("C2", "MLP, digits", "loss not divided by N vs large batch", "differs", 7.0),
        ("C2", "MLP, SGD", "update, loss/N vs large batch", "equal", 4.5e-15),
        ("C3", "MLP, SGD", "zero_grad every micro-step vs large batch", "differs", 1.1),
        ("C3", "MLP, SGD", "zero_grad every micro-step vs -lr * g_last / N", "equal", 7e-15),
        ("C4", "batch norm, train mode", "accumulated vs large batch", "differs", 0.5),
        ("C4", "layer norm, train mode", "accumulated vs large batch", "equal", 6e-16),
        ("C6", "SGD", "lr/N vs loss/N", "equal", 0.0),
        ("C6", "SGD, momentum 0.9", "lr/N vs loss/N", "equal", 0.0),
        ("C6", "Adam", "lr/N vs loss/N", "differs", 0.136),
        ("C7", "variable-length text", "mean of per-micro-batch token means vs large batch", "differs", 1.2e-2),
        ("C7", "variable-length text", "sum / global token count vs large batch", "equal", 1.3e-15),
    ]
    return [
        {
            "claim": c,
            "case": case,
            "comparison": comp,
            "n_accum": "8",
            "predicted": pred,
            "rel_difference": repr(d),
            "bit_identical": "1" if d == 0 else "0",
            "as_predicted": "1",
        }
        for c, case, comp, pred, d in spec
    ]


def _mg_rows(naive_err: dict[int, float], naive_ratio: dict[int, float], compute: str = "fp32") -> list[dict[str, str]]:
    """model-gradients rows for one workload: naive bf16 as given, every other buffer far below 1%."""
    rows = []
    for fmt in ("fp32", "bf16", "fp16"):
        for strategy in ("naive", "kahan", "stochastic", "pairwise"):
            for n in naive_err:
                for trial in range(3):
                    bad = (fmt, strategy) == ("bf16", "naive")
                    err = naive_err[n] if bad else (1e-7 if fmt == "fp32" else 1e-3)
                    ratio = naive_ratio[n] if bad else 1.0
                    rows.append(
                        {
                            "workload": "mlp",
                            "compute_format": compute,
                            "regime": "fixed_effective",
                            "quantisation_floor": "1.7e-3" if fmt == "bf16" else "1e-4",
                            "scaling": "post",
                            "buffer_format": fmt,
                            "strategy": strategy,
                            "n_accum": str(n),
                            "trial": str(trial),
                            "rel_l2_error": repr(err),
                            "norm_ratio": repr(ratio),
                            "projection_bias": repr(ratio - 1.0),
                        }
                    )
    return rows


def _at(grid: tuple[int, ...], values: tuple[float, ...]) -> dict[int, float]:
    return dict(zip(grid, values, strict=True))


def _by_claim(res: claims.Results) -> dict[str, claims.Verdict]:
    return {v.claim: v for v in claims.evaluate(res)}


def test_every_claim_is_reported_and_missing_results_say_so() -> None:
    verdicts = claims.evaluate({})
    assert [v.claim for v in verdicts] == list(claims.CLAIMS) == [f"C{i}" for i in range(1, 11)]
    assert all(v.verdict == claims.MISSING and v.commands for v in verdicts)
    assert set(claims.RULES) == set(claims.CLAIMS)


def test_equivalence_verdicts_follow_the_numbers() -> None:
    rows = _eq_rows()
    v = _by_claim({"equivalence": rows})
    assert (v["C1"].verdict, v["C2"].verdict, v["C3"].verdict) == (claims.CONDITIONAL, claims.HOLDS, claims.FAILS)
    assert (v["C4"].verdict, v["C6"].verdict, v["C7"].verdict) == (
        claims.CONDITIONAL,
        claims.CONDITIONAL,
        claims.CONDITIONAL,
    )
    # Negative controls: break one number and the verdict must change.
    broken = copy.deepcopy(rows)
    broken[0]["rel_difference"] = "1e-6"  # accumulation no longer equals the large batch in fp64
    assert _by_claim({"equivalence": broken})["C1"].verdict == claims.FAILS
    broken = copy.deepcopy(rows)
    broken[1]["rel_difference"] = "3.0"  # undivided loss off by 3, not N - 1 = 7
    assert _by_claim({"equivalence": broken})["C2"].verdict == claims.FAILS
    broken = copy.deepcopy(rows)
    broken[9]["rel_difference"] = "0.0"  # Adam would then agree too: the claim holds outright
    assert _by_claim({"equivalence": broken})["C6"].verdict == claims.HOLDS
    broken = copy.deepcopy(rows)
    broken[4]["rel_difference"] = "0.3"  # the update is not -lr g_last / N: C3's refutation is gone
    assert _by_claim({"equivalence": broken})["C3"].verdict == claims.HOLDS


def test_c5_verdict_thresholds() -> None:
    grid = (16, 64, 256, 4096)
    late = _mg_rows(_at(grid, (4e-3, 8e-3, 1.6e-2, 0.23)), _at(grid, (1.0, 1.0, 1.002, 1.12)))
    v = _by_claim({"model-gradients": late})["C5"]
    assert v.verdict == claims.CONDITIONAL
    assert "mlp, bf16 naive: error > 1% from N = 256; bias > 1% (95% CI excluding 0) from N = 4096" in v.evidence[0]
    early = _mg_rows(_at(grid, (4e-2,) * 4), _at(grid, (0.97,) * 4))  # biased from N = 16
    assert _by_claim({"model-gradients": early})["C5"].verdict == claims.FAILS
    never = _mg_rows(_at(grid, (1e-3,) * 4), _at(grid, (1.0,) * 4))
    assert _by_claim({"model-gradients": never})["C5"].verdict == claims.HOLDS
    # Negative control: noise alone grows the norm (ratio 1.12) while the bias's interval spans 0
    noise = _mg_rows(_at(grid, (1e-3,) * 4), _at(grid, (1.12,) * 4))
    for r in noise:
        if (r["buffer_format"], r["strategy"]) == ("bf16", "naive"):
            r["projection_bias"] = ("0.05", "-0.05", "0.002")[int(r["trial"])]
    assert _by_claim({"model-gradients": noise})["C5"].verdict == claims.HOLDS


def test_c10_verdict_compares_with_fp32() -> None:
    grid = (16, 256)
    rows = _mg_rows(_at(grid, (1e-2, 2e-2)), _at(grid, (1.0, 1.0)))
    assert _by_claim({"model-gradients": rows})["C10"].verdict == claims.FAILS  # 1e-3 vs 1e-7
    # bf16 micro-gradients: Kahan matches fp32 (both at the input rounding), stochastic does not
    bf16 = _mg_rows(_at(grid, (1e-2, 2e-2)), _at(grid, (1.0, 1.0)), compute="bf16")
    for r in bf16:
        r["rel_l2_error"] = {"kahan": "1e-2", "stochastic": "3e-2"}.get(r["strategy"], "1e-2")
    assert _by_claim({"model-gradients": rows + bf16})["C10"].verdict == claims.CONDITIONAL
    for r in rows:  # every low-precision buffer within 1.1x of fp32: then the claim holds
        if r["buffer_format"] != "fp32":
            r["rel_l2_error"] = "1.05e-7"
    for r in bf16:
        r["rel_l2_error"] = "1e-2"
    assert _by_claim({"model-gradients": rows + bf16})["C10"].verdict == claims.HOLDS


def test_c8_and_c9_from_their_experiments() -> None:
    overhead = [
        {
            "workload": "mlp",
            "mode": "pytorch",
            "n_accum": str(n),
            "micro_batch": str(1024 // n),
            "effective_batch": "1024",
            "device": "cpu",
            "threads": "1",
            "time_ratio": repr(t),
            "peak_bytes": repr(p),
            "time_vs_pytorch": "1.0",
        }
        for n, t, p in ((1, 1.0, 8e6), (4, 1.05, 3e6), (256, 3.0, 1e6))
    ]
    assert _by_claim({"overhead": overhead})["C8"].verdict == claims.CONDITIONAL
    overhead[-1]["peak_bytes"] = "9e6"  # memory no longer saved
    assert _by_claim({"overhead": overhead})["C8"].verdict == claims.FAILS
    ddp = [
        {
            "model_format": m,
            "allreduce_format": "native",
            "mode": mode,
            "n_accum": "16",
            "world_size": "2",
            "allreduces": "1" if mode == "no_sync" else "16",
            "rel_l2_error": "4e-16",
        }
        for m in ("fp64", "fp32")
        for mode in ("no_sync", "every_step")
    ]
    assert _by_claim({"ddp": ddp})["C9"].verdict == claims.HOLDS
    ddp[0]["allreduces"] = "16"  # no_sync that still synchronises every micro-step
    assert _by_claim({"ddp": ddp})["C9"].verdict == claims.FAILS


def test_report_is_written_atomically_with_stable_bytes(tmp_path: Path) -> None:
    cols = list(_eq_rows()[0])
    write_csv(tmp_path / "res" / "equivalence" / "results.csv", _eq_rows(), cols)
    a = claims.write_report(tmp_path / "res", tmp_path / "a", ["equivalence", "ddp"])
    b = claims.write_report(tmp_path / "res", tmp_path / "b", ["equivalence", "ddp"])
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    assert "| [C3](#c3)" in text
    assert "**does not hold**" in text
    assert "**not measured**" in text
    assert "![equivalence.png](equivalence.png)" in text
    assert sorted(p.name for p in a.parent.iterdir()) == ["CLAIMS.md"]  # no temporary left behind


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_numbers_are_printed_not_hidden(value: str) -> None:
    grid = (16, 256)
    rows = _mg_rows(_at(grid, (1e-2, float(value))), _at(grid, (1.0, float(value))))
    v = _by_claim({"model-gradients": rows})["C5"]
    assert f"error {value}" in v.evidence[0]
