"""The playground in a real headless Chromium (Debian's, driven through its chromedriver) against
the real gateway, Redis and workers on the bundled demo model: sign in, upload the shipped
example's images, fine-tune with live progress, generate, move the density slider, toggle an
atom, open the attribution view, then download, import, delete and cancel. Each step asserts what
the page shows; the main ones are saved as the README's screenshots under ``docs/playground/``;
any JavaScript error in the browser's console fails the test.

Beside it: the page's training and generation defaults are the API's own, and everything the page
loads weighs at most 200 KB gzipped.
"""

import gzip
import html.parser
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.api.playground import PLAYGROUND_DIR
from service.api.schemas import GenerationRequest, TrainingForm
from service.core.redis_db import connect
from service.core.tenants import TenantStore
from tests.service.conftest import serve_stack

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "playground"
EXAMPLE = REPO / "examples" / "striped-heart"
PAGE_BUDGET_BYTES = 200 * 1024
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
STEP_SECONDS = 120


class _Inputs(html.parser.HTMLParser):
    """The attributes of every form control with an id, by id."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("input", "select") and values.get("id"):
            self.controls[str(values["id"])] = values


def _controls() -> dict[str, dict[str, str | None]]:
    parser = _Inputs()
    parser.feed((PLAYGROUND_DIR / "index.html").read_text())
    return parser.controls


def _bound(model: type, field: str, name: str) -> float | None:
    for item in model.model_fields[field].metadata:  # type: ignore[attr-defined]
        if hasattr(item, name):
            return float(getattr(item, name))
    return None


def test_the_pages_fields_carry_the_apis_defaults_and_bounds() -> None:
    controls = _controls()
    training = {c["name"]: c for c in controls.values() if c.get("id", "").startswith("ft-") and c.get("name")}
    assert set(training) == set(TrainingForm.model_fields) - {"images", "captions", "webhook_url"}
    for name, control in training.items():
        default = TrainingForm.model_fields[name].default
        if control.get("type") == "number":
            assert (control.get("value") or None) == (None if default is None else str(default)), name
            assert float(control["max"] or "nan") == _bound(TrainingForm, name, "le"), name
            if _bound(TrainingForm, name, "ge") is not None:
                assert float(control["min"] or "nan") == _bound(TrainingForm, name, "ge"), name
    generation = {"gen-steps": "steps", "gen-guidance": "guidance_scale"}
    for control_id, field in generation.items():
        control = controls[control_id]
        assert float(control["value"] or "nan") == GenerationRequest.model_fields[field].default
        assert float(control["max"] or "nan") == _bound(GenerationRequest, field, "le")


def test_everything_the_page_loads_weighs_at_most_200_kb_gzipped() -> None:
    files = sorted(p for p in PLAYGROUND_DIR.iterdir() if p.is_file())
    assert {p.suffix for p in files} == {".html", ".css", ".js", ".svg"}
    total = sum(len(gzip.compress(p.read_bytes(), compresslevel=9)) for p in files)
    assert total <= PAGE_BUDGET_BYTES, total
    print(f"playground: {len(files)} files, {total} bytes gzipped")


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def browser(downloads: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert BROWSER and DRIVER, "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    prefs = {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    options.add_experimental_option("prefs", prefs)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_window_size(1280, 800)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo_stack(own_env: Callable[..., dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The stack as ``atomtune up`` runs it: the demo model, a worker per queue."""
    env = own_env("playground", base_model=str(REPO / "models" / "demo"), max_active_jobs_per_tenant="16")
    yield from serve_stack(env, tmp_path_factory, queues="finetune,generate")


