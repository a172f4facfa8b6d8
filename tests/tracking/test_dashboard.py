"""The MLflow dashboard in a real browser (Debian's Chromium, headless) over a store filled by a tiny pipeline run:
tokenize and pretrain, served by `mlflow ui` as `make mlflow-ui` serves outputs/mlflow.db.

What a user should see: the experiment's runs table lists the stage runs, the pretrain run's Dataset column names
the tokenize output it read and its Models column the model it registered; the registry page shows that version
under the stage's alias; a plot a stage logged opens as an image.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from pipeline.config import compose
from pipeline.contract import execute_stage
from pipeline.stages import load_stage
from tests.conftest import tiny_tokenize_overrides
from tests.stages.test_pretrain import TINY_TRAIN

CHROMIUM = Path("/usr/bin/chromium")  # Debian's packages, so nothing is downloaded (no Selenium Manager)
CHROMEDRIVER = Path("/usr/bin/chromedriver")
EXPERIMENT = "dashboard"  # the MLflow experiment, and so the registered model's name
PLOT = "corpus.png"  # the plot tokenize logs (pretrain logs none)
SERVER_START_S = 120  # `mlflow ui` takes 15 s to answer on 2 busy cores
PAGE_S = 60  # the React UI's first page load takes about 10 s there

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.exists()),
                       reason=f"no browser: {CHROMIUM} and {CHROMEDRIVER} come from Debian's chromium and "
                              f"chromium-driver packages (apt-get install chromium chromium-driver; .ci/run does)"),
]


@dataclass
class Dashboard:
    url: str  # the server's root, http://127.0.0.1:<port>
    tracking_uri: str  # the SQLite store it serves
    experiment_id: str
    runs: dict[str, str]  # MLflow run id by stage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + SERVER_START_S
    while True:
        assert server.poll() is None, f"mlflow ui exited with {server.returncode}: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            assert time.time() < deadline, f"mlflow ui did not answer within {SERVER_START_S} s: {log.read_text()[-3000:]}"
            time.sleep(0.5)


def run_stages(root: Path, data_dir: Path) -> dict[str, str]:
    """tokenize then pretrain (10 steps of the tiny model, its export registered) into ``root``'s store."""
    cfg = compose(f"paths.outputs_dir={root}", f"tracking.uri=sqlite:///{root}/mlflow.db",
                  f"tracking.experiment={EXPERIMENT}", "tracking.models=true", *tiny_tokenize_overrides(data_dir),
                  "tokenizer.vocab_size=512", *TINY_TRAIN, "pretrain.max_steps=10", "pretrain.eval_every_steps=10",
                  "pretrain.ckpt_every_steps=10", "pretrain.sample_every_steps=10")
    return {stage: execute_stage(stage, load_stage(stage), cfg)["mlflow_run_id"] for stage in ("tokenize", "pretrain")}


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, data_dir):
    """`mlflow ui` over a store holding one tiny tokenize and pretrain run; the server boots while the stages run."""
    root = tmp_path_factory.mktemp("dashboard")
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the tables, so the server and the stages never both do
    port, log = free_port(), root / "mlflow-ui.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", uri,
             "--artifacts-destination", str(root / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no background job runner
    try:
        runs = run_stages(root, data_dir)
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, server, log)
        yield Dashboard(url, uri, MlflowClient(uri).get_experiment_by_name(EXPERIMENT).experiment_id, runs)
    finally:  # the whole group: `mlflow ui` runs uvicorn as a child
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium that reaches nothing but the test's server and writes only under pytest's tmp dir."""
    home = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1920,1080", f"--user-data-dir={home / 'profile'}", f"--disk-cache-dir={home / 'cache'}"):
        options.add_argument(flag)
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "cache"),
           "PATH": "/usr/bin:/bin"}
    try:
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER), env=env), options=options)
    except WebDriverException as e:
        pytest.fail(f"{CHROMIUM} is installed but does not start under {CHROMEDRIVER}: {e.msg}")
    driver.screenshot_dir = home  # where a failed wait leaves its picture
    yield driver
    driver.quit()


def wait_for(driver, what: str, found):
    """``found(driver)``'s first truthy value within PAGE_S; on a timeout, fail naming ``what``, with a screenshot."""
    try:
        return WebDriverWait(driver, PAGE_S, ignored_exceptions=[WebDriverException]).until(found)
    except TimeoutException:
        picture = driver.screenshot_dir / f"{what.replace(' ', '_')[:60]}.png"
        driver.save_screenshot(str(picture))
        text = driver.find_element(By.TAG_NAME, "body").text[-2000:]
        raise AssertionError(f"{driver.current_url} never showed {what} (screenshot {picture}); it shows: {text}")


