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
* no "Join the Dagster community" dialog covers the graph (the shipped instance config).

Each wait is bounded; a failed check saves a screenshot and the page text next to the test's
temporary files and names them in the assertion message. Needs Debian's chromium
(``apt-get install -y chromium``): the test fails, not skips, without it.
"""

import re

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

MUST_SHOW = ("two_tower_model", "evaluation_metrics", "champion")
METRICS_HEADERS = ("k", "metric", "popularity", "random", "svd", "two_tower")  # and maybe more
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")
LOGGED_MODELS = {"match_model": "two_tower_match", "retriever": "two_tower_retriever"}

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


def asset_names() -> list[str]:
    from twotower_assets.definitions import defs

    return sorted(key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys())


@pytest.mark.slow
def test_the_uis_show_the_graph_the_metrics_and_the_logged_models(tmp_path):
    require_chromium()  # before the minute of materialising: fail at once without a browser
    from playwright.sync_api import expect

    evidence = tmp_path / "browser"
    dev = DagsterDev(tmp_path)  # the shipped configs/dagster.yaml, as the README copies it
    materialize_tiny(dev.env, tmp_path / "materialize.log")
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


def test_a_missing_chromium_fails_with_how_to_install_it(monkeypatch, tmp_path):
    """Without Debian's chromium the browser tests fail (never skip) and say what to install."""
    from helpers import browser

    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        browser.require_chromium()
