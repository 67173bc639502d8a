"""bench/cell_overhead.py end to end on CPU with bench's tiny model: the JSON's structure, and its derived
numbers (overhead ratio, repeatability, monotonicity pairs) recomputed from the JSON's own fields."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cell_overhead import GcPauses, main, monotonicity, parse_setting

SETTINGS = ["vt16_k2_b2", "vt16_k2_b4", "vt36_k2_b4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("cell_overhead") / "co.json"
    returned = main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--n",
            "3",
            "--warmup",
            "1",
            "--host-probe-s",
            "0.05",
            "--load-blocks",
            "2",
            "--settings",
            *SETTINGS,
            "--out",
            str(out),
        ]
    )
    assert not out.with_name(out.name + ".tmp").exists()  # written atomically
    # The benchmark turns gradients off; the caller's mode comes back (later tests train models in-process).
    assert torch.is_grad_enabled()
    return returned, json.loads(out.read_text())


def test_cells_of_both_passes_and_workloads(run):
    _, result = run
    assert result["errors"] == []
    assert result["inference_path"] == {"requested": "auto", "resolved": "eager"}  # CPU
    cells = result["cells"]
    keys = sorted((c["pass"], c["setting"], c["kind"]) for c in cells)
    assert keys == sorted((p, s, k) for p in (1, 2) for s in SETTINGS for k in ("qa", "captioning"))
    for c in cells:
        assert "error" not in c, c.get("traceback")
        assert c["n"] == 3 and len(c["total_ms"]) == 3 and len(c["wall_ms"]) == 3
        assert c["max_new_tokens"] == (4 if c["kind"] == "qa" else 48)
        assert all(1 <= t <= c["max_new_tokens"] for t in c["output_tokens"])
        t = c["total"]
        assert t["median"] > 0 and t["p95"] >= t["median"] and t["p99"] >= t["p95"]
        assert t["min"] <= t["median"] <= t["max"]
        assert c["wall"]["median"] > 0
        # the wall clock around a request includes its CUDA-event/host total
        assert c["wall"]["median"] >= 0.9 * t["median"]
        assert c["setting_change_s"] > 0 and c["warmup_s"] > 0
        # The workflow's per-request host probe, once per timed request.
        assert len(c["host_probe_us"]) == 3 and c["host_probe_us_median"] == pytest.approx(
            sorted(c["host_probe_us"])[1], abs=0.01
        )
        assert c["active_blocks"] == parse_setting(c["setting"])["active_blocks"]
        assert c["preprocess"] == "image placeholders expanded on token ids"


def test_overhead_ratio_is_the_formula(run):
    _, result = run
    n_eval = result["real_config"]["n_eval"]
    assert n_eval == {"qa": 500, "captioning": 500}  # config/qwen3_vl_30b_a3b.yaml
    assert result["real_config"]["cells_per_run"] == 2 * 7 * 6 * 8
    per_cell = result["load"]["full_load_s_per_cell"]
    for c in result["cells"]:
        mean_ms = sum(c["total_ms"]) / len(c["total_ms"])  # samples are rounded to 1 us in the JSON
        gpu_s = n_eval[c["kind"]] * mean_ms / 1e3
        ratio = (c["setting_change_s"] + c["warmup_s"]) / gpu_s
        assert c["overhead_ratio"] == pytest.approx(ratio, rel=1e-3)
        assert c["load_per_cell_ratio"] == pytest.approx(per_cell / gpu_s, rel=1e-3)
        # as a job of its own (SLURM): a full load, the process's first setting change, this cell's warm-up
        first_change = result["cells"][0]["setting_change_s"]
        job_s = result["load"]["full_load_s_estimate"] + first_change + c["warmup_s"]
        assert c["slurm_overhead_ratio"] == pytest.approx(job_s / gpu_s, rel=1e-3)
    ratios = [c["slurm_overhead_ratio"] for c in result["cells"]]
    assert result["summary"]["max_slurm_overhead_ratio"] == pytest.approx(max(ratios))


def test_worker_amortisation_is_the_formula(run):
    _, result = run
    worker = result["summary"]["worker_amortisation"]
    cells = result["cells"]
    change = {(c["pass"], c["setting"], c["kind"]): c["setting_change_s"] for c in cells}
    excess = [max(0.0, change[(1, s, k)] - change[(2, s, k)]) for (p, s, k) in change if p == 1]
    assert len(excess) == len(SETTINGS) * 2
    one_time = result["load"]["full_load_s_estimate"] + 6 * max(excess)  # the real grid's 6 top-k values
    share = one_time / (2 * 7 * 6 * 8 * min(c["cell_gpu_s"] for c in cells))
    steady = max(c["overhead_ratio"] for c in cells if c["pass"] == 2)
    assert worker["one_time_bound_s"] == pytest.approx(one_time)
    assert worker["worst_cell_ratio"] == pytest.approx(share + steady)
    assert worker["within_target"] == (share + steady <= 0.10)
    assert gc.get_freeze_count() == 0  # the benchmark unfroze what it froze: this process goes on


def test_repeatability_recomputed_from_the_passes(run):
    _, result = run
    p95 = {(c["pass"], c["setting"], c["kind"]): c["total"]["p95"] for c in result["cells"]}
    rows = result["repeatability"]
    assert len(rows) == len(SETTINGS) * 2
    for r in rows:
        a, b = p95[(1, r["setting"], r["kind"])], p95[(2, r["setting"], r["kind"])]
        assert r["p95_rel_diff"] == pytest.approx(abs(b - a) / a)
        assert r["p95_within_target"] == (r["p95_rel_diff"] <= 0.03)
        ci = {
            c["pass"]: c["total"]["p95_ci95"]
            for c in result["cells"]
            if c["setting"] == r["setting"] and c["kind"] == r["kind"]
        }
        assert r["p95_within_sampling_noise"] == (max(ci[1][0], ci[2][0]) <= min(ci[1][1], ci[2][1]))
        stages = {
            c["pass"]: c["stage_p95_ms"]
            for c in result["cells"]
            if c["setting"] == r["setting"] and c["kind"] == r["kind"]
        }
        probes = {
            c["pass"]: c["host_probe"]["p95_over_median"]
            for c in result["cells"]
            if c["setting"] == r["setting"] and c["kind"] == r["kind"]
        }
        assert r["host_p95_over_median"] == [probes[1], probes[2]]
        assert set(r["stage_p95_diff_ms"]) == {"preprocess", "vision", "prefill", "decode"}
        for stage, diff in r["stage_p95_diff_ms"].items():
            assert diff == pytest.approx(stages[2][stage] - stages[1][stage])
    assert result["summary"]["max_p95_rel_diff"] == pytest.approx(max(r["p95_rel_diff"] for r in rows))


def test_monotonicity_pairs(run):
    _, result = run
    # one-knob pairs: b2 < b4 at vt16, vt16 < vt36 at b4; per workload
    pairs = {(m["kind"], m["smaller"], m["larger"]) for m in result["monotonicity"]}
    assert pairs == {(k, s, b) for k in ("qa", "captioning") for s, b in [SETTINGS[:2], SETTINGS[1:]]}


def test_monotonicity_flags_a_slower_smaller_setting():
    def cell(p: int, name: str, median: float) -> dict:
        knobs = parse_setting(name)
        return {
            "pass": p,
            "setting": name,
            "kind": "qa",
            **knobs,
            "total": {"median": median},
            "output_tokens": [4],
        }

    cells = [cell(1, "vt16_k2_b2", 10.0), cell(2, "vt16_k2_b2", 10.2), cell(1, "vt16_k2_b4", 9.0)]
    cells.append(cell(2, "vt16_k2_b4", 9.1))
    (row,) = monotonicity(cells)
    assert row["noise_ms"] == pytest.approx(0.2) and row["violation"]
    cells[2]["total"]["median"] = 9.95  # within the noise of 0.2 ms now (10.1 vs 10.025)
    (row,) = monotonicity(cells)
    assert not row["violation"]


def test_load_part(run):
    _, result = run
    load = result["load"]
    assert "error" not in load, load
    assert load["loader"] == "knobsweep.models.load_model"
    assert load["bytes"] > 0 and load["load_s"] > 0 and load["gb_per_s"] > 0
    assert [r["page_cache"] for r in load["runs"]][1] == "warm"
    assert load["full_model_bytes"] > load["bytes"]  # 2 of 6 blocks saved
    assert load["full_load_s_estimate"] == pytest.approx(
        load["load_s"] * load["full_model_bytes"] / load["bytes"]
    )
    assert not Path(load["dir"]).exists()  # temp checkpoint deleted


def test_profiled_setting_changes_say_where_their_time_goes(tmp_path):
    """--profile-changes: each cell's setting change carries the functions that took >= 1 % of it, by
    cumulative time; the request that builds the cell's first output is among them."""
    out = tmp_path / "co.json"
    args = ["--tiny", "--device", "cpu", "--n", "1", "--warmup", "0", "--skip-load", "--out", str(out)]
    result = main([*args, "--settings", SETTINGS[0], "--profile-changes"])
    assert result["errors"] == []
    for cell in result["cells"]:
        rows = cell["setting_change_profile"]
        cumulative = [r["cumulative_s"] for r in rows]
        assert rows and cumulative == sorted(cumulative, reverse=True)
        assert all(r["cumulative_s"] >= 0.01 * cell["setting_change_s"] and r["calls"] >= 1 for r in rows)
        assert cumulative[0] <= cell["setting_change_s"] * 1.01  # a part of the timed change
        assert any("(generate_batch)" in r["function"] for r in rows)
    # without the flag, nothing is profiled
    plain = main([*args, "--settings", SETTINGS[0]])
    assert all("setting_change_profile" not in cell for cell in plain["cells"])