@pytest.mark.timeout(600)
def test_the_playground_takes_a_tenant_from_images_to_atoms_and_their_maps(
    browser: object, downloads: Path, demo_stack: str, own_redis_url: str
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    driver: WebDriver = browser  # type: ignore[assignment]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    gateway = demo_stack
    _, key = TenantStore(connect(own_redis_url)).create("playground")
    prompt = (EXAMPLE / "prompt.txt").read_text().strip()
    wait = WebDriverWait(driver, STEP_SECONDS)

    def element(element_id: str):
        return driver.find_element(By.ID, element_id)

    def text(element_id: str) -> str:
        return str(element(element_id).text)

    def shot(name: str, section: str | None = None) -> None:
        if section is not None:
            driver.execute_script("document.getElementById(arguments[0]).scrollIntoView()", section)
        driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))

    # The page is served with a policy that lets it load nothing from elsewhere.
    for path in ("/", "/playground/index.html", "/playground/playground.js"):
        page = httpx.get(f"{gateway}{path}")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"], path

    # 1. Sign in: a wrong key is refused with the API's own message, the right one opens the page.
    driver.get(f"{gateway}/")
    # A 1280×800 viewport, whatever the window's own frame takes.
    frame = driver.execute_script(
        "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]"
    )
    driver.set_window_size(1280 + frame[0], 800 + frame[1])
    assert driver.execute_script("return [window.innerWidth, window.innerHeight]") == [1280, 800]
    assert driver.title == "atomtune playground" and not element("app").is_displayed()
    element("api-key").send_keys("at_wrong.key\n")
    wait.until(lambda _: text("sign-in-error") == "the API key is unknown or revoked")
    shot("01-sign-in-error")
    element("api-key").clear()
    element("api-key").send_keys(key + "\n")
    wait.until(lambda _: element("app").is_displayed())
    assert text("sign-in-error") == "" and "Signed in" in text("who")
    assert driver.execute_script("return sessionStorage.getItem('atomtune.api_key')") == key
    assert key not in driver.current_url
    assert text("no-adapters") == "No adapters yet."

    # 2. Upload the shipped example's six images with their captions and fine-tune, with live progress and a loss
    # chart. Without images first: the API's own message is shown in the fine-tune section.
    element("ft-prompt").send_keys(prompt)
    element("ft-start").click()
    wait.until(lambda _: "images" in text("finetune-error"))
    assert text("sign-in-error") == "" and text("generate-error") == ""
    paths = sorted(str(path) for path in EXAMPLE.glob("*.png"))
    element("images").send_keys("\n".join(paths))
    wait.until(lambda _: len(driver.find_elements(By.CSS_SELECTOR, "#thumbnails img")) == len(paths))
    assert f"{len(paths)} images chosen" in text("drop-zone")
    # Each image captioned with its context, as the example ships them.
    captions = (EXAMPLE / "captions.txt").read_text().splitlines()
    for field, caption in zip(
        driver.find_elements(By.CSS_SELECTOR, "#thumbnails input.caption"), captions, strict=True
    ):
        field.send_keys(caption)
    element("ft-steps").clear()
    element("ft-steps").send_keys("1000")
    element("ft-start").click()
    wait.until(lambda _: "Training: step" in text("ft-status"))
    wait.until(lambda _: "succeeded" in text("ft-status"))
    # Progress arrived live, event by event: the chart drew a point for each step's loss.
    assert int(element("loss-line").get_attribute("data-count") or 0) >= 2
    assert text("finetune-error") == ""
    shot("02-fine-tune")

    # 3. The adapters list shows it ready with its final loss; the generate form has it chosen.
    row = driver.find_element(By.CSS_SELECTOR, "#adapter-rows tr")
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == prompt and cells[1] == "ready" and float(cells[2]) > 0
    adapter_id = row.get_attribute("data-adapter")
    assert element("gen-adapter").get_attribute("value") == adapter_id
    wait.until(lambda _: len(driver.find_elements(By.CSS_SELECTOR, "#atom-toggles input[type=checkbox]")) > 0)
    shot("03-adapters", "adapters")

    # 4. Generate: base, adapter and edited side by side, each downloadable.
    assert element("gen-prompt").get_attribute("value") == prompt  # the adapter's own, to start with
    element("gen-start").click()

    def rendered(slot: str, previous: str | None = None) -> bool:
        figure = element(f"render-{slot}")
        job = figure.get_attribute("data-job")
        return bool(job) and job != previous and bool(figure.find_element(By.TAG_NAME, "img").get_attribute("src"))

    wait.until(lambda _: all(rendered(slot) for slot in ("base", "adapter", "edited")))
    assert text("generate-error") == ""
    jobs = {slot: element(f"render-{slot}").get_attribute("data-job") for slot in ("base", "adapter", "edited")}
    assert len(set(jobs.values())) == 3
    for slot in jobs:
        link = element(f"render-{slot}").find_element(By.CSS_SELECTOR, "a.download")
        assert link.is_displayed() and str(link.get_attribute("href")).startswith("blob:")
    assert "seed 0" in element("render-adapter").text
    shot("04-generate", "generate")

    # 5. The density slider re-renders the edited image only, with the same seed.
    slider = element("density")
    before = float(slider.get_attribute("value") or 0)
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    wait.until(lambda _: rendered("edited", jobs["edited"]))
    after = float(slider.get_attribute("value") or 0)
    assert after == pytest.approx(before + 0.02)
    assert f"density {after:.2f}" in element("render-edited").text and "seed 0" in element("render-edited").text
    assert element("render-base").get_attribute("data-job") == jobs["base"]
    assert element("render-adapter").get_attribute("data-job") == jobs["adapter"]
    jobs["edited"] = element("render-edited").get_attribute("data-job")

    # 6. Switching off the most important atom re-renders it with that atom masked.
    toggle = driver.find_element(By.CSS_SELECTOR, "#atom-toggles input[type=checkbox]")
    toggle.send_keys(Keys.SPACE)
    wait.until(lambda _: rendered("edited", jobs["edited"]))
    assert "1 atom off" in element("render-edited").text and not toggle.is_selected()
    edited_job = httpx.get(
        f"{gateway}/v1/jobs/{element('render-edited').get_attribute('data-job')}",
        headers={"Authorization": f"Bearer {key}"},
    ).json()
    assert edited_job["status"] == "succeeded" and edited_job["result"]["seed"] == 0
    shot("05-edit", "render-base")

    # 7. The attribution view: where the adapter's atoms act, block by block, atom by atom.
    wait.until(lambda _: element("attribution-view").is_displayed() and element("attr-image").get_attribute("src"))
    assert "whole effect" in text("attr-caption")
    chips = driver.find_elements(By.CSS_SELECTOR, "#attr-atoms button")
    assert chips[0].text == "All atoms" and len(chips) >= 2
    first_map = element("attr-image").get_attribute("src")
    chips[1].click()
    wait.until(lambda _: element("attr-image").get_attribute("src") != first_map)
    assert "% of the block's effect" in text("attr-caption")
    assert chips[1].get_attribute("aria-pressed") == "true"
    assert str(element("attr-source").get_attribute("src")).startswith("blob:")
    shot("06-attribution", "attribution")

    # 8. Download the adapter, import the zip back, delete the copy (a second press confirms).
    driver.find_element(By.CSS_SELECTOR, f'[data-adapter="{adapter_id}"] button[aria-label^="Download"]').click()
    zip_path = downloads / f"adapter-{adapter_id}.zip"
    wait.until(lambda _: zip_path.exists() and zip_path.stat().st_size > 0)
    element("import-file").send_keys(str(zip_path))
    element("import-prompt").send_keys("an imported copy")
    driver.find_element(By.CSS_SELECTOR, "#import-form button[type=submit]").click()
    wait.until(lambda _: len(driver.find_elements(By.CSS_SELECTOR, "#adapter-rows tr")) == 2)
    copy = next(r for r in driver.find_elements(By.CSS_SELECTOR, "#adapter-rows tr") if "imported" in r.text)
    assert "ready" in copy.text and text("adapters-error") == ""
    copy_id = copy.get_attribute("data-adapter")
    delete = copy.find_element(By.CSS_SELECTOR, 'button[aria-label^="Delete"]')
    delete.click()
    assert delete.text == "Confirm delete" and len(driver.find_elements(By.CSS_SELECTOR, "#adapter-rows tr")) == 2
    delete.click()
    wait.until(lambda _: not driver.find_elements(By.CSS_SELECTOR, f'[data-adapter="{copy_id}"]'))

    # 9. A long fine-tune, cancelled while it runs.
    element("ft-steps").clear()
    element("ft-steps").send_keys("5000")
    element("ft-start").click()
    wait.until(lambda _: "Training: step" in text("ft-status"))
    element("ft-cancel").click()
    wait.until(lambda _: element("ft-status").get_attribute("data-status") == "cancelled")
    assert text("ft-status") == "Fine-tune cancelled" and text("finetune-error") == ""
    assert element("ft-start").is_enabled() and not element("ft-cancel").is_enabled()

    # Everything came from the gateway itself; every control has a label.
    sources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert sources and all(str(s).startswith(gateway) or str(s).startswith("blob:") for s in sources), sources
    unlabelled = driver.execute_script(
        "return [...document.querySelectorAll('input, select')].filter(e => !e.labels || !e.labels.length)"
        ".map(e => e.id)"
    )
    assert unlabelled == [], unlabelled

    # 10. A phone's width: one column, nothing wider than the screen.
    driver.set_window_size(390, 844)
    driver.execute_script("window.scrollTo(0, 0)")
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, overflow
    shot("07-phone")

    # Only the refusals asked for above (the wrong key's 401, the missing images' 422) may show in
    # the console; no JavaScript error at all.
    logs = driver.get_log("browser")  # type: ignore[attr-defined]
    errors = [entry for entry in logs if entry["level"] == "SEVERE"]
    expected = ("status of 401", "status of 422")
    unexpected = [e for e in errors if not (e.get("source") == "network" and any(x in e["message"] for x in expected))]
    assert unexpected == [], unexpected
