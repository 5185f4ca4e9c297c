"""Where a study is in MLflow's UI: the links the study prints and the report logs.

MLflow 3's UI (3.17) shows an experiment as GenAI (overview, traces) or as model training (the
runs table) by the URL's ``workflowType``; every link here says ``workflowType=machine_learning``.
The runs table's saved view (:func:`study_view`) is an experiment tag read by the UI.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote, urlencode


class StudyLinks(Protocol):
    """What :func:`ui_lines` reads of a study's tracker (:class:`~dora_lab.track.tracker.StudyTracker`)."""

    experiment_id: str
    parent_id: str | None
    view_key: str | None

    def runs_url(self, maximize: bool = True, ui: str | None = None) -> str: ...

__all__ = ["GROUP_COLORS", "ROLE_TAG", "STUDY_TAG", "UI_PORT", "compare_url", "experiment_url", "group_color", "run_url",
           "filter_value", "safe_url", "study_view", "ui_address", "ui_lines"]

STUDY_TAG = "dora_lab.study"
ROLE_TAG = "dora_lab.role"
UI_PORT = 5000  # the port of the printed mlflow ui command
VIEW_SECTION = "dora_lab-study"  # the saved view's chart section
# well-separated colours from MLflow's own run palette: blue, coral, green, brown, purple, teal, orange, ...
GROUP_COLORS = ("#2272b4", "#c83243", "#308613", "#a6630c", "#8a63bf", "#04867d", "#de7921", "#b45091",
                "#434a93", "#1f272d", "#8acaff", "#facb66")


def safe_url(url: str) -> str:
    """``url`` without its password (for tags and printed messages)."""
    if "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def filter_value(text: str) -> str:
    """``text`` as a string literal of an MLflow search filter: in single quotes, or in double quotes
    when it holds a single quote (``o'brien``; MLflow's filter grammar has no escapes, so a text with
    both quotes cannot be written: :func:`dora_lab.run.names.check_name` refuses ``"`` in names)."""
    if "'" not in text:
        return f"'{text}'"
    if '"' in text:
        raise ValueError(f"{text!r} holds both quote characters; an MLflow filter cannot match it")
    return f'"{text}"'


def ui_address(tracking_uri: str) -> str:
    """Where the MLflow UI of ``tracking_uri`` is: the server itself, or for a local store the
    address of the ``mlflow ui`` command :func:`ui_lines` prints."""
    if tracking_uri.startswith(("http://", "https://")):
        return safe_url(tracking_uri).rstrip("/")
    return f"http://127.0.0.1:{UI_PORT}"


def experiment_url(ui: str, experiment_id: str, study: str | None = None, maximize: bool = True,
                   view: str | None = None) -> str:
    """The runs table of experiment ``experiment_id`` in the UI at ``ui``, in the model-training view;
    with ``study``, showing that study's trials, best first; with ``view``, the saved view of that
    key instead (:func:`study_view`: the same search and order, and the columns that matter).

    MLflow 3's UI (3.17) shows an experiment as GenAI (overview, traces) or as model training (the
    runs table) by its ``workflowType``: the query parameter of the experiment page's URL, else the
    last choice kept in the browser, else ``genai``.  The ``mlflow.experimentKind`` tag, which
    earlier 3.x UIs read, is set too (:meth:`StudyTracker._experiment`), but 3.17 decides by the
    URL: so the link says ``workflowType=machine_learning``.  The table's search and order are URL
    parameters as well (``searchFilter``, ``orderByKey``, ``orderByAsc``): the trials alone (child
    runs whose parent is filtered out are listed flat, not folded under the parent's row), sorted
    by ``objective``."""
    query = {"workflowType": "machine_learning"}
    if view is not None:  # the UI ignores a saved view when the URL has a search or an order of its own
        query["viewStateShareKey"] = view
    elif study is not None:
        query |= {"searchFilter": f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = {filter_value(study)}",
                  "orderByKey": "metrics.`objective`", "orderByAsc": "false" if maximize else "true"}
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


def run_url(ui: str, experiment_id: str, run_id: str, artifact: str = "") -> str:
    """A run's page in the UI at ``ui``; with ``artifact``, that file opened in the run's artifacts."""
    page = f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{page}/artifactPath/{artifact}?workflowType=machine_learning" if artifact else \
        f"{page}?workflowType=machine_learning"


