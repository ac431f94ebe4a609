"""What optuna-dashboard shows of a study's stability, written to the study itself.

- **Two plots on the study page** (``optuna_dashboard.save_plotly_graph_object``, under fixed
  ids so that each write replaces the last): the stability map and the stability importance
  (drawn by dashboard_plots.py). Each is written only when it changed: a finished study
  reported again is not written to.
- **Broken trials infeasible.** Optuna 5 keeps a named constraint (``constraints:stability``);
  optuna-dashboard reads only the older list form (the system attribute ``constraints``), so a
  trial's stability is written in both. A trial pruned for its quality stays feasible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna

if TYPE_CHECKING:
    import plotly.graph_objects as go

MAP_ID = "stylepipe-stability-map"
IMPORTANCE_ID = "stylepipe-stability-importance"
# optuna-dashboard's own key for a trial's constraints (its serializer reads this list only).
DASHBOARD_CONSTRAINTS = "constraints"


def mark_feasibility(trial: optuna.Trial, value: float) -> None:
    """The trial's stability constraint (> 0: it broke) in the list form optuna-dashboard reads,
    beside Optuna 5's named one (``trial.set_constraint``)."""
    trial.storage.set_trial_system_attr(trial._trial_id, DASHBOARD_CONSTRAINTS, [float(value)])


def show_stability(study: optuna.Study, figures: dict[str, go.Figure]) -> list[str]:
    """Save each figure (graph id -> figure) as a dashboard plot of ``study`` unless the same
    figure is already there; the ids written."""
    from optuna_dashboard import save_plotly_graph_object
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    shown = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    written = []
    for graph_id, figure in figures.items():
        if shown.get(graph_id) != figure.to_json():
            save_plotly_graph_object(study, figure, graph_object_id=graph_id)
            written.append(graph_id)
    return written
