"""Aggregation of synthetic scored shards written to tmp_path."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from knobsweep.aggregate import aggregate_cells, load_cells
from knobsweep.analysis.example import synthetic_rows, write_scored_shards
from knobsweep.analysis.pipeline import run_aggregate

GRID = {"vision_tokens": (64, 256), "top_k": (1, 4), "active_blocks": (4, 12)}


@pytest.fixture
def shards(tmp_path):
    rows = synthetic_rows(**GRID, n_samples=37, seed=2)
    return rows, write_scored_shards(rows, tmp_path / "run")


def test_records_match_numpy(shards):
    rows, paths = shards
    result, all_rows = aggregate_cells(paths, run="t", n_bootstrap=200, seed=0)
    assert len(result["cells"]) == len(paths) == 16
    assert len(all_rows) == len(rows)
    assert "resampl" in result["quality_ci_method"]
    for rec in result["cells"]:
        g = rows[
            (rows["workload"] == rec["workload"])
            & (rows["vision_tokens"] == rec["vision_tokens"])
            & (rows["top_k"] == rec["top_k"])
            & (rows["active_blocks"] == rec["active_blocks"])
        ]
        lat = g["latency_ms"].to_numpy()
        assert rec["n_samples"] == rec["latency_n_samples"] == 37
        for p in (50, 95, 99):
            assert rec[f"latency_p{p}_ms"] == pytest.approx(np.percentile(lat, p))
        assert rec["latency_mean_ms"] == pytest.approx(lat.mean())
        assert rec["latency_p95_tail_n"] == int((lat >= np.percentile(lat, 95)).sum())
        assert rec["quality"] == pytest.approx(g["quality"].mean())
        assert rec["decode_ms_mean"] == pytest.approx(g["decode_ms"].mean())
        assert rec["kept_blocks"] == list(range(rec["active_blocks"]))
        metric = "vqa_accuracy" if rec["workload"] == "qa" else "cider"
        assert rec["quality_metric"] == metric and rec[metric] == pytest.approx(rec["quality"])
        if rec["workload"] == "captioning":
            assert rec["bleu4"] == pytest.approx(g["bleu4"].mean())
        for stat in ("quality", "latency_mean_ms", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):
            assert rec[f"{stat}_ci_low"] <= rec[stat] <= rec[f"{stat}_ci_high"], stat
            assert rec[f"{stat}_ci_low"] < rec[f"{stat}_ci_high"], stat


def test_bootstrap_is_seeded_and_independent_of_cell_set(shards):
    _, paths = shards
    a, _ = aggregate_cells(paths, run="t", n_bootstrap=50, seed=7)
    b, _ = aggregate_cells(paths[::-1][:5], run="t", n_bootstrap=50, seed=7)
    c, _ = aggregate_cells(paths, run="t", n_bootstrap=50, seed=8)
    by_cell = {(r["workload"], r["vision_tokens"], r["top_k"], r["active_blocks"]): r for r in a["cells"]}
    for r in b["cells"]:
        same = by_cell[(r["workload"], r["vision_tokens"], r["top_k"], r["active_blocks"])]
        assert r["latency_p95_ms_ci_low"] == same["latency_p95_ms_ci_low"]
    assert any(x["quality_ci_low"] != y["quality_ci_low"] for x, y in zip(a["cells"], c["cells"]))


def test_mixed_models_are_refused(tmp_path):
    rows = synthetic_rows(**GRID, n_samples=5, workloads=("qa",))
    first = write_scored_shards(rows[rows["vision_tokens"] == 64], tmp_path / "a", model="model-A")
    second = write_scored_shards(rows[rows["vision_tokens"] == 256], tmp_path / "b", model="model-B")
    with pytest.raises(ValueError, match="model") as err:
        aggregate_cells(first + second, run="t", n_bootstrap=10, seed=0)
    assert str(tmp_path / "a") in str(err.value) and str(tmp_path / "b") in str(err.value)


def test_mixed_manifests_are_refused_within_a_workload(tmp_path):
    rows = synthetic_rows(**GRID, n_samples=5, workloads=("qa",))
    first = write_scored_shards(rows[rows["top_k"] == 1], tmp_path / "a", manifest="m1")
    second = write_scored_shards(rows[rows["top_k"] == 4], tmp_path / "b", manifest="m2")
    with pytest.raises(ValueError, match="manifest"):
        aggregate_cells(first + second, run="t", n_bootstrap=10, seed=0)


def test_bad_shards_are_named(tmp_path):
    rows = synthetic_rows(**GRID, n_samples=5, workloads=("qa",))
    paths = write_scored_shards(rows, tmp_path / "a")
    wrong = paths[0].with_name("vt999_k1_b4.parquet")
    paths[0].rename(wrong)
    with pytest.raises(ValueError, match="vt999_k1_b4.parquet: file name says"):
        aggregate_cells([wrong], run="t", n_bootstrap=10, seed=0)
    table = pq.read_table(paths[1])
    df = table.to_pandas()
    df.loc[2, "latency_ms"] = np.nan
    pq.write_table(
        pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(table.schema.metadata),
        paths[1],
    )
    with pytest.raises(ValueError, match="'latency_ms' is missing"):
        aggregate_cells([paths[1]], run="t", n_bootstrap=10, seed=0)
    with pytest.raises(ValueError, match="no scored shards"):
        aggregate_cells([], run="t", n_bootstrap=10, seed=0)


def test_run_aggregate_writes_json_and_rows(shards, tmp_path):
    _, paths = shards
    out_json, out_rows = tmp_path / "out" / "e2_knob_grid_results.json", tmp_path / "out" / "rows.parquet"
    run_aggregate(paths, out_json, out_rows, run="demo", config={"n_bootstrap": 20})
    result = json.loads(out_json.read_text())
    assert result["run"] == "demo" and result["n_bootstrap"] == 20
    assert len(load_cells(result)) == 16
    assert pq.read_metadata(out_rows).num_rows == 16 * 37
    assert not list(out_json.parent.glob(".*tmp"))  # no temporary file left behind


def test_cells_measured_differently_are_listed_and_warned_about(tmp_path, caplog):
    """Each record carries how its latencies were measured; a workload whose cells differ (here: a vision graph
    that fell back in some cells) lists each setup with its cell count and logs a warning."""
    rows = synthetic_rows(**GRID, n_samples=5, workloads=("qa",))
    same = write_scored_shards(rows, tmp_path / "same")
    result, _ = aggregate_cells(same, run="t", n_bootstrap=10, seed=0)
    setup = {
        "device_name": "cpu",
        "inference_path": "eager",
        "vision_encoder": "as loaded",
        "preprocess": "image placeholders expanded on token ids",
    }
    assert result["workloads"]["qa"]["measurement_setups"] == [{**setup, "n_cells": 8}]
    assert all({k: r[k] for k in setup} == setup for r in result["cells"])
    graphed = write_scored_shards(rows[rows["top_k"] == 1], tmp_path / "mixed", vision_encoder="graphed")
    loaded = write_scored_shards(rows[rows["top_k"] == 4], tmp_path / "mixed")
    with caplog.at_level("WARNING", logger="knobsweep.aggregate"):
        result, _ = aggregate_cells(graphed + loaded, run="t", n_bootstrap=10, seed=0)
    setups = result["workloads"]["qa"]["measurement_setups"]
    assert sorted((s["vision_encoder"], s["n_cells"]) for s in setups) == [("as loaded", 4), ("graphed", 4)]
    assert any("2 different ways" in r.getMessage() for r in caplog.records)
    # Cells whose placeholders the processor expanded (the token-id expansion differed there) are another setup.
    by_processor = write_scored_shards(
        rows[rows["top_k"] == 1], tmp_path / "pre", preprocess="processor: differs"
    )
    expanded = write_scored_shards(rows[rows["top_k"] == 4], tmp_path / "pre")
    result, _ = aggregate_cells(by_processor + expanded, run="t", n_bootstrap=10, seed=0)
    setups = result["workloads"]["qa"]["measurement_setups"]
    assert sorted(s["preprocess"] for s in setups) == [setup["preprocess"], "processor: differs"]


def test_cells_measured_at_another_host_speed_are_flagged(tmp_path, caplog):
    """Each cell's median host probe over the run's usual one (the median over cells); cells >= HOST_SPEED_RATIO
    slower or faster are listed, warned about and named in the findings. Shards without the probe (before code
    version 12) flag nothing."""
    from knobsweep.aggregate import HOST_SPEED_RATIO
    from knobsweep.analysis.findings import _host_speed_lines

    rows = synthetic_rows(**GRID, n_samples=9, workloads=("qa",), seed=3)
    rng = np.random.default_rng(0)
    rows["host_probe_us"] = 50.0 * (1 + 0.05 * rng.random(len(rows)))  # a steady host: within 5 %
    cell = (
        rows["vision_tokens"].astype(str)
        + "_"
        + rows["top_k"].astype(str)
        + "_"
        + rows["active_blocks"].astype(str)
    )
    rows.loc[cell == "256_4_12", "host_probe_us"] *= 2.0  # the host's slow speed during this cell
    rows.loc[cell == "64_4_4", "host_probe_us"] *= 0.6  # and its fast one during this
    rows.loc[cell == "64_1_4", "host_probe_us"] *= 1.2  # within the ratio
    stalls = (cell == "64_1_12") & (rows.index % 3 == 0)
    rows.loc[stalls, "host_probe_us"] *= 3.0  # a few stalled requests: the median holds
    with caplog.at_level("WARNING", logger="knobsweep.aggregate"):
        result, _ = aggregate_cells(
            write_scored_shards(rows, tmp_path / "r"), run="t", n_bootstrap=10, seed=0
        )
    host = result["host_speed"]
    medians = rows.groupby(cell)["host_probe_us"].median()
    usual = float(np.median(medians))
    assert host["usual_probe_us"] == pytest.approx(usual)
    assert host["cells_at_another_host_speed"] == [
        {
            "workload": "qa",
            "cell": "vt64_k4_b4",
            "host_probe_ratio": pytest.approx(medians["64_4_4"] / usual),
        },
        {
            "workload": "qa",
            "cell": "vt256_k4_b12",
            "host_probe_ratio": pytest.approx(medians["256_4_12"] / usual),
        },
    ]
    assert host["cells_without_probe"] == 0 and host["speed_ratio"] == HOST_SPEED_RATIO
    by_cell = {f"{r['vision_tokens']}_{r['top_k']}_{r['active_blocks']}": r for r in result["cells"]}
    assert by_cell["256_4_12"]["host_probe_ratio"] > 1.9 and by_cell["64_4_4"]["host_probe_ratio"] < 0.65
    assert 1.15 < by_cell["64_1_4"]["host_probe_ratio"] < HOST_SPEED_RATIO
    assert by_cell["64_1_12"]["host_probe_us_median"] == pytest.approx(medians["64_1_12"])
    slow, fast = (f"{medians[c] / usual:.2f}" for c in ("256_4_12", "64_4_4"))
    assert any(f"qa vt256_k4_b12 ({slow})" in r.getMessage() for r in caplog.records)
    text = "\n".join(_host_speed_lines(host))
    assert "**2 cell(s) were measured while the host ran >= 1.25x slower or faster**" in text
    assert f"qa vt64_k4_b4 ({fast})" in text and f"qa vt256_k4_b12 ({slow})" in text
    assert (
        "`--forcerun <results>/cells/qa/vt64_k4_b4.parquet <results>/cells/qa/vt256_k4_b12.parquet`" in text
    )

    result, _ = aggregate_cells(
        write_scored_shards(rows.drop(columns="host_probe_us"), tmp_path / "old"),
        run="t",
        n_bootstrap=10,
        seed=0,
    )
    assert result["host_speed"]["cells_at_another_host_speed"] == []
    assert result["host_speed"]["cells_without_probe"] == 8
    assert "not recorded" in "\n".join(_host_speed_lines(result["host_speed"]))
