"""Check what MLflow's UI shows of a study, in a real browser (headless Chromium).

Runs a tiny scorer ablation (``studies/ablation_scorer.yaml``: 2 scorers x 2 seeds on a tiny BERT and
64 CoLA sentences), starts the MLflow UI over its store exactly as the study prints it (on a free
port), opens in headless Chromium (driven by selenium) the links the study printed and clicks as a
person would (``element.click()``, never a click through JavaScript):

1. the answer link (the parent run): its description shows the per-group table with sd and 95% CI and
   the paired comparison on the first page;
2. one click on ``allocations.png`` in that description: every trial's allocation side by side, each
   heatmap at least :data:`MIN_PANEL` pixels on screen;
3. back, one click on ``report.html``: the report in the page;
4. the runs link: the saved view, grouped by scorer (a row per group), the columns objective /
   scorer.name / seed; its charts (``compareRunsMode=CHART``): the bar and scatter chart of the view.

Saves the pages' screenshots (``--shots``, default ``docs/mlflow_ui``).

    .venv/bin/python scripts/check_mlflow_ui.py [--out DIR] [--shots DIR] [--chromium PATH]

Chromium: Debian's ``chromium`` (``bash scripts/ci_chromium.sh`` installs it).  Exit 0: all seen;
1: something is missing (it says what, and the screenshots show why); 3: no Chromium.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny model and server helpers
from mlflow_server import free_port, serve  # noqa: E402
from tiny import COLA, make_tiny_model_dir  # noqa: E402

SCORERS = ("magnitude", "sensitivity")
SEEDS = (0, 1)
MIN_PANEL = (200, 100)  # the least width and height on screen, in CSS pixels, of one trial's heatmap


def tiny_model(path: Path) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's tokenizer (tests/tiny.py), weights drawn wide
    (std 0.5) so that four short runs allocate visibly differently."""
    return make_tiny_model_dir(path, init_range=0.5)


