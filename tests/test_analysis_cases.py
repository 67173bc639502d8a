"""Illustrative cases on a constructed two-workload grid with a known cross-workload case."""

import pandas as pd
import pytest
from knobsweep.analysis.cases import cross_workload_cases, interior_frontier_points

KNOBS = ["vision_tokens", "top_k", "active_blocks"]


def cells() -> pd.DataFrame:
    # qa: (1,1,1) 1ms/0.5, (2,1,1) 2ms/0.6, (2,2,1) 3ms/0.8 -> all on the qa frontier.
    # captioning: (2,1,1) at 2ms/0.2 is dominated by (1,1,1) at 1ms/0.4 -> gap 0.2 of range 0.9-0.2.
    qa = [((1, 1, 1), 1.0, 0.5), ((2, 1, 1), 2.0, 0.6), ((2, 2, 1), 3.0, 0.8), ((3, 3, 3), 9.0, 0.7)]
    cap = [((1, 1, 1), 1.0, 0.4), ((2, 1, 1), 2.0, 0.2), ((2, 2, 1), 3.0, 0.9), ((3, 3, 3), 9.0, 0.3)]
    rows = [
        {"workload": w, **dict(zip(KNOBS, s)), "latency_p95_ms": c, "quality": q}
        for w, data in (("qa", qa), ("captioning", cap))
        for s, c, q in data
    ]
    return pd.DataFrame(rows)


def test_cross_workload_case_and_gap():
    cases = cross_workload_cases(cells(), n_cases=5)
    qa_only = [c for c in cases if c["optimal_for"] == "qa"]
    assert [c["setting"] for c in qa_only] == [{"vision_tokens": 2, "top_k": 1, "active_blocks": 1}]
    case = qa_only[0]
    assert case["quality_gap"] == pytest.approx(0.2)
    assert case["quality_gap_normalised"] == pytest.approx(0.2 / 0.7)
    assert case["latency_excess_ms"] == pytest.approx(1.0)  # captioning reaches 0.2 already at 1 ms
    # Everything on the captioning frontier is also on the qa frontier here.
    assert not [c for c in cases if c["optimal_for"] == "captioning"]


def test_interior_points():
    out = interior_frontier_points(cells())
    assert out["qa"]["n_frontier_points"] == 3
    assert [(p["vision_tokens"], p["top_k"], p["active_blocks"]) for p in out["qa"]["points"]] == []
    df = cells()
    df.loc[(df["workload"] == "qa") & (df["vision_tokens"] == 2) & (df["top_k"] == 2), "active_blocks"] = 2
    out = interior_frontier_points(df)
    assert [(p["vision_tokens"], p["top_k"], p["active_blocks"]) for p in out["qa"]["points"]] == [(2, 2, 2)]
