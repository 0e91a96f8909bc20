"""The app in a real headless browser (Debian's chromium driven by playwright): the demo model's
form (the quickstart's settings), a shipped recipe uploaded, Check refusing data and models that
would fail, start runs (a double click starts one run; others wait in the queue), watch the loss
plot update, cancel and delete with a confirmation, a stable runs table, compare (the plot follows
the selection), try and export; a screenshot of each tab is saved and its path printed.

Needs `pip install playwright` and `apt-get install chromium` (never `playwright install`: it
downloads browsers). Skipped with the reason when either is missing. Screenshots go to
$SDFT_SCREENSHOTS or tests/artifacts/screenshots/.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from test_app import ROOT, demo_available, free_port, kill_trainings, reverse_data, wait_http

pytest.importorskip("gradio")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)

CHROMIUM = os.environ.get("SDFT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("SDFT_SCREENSHOTS") or Path(__file__).parent / "artifacts" / "screenshots")
TIMEOUT_MS = 240_000  # a training on a busy 2-core CPU
# Form settings a user would type into "extra keys" for a fast CPU run.
EXTRA_KEYS = """model.load_in_4bit=false
model.lora.r=4
generation.max_new_tokens=12
train.batch_size=2
train.learning_rate=0.01
train.gradient_checkpointing=false
train.sample_steps=1
eval.limit=8"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import app

    runs = tmp_path_factory.mktemp("browser") / "runs"
    port = free_port()
    demo = app.launch(runs_dir=runs, port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    wait_http(url)
    yield url, runs
    demo.close()
    demo.jobs.close()
    kill_trainings(runs)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def pick(page, label: str, option: str) -> None:
    """Choose an option in a gradio dropdown (retried: a tab switch refreshes the choices under the list)."""
    for attempt in range(3):
        page.get_by_label(label).click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=5_000)
            return
        except sync_api.TimeoutError:
            page.keyboard.press("Escape")
            if attempt == 2:
                raise


def expect_order(page, names: list[str]) -> None:
    """The runs table's name column shows `names`, top to bottom (waits for the next refresh)."""
    from app.views import RUN_COLUMNS

    page.wait_for_function(
        """([n, want]) => Array.from(document.querySelectorAll('#runs-table [role=gridcell]'))
            .filter((c, i) => i % n === 0).map(c => c.innerText.trim()).join() === want""",
        arg=[len(RUN_COLUMNS), ",".join(names)],
        timeout=30_000,
    )


def legend(page, elem_id: str) -> list[str]:
    return page.eval_on_selector_all(
        f"#{elem_id} svg .role-legend-label text", "labels => labels.map(t => t.textContent)"
    )


def check_message(page, text: str) -> None:
    page.get_by_role("button", name="Check recipe").click()
    sync_api.expect(page.locator("#new-run-message")).to_contain_text(text, timeout=60_000)


def loss_path(page) -> str | None:
    line = page.locator("#plot-loss svg .mark-line path")
    return line.first.get_attribute("d") if line.count() else None


def test_browser_form_run_plot_and_tabs(server, page, tiny_model_dir, tmp_path):
    try:
        _walk_through_tabs(server, page, tiny_model_dir, tmp_path)
    except Exception:
        shot(page, "failure")  # what the page showed when it failed
        raise


