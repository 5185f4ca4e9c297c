"""Where a study is in MLflow's UI: the links the study prints and the report logs.

MLflow 3's UI (3.17) shows an experiment as GenAI (overview, traces) or as model training (the
runs table) by the URL's ``workflowType``; every link here says ``workflowType=machine_learning``.
The runs table's saved view (:func:`study_view`) is an experiment tag read by the UI.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from .tracker import StudyTracker

__all__ = ["ROLE_TAG", "STUDY_TAG", "UI_PORT", "compare_url", "experiment_url", "run_url", "safe_url", "study_view",
           "ui_address", "ui_lines"]

STUDY_TAG = "dora_lab.study"
ROLE_TAG = "dora_lab.role"
UI_PORT = 5000  # the port of the printed mlflow ui command


def safe_url(url: str) -> str:
    """``url`` without its password (for tags and printed messages)."""
    if "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def ui_address(tracking_uri: str) -> str:
    """Where the MLflow UI of ``tracking_uri`` is: the server itself, or for a local store the
    address of the ``mlflow ui`` command :func:`print_summary` prints."""
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
        query |= {"searchFilter": f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = '{study}'",
                  "orderByKey": "metrics.`objective`", "orderByAsc": "false" if maximize else "true"}
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


def run_url(ui: str, experiment_id: str, run_id: str, artifact: str = "") -> str:
    """A run's page in the UI at ``ui``; with ``artifact``, that file opened in the run's artifacts."""
    page = f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{page}/artifactPath/{artifact}?workflowType=machine_learning" if artifact else \
        f"{page}?workflowType=machine_learning"


def study_view(study: str, metric: str, searched: Sequence[str], maximize: bool = True) -> dict[str, Any]:
    """The runs table as a study wants it, as MLflow's UI keeps a shared view (``Views`` > share: an
    experiment tag ``mlflow.sharedViewState.<key>`` holding this JSON, opened by the URL parameter
    ``viewStateShareKey=<key>``): the study's trials flat, best ``objective`` first, and as columns
    the datasets, ``objective``, ``best_<metric>``, the final adapter size, the minutes and every
    searched key, instead of MLflow's default Source / Models / Dataset."""
    return {"searchFilter": f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = '{study}'",
            "orderByKey": "metrics.`objective`", "orderByAsc": not maximize,
            "selectedColumns": ["attributes.`Dataset`", "metrics.`objective`", f"metrics.`best_{metric}`",
                                "metrics.`adapter_parameters_final`", "metrics.`minutes`",
                                *(f"params.`{k}`" for k in searched)]}


def compare_url(ui: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """MLflow's compare page of ``run_ids`` (params, metrics and the top-level artifacts side by side)."""
    return (f"{ui.rstrip('/')}/#/compare-runs?runs={quote(json.dumps(list(run_ids)), safe='')}"
            f"&experiments={quote(json.dumps([experiment_id]), safe='')}&workflowType=machine_learning")



def ui_lines(tracking_uri: str, tracker: StudyTracker, maximize: bool = True, compare: Sequence[str] = ()) -> list[str]:
    """How to see the study in MLflow: for a local store the ``mlflow ui`` command (with this
    interpreter, so it works as printed without an activated virtualenv), the link to the runs table
    in the model-training view and, given run ids ``compare``, to their compare page."""
    lines = []
    if not tracking_uri.startswith(("http://", "https://")):
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                   "--host", "127.0.0.1", "--port", str(UI_PORT)]
        lines += ["open the MLflow UI on this study:", f"  {shlex.join(command)}", "then"]
    ui = ui_address(tracking_uri)
    lines.append(f"MLflow runs of this study: {tracker.runs_url(maximize, ui)}")
    if len(compare) > 1:
        lines.append(f"MLflow compare ({len(compare)} complete trials): {compare_url(ui, tracker.experiment_id, compare)}")
    return lines