def run_study(out: Path) -> str:
    """The tiny ablation; returns what it printed."""
    from dora_lab.studies import main

    sets = [f"model.name={tiny_model(out / 'tiny')}", f"task.data_dir={COLA}", "task.max_train_samples=64",
            "task.max_eval_samples=64", f"output_dir={out}", "train.batch_size=16", "train.epochs=2",
            "train.eval_every=4", "schedule.interval=2", "train.lr=0.03", "adapter.alpha=64",
            f"study.space.scorer.name={{type: categorical, choices: [{', '.join(SCORERS)}]}}",
            f"study.space.seed={{type: categorical, choices: [{', '.join(map(str, SEEDS))}]}}"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([str(REPO / "studies" / "ablation_scorer.yaml"), *(x for s in sets for x in ("--set", s))])
    sys.stdout.write(printed.getvalue())
    if code != 0:
        raise SystemExit(f"the tiny study failed (exit {code})")
    return printed.getvalue()


def mlflow_ui(command: list[str], port: int) -> Any:
    """The printed ``mlflow ui`` command, on ``port``: a context manager yielding its address."""
    command = [*command[:command.index("--port") + 1], str(port)]
    return serve(command, f"http://127.0.0.1:{port}", what="the MLflow UI")


def browser(binary: str, driver: str, width: int = 1700, height: int = 900) -> Any:
    """Headless Chromium driven by selenium (Debian's ``chromium`` and ``chromium-driver``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


def wait_for(condition: Callable[[], Any], seconds: float = 60) -> Any:
    """``condition()`` once it is true (the UI is a single-page app: it renders after its requests)."""
    deadline = time.time() + seconds
    while True:
        try:
            value = condition()
        except Exception:  # not rendered yet
            value = None
        if value or time.time() > deadline:
            return value
        time.sleep(0.5)


def close_assistant(page: Any) -> None:
    """Close MLflow's assistant panel (open by default in 3.17), so that the screenshots show the runs."""
    from selenium.webdriver.common.by import By

    for button in page.find_elements(By.XPATH, "//*[contains(text(), 'MLflow Assistant')]/following::button[3]"):
        with contextlib.suppress(Exception):
            button.click()
    time.sleep(1)


def shrink(png: Path, box: tuple[int, int, int, int] | None = None) -> None:
    """A screenshot as a 256-colour PNG (a third of the size; the UI has few colours); with ``box``
    (left, top, right, bottom), cut to it."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    if box:
        rgb = rgb.crop(box)
    rgb.quantize(256).save(png, optimize=True)


def text_of(page: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(page.find_element(By.TAG_NAME, "body").text)


def click_link(page: Any, text: str) -> bool:
    """Click (as a person: the element's own click) the first visible link whose text is ``text``; the
    description's links open in a new tab (MLflow's ``target=_blank``): continue in it."""
    from selenium.webdriver.common.by import By

    link = wait_for(lambda: next(a for a in page.find_elements(By.LINK_TEXT, text) if a.is_displayed()), 30)
    if link is None:
        return False
    before = set(page.window_handles)
    link.click()
    opened = wait_for(lambda: set(page.window_handles) - before, 10)
    if opened:
        page.switch_to.window(opened.pop())
    return True


def close_tab(page: Any) -> None:
    """Close a tab a link opened and go back to the first one (else: the browser's back button)."""
    if len(page.window_handles) > 1:
        page.close()
        page.switch_to.window(page.window_handles[0])
    else:
        page.back()


def answer_page(page: Any, url: str, shots: Path) -> list[str]:
    """The printed answer link: the table with spread and the comparison on the page, then one click
    to the allocation figure, back, one click to report.html."""
    from selenium.webdriver.common.by import By

    problems = []
    page.set_window_size(1440, 900)  # a laptop's window
    page.get(url)
    wait_for(lambda: "the answer so far" in text_of(page), 60)
    time.sleep(2)  # the page settles (it fetches the run's details in several requests)
    toggle = wait_for(lambda: page.find_element(By.CSS_SELECTOR, "[data-testid=show-comment-toggle]"), 10)
    if toggle is None:  # MLflow folds a long description: one click ("Show more") unfolds it
        problems.append("answer page: no 'Show more' on the description")
    else:
        toggle.click()
        time.sleep(1)
    wanted = ("the answer so far", "sd", "95% CI", "Paired by seed against the reference", "p (Holm)", "Best trial")
    if not wait_for(lambda: all(w in text_of(page) for w in wanted), 60):
        problems.append(f"answer page: not all of {wanted} shown")
    close_assistant(page)
    from selenium.webdriver.common.action_chains import ActionChains

    heading = wait_for(lambda: page.find_element(By.XPATH, "//*[normalize-space(text())='Description']"), 5)
    if heading is not None:  # the unfolded description from its top, as a person scrolls back to it
        ActionChains(page).scroll_to_element(heading).perform()
        ActionChains(page).scroll_by_amount(0, -400).perform()
        time.sleep(1)
    page.save_screenshot(str(shots / "answer.png"))
    if not click_link(page, "allocations.png"):
        problems.append("answer page: no allocations.png link")
        return problems
    else:
        def figure() -> Any:
            img = next(i for i in page.find_elements(By.TAG_NAME, "img") if "allocations" in (i.get_attribute("alt") or "")
                       or (i.size["width"] > 400 and i.is_displayed()))
            return img if img.size["width"] > 0 else None

        img = wait_for(figure, 30)
        if img is None:
            problems.append("allocation figure: not shown")
        else:
            columns = max(2, round((len(SCORERS) * len(SEEDS)) ** 0.5))
            rows = -(-len(SCORERS) * len(SEEDS) // columns)
            panel = (img.size["width"] / columns, img.size["height"] / rows)
            if panel[0] < MIN_PANEL[0] or panel[1] < MIN_PANEL[1]:
                problems.append(f"allocation figure: a heatmap is {panel[0]:.0f} x {panel[1]:.0f} px on screen, "
                                f"less than {MIN_PANEL}")
            close_assistant(page)
            page.save_screenshot(str(shots / "allocations.png"))
    close_tab(page)
    if not click_link(page, "report.html"):  # in the description's first line: no need to unfold
        problems.append("answer page: no report.html link")
    elif wait_for(lambda: page.find_element(By.TAG_NAME, "iframe"), 30) is None:
        problems.append("report: the parent run's report.html is not shown")
    else:
        close_assistant(page)
        time.sleep(2)
        page.save_screenshot(str(shots / "report.png"))
    return problems


def runs_pages(page: Any, url: str, names: list[str], shots: Path) -> list[str]:
    """The printed runs link: grouped by scorer, the study's columns; and its charts."""
    from selenium.webdriver.common.by import By

    problems = []
    page.set_window_size(2200, 900)  # wide: the table draws only the columns in view
    page.get(url)
    if not wait_for(lambda: all(s in text_of(page) for s in SCORERS), 60):
        problems.append("runs page: the scorer groups are not shown")
    if "Model training" not in page.page_source:
        problems.append("runs page: not the model-training view")

    def column_names() -> set[str]:
        return {h.text.strip() for h in page.find_elements(By.CSS_SELECTOR, "[role=columnheader]")}

    wanted = {"objective", "scorer.name", "seed"}  # the study's saved view of the table
    wait_for(lambda: wanted <= column_names(), 20)
    if not wanted <= column_names():
        problems.append(f"runs page: the columns objective, scorer.name, seed not all shown ({column_names()})")
    close_assistant(page)
    page.set_window_size(1600, 800)
    page.save_screenshot(str(shots / "runs.png"))
    page.set_window_size(1600, 1000)
    page.get(f"{url}&compareRunsMode=CHART")
    charts = ("objective by group", "adapter_parameters_final")  # the view's section and its scatter
    if not wait_for(lambda: all(c in text_of(page) for c in charts), 60):
        problems.append(f"charts page: the view's charts {charts} not shown")
    close_assistant(page)
    time.sleep(2)
    page.save_screenshot(str(shots / "charts.png"))
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="the study's output folder (default: a temporary one)")
    parser.add_argument("--shots", type=Path, default=REPO / "docs" / "mlflow_ui", help="where the screenshots go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--driver", default=shutil.which("chromedriver"))
    args = parser.parse_args()
    if not args.chromium or not args.driver or importlib.util.find_spec("selenium") is None:
        print("no chromium, chromedriver or selenium: `bash scripts/ci_chromium.sh` installs them", file=sys.stderr)
        return 3
    out = args.out or Path(tempfile.mkdtemp(prefix="dora_lab_ui_"))
    started = time.time()
    printed = run_study(out)
    command = next(line.strip() for line in printed.splitlines() if " -m mlflow ui " in line)
    runs_link = re.search(r"MLflow runs of this study: (\S+)", printed)
    answer_link = re.search(r"MLflow answer [^:]*: (\S+)", printed)
    if not runs_link or not answer_link:
        print("error: the study printed no MLflow links", file=sys.stderr)
        return 1

    from mlflow import MlflowClient

    uri = command.split("--backend-store-uri ")[1].split()[0]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ablation_scorer")
    assert exp is not None
    names = sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])
                   if r.data.tags.get("dora_lab.role") == "trial")
    args.shots.mkdir(parents=True, exist_ok=True)
    problems = []
    port = free_port()

    with mlflow_ui(command.split(), port):
        here = f"127.0.0.1:{port}"  # the printed links name port 5000; this check's server has its own
        page = browser(args.chromium, args.driver)
        try:
            problems += answer_page(page, answer_link.group(1).replace("127.0.0.1:5000", here), args.shots)
            problems += runs_pages(page, runs_link.group(1).replace("127.0.0.1:5000", here), names, args.shots)
            (out / "last_page.html").write_text(page.page_source)
        finally:
            page.quit()
    for shot in sorted(args.shots.glob("*.png")):
        shrink(shot)
        print(f"screenshot {shot} ({shot.stat().st_size // 1024} KB)")
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"{'FAILED' if problems else 'OK'}: {len(names)} runs ({', '.join(names)}) in "
          f"{time.time() - started:.0f} s; the pages' DOM in {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
