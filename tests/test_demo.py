"""Showing a trained model: the export's model card and examples, the eval job's plots, the
browser demo in a real headless Chromium, and the notebook executed top to bottom.

One tiny model (10 steps on labelled synthetic pages) is trained, exported and evaluated once
for the module; the demo runs as its own process on a loopback port.
"""
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

import helpers
from semantica_jax import export, images, model_card, train
from semantica_jax.evaluation import job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _config(data_dir, cache_dir):
    c = helpers.tiny_config(data_dir, 10)
    c.train.checkpoint_every = 10
    c.train.eval_every = 0
    c.train.async_checkpointing = False
    c.data.class_names = ("circle", "square", "stripes")
    c.eval.group_by = "label"
    c.eval.shots = 1
    c.eval.samples_per_condition = 2
    c.eval.num_steps = 3
    c.eval.batch_size = 16
    c.eval.guidance_scales = (1.0, 2.0)
    c.eval.extractor_resolution = 32
    c.eval.memorization_images = 16
    c.eval.grid_groups = 3
    c.eval.cache_dir = cache_dir
    return c


def _labelled_pages(data_dir):
    """Synthetic pages of 3 images of one of 3 labelled shapes (the eval job's per-class numbers
    and the class judge need labels)."""
    from data_pipeline import shards

    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[:16, :16]

    def image(label):
        x = np.zeros((16, 16, 3), np.uint8)
        if label == 0:
            x[(yy - 8) ** 2 + (xx - 8) ** 2 < rng.randint(9, 40)] = 255
        elif label == 1:
            a = rng.randint(2, 6)
            x[a:16 - a, a:16 - a] = 255
        else:
            x[:, :: rng.randint(2, 4)] = 255
        return x

    for prefix, num_shards, pages in (("train", 2, 24), ("eval", 1, 18)):
        shards.write_shards([{"page_id": f"{prefix}-{i}", "images": [image(i % 3) for _ in range(3)], "label": i % 3}
                             for i in range(pages)], data_dir, num_shards, prefix=prefix)
    return data_dir


@pytest.fixture(scope="module")
def evaluated_export(tmp_path_factory):
    data_dir = _labelled_pages(str(tmp_path_factory.mktemp("pages")))
    workdir = str(tmp_path_factory.mktemp("workdir"))
    config = _config(data_dir, str(tmp_path_factory.mktemp("feature_cache")))
    train.train_and_evaluate(config, workdir)
    out = export.export_checkpoint(workdir, str(tmp_path_factory.mktemp("exports") / "step10"))
    card_before = open(os.path.join(out, model_card.CARD)).read()
    results = job.run_eval_job(config, workdir, export_dir=out)
    return out, workdir, card_before, results[0]


def test_export_ships_examples_and_a_card_the_eval_job_completes(evaluated_export):
    out, workdir, card_before, result = evaluated_export
    examples = sorted(os.listdir(os.path.join(out, model_card.EXAMPLES_DIR)))
    assert examples == ["00_circle.png", "01_square.png", "02_stripes.png"]  # one per label, named
    assert Image.open(os.path.join(out, "examples", examples[0])).size == (16, 16)  # the source image
    info = json.load(open(os.path.join(out, "export.json")))
    assert info["training"]["hardware"]["devices"] == 8 and info["training"]["total_wall_seconds"] > 0
    assert isinstance(info["training"]["command"], str) and info["training"]["command"]
    # Written by the export: model, encoder, data, run; not yet evaluated.
    assert "## Evaluation\n\nNot evaluated yet" in card_before
    assert "10 steps at batch 16 (**160 pairs seen**)" in card_before
    assert f"{info['num_params']:,} parameters" in card_before
    # Rewritten by the eval job: the numbers of its result, the grid and plots beside it.
    card = open(os.path.join(out, model_card.CARD)).read()
    assert "Not evaluated yet" not in card
    for g, r in result["by_guidance"].items():
        assert f"| {g} | **{r['class_consistency_judge']:.2f}** |" in card
    assert f"ceiling {result['judge_accuracy_real']:.2f}" in card
    for rel in ("card/per_class.png", "card/tradeoff.png"):
        assert f"]({rel})" in card and Image.open(os.path.join(out, rel)).size[0] > 300
    grid_rel = re.search(r"\]\((card/grid_g[0-9.]+\.png)\)", card).group(1)
    assert Image.open(os.path.join(out, grid_rel)).size == Image.open(result["by_guidance"]["1"]["grid"]).size
    assert model_card.read_eval(out)["result"]["by_guidance"].keys() == result["by_guidance"].keys()
    # The eval job's own plots and TensorBoard images.
    assert os.path.exists(os.path.join(workdir, "eval", "plots", "export_step_10_per_class.png"))
    from tensorboard.backend.event_processing import event_accumulator

    ev = event_accumulator.EventAccumulator(os.path.join(workdir, "eval"), size_guidance={"tensors": 0})
    ev.Reload()
    assert {"fewshot/plots/per_class", "fewshot/plots/tradeoff"} <= set(ev.Tags()["tensors"])


