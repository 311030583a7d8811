"""The UIs in a real browser: headless Debian chromium, driven by Playwright.

Materialises the tiny graph for one date from the command line (as a user would, into a
temporary DAGSTER_HOME and TWOTOWER_HOME), starts ``dagster dev`` and ``mlflow ui`` on free
loopback ports against them, and checks what a person would look at:

* the global asset graph (groups expanded, fitted to the window) draws every asset, among
  them two_tower_model, evaluation_metrics and champion;
* the evaluation_metrics asset page shows its metrics table (the markdown ``| k | metric |
  popularity | ...`` table rendered as an HTML table) and a plot (a ``data:image/png`` image in
  the markdown metadata), and the MLflow run id;
* the MLflow UI's page of that run lists its logged models ``match_model`` and
  ``retriever``, with the registered models they became;
* each logged model's own page shows the run's recall@50 of the model and no baseline's metric;
* the experiment's Models view (MLflow 3's logged models, in the "Model training" view) shows
  both logged models with the numbers of the run's evaluation, as the MLflow store holds them;
* every training-date asset's Partitions tab reads what the docs promise after one run: the
  run's date materialized, no date failed or materializing, every other date missing;
* no "Join the Dagster community" dialog covers the graph (the shipped instance config).

The same command-line run is also read for what it printed: no line at WARNING or worse
except the ones listed in :data:`EXPECTED_WARNINGS`, and no progress bars.

Each wait is bounded; a failed check saves a screenshot and the page text next to the test's
temporary files and names them in the assertion message. Needs Debian's chromium
(``apt-get install -y chromium``): the test fails, not skips, without it.
"""

import re
from pathlib import Path

import pytest

from helpers.browser import (
    MlflowUI,
    chromium_context,
    label_matches,
    materialize_tiny,
    require_chromium,
    saved_on_failure,
)
from helpers.dagster_dev import DagsterDev
from helpers.graph import TINY_PARTITION

MUST_SHOW = ("two_tower_model", "evaluation_metrics", "champion")
# What a user's shell may set to quiet TensorFlow or MLflow: the CLI run goes without them, so it
# prints what the package itself leaves on.
QUIETING_VARIABLES = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLED_DEVICE_TYPES", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                      "PYTHONWARNINGS")
# A line at WARNING or worse: Dagster's console lines (" - WARNING - "), TensorFlow's C++ log
# lines (E0000 / W0000 / F0000 ...), Python warnings ("UserWarning:") and bare WARNING:/ERROR:.
SEVERE_LINE = re.compile(r" - (?:WARNING|ERROR|CRITICAL) - |^[EWF]\d{4} |\w+Warning: |^(?:WARNING|ERROR)\b|^Traceback")
EXPECTED_WARNINGS = {
    # `dagster asset materialize` (the README's and CI's command) is superseded by `dg launch`;
    # click prints Dagster's notice before any project code runs (docs/operations.md).
    "dagster asset materialize is superseded by dg launch":
        re.compile(r"SupersessionWarning: Function `asset_materialize_command` is superseded"),
    # The tensorflow wheel's CUDA runtime stub logs "Could not find cuda drivers" (an INFO line)
    # when the library loads on a machine without CUDA, before TensorFlow has set up its logging
    # or read TF_CPP_MIN_LOG_LEVEL; absl heads such early lines with this notice, once per
    # library (two). Nothing set before the import changes it; with CUDA installed it is absent.
    "absl's notice before TensorFlow's logging starts":
        re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    # The product's own message: the quality gate passed, but the strongest simple baseline
    # (EASE on the tiny catalogue) is ahead of a two-epoch model. The default policy warns
    # (strongest_baseline: warn, docs/operations.md), and a person should see it.
    "the quality gate's warning that EASE is ahead":
        re.compile(r" - WARNING - .* - evaluation_metrics_quality_gate - Quality gate passed for \S+ with a warning: "
                   r".*does not beat the strongest simple baseline, ease"),
}
METRICS_HEADERS = ("k", "metric", "popularity", "random", "svd", "two_tower")  # and maybe more
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")
LOGGED_MODELS = {"match_model": "two_tower_match", "retriever": "two_tower_retriever"}
HEADLINE_KEYS = ("recall_at_50", "ndcg_at_10")  # the evaluation's single numbers on each logged model
NEXT_DAY = "2026-06-02"  # a training date the run did not train

# A point of the graph's background (not a node, a group or a control), where a double-click
# fits the whole graph into the window.
EMPTY_GRAPH_POINT = """() => {
  const svg = Array.from(document.querySelectorAll('svg')).find(s => +s.getAttribute('width') > 300);
  if (!svg) return null;
  const viewport = svg.parentElement.parentElement;
  const r = viewport.getBoundingClientRect();
  for (let fy = 0.05; fy < 0.95; fy += 0.05) {
    for (let fx = 0.05; fx < 0.9; fx += 0.05) {
      const x = r.left + fx * r.width, y = r.top + fy * r.height;
      const el = document.elementFromPoint(x, y);
      if (el === viewport || el === svg || el === svg.parentElement) return [x, y];
    }
  }
  return null;
}"""


