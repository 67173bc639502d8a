"""Every figure and the findings text, produced from a small synthetic result set through the pipeline."""

import json

import pytest
from knobsweep.analysis.example import synthetic_rows, write_scored_shards
from knobsweep.analysis.pipeline import (
    run_aggregate,
    run_cases,
    run_coupling,
    run_figures,
    run_findings,
    run_frontiers,
    run_policies,
)
from PIL import Image

CONFIG = {"n_bootstrap": 20, "seed": 1}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    rows = synthetic_rows(vision_tokens=(64, 144, 256), top_k=(1, 2, 4), active_blocks=(4, 8), n_samples=12)
    paths = write_scored_shards(rows, root)
    f = {name: root / f"{name}.json" for name in ("results", "frontiers", "policies", "coupling", "cases")}
    rows_path = root / "rows.parquet"
    run_aggregate(paths, f["results"], rows_path, run="plots", config=CONFIG)
    run_frontiers(f["results"], rows_path, f["frontiers"], config=CONFIG)
    run_policies(f["results"], rows_path, f["policies"], config=CONFIG)
    run_coupling(f["results"], rows_path, f["policies"], f["coupling"], config=CONFIG)
    run_cases(f["results"], f["frontiers"], f["policies"], f["cases"], config=CONFIG)
    figures = {
        k: root / "figures" / f"{k}.png" for k in ("pareto_qa", "pareto_captioning", "coupling", "cases")
    }
    run_figures(f["results"], f["frontiers"], f["coupling"], f["cases"], f["policies"], figures)
    run_findings(
        f["results"], f["frontiers"], f["coupling"], f["policies"], f["cases"], root / "e2_findings.md"
    )
    return f, figures, root / "e2_findings.md"


@pytest.mark.parametrize(
    "name,min_size",
    [
        ("pareto_qa", (1000, 600)),
        ("pareto_captioning", (1000, 600)),
        ("coupling", (1200, 1200)),
        ("cases", (2000, 500)),
    ],
)
def test_figures(outputs, name, min_size):
    _, figures, _ = outputs
    path = figures[name]
    assert path.stat().st_size > 20_000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
        # Not blank: many distinct colours.
        assert len(img.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 50


def test_findings_follow_the_outputs(outputs):
    files, _, findings = outputs
    text = findings.read_text()
    coupling = json.loads(files["coupling"].read_text())
    for q, answer in coupling["questions"].items():
        assert f"## {q}. {answer['question']}" in text
        assert f"**{answer['verdict']}**" in text.split(f"## {q}.")[1].split("\n")[0]
    policies = json.loads(files["policies"].read_text())
    ratio = policies["workloads"]["qa"]["policies"]["top_k"]["hypervolume_ratio"]
    assert f"{ratio:.3g}" in text


def test_figures_without_captioning(tmp_path):
    rows = synthetic_rows(
        vision_tokens=(64, 256), top_k=(1, 4), active_blocks=(4, 8), n_samples=6, workloads=("qa",)
    )
    paths = write_scored_shards(rows, tmp_path)
    f = {
        name: tmp_path / f"{name}.json" for name in ("results", "frontiers", "policies", "coupling", "cases")
    }
    rows_path = tmp_path / "rows.parquet"
    run_aggregate(paths, f["results"], rows_path, run="qa-only", config=CONFIG)
    run_frontiers(f["results"], rows_path, f["frontiers"], config=CONFIG)
    run_policies(f["results"], rows_path, f["policies"], config=CONFIG)
    run_coupling(f["results"], rows_path, f["policies"], f["coupling"], config=CONFIG)
    run_cases(f["results"], f["frontiers"], f["policies"], f["cases"], config=CONFIG)
    figures = {k: tmp_path / f"{k}.png" for k in ("pareto_qa", "pareto_captioning", "coupling", "cases")}
    run_figures(f["results"], f["frontiers"], f["coupling"], f["cases"], f["policies"], figures)
    run_findings(f["results"], f["frontiers"], f["coupling"], f["policies"], f["cases"], tmp_path / "f.md")
    assert all(p.stat().st_size > 5_000 for p in figures.values())
    assert "fewer than two workloads" in (tmp_path / "f.md").read_text()


def test_degenerate_run_like_ci(tmp_path):
    """Three listed cells per workload, four samples, every quality zero (a random model): the analysis
    says 'inconclusive' instead of failing."""
    rows = synthetic_rows(
        vision_tokens=(16, 32),
        top_k=(1, 2),
        active_blocks=(2, 4),
        n_samples=4,
        quality_fn=lambda *a: 0.0,
        quality_noise=0.0,
    )
    keep = [(16, 1, 2), (32, 2, 4), (32, 1, 4)]
    rows = rows[[k in keep for k in zip(rows["vision_tokens"], rows["top_k"], rows["active_blocks"])]]
    paths = write_scored_shards(rows, tmp_path)
    f = {
        name: tmp_path / f"{name}.json" for name in ("results", "frontiers", "policies", "coupling", "cases")
    }
    rows_path = tmp_path / "rows.parquet"
    run_aggregate(paths, f["results"], rows_path, run="tiny", config=CONFIG)
    run_frontiers(f["results"], rows_path, f["frontiers"], config=CONFIG)
    run_policies(f["results"], rows_path, f["policies"], config=CONFIG)
    run_coupling(f["results"], rows_path, f["policies"], f["coupling"], config=CONFIG)
    run_cases(f["results"], f["frontiers"], f["policies"], f["cases"], config=CONFIG)
    figures = {k: tmp_path / f"{k}.png" for k in ("pareto_qa", "pareto_captioning", "coupling", "cases")}
    run_figures(f["results"], f["frontiers"], f["coupling"], f["cases"], f["policies"], figures)
    run_findings(f["results"], f["frontiers"], f["coupling"], f["policies"], f["cases"], tmp_path / "f.md")
    coupling = json.loads(f["coupling"].read_text())
    assert {q["verdict"] for q in coupling["questions"].values()} == {"inconclusive"}
    assert all(p.stat().st_size > 5_000 for p in figures.values())


def test_pareto_labels_never_overlap_where_frontier_points_crowd(tmp_path, monkeypatch):
    """Twelve frontier points, eight of them crowded into the low-latency corner: the labels drawn must not
    overlap (measured on the rendered text), and the ends of the frontier keep theirs."""
    import numpy as np
    import pandas as pd
    from knobsweep.plots import figures

    latency = np.r_[np.linspace(10.0, 11.4, 8), [40.0, 70.0, 100.0, 130.0]]
    quality = np.r_[np.linspace(0.20, 0.22, 8), [0.45, 0.60, 0.70, 0.75]]
    points = [
        {
            "vision_tokens": 36 * (1 + i % 3),
            "top_k": 2 ** (i % 4),
            "active_blocks": 8 + i,
            "quality": q,
            "latency_p95_ms": t,
        }
        for i, (t, q) in enumerate(zip(latency, quality))
    ]
    cells = pd.DataFrame(points).assign(workload="qa", quality_metric="vqa_accuracy")
    frontiers = {
        "frontiers": [{"workload": "qa", "cost": "latency_p95_ms", "benefit": "quality", "points": points}]
    }
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    figures.pareto_figure(cells, frontiers, "qa", tmp_path / "p.png")
    (fig,) = saved
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if "/" in t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert 2 <= len(labels) < len(points)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    texts = {t.get_text().split(" ")[0] for t in labels}
    assert "36/1/8" in texts and f"{36 * (1 + 11 % 3)}/{2 ** (11 % 4)}/19" in texts