def test_plots_are_drawn_from_the_numbers():
    from semantica_jax.evaluation import plots

    def result(values):
        return {"tag": "t", "judge_accuracy_real": 0.9, "judge_accuracy_real_per_group": {"label 0": 0.9, "label 1": 0.8},
                "by_guidance": {g: {"class_consistency_judge": float(np.mean(v)), "pixel_diversity": 0.5 - 0.1 * i,
                                    "pixel_diversity_real": 0.6,
                                    "per_group": [{"group": f"label {k}", "class_consistency_judge": x}
                                                  for k, x in enumerate(v)]}
                                for i, (g, v) in enumerate(values.items())}}

    a = plots.per_class_bars(result({"1": [0.2, 0.4], "2": [0.3, 0.9]}), ("a", "b"))
    b = plots.per_class_bars(result({"1": [0.2, 0.4], "2": [0.3, 0.1]}), ("a", "b"))
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape == b.shape and (a != b).any()
    c = plots.tradeoff_plot({"pairs": result({"1": [0.2], "2": [0.3]}), "recon": result({"1": [0.6], "2": [0.7]})})
    assert c.shape[2] == 3 and c.std() > 0


# ------------------------------------------------------------------------------------ the demo
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(evaluated_export):
    out = evaluated_export[0]
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    log = open(os.path.join(os.path.dirname(out), "demo.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "semantica_jax.demo", "--export", out, "--port", str(port),
                             "--max_upload_mb", "1", "--max_pixels", str(512 * 512), "--chunk", "2"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, open(log.name).read()[-3000:]
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            assert time.time() < deadline, "the demo did not serve within 180 s"
            time.sleep(0.5)
    yield url, out, proc
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium + chromium-driver are missing: `bash launch/setup_env.sh --apt=browser` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
              "--no-proxy-server"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _page(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#vary"))
    return By


def _upload(browser, path):
    from selenium.webdriver.common.by import By

    for button in browser.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear']"):
        button.click()
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(path)
    time.sleep(1.0)


def _wait(browser, what, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = what()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s")


def _vary_and_wait(browser, By, old_status=""):
    """Clicks Vary and returns the new final status line (while it runs, Gradio's progress text
    shows in the same element)."""
    browser.find_element(By.CSS_SELECTOR, "#vary").click()

    def final():
        text = browser.find_element(By.CSS_SELECTOR, "#status").text.strip()
        done = "\n" not in text and (text.startswith("Could not vary") or " variations of " in text)
        return text if done and text != old_status else None

    return _wait(browser, final)


def test_browser_bad_uploads_get_a_message_and_the_server_stays_up(demo, browser, tmp_path):
    url, out, proc = demo
    By = _page(browser, url)
    (tmp_path / "notes.png").write_text("not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("L", (600, 600)).save(tmp_path / "wide.png")  # 360,000 px > --max_pixels
    (tmp_path / "big.png").write_bytes(np.random.RandomState(0).bytes(1_500_000))  # > --max_upload_mb
    status = ""
    for name, message in (("notes.png", "notes.png: not a decodable image"), ("empty.png", "empty.png is empty"),
                          ("wide.png", "wide.png is 600x600 px; the demo accepts at most 262,144 pixels")):
        _upload(browser, str(tmp_path / name))
        status = _vary_and_wait(browser, By, status)
        assert status.startswith("Could not vary this image:") and message in status, status
        assert "Traceback" not in browser.page_source
    _upload(browser, str(tmp_path / "big.png"))
    toast = _wait(browser, lambda: [t.text for t in browser.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
                                    if "exceed the maximum allowed size" in t.text], timeout=30)
    assert "big.png" in toast[0]
    # A request can read nothing but its own uploads and the export's examples.
    body = json.dumps({"data": [{"path": os.path.join(out, "export.json"), "meta": {"_type": "gradio.FileData"}},
                                2, 25, 1.0, 0]}).encode()
    req = urllib.request.Request(url + "gradio_api/call/on_vary", body, {"Content-Type": "application/json"})
    event = json.load(urllib.request.urlopen(req, timeout=30))["event_id"]
    stream = urllib.request.urlopen(f"{url}gradio_api/call/on_vary/{event}", timeout=60).read().decode()
    assert "event: error" in stream and "config" not in stream
    for path in (os.path.join(out, "export.json"), "/etc/hostname"):
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10)
    assert proc.poll() is None


def test_browser_upload_shows_num_variations_and_the_seed_fixes_the_grid(demo, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    url, out, proc = demo
    By = _page(browser, url)
    src = os.path.join(out, "examples", "01_square.png")
    shutil.copy(src, tmp_path / "mine.png")
    _upload(browser, str(tmp_path / "mine.png"))
    num = browser.find_element(By.CSS_SELECTOR, "#num input[type=number]")
    num.send_keys(Keys.CONTROL, "a")
    num.send_keys("3", Keys.TAB)
    steps = browser.find_element(By.CSS_SELECTOR, "#steps input")
    steps.click()
    _wait(browser, lambda: [o for o in browser.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text == "25"])[0].click()

    def grid_pixels():
        src = _wait(browser, lambda: [i.get_attribute("src") for i in browser.find_elements(By.CSS_SELECTOR, "#grid img")
                                      if i.get_attribute("src")])[0]
        return np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read())).convert("RGB"))

    status = _vary_and_wait(browser, By)
    assert status.startswith("3 variations of mine.png: DDIM-25, guidance 2, seed 0"), status
    first = grid_pixels()
    # The grid of one row with the condition and 3 variations, as semantica-vary draws it.
    expected = images.variation_grid(np.zeros((1, 16, 16, 3)), np.zeros((3, 16, 16, 3)), 3, 16, row_labels=["mine.png"])
    assert first.shape == expected.shape
    seed = browser.find_element(By.CSS_SELECTOR, "#seed input")
    for value, same in (("1", False), ("0", True)):  # another seed, then the first seed again
        seed.send_keys(Keys.CONTROL, "a")
        seed.send_keys(value, Keys.TAB)
        status = _vary_and_wait(browser, By, status)
        assert f"seed {value} (" in status, status
        pixels = grid_pixels()
        assert pixels.shape == first.shape and (pixels == first).all() == same
    assert proc.poll() is None


# ------------------------------------------------------------------------------------ the notebook
def test_notebook_runs_top_to_bottom_on_an_export(evaluated_export, tmp_path):
    import nbclient
    import nbformat

    out = evaluated_export[0]
    nb = nbformat.read(os.path.join(REPO, "notebooks", "variations.ipynb"), as_version=4)
    env_before = dict(os.environ)
    os.environ.update(SEMANTICA_EXPORT=out, SEMANTICA_NUM="3", JAX_PLATFORMS="cpu",
                      XLA_FLAGS="--xla_force_host_platform_device_count=1")
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "step 10," in text and "3 images x 3 variations" in text
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) >= 3  # the variation grid and the two plots
    markdown = "".join(o.data.get("text/markdown", "") for o in outputs if o.output_type == "display_data")
    assert "| guidance | class-consistency |" in markdown and "# Model card" in markdown