def _walk_through_tabs(server, page, tiny_model_dir, tmp_path):
    url, runs = server
    expect = sync_api.expect
    page.goto(url)
    page.get_by_role("button", name="Start training").wait_for()
    message = page.locator("#new-run-message")

    if demo_available():
        # The form opens on the demo model with the quickstart's settings (read from the shipped file).
        quick = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text(encoding="utf-8"))
        expect(page.get_by_label("teacher.kind")).to_have_value(quick["teacher"]["kind"])
        expect(page.get_by_label("train.max_steps")).to_have_value(str(quick["train"]["max_steps"]))
        lr = float(page.get_by_label("train.learning_rate").input_value())
        assert lr == quick["train"]["learning_rate"]
        # Check makes the checks Start makes: bad rows, a column mapped twice, a model not here.
        empty_cell = tmp_path / "empty_cell.csv"
        empty_cell.write_text(
            "prompt,demonstration\nSay this word twice: cat,cat cat\nSay this word twice: dog,\n"
        )
        page.locator("#data-file input[type=file]").set_input_files(str(empty_cell))
        expect(page.get_by_text("2 rows, columns: prompt, demonstration")).to_be_visible()
        check_message(page, "row 2: column 'demonstration' is empty")
        one_column = tmp_path / "one_column.csv"
        one_column.write_text("text\nSay this word twice: cat\nSay this word twice: dog\n")
        page.get_by_label("data.source").fill(str(one_column))
        page.get_by_label("data.source").press("Enter")
        expect(page.get_by_label("data.demonstration_column")).to_have_value("text")
        check_message(page, "data.prompt_column and data.demonstration_column are both 'text'")
        expect(message).not_to_contain_text("Recipe OK")
        good = tmp_path / "good.csv"
        good.write_text("prompt,demonstration\nSay this word twice: cat,cat cat\n")
        page.get_by_label("data.source").fill(str(good))
        page.get_by_label("data.source").press("Enter")
        expect(page.get_by_label("data.demonstration_column")).to_have_value("demonstration")
        page.get_by_label("Hub id or local folder").check()
        page.get_by_label("model.name").fill("sdft-lite-tests/not-downloaded-model")
        check_message(page, "is not in the local Hugging Face cache: download it first")
        # Back to the demo: its settings are filled in again (the data source too).
        page.get_by_role("radio", name="built-in demo").check()
        expect(page.get_by_label("data.source")).to_have_value(str(ROOT / "recipes/data/demo/train.jsonl"))
        # The shipped recipe, uploaded: its relative paths are the repository's recipes folder's.
        page.get_by_text("Load an existing recipe YAML into the form").click()
        page.locator("input[type=file]").first.set_input_files(str(ROOT / "recipes" / "quickstart.yaml"))
        expect(message).to_contain_text("loaded quickstart.yaml")
        expect(message).not_to_contain_text("not found")
        expect(page.get_by_label("output.name")).to_have_value("quickstart")
        check_message(page, "Recipe OK: run quickstart")
        expect(page.get_by_text(re.compile(r"on cpu,"))).to_be_visible()  # the plan: this CPU-only machine
        page.get_by_label("data.source").press("Enter")
    else:
        page.get_by_label("Hub id or local folder").check()
        page.get_by_label("model.name").fill(str(tiny_model_dir))
        # Upload the data file: the app keeps a copy under <runs>/.uploads and previews it.
        data = reverse_data(tmp_path / "train.jsonl")
        page.locator("#data-file input[type=file]").set_input_files(str(data))
        uploaded = re.compile(re.escape(str(runs / ".uploads")) + r"/\w+-train\.jsonl")
        expect(page.get_by_label("data.source")).to_have_value(uploaded)
    expect(page.get_by_text("columns: prompt, demonstration, answer")).to_be_visible()
    expect(page.get_by_label("data.demonstration_column")).to_have_value("demonstration")
    # browser-1 gets far more steps than the test waits for: it is watched mid-run, then stopped with
    # "Stop and save" (timing-free on any machine). browser-2 and -3 are short and run to completion.
    page.get_by_label("train.max_steps").fill("100000")
    page.get_by_label("extra keys").fill(EXTRA_KEYS)
    page.get_by_label("output.name").fill("browser-1")
    check_message(page, "Recipe OK")
    expect(page.get_by_text("output.name=browser-1")).to_be_visible()  # the command box
    shot(page, "1-new-run")
    page.get_by_role("button", name="Start training").click()
    expect(message).to_contain_text("browser-1 started")
    if demo_available():  # the uploaded recipe's eval and probe sets, resolved as the CLI resolves them
        recipe = yaml.safe_load((runs / "browser-1" / "recipe.yaml").read_text(encoding="utf-8"))
        assert recipe["data"]["eval_source"] == str(ROOT / "recipes/data/demo/eval.jsonl")
        assert [p["source"] for p in recipe["eval"]["probes"]] == [
            str(ROOT / "recipes" / p["source"]) for p in quick["eval"]["probes"]
        ]
    page.get_by_label("output.name").fill("browser-2")
    page.get_by_label("train.max_steps").fill("4")
    pick(page, "teacher.kind", "base")
    page.get_by_role("button", name="Start training").click()
    expect(message).to_contain_text("browser-2 queued")
    # A double click on Start (the loaded recipe's run name, no eval set): one run, reported as queued.
    page.get_by_label("output.name").fill("")
    page.get_by_label("train.max_steps").fill("2")
    page.get_by_label("extra keys").fill(EXTRA_KEYS + "\ndata.eval_source=null\neval.probes=[]")
    page.get_by_role("button", name="Start training").dblclick()
    expect(message).not_to_contain_text("browser-2")  # the message of this start, not the last one
    expect(message).to_contain_text("queued")
    expect(page.get_by_role("button", name="Start training")).to_be_enabled()
    third = re.search(r"Run (\S+) queued", message.inner_text()).group(1)
    assert "Cannot" not in message.inner_text()
    # A fourth run, cancelled (with a confirmation) before it starts, then deleted (with one).
    page.get_by_label("output.name").fill("browser-4")
    page.get_by_role("button", name="Start training").click()
    expect(message).to_contain_text("browser-4 queued")
    made = sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert made == sorted(["browser-1", "browser-2", third, "browser-4"]), made

    # Runs: newest first, in an order that stays put as runs start and end.
    order = ["browser-4", third, "browser-2", "browser-1"]
    page.get_by_role("tab", name="Runs").click()
    cell = page.locator("#runs-table [role=gridcell]", has_text="queued #1")
    expect(cell).to_be_visible()
    expect_order(page, order)
    page.locator("#runs-table [role=gridcell]", has_text="browser-4").first.click()
    expect(page.get_by_label("selected run")).to_have_value("browser-4")
    confirm = page.locator("#confirm-row")
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(confirm).to_contain_text("Cancel browser-4 now?")
    page.get_by_role("button", name="No, keep it").click()
    expect(confirm).to_be_hidden()
    assert json.loads((runs / "browser-4" / "status.json").read_text())["state"] == "queued"
    page.get_by_role("button", name="Cancel", exact=True).click()
    page.get_by_role("button", name="Yes, cancel browser-4").click()
    action = page.locator("#run-action-message")
    expect(action).to_contain_text("browser-4 removed from the queue")
    expect(page.locator("#run-progress")).to_contain_text("browser-4: stopped")
    expect(page.locator("#run-error")).to_contain_text("What to do: start it again with Resume")
    assert "--" not in page.locator("#run-error").inner_text()
    page.get_by_role("button", name="Delete", exact=True).click()
    expect(confirm).to_contain_text("Delete browser-4?")
    page.get_by_role("button", name="Yes, delete browser-4").click()
    expect(action).to_contain_text("browser-4 deleted")
    assert not (runs / "browser-4").exists()
    order.remove("browser-4")
    expect_order(page, order)

    # Select the running run and watch its loss curve grow.
    page.locator("#runs-table [role=gridcell]", has_text="browser-1").first.click()
    expect(page.get_by_label("selected run")).to_have_value("browser-1")
    progress = page.locator("#run-progress")
    expect(progress).to_contain_text("browser-1: running", timeout=TIMEOUT_MS)
    segments = """(n) => {
        const line = document.querySelector('#plot-loss svg .mark-line path');
        return line !== null && (line.getAttribute('d').match(/L/g) || []).length >= n;
    }"""
    page.wait_for_function(segments, arg=1, timeout=TIMEOUT_MS)  # two points drawn
    first = loss_path(page)
    n_first = first.count("L")
    # The timer redraws every 2 s: the same run, still running, draws more points.
    page.wait_for_function(segments, arg=n_first + 2, timeout=TIMEOUT_MS)
    assert loss_path(page) != first, "the loss plot did not change while the run trained"
    expect(progress).to_contain_text("browser-1: running")
    expect(page.get_by_label("selected run")).to_have_value("browser-1")  # the refreshes kept it
    expect_order(page, order)
    expect(page.get_by_label("latest samples (student completion vs demonstration)")).to_contain_text(
        "Say this word twice" if demo_available() else "reverse"
    )
    shot(page, "2-runs")
    page.get_by_role("button", name="Stop and save").click()
    expect(page.get_by_text("stop requested: browser-1")).to_be_visible()
    expect(progress).to_contain_text("browser-1: stopped", timeout=TIMEOUT_MS)
    assert (runs / "browser-1" / "adapter" / "adapter_config.json").exists()

    # The queued runs ran after it; the one without an eval set says so.
    page.locator("#runs-table [role=gridcell]", has_text=third).first.click()
    expect(progress).to_contain_text(f"{third}: completed", timeout=TIMEOUT_MS)
    expect(page.locator("#run-eval-note")).to_contain_text("No eval set: this run measures no accuracy")
    expect_order(page, order)
    page.locator("#runs-table [role=gridcell]", has_text="browser-2").first.click()
    expect(progress).to_contain_text("browser-2: completed", timeout=TIMEOUT_MS)

    # Compare: the plot draws the runs selected, also after the selection changes.
    page.get_by_role("tab", name="Compare").click()
    for name in ("browser-1", "browser-2"):
        pick(page, "runs to compare (two or more)", name)
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text("accuracy % after training")).to_be_visible(timeout=120_000)
    page.wait_for_function(
        "() => document.querySelectorAll('#compare-plot svg .mark-line path').length >= 2", timeout=60_000
    )
    assert sorted(legend(page, "compare-plot")) == ["browser-1", "browser-2"]
    page.locator(".token", has_text="browser-2").locator(".token-remove").click()
    pick(page, "runs to compare (two or more)", third)
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text(f"loss: browser-1, {third}")).to_be_visible(timeout=120_000)
    page.wait_for_function(
        "(want) => Array.from(document.querySelectorAll('#compare-plot svg .role-legend-label text'))"
        ".map(t => t.textContent).sort().join() === want",
        arg=",".join(sorted(["browser-1", third])),
        timeout=60_000,
    )
    shot(page, "3-compare")

    # Try: base model and the adapter answer the same prompt; it says which adapter it used.
    page.get_by_role("tab", name="Try").click()
    pick(page, "run to try (with a saved adapter)", "browser-1")
    page.get_by_label("prompt to try").fill("reverse abc")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_label("with the run's adapter")).not_to_have_value("", timeout=120_000)
    expect(page.get_by_text("Adapter used: the final adapter (browser-1/adapter")).to_be_visible()
    shot(page, "4-try")

    # Export: the adapter as a zip that names the recipe's model, not a path on this machine.
    page.get_by_role("tab", name="Export").click()
    pick(page, "run to export (with a saved adapter)", "browser-2")
    page.get_by_role("button", name="Download the adapter (.zip)").click()
    expect(page.get_by_text("adapter of browser-2")).to_be_visible()
    shot(page, "5-export")
    href = page.locator("a[href*='browser-2-adapter.zip']").first.get_attribute("href")
    download = page.request.get(href if "://" in href else url + href.lstrip("/"))
    config = json.loads(zipfile.ZipFile(io.BytesIO(download.body())).read("adapter_config.json"))
    expected = "sdft-lite/demo" if demo_available() else tiny_model_dir.name
    assert config["base_model_name_or_path"] == expected
    assert (runs / "browser-2" / "adapter" / "adapter_config.json").exists()