def cell(driver, run_id: str, column: str) -> str:
    """The text of ``run_id``'s cell in the runs table's ``column`` ('' until the grid has drawn it)."""
    cells = driver.find_elements(By.CSS_SELECTOR, f'[role=row][row-id="{run_id}"] [col-id="attributes.`{column}`"]')
    return cells[0].text if cells else ""


def texts(driver, xpath: str) -> list[str]:
    """The non-empty texts of the elements at ``xpath`` (an element of the page being left has none once detached)."""
    return [text for e in driver.find_elements(By.XPATH, xpath) if (text := e.text.strip())]


def png_width(path: Path) -> int:
    """The width in pixels that the PNG file at ``path`` declares in its header."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">I", data[16:20])[0]


def test_runs_table_lists_the_stage_runs_with_their_dataset_and_model(dashboard, browser):
    browser.get(f"{dashboard.url}/#/experiments/{dashboard.experiment_id}/runs")
    for stage, run_id in dashboard.runs.items():
        wait_for(browser, f"the {stage} run", lambda d: cell(d, run_id, "Run Name").endswith(stage))

    pretrain = dashboard.runs["pretrain"]
    inputs = MlflowClient(dashboard.tracking_uri).get_run(pretrain).inputs.dataset_inputs
    (read,) = [i.dataset for i in inputs if {t.value for t in i.tags} == {"input"}]
    assert read.name == "tokenize", "pretrain's input dataset is tokenize's output"
    datasets = wait_for(browser, "pretrain's Dataset cell", lambda d: cell(d, pretrain, "Dataset"))
    assert f"tokenize ({read.digest})" in datasets and "Input" in datasets, datasets
    models = wait_for(browser, "pretrain's Models cell", lambda d: cell(d, pretrain, "Models"))
    assert models.split() == [EXPERIMENT, "v1"], f"pretrain registered {EXPERIMENT} version 1, the table shows {models}"
    assert cell(browser, dashboard.runs["tokenize"], "Models") == "-", "tokenize trains no model"


def test_run_page_and_registry_show_the_registered_model(dashboard, browser):
    version = f"a[@href='#/models/{EXPERIMENT}/versions/1']"
    browser.get(f"{dashboard.url}/#/experiments/{dashboard.experiment_id}/runs/{dashboard.runs['pretrain']}")
    (link, *_) = wait_for(browser, "the run's registered models", lambda d: texts(
        d, f"//*[normalize-space(text())='Registered models']/..//{version}"))
    assert link.split() == [EXPERIMENT, "v1"], link

    browser.get(f"{dashboard.url}/#/models/{EXPERIMENT}")
    (row,) = wait_for(browser, "version 1 in the registry", lambda d: [
        row for row in texts(d, f"//{version}/ancestor::*[@role='row'][1]") if row.startswith("Version 1")])
    assert "@ pretrain" in row, f"version 1's alias is the stage that trained it: {row}"


def test_a_logged_plot_opens_as_an_image(dashboard, browser, tmp_path):
    plot = Path(MlflowClient(dashboard.tracking_uri).download_artifacts(dashboard.runs["tokenize"], PLOT, str(tmp_path)))
    browser.get(f"{dashboard.url}/#/experiments/{dashboard.experiment_id}/runs/{dashboard.runs['tokenize']}/artifacts")
    entry = f"//*[normalize-space(text())='{PLOT}']"
    wait_for(browser, f"{PLOT} in the artifact tree", lambda d: d.find_elements(By.XPATH, entry))[0].click()
    width = wait_for(browser, f"{PLOT} drawn", lambda d: d.execute_script(
        "const img = document.querySelector(arguments[0]);"
        "return img && img.complete && img.naturalWidth;", f'img[alt="{PLOT}"]'))
    assert width == png_width(plot), "the page shows the logged PNG itself"