def choose_graph_setting(page, item: str, attempts: int = 3) -> None:
    """An item of the graph's settings menu (the gear at the bottom right). The menu can be
    re-rendered under the pointer while the graph lays itself out again: then open it again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    for attempt in range(attempts):
        page.locator("button:has([aria-label=settings])").last.click()
        try:
            page.get_by_role("menuitem", name=item).click(timeout=10_000)
            return
        except PlaywrightTimeoutError:
            if attempt == attempts - 1:
                raise
            page.keyboard.press("Escape")


def open_markdown(page, row):
    """Where a markdown metadata value of the asset page is rendered: in its row when it is
    short, else (1,000 characters or more) in the dialog its "[Show Markdown]" button opens."""
    from playwright.sync_api import expect

    inline = row.locator("table, img").first  # the markdown rendered in the row itself
    button = row.get_by_text("[Show Markdown]", exact=True)
    expect(inline.or_(button).first).to_be_visible()
    if button.count():
        button.click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_be_visible()
        return dialog
    return row


def close_dialog(page) -> None:
    dialog = page.get_by_role("dialog")
    if dialog.count():
        dialog.get_by_role("button", name="Close").click()
        dialog.wait_for(state="detached")


# MLflow's grid (ag-grid) draws only the columns in view: its scrolling parts, moved together.
GRID_VIEWPORTS = ".ag-body-horizontal-scroll-viewport, .ag-center-cols-viewport, .ag-header-viewport"
SCROLL_GRID_TO_START = f"grid => grid.querySelectorAll('{GRID_VIEWPORTS}').forEach(v => {{ v.scrollLeft = 0; }})"
SCROLL_GRID_RIGHT = f"""grid => {{
  let moved = false;
  for (const v of grid.querySelectorAll('{GRID_VIEWPORTS}')) {{
    const before = v.scrollLeft;
    v.scrollLeft = before + Math.max(200, v.clientWidth / 2);
    moved = moved || v.scrollLeft !== before;
  }}
  return moved;
}}"""


def reveal_column(page, grid, key: str) -> None:
    """Scroll MLflow's grid from its left edge until the header of the column of ``key`` is drawn;
    fails naming the column when the grid ends without it."""
    from playwright.sync_api import expect

    header = grid.locator(f'[role=columnheader][col-id*="{key}"]')
    grid.evaluate(SCROLL_GRID_TO_START)
    for _ in range(50):
        if header.count() or not grid.evaluate(SCROLL_GRID_RIGHT):
            break
        page.wait_for_timeout(300)
    expect(header).to_have_count(1)


def training_date_assets() -> list[str]:
    """The assets partitioned by training date (every partitioned one but click_events)."""
    from twotower_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    return sorted(key.to_user_string() for key in graph.get_all_asset_keys()
                  if graph.get(key).partitions_def is not None and key.to_user_string() != "click_events")


def asset_names() -> list[str]:
    from twotower_assets.definitions import defs

    return sorted(key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys())


def severe_lines(log: Path) -> list[str]:
    """The lines of ``log`` at WARNING or worse (tqdm's carriage returns split lines too)."""
    text = log.read_text(errors="replace").replace("\r", "\n")
    return [line for line in text.splitlines() if SEVERE_LINE.search(line)]


def unexpected(lines: list[str]) -> list[str]:
    return [line for line in lines if not any(p.search(line) for p in EXPECTED_WARNINGS.values())]


def test_the_noise_filter_finds_each_kind_of_line():
    lines = [
        "2026-12-07 01:07:51 +0000 - dagster - WARNING - __ASSET_JOB - 1 - two_tower_model - slow",
        "2026-12-07 01:07:51 +0000 - dagster - ERROR - __ASSET_JOB - 1 - two_tower_model - broken",
        "E0000 00:00:1796605632.683702    5173 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
        "W0000 00:00:1796605632.683702    5173 something.cc:1] careful",
        "/x/tuning.py:216: ExperimentalWarning: optuna.visualization is experimental",
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    ]
    quiet = ["2026-12-07 01:07:51 +0000 - dagster - INFO - __ASSET_JOB - 1 - champion - moved",
             "I0000 00:00:1796605619.774232    5173 cudart_stub.cc:31] Could not find cuda drivers on your machine"]
    assert [line for line in lines + quiet if SEVERE_LINE.search(line)] == lines
    assert unexpected(lines) == lines[:-1]


@pytest.fixture(scope="module")
def chromium():
    require_chromium()  # before the minute of materialising: fail at once without a browser


@pytest.fixture(scope="module")
def tiny_cli_run(tmp_path_factory):
    """The README's first step for one date from the command line, into fresh homes: a
    ``DagsterDev`` (not started) on them, and the run's log."""
    tmp = tmp_path_factory.mktemp("cli_run")
    dev = DagsterDev(tmp)  # the shipped configs/dagster.yaml, as the README copies it
    for name in QUIETING_VARIABLES:
        dev.env.pop(name, None)
    log = tmp / "materialize.log"
    materialize_tiny(dev.env, log)
    return tmp, dev, log


@pytest.mark.slow
def test_the_command_line_run_prints_no_warning_or_error_but_the_expected(tiny_cli_run):
    """What a new user's first run prints at WARNING or worse: only the lines the project cannot
    avoid or means to show (EXPECTED_WARNINGS), and no MLflow download progress bars."""
    _, _, log = tiny_cli_run
    lines = severe_lines(log)
    assert not unexpected(lines), f"unexpected lines at WARNING or worse (log: {log}):\n" + "\n".join(unexpected(lines))
    assert "Downloading artifacts" not in log.read_text(errors="replace"), f"MLflow progress bars in {log}"
    assert "cuInit" not in log.read_text(errors="replace")


@pytest.mark.slow
def test_the_uis_show_the_graph_the_metrics_and_the_logged_models(chromium, tiny_cli_run):
    from playwright.sync_api import expect

    tmp_path, dev, _ = tiny_cli_run
    evidence = tmp_path / "browser"
    names = asset_names()

    with dev, MlflowUI(tmp_path / "home", tmp_path / "mlflow_ui.log") as mlflow_ui, \
            chromium_context(tmp_path) as browser:
        page = browser.new_page()

        # 1. The global asset graph, every group expanded, fitted to the window.
        with saved_on_failure(page, evidence, "asset_graph"):
            page.goto(f"{dev.url}/asset-groups")
            graph = page.locator("svg foreignObject")
            expect(graph.filter(has_text="publishing").first).to_be_visible()
            # The shipped instance config turns off the first visit's community dialog.
            expect(page.get_by_text("Join the Dagster community")).to_have_count(0)
            choose_graph_setting(page, "Expand all groups")
            expect(graph.get_by_text("champion", exact=True)).to_have_count(1)
            # The vertical layout of this graph fits a landscape window; the horizontal one is tall.
            choose_graph_setting(page, "Change graph to vertical orientation")
            point = page.evaluate(EMPTY_GRAPH_POINT)
            assert point, "no empty background in the graph to double-click"
            page.mouse.dblclick(*point)  # the graph's "zoom to fit"
            for name in MUST_SHOW:
                expect(graph.get_by_text(name, exact=True)).to_be_in_viewport()
            labels = [text.strip() for text in graph.all_text_contents() if text.strip()]
            missing = [name for name in names if not any(label_matches(label, name) for label in labels)]
            assert not missing, f"assets not drawn in the graph: {missing} (labels: {labels})"

        # 2. evaluation_metrics: the metrics table, a plot and the MLflow run it logged to.
        with saved_on_failure(page, evidence, "evaluation_metrics"):
            page.goto(f"{dev.url}/assets/evaluation_metrics")
            metrics_row = page.locator("tr", has=page.get_by_text("metrics", exact=True)).first
            table = open_markdown(page, metrics_row).locator("table").first
            for header in METRICS_HEADERS:
                expect(table.locator("th", has_text=re.compile(rf"^{header}$"))).to_have_count(1)
            expect(table.locator("td", has_text=re.compile(r"^recall$")).first).to_be_visible()
            expect(table.locator("td", has_text=re.compile(r"^0\.\d{4}$")).first).to_be_visible()
            close_dialog(page)

            plot_row = page.locator("tr", has=page.get_by_text("plot_metric_vs_k", exact=True)).first
            image = open_markdown(page, plot_row).locator("img").first
            expect(image).to_be_visible()
            source = image.get_attribute("src") or ""
            assert source.startswith("data:image/png;base64,"), f"plot source: {source[:60]}"
            size = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert min(size) > 100, f"the plot is not a decoded PNG: {size}"
            close_dialog(page)

            run_row = page.locator("tr", has=page.get_by_text("mlflow_run_id", exact=True)).first
            found = RUN_ID.search(run_row.inner_text())
            assert found, f"no MLflow run id on the asset page: {run_row.inner_text()!r}"
            run_id = found.group(0)

        # 3. MLflow UI: the run's page lists its logged models and their registered versions.
        with saved_on_failure(page, evidence, "mlflow_run"):
            page.goto(f"{mlflow_ui.url}/#/runs/{run_id}")
            heading = page.get_by_text(f"Logged models ({len(LOGGED_MODELS)})", exact=True)
            expect(heading).to_be_visible()
            heading.scroll_into_view_if_needed()
            models = page.get_by_role("grid").filter(has_text="Model name")
            expect(models).to_have_count(1)
            for logged, registered in LOGGED_MODELS.items():
                row = models.get_by_role("row").filter(has=page.get_by_role("link", name=logged, exact=True))
                expect(row).to_have_count(1)
                expect(row.get_by_role("link", name=re.compile(rf"^{registered}\b"))).to_be_visible()
                expect(row).to_contain_text("Ready")

        # 4. MLflow UI: each logged model's page shows its own numbers, the run's evaluation of
        # the model (to full precision), and no baseline's.
        from mlflow import MlflowClient

        from twotower_assets.serving.registry import logged_model_id

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
        recall = client.get_run(run_id).data.metrics["recall_at_50"]
        for logged, registered in LOGGED_MODELS.items():
            with saved_on_failure(page, evidence, f"logged_model_{logged}"):
                model = client.get_logged_model(logged_model_id(client, registered, "1"))
                page.goto(f"{mlflow_ui.url}/#/experiments/{model.experiment_id}/models/{model.model_id}")
                expect(page.get_by_text("recall_at_50", exact=True)).to_be_visible()
                expect(page.get_by_text(repr(recall), exact=True).first).to_be_visible()
                expect(page.get_by_text(re.compile(r"^(random|popularity|svd|ease)_"))).to_have_count(0)

        # 5. MLflow UI, the experiment's Models view (MLflow 3's logged models; the UI opens in its
        # GenAI view, where this page is "Agent versions"): each logged model's row shows the run's
        # evaluation as the store holds it, in MLflow's formatting of a metric (the float's repr).
        run = client.get_run(run_id)
        evaluation = {key: run.data.metrics[key] for key in HEADLINE_KEYS}
        stored = {}
        for logged, registered in LOGGED_MODELS.items():
            model = client.get_logged_model(logged_model_id(client, registered, "1"))
            stored[logged] = {m.key: m.value for m in model.metrics if m.key in HEADLINE_KEYS}
            assert stored[logged] == evaluation, (logged, stored[logged], evaluation)
        with saved_on_failure(page, evidence, "mlflow_models_view"):
            page.goto(f"{mlflow_ui.url}/#/experiments/{run.info.experiment_id}/models")
            page.get_by_text("Model training", exact=True).first.click()  # it then opens the Runs page
            page.goto(f"{mlflow_ui.url}/#/experiments/{run.info.experiment_id}/models")
            grid = page.get_by_role("grid").filter(has_text="Model name")
            expect(grid).to_have_count(1)
            rows = {}
            for logged in LOGGED_MODELS:
                row = grid.get_by_role("row").filter(has=page.get_by_role("link", name=logged, exact=True))
                expect(row).to_have_count(1)
                rows[logged] = row.get_attribute("aria-rowindex")
            for key in HEADLINE_KEYS:
                reveal_column(page, grid, key)
                for logged, index in rows.items():
                    cell = grid.locator(f'[role=row][aria-rowindex="{index}"] [role=gridcell][col-id*="{key}"]')
                    expect(cell).to_have_text(repr(stored[logged][key]))

        # 6. The asset catalog's partition health after one run, as the docs promise: on every
        # training-date asset the run's date is materialized, no date failed or is materializing,
        # every other date is missing (grey, never trained).
        for name in training_date_assets():
            with saved_on_failure(page, evidence, f"partitions_{name}"):
                page.goto(f"{dev.url}/assets/{name}?view=partitions")
                selected = page.get_by_text(re.compile(r"^\d+ Partitions Selected$"))
                expect(selected).to_be_visible()
                total = int(selected.inner_text().split()[0])
                for state in ("Failed (0)", "Materializing (0)", "Materialized (1)", f"Missing ({total - 1})"):
                    expect(page.get_by_text(state, exact=True)).to_be_visible()
        with saved_on_failure(page, evidence, "partitions_materialized"):
            # Only the materialized dates: the run's date, and not the day after it.
            page.get_by_text(f"Missing ({total - 1})", exact=True).click()
            expect(page.get_by_text(TINY_PARTITION, exact=True).first).to_be_visible()
            expect(page.get_by_text(NEXT_DAY, exact=True)).to_have_count(0)
            # Still no community dialog, after every page above.
            expect(page.get_by_text("Join the Dagster community")).to_have_count(0)


def test_a_missing_chromium_fails_with_how_to_install_it(monkeypatch, tmp_path):
    """Without Debian's chromium the browser tests fail (never skip) and say what to install."""
    from helpers import browser

    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        browser.require_chromium()