class _Cycle:
    def __init__(self):
        self.me = self


def test_gc_pauses_counts_collections_inside_the_block_only():
    callbacks = list(gc.callbacks)
    with GcPauses() as pauses:
        cycles = [_Cycle() for _ in range(1000)]
        del cycles
        gc.collect()
        assert pauses.full_collections == 1 and pauses.ms > 0
        pauses.reset()
        assert (pauses.ms, pauses.full_collections) == (0.0, 0)
        gc.collect(0)
        assert pauses.full_collections == 0 and pauses.ms > 0
    assert gc.callbacks == callbacks
    gc.collect()
    assert pauses.full_collections == 0


def test_cells_record_gc_inside_requests(run):
    result, _ = run
    for cell in (c for c in result["cells"] if "error" not in c and "skipped" not in c):
        assert len(cell["gc_ms"]) == len(cell["gc_full_collections"]) == cell["n"]


def test_p95_interval_reflects_the_samples_spread():
    """A constant sample's P95 cannot move; a heavy-tailed one of 100 moves by tens of percent; 10,000 draws of
    the same distribution pin it down, and the interval holds the point estimate."""
    from bench.cell_overhead import p95_interval

    assert p95_interval([5.0] * 100) == [5.0, 5.0]
    rng = np.random.default_rng(1)

    def heavy(n: int) -> list[float]:
        return list(20 + rng.pareto(2.0, n) * 5)

    small, large = heavy(100), heavy(10_000)
    (lo_s, hi_s), (lo_l, hi_l) = p95_interval(small), p95_interval(large)
    assert lo_s <= np.percentile(small, 95) <= hi_s and lo_l <= np.percentile(large, 95) <= hi_l
    assert (hi_s - lo_s) / np.percentile(small, 95) > 0.1 > (hi_l - lo_l) / np.percentile(large, 95)


