"""The app in a real headless browser (Debian's chromium driven by playwright): fill the New-run
form, start two runs (the second waits in the queue), watch the loss plot update, compare, try
and export; a screenshot of each tab is saved and its path printed.

Needs `pip install playwright` and `apt-get install chromium` (never `playwright install`: it
downloads browsers). Skipped with the reason when either is missing. Screenshots go to
$SDFT_SCREENSHOTS or tests/artifacts/screenshots/.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from test_app import demo_available, free_port, kill_trainings, reverse_data, wait_http

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
train.sample_steps=1"""


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

    # New run: model, data (preview + column mapping), budget, extra keys; check, then start.
    if not demo_available():
        page.get_by_label("Hub id or local folder").check()
        page.get_by_label("model.name").fill(str(tiny_model_dir))
        # Upload the data file: the app keeps a copy under <runs>/.uploads and previews it.
        data = reverse_data(tmp_path / "train.jsonl")
        page.locator("#data-file input[type=file]").set_input_files(str(data))
        uploaded = re.compile(re.escape(str(runs / ".uploads")) + r"/\w+-train\.jsonl")
        expect(page.get_by_label("data.source")).to_have_value(uploaded)
    else:
        page.get_by_label("data.source").press("Enter")
    expect(page.get_by_text("columns: prompt, demonstration, answer")).to_be_visible()
    expect(page.get_by_label("data.demonstration_column")).to_have_value("demonstration")
    # browser-1 gets far more steps than the test waits for: it is watched mid-run, then stopped with
    # "Stop and save" (timing-free on any machine). browser-2 is short and runs to completion.
    page.get_by_label("train.max_steps").fill("100000")
    page.get_by_label("extra keys").fill(EXTRA_KEYS)
    page.get_by_label("output.name").fill("browser-1")
    page.get_by_role("button", name="Check recipe").click()
    expect(page.locator("#new-run-message")).to_contain_text("Recipe OK")
    expect(page.get_by_text("output.name=browser-1")).to_be_visible()  # the command box
    shot(page, "1-new-run")
    page.get_by_role("button", name="Start training").click()
    expect(page.locator("#new-run-message")).to_contain_text("browser-1 started")
    page.get_by_label("output.name").fill("browser-2")
    page.get_by_label("train.max_steps").fill("4")
    pick(page, "teacher.kind", "base")
    page.get_by_role("button", name="Start training").click()
    expect(page.locator("#new-run-message")).to_contain_text("browser-2 queued")

    # Runs: the queue is visible; select the running run and watch its loss curve grow.
    page.get_by_role("tab", name="Runs").click()
    cell = page.locator("#runs-table [role=gridcell]", has_text="queued #1")
    expect(cell).to_be_visible()
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
    expect(page.get_by_label("latest samples (student completion vs demonstration)")).to_contain_text(
        "Say this word twice" if demo_available() else "reverse"
    )
    shot(page, "2-runs")
    page.get_by_role("button", name="Stop and save").click()
    expect(page.get_by_text("stop requested: browser-1")).to_be_visible()
    expect(progress).to_contain_text("browser-1: stopped", timeout=TIMEOUT_MS)
    assert (runs / "browser-1" / "adapter" / "adapter_config.json").exists()

    # Compare: both runs (the queued one ran after the first).
    page.locator("#runs-table [role=gridcell]", has_text="browser-2").first.click()
    expect(progress).to_contain_text("browser-2: completed", timeout=TIMEOUT_MS)
    page.get_by_role("tab", name="Compare").click()
    for name in ("browser-1", "browser-2"):
        pick(page, "runs to compare (two or more)", name)
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text("accuracy % after training")).to_be_visible(timeout=120_000)
    page.wait_for_function(
        "() => document.querySelectorAll('#compare-plot svg .mark-line path').length >= 2", timeout=60_000
    )
    shot(page, "3-compare")

    # Try: base model and the adapter answer the same prompt.
    page.get_by_role("tab", name="Try").click()
    pick(page, "run to try (with a saved adapter)", "browser-1")
    page.get_by_label("prompt to try").fill("reverse abc")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_label("with the run's adapter")).not_to_have_value("", timeout=120_000)
    shot(page, "4-try")

    # Export: the adapter as a zip.
    page.get_by_role("tab", name="Export").click()
    pick(page, "run to export (with a saved adapter)", "browser-2")
    page.get_by_role("button", name="Download the adapter (.zip)").click()
    expect(page.get_by_text("adapter of browser-2")).to_be_visible()
    shot(page, "5-export")
    assert (runs / "browser-2" / "adapter" / "adapter_config.json").exists()
