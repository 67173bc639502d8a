"""Figures from the analysis outputs (matplotlib Agg backend; seaborn colour-blind palette)."""

from .figures import cases_figure, coupling_figure, make_figures, pareto_figure

__all__ = ["cases_figure", "coupling_figure", "make_figures", "pareto_figure"]