def test_host_probe_finds_stalled_iterations(monkeypatch):
    """bench.host_probe on a fake clock: iterations of 0.5 ms, three of them 2 ms (two in a row, then one)."""
    from bench import host_probe

    slow = {10, 11, 30}
    state = {"now": 0.0, "calls": 0}

    def clock() -> float:
        # calls: the deadline, then per iteration its start (t0) and its end (t1)
        state["calls"] += 1
        calls = state["calls"]
        if calls > 1 and calls % 2 == 1:  # an iteration's end
            iteration = (calls - 3) // 2
            state["now"] += 0.002 if iteration in slow else 0.0005
        elif calls > 1:
            state["now"] += 0.0005  # between iterations
        return state["now"]

    monkeypatch.setattr(host_probe.time, "perf_counter", clock)
    result = host_probe.probe(0.05)
    # 42 iterations of 1 ms (0.5 timed + 0.5 between) and 3 of 2.5 ms end at 49.5 ms; the next would start at 50
    assert result["iterations"] == 45
    assert result["median_ms"] == pytest.approx(0.5)
    assert result["max_ms"] == pytest.approx(2.0)
    assert result["stalled_fraction"] == pytest.approx(3 / 45)
    assert len(result["stall_starts_s"]) == 2  # two runs of stalled iterations