def study_view(study: str, metric: str, searched: Sequence[str], maximize: bool = True,
               factors: Sequence[str] = (), extra: Sequence[str] = ()) -> dict[str, Any]:
    """The runs table as a study wants it, as MLflow's UI keeps a shared view (``Views`` > share: an
    experiment tag ``mlflow.sharedViewState.<key>`` holding this JSON, opened by the URL parameter
    ``viewStateShareKey=<key>``): the study's trials, best ``objective`` first, and as columns
    the datasets, ``objective``, ``best_<metric>``, the final adapter size, the minutes and every
    searched key (then the ``extra`` columns: a multi-objective study's Pareto tag), instead of MLflow's
    default Source / Models / Dataset.

    With ``factors`` (params: the study's groups), the table is grouped by them (``groupBy``: the
    group rows show the group's mean) and the charts of the view (``compareRunCharts`` in the section
    ``compareRunSections``) are a bar chart of ``objective`` and a scatter of ``objective`` against
    ``adapter_parameters_final``, one point per run (``useGroupedValuesInCharts`` off) in its group's
    colour (each trial run's ``mlflow.runColor`` tag, :func:`group_color`).  The keys and card
    fields are those MLflow 3.17's UI restores from a shared view (its bundle's list of persisted UI
    state keys and its chart card classes)."""
    state: dict[str, Any] = {
        "searchFilter": f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = {filter_value(study)}",
        "orderByKey": "metrics.`objective`", "orderByAsc": not maximize,
        "selectedColumns": ["attributes.`Dataset`", "metrics.`objective`", f"metrics.`best_{metric}`",
                            "metrics.`adapter_parameters_final`", "metrics.`minutes`",
                            *(f"params.`{k}`" for k in searched), *extra]}
    if not factors:
        return state
    card = {"runsCountToCompare": 100, "metricSectionId": VIEW_SECTION, "deleted": False, "isGenerated": False}
    return state | {
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "param", "groupByData": k} for k in factors]},
        "groupsExpanded": {}, "useGroupedValuesInCharts": False, "isAccordionReordered": True,
        "compareRunSections": [{"uuid": VIEW_SECTION, "name": f"{study}: objective by group",
                                "display": True, "isReordered": True}],
        "compareRunCharts": [
            {**card, "uuid": f"{VIEW_SECTION}-bar", "type": "BAR", "metricKey": "objective",
             "displayName": f"objective ({metric}) per run, coloured by {', '.join(factors)}"},
            {**card, "uuid": f"{VIEW_SECTION}-size", "type": "SCATTER",
             "xaxis": {"key": "adapter_parameters_final", "type": "METRIC"},
             "yaxis": {"key": "objective", "type": "METRIC"},
             "displayName": f"objective ({metric}) against the final adapter parameters"}]}


def group_color(group: Sequence[str], order: Sequence[Sequence[str]] = ()) -> str:
    """A group's colour for its runs' ``mlflow.runColor`` tag: the ``order``-th colour of
    :data:`GROUP_COLORS` (``order``: the study's groups in grid order), else one picked by a stable
    hash of the group's values.  MLflow colours a group row by a hash of its id, which gives two
    groups the same colour often enough; a run's colour tag it shows as set."""
    groups = [tuple(g) for g in order]
    if tuple(group) in groups:
        return GROUP_COLORS[groups.index(tuple(group)) % len(GROUP_COLORS)]
    digest = int(hashlib.sha1("\x1f".join(group).encode()).hexdigest(), 16)
    return GROUP_COLORS[digest % len(GROUP_COLORS)]


def compare_url(ui: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """MLflow's compare page of ``run_ids`` (params, metrics and the top-level artifacts side by side)."""
    return (f"{ui.rstrip('/')}/#/compare-runs?runs={quote(json.dumps(list(run_ids)), safe='')}"
            f"&experiments={quote(json.dumps([experiment_id]), safe='')}&workflowType=machine_learning")



def ui_lines(tracking_uri: str, tracker: StudyLinks, maximize: bool = True, compare: Sequence[str] = (),
             report: str | None = None) -> list[str]:
    """How to see the study in MLflow, the answer first: for a local store the ``mlflow ui`` command
    (with this interpreter, so it works as printed without an activated virtualenv); the report
    (``report``: its artifact path on the parent run, once made); the parent run, whose description
    holds the answer so far; the runs table (grouped, in the model-training view) and its charts;
    given run ids ``compare``, their compare page."""
    lines = []
    if not tracking_uri.startswith(("http://", "https://")):
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                   "--host", "127.0.0.1", "--port", str(UI_PORT)]
        lines += ["open the MLflow UI on this study:", f"  {shlex.join(command)}", "then"]
    ui = ui_address(tracking_uri)
    if tracker.parent_id and report:
        lines.append(f"MLflow report of this study: {run_url(ui, tracker.experiment_id, tracker.parent_id, report)}")
    if tracker.parent_id:
        lines.append("MLflow answer (per-group mean, sd, CI; paired tests; best trial; updated as trials finish): "
                     f"{run_url(ui, tracker.experiment_id, tracker.parent_id)}")
    runs = tracker.runs_url(maximize, ui)
    lines.append(f"MLflow runs of this study: {runs}")
    if tracker.view_key:
        lines.append(f"MLflow charts (objective by group, against adapter size): {runs}&compareRunsMode=CHART")
    if len(compare) > 1:
        lines.append(f"MLflow compare ({len(compare)} complete trials): {compare_url(ui, tracker.experiment_id, compare)}")
    return lines
