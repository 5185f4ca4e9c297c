"""Check what MLflow's UI shows of a study, in a real browser (headless Chromium).

Runs a tiny scorer ablation (``studies/ablation_scorer.yaml``: 2 scorers x 2 seeds on a tiny BERT and
64 CoLA sentences), starts the MLflow UI over its store exactly as the study prints it (on a free
port), opens in headless Chromium (driven by selenium) the links the study printed: the runs table
(model-training view, the study's saved view), the compare page of its trials and the parent run's
report.html; asserts that the run names, the columns objective / scorer.name / seed and the four
rank heatmaps side by side are on those pages.  Saves the pages' screenshots (``--shots``, default ``docs/mlflow_ui``).

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


def tiny_model(path: Path) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's tokenizer (tests/tiny.py), weights drawn wide
    (std 0.5) so that four short runs allocate visibly differently."""
    return make_tiny_model_dir(path, init_range=0.5)


def run_study(out: Path) -> str:
    """The tiny ablation; returns what it printed."""
    from dora_lab.study.runner import main

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
    compare_link = re.search(r"MLflow compare \(\d+ complete trials\): (\S+)", printed)
    report_link = re.search(r"logged to the MLflow parent run of '[^']+': (\S+)", printed)
    if not runs_link or not compare_link:
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
    from selenium.webdriver.common.by import By

    with mlflow_ui(command.split(), port):
        here = f"127.0.0.1:{port}"  # the printed links name port 5000; this check's server has its own
        page = browser(args.chromium, args.driver)
        try:
            # 1. the printed link: the runs table (model-training view), the trials named, best first
            page.set_window_size(2600, 900)  # wide: the table draws only the columns in view
            page.get(runs_link.group(1).replace("127.0.0.1:5000", here))
            shown = wait_for(lambda: all(n in page.page_source.replace("&nbsp;", " ") for n in names))
            if not shown:
                problems.append(f"runs page: run names not all shown ({names})")
            if "Model training" not in page.page_source:
                problems.append("runs page: not the model-training view")

            def column_names() -> set[str]:
                return {h.text.strip() for h in page.find_elements(By.CSS_SELECTOR, "[role=columnheader]")}

            wanted = {"objective", "scorer.name", "seed"}  # the study's saved view of the table
            wait_for(lambda: wanted <= column_names(), 20)
            headers = column_names()
            if not wanted <= headers:
                problems.append(f"runs page: the columns objective, scorer.name, seed not all shown ({headers})")
            close_assistant(page)
            page.set_window_size(1900, 720)
            page.save_screenshot(str(args.shots / "runs.png"))
            # 2. the compare page: the rank heatmaps side by side (MLflow lists the top-level artifacts)
            page.set_window_size(1700, 900)
            page.get(compare_link.group(1).replace("127.0.0.1:5000", here))
            entry = wait_for(lambda: page.find_element(By.XPATH, "//*[@aria-label='rank_heatmap.png']"))
            if entry is None:
                problems.append("compare page: no rank_heatmap.png among the artifacts")
            else:
                page.execute_script("arguments[0].scrollIntoView({block: 'start'}); arguments[0].click()", entry)
                def heatmaps() -> set[str] | None:  # the pictures, fetched by the page as blobs
                    srcs = {i.get_attribute("src") or "" for i in page.find_elements(By.TAG_NAME, "img")}
                    blobs = {src for src in srcs if src.startswith("blob:")}
                    return blobs if len(blobs) >= len(names) else None

                images = wait_for(heatmaps, 30)
                if not images or len(images) < len(names):
                    problems.append(f"compare page: {len(images or ())} rank heatmap(s) shown, expected {len(names)}")
                if not all(n in page.page_source.replace("&nbsp;", " ") for n in names):
                    problems.append("compare page: run names not all shown")
                close_assistant(page)
                page.execute_script("arguments[0].scrollIntoView({block: 'start'})", entry)
                time.sleep(1)
                page.save_screenshot(str(args.shots / "compare_heatmaps.png"))
                # the part of the page with the pictures (the page is drawn at one pixel per CSS pixel)
                crop = [round(v) for v in page.execute_script(
                    "const r = [...document.images].filter(i => i.src.startsWith('blob:'))"
                    ".map(i => i.getBoundingClientRect()).filter(b => b.width > 50);"  # not the hidden previews
                    "return [Math.min(...r.map(b => b.left)) - 10, Math.min(...r.map(b => b.top)) - 10,"
                    " Math.max(...r.map(b => b.right)) + 10, Math.max(...r.map(b => b.bottom)) + 10];")]
                shrink(args.shots / "compare_heatmaps.png", (max(0, crop[0]), max(0, crop[1]), crop[2], crop[3]))
            # 3. the parent run's report.html (MLflow shows an HTML artifact in the page)
            if report_link:
                page.get(report_link.group(1).replace("127.0.0.1:5000", here))
                frame = wait_for(lambda: page.find_element(By.TAG_NAME, "iframe"))
                if frame is None:
                    problems.append("report: the parent run's report.html is not shown")
                else:
                    close_assistant(page)
                    time.sleep(2)
                    page.save_screenshot(str(args.shots / "report.png"))
            (out / "last_page.html").write_text(page.page_source)
        finally:
            page.quit()
    for shot in sorted(args.shots.glob("*.png")):
        if shot.name != "compare_heatmaps.png":  # cropped above
            shrink(shot)
        print(f"screenshot {shot} ({shot.stat().st_size // 1024} KB)")
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"{'FAILED' if problems else 'OK'}: {len(names)} runs ({', '.join(names)}) in "
          f"{time.time() - started:.0f} s; the pages' DOM in {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
