"""Analysis of the knob grid: frontiers, coupling, single- vs multi-knob policies, cases, findings.

`pipeline` holds the file-level entry points the Snakemake steps call; the other modules work on
DataFrames and dicts and know nothing of files.
"""
