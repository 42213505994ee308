"""The HTML run report: its content from a hand-made store (escaping, captions, images, links,
hostile files), the `gileak report` command, and a real report of a small matrix run opened in
headless Chromium (sorting, images, failed rows, no console error)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from gileak.cli import main
from gileak.report.html import result_stem, write_report
from gileak.report.images import UnreadableImages, load_victim_images, save_victim_images
from gileak.store import ResultStore, StoredResult, VictimRecord

HOSTILE = "<script>window.__pwned = 1</script>"
CELL = 'digits{} | cnn{} | none{} | seed=0'


class Page(HTMLParser):
    """The parts of a report the tests look at: elements with attributes and their text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.scripts = 0
        self.texts: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self.scripts += tag == "script"

    def handle_data(self, data):
        self.texts.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag]

    def classed(self, tag: str, name: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and name in (a.get("class") or "").split()]


def _images(n: int, seed: int, channels: int = 3, side: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, channels, side, side), dtype=np.uint8)


def _result(defense: str, attack: str, status: str = "ok", ssims=(), error=None, position=0, **extra) -> StoredResult:
    victims = [VictimRecord(victim=10 + i, label=i % 3, ssim=s, psnr=None if s == 1.0 else 12.345 + i, mse=0.01,
                            lpips=None, iterations=5, loss=0.1) for i, s in enumerate(ssims)]
    return StoredResult(cell=CELL.replace("none", defense), attack=f"{attack}{{}}", dataset="digits", model="cnn",
                        defense=defense, seed=0, attack_label=attack, position=position, status=status, error=error,
                        seconds=1.5, victims=victims, env={"gileak": "0.1.0", "torch": "2.x", "python": "3.11",
                                                           "device": "cpu", "threads": 1}, **extra)


def _stem(result: StoredResult) -> str:
    return result_stem(result)


def _store_images(run_dir: Path, result: StoredResult, originals, reconstructions) -> None:
    save_victim_images(originals, reconstructions, run_dir / "reconstructions" / f"{_stem(result)}.npz",
                       cell=result.cell, attack=result.attack, victims=[v.victim for v in result.victims])


@pytest.fixture
def hand_made_run(tmp_path):
    """A run directory written through the store as a bench writes it: an ok row whose defense
    label is hostile HTML, a failed row, a not-applicable row, an ok row trained 3 rounds."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store = ResultStore(run_dir)
    hostile = _result(HOSTILE, "ig", ssims=[0.734, 0.2, 1.0], position=0)
    failed = _result(HOSTILE, "dlg", status="failed", error=f"RuntimeError: boom {HOSTILE}\nsecond line", position=1)
    not_applicable = _result("none", "analytic", status="not applicable",
                             error="not applicable: analytic needs a fully connected first layer", position=2)
    trained = _result("cvb", "ig", ssims=[0.1, 0.05], position=3, accuracy=0.5, accuracy_curve=[0.3, 0.4, 0.5],
                      rounds_run=3, attacked_round=3, training_seconds=4.0, params=100, params_added_pct=10.0)
    for result in (hostile, failed, not_applicable, trained):
        store.put(result)
    store.set_meta("budget", json.dumps({"victims": 3, "iterations": 5, "rounds": 3}))
    store.record_run(1_700_000_000.0, 1_700_000_090.0, completed=True, computed=4, reused=0)
    store.close()
    originals, reconstructions = _images(3, 0), _images(3, 1)
    _store_images(run_dir, hostile, originals, reconstructions)
    _store_images(run_dir, trained, _images(2, 2, channels=1), _images(2, 3, channels=1))
    (run_dir / "spec.json").write_text(json.dumps({
        "models": [{"name": "cnn", "params": {}, "label": "cnn"}],
        "datasets": [{"name": "digits", "params": {}, "label": "digits"}],
        "defenses": [{"name": "x", "params": {}, "label": HOSTILE}],
        "attacks": [{"name": "ig", "params": {}, "label": "ig"}], "victims": 3, "iterations": 5, "rounds": 3,
        "patience": 40, "seeds": 1, "device": "cpu", "attack_at": "final", "trace": False, "data_root": None}))
    return run_dir, {"hostile": hostile, "trained": trained, "originals": originals,
                     "reconstructions": reconstructions}


def _decode(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


# --- page content -----------------------------------------------------------------------------


def test_user_text_is_escaped_and_only_the_pages_own_script_runs(hand_made_run):
    run_dir, _ = hand_made_run
    text = write_report(run_dir).path.read_text()
    assert HOSTILE not in text and "window.__pwned" in text  # shown, as text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text
    page = Page(text)
    assert page.scripts == 1
    assert HOSTILE in "".join(page.texts)  # a reader sees the label exactly as written


def test_leaderboard_has_every_terminal_column_and_every_row_with_its_reason(hand_made_run):
    from gileak.report.leaderboard import TABLE_COLUMNS

    run_dir, _ = hand_made_run
    text = write_report(run_dir).path.read_text()
    page = Page(text)
    headers = re.findall(r'<th scope="col"[^>]*>(.*?)</th>', text)
    assert headers == [header for header, _ in TABLE_COLUMNS] and "status" in headers
    body = text.split('id="leaderboard-table"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr class=\"([\w-]+)\"", body)
    assert rows == ["ok", "failed", "not-applicable", "ok"]
    assert "boom &lt;script&gt;" in body and "analytic needs a fully connected first layer" in body
    assert "0.645 ± 0.333" in body  # SSIM mean ± std of (0.734, 0.2, 1.0), formatted as the terminal does
    assert "50.0 ± 0.0" in body  # accuracy of the trained row
    assert "LPIPS —" in text and "ASR = share of images" in text
    ssim_keys = [a["data-s6"] for a in page.all("tr") if "data-s6" in a]
    assert ssim_keys[1:3] == ["", ""]  # failed rows have no value: they sort last
    assert [float(k) for k in ssim_keys[::3]] == pytest.approx([np.mean([0.734, 0.2, 1.0]), 0.075])


def test_every_victim_is_shown_original_above_reconstruction_captioned_and_marked(hand_made_run):
    run_dir, made = hand_made_run
    text = write_report(run_dir).path.read_text()
    page = Page(text)
    victims = page.classed("figure", "victim")
    assert len(victims) == 5
    assert [float(v["data-ssim"]) for v in victims] == pytest.approx([0.734, 0.2, 1.0, 0.1, 0.05])
    assert len([v for v in victims if "leak" in v["class"].split()]) == 2  # SSIM 0.734 and 1.0
    assert "SSIM 0.734<br>PSNR 12.3 dB" in text and "SSIM 1.000<br>PSNR ∞ dB" in text
    shown = [a for a in page.all("img") if a.get("alt", "").startswith(("original", "reconstruction"))]
    assert len(shown) == 10
    for i, (original, reconstruction) in enumerate(zip(shown[0:6:2], shown[1:6:2])):
        assert original["alt"] == f"original, victim {10 + i}"
        assert np.array_equal(np.asarray(_decode(original["src"])), made["originals"][i].transpose(1, 2, 0))
        assert np.array_equal(np.asarray(_decode(reconstruction["src"])),
                              made["reconstructions"][i].transpose(1, 2, 0))
        assert (original["width"], original["height"]) == ("96", "96")  # 32 px shown 3x, nearest neighbour
    gray = _decode(shown[6]["src"])
    assert gray.mode == "L" and gray.size == (32, 32)
    assert "image-rendering: pixelated" in text


def test_the_page_is_self_contained_and_links_only_into_the_run_directory(hand_made_run):
    run_dir, _ = hand_made_run
    path = write_report(run_dir).path
    page = Page(path.read_text())
    assert all(a["src"].startswith("data:image/png;base64,") for a in page.all("img"))
    assert not page.all("link") and not [a for a in page.all("script") if "src" in a]
    for anchor in page.all("a"):
        href = anchor["href"]
        assert href.startswith("#") or (path.parent / unquote(href)).resolve().exists(), href


def test_figures_spec_budget_environment_and_wall_time_are_on_the_page(hand_made_run):
    run_dir, _ = hand_made_run
    text = write_report(run_dir).path.read_text()
    page = Page(text)
    alts = {a.get("alt") for a in page.all("img")}
    assert {"Per-victim SSIM of every row", "Privacy against utility", "Test accuracy per federated round"} <= alts
    assert "iterations = 5" in text and "victims = 3" in text  # the budget
    assert "90.0 s over 1 bench run(s)" in text  # the recorded wall time
    assert "<dt>torch</dt><dd>2.x</dd>" in text and "<dt>threads</dt><dd>1</dd>" in text
    assert "gileak bench --models cnn --datasets digits --defenses" in text and "--rounds 3" in text


def test_images_of_another_result_or_a_pickle_are_refused_never_shown_or_unpickled(hand_made_run, tmp_path):
    run_dir, made = hand_made_run
    hostile, trained = made["hostile"], made["trained"]
    npz = run_dir / "reconstructions" / f"{_stem(hostile)}.npz"
    # the trained row's file copied over the hostile row's: same shape of data, another result
    (run_dir / "reconstructions" / f"{_stem(trained)}.npz").replace(npz)
    text = write_report(run_dir).path.read_text()
    assert "holds the images of another result" in text
    assert len(Page(text).classed("figure", "victim")) == 0
    assert "<td class=\"num\">0.734</td>" in text  # the victims' numbers are still listed

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    zeros = np.zeros((3, 3, 32, 32), np.uint8)
    np.savez(npz, format=np.array([Payload()], dtype=object), originals=zeros, reconstructions=zeros,
             victims=np.arange(10, 13), cell=np.str_(hostile.cell), attack=np.str_(hostile.attack))
    text = write_report(run_dir).path.read_text()
    assert not marker.exists()
    assert "could not be read" in text and "allow_pickle" in text


def test_a_directory_written_before_per_victim_images_shows_its_strip(hand_made_run):
    run_dir, made = hand_made_run
    stem = _stem(made["hostile"])
    (run_dir / "reconstructions" / f"{stem}.npz").unlink()
    Image.new("RGB", (40, 20)).save(run_dir / "reconstructions" / f"{stem}.png")
    text = write_report(run_dir).path.read_text()
    assert "only the strip below" in text
    strip = Page(text).classed("img", "strip")
    assert len(strip) == 1 and _decode(strip[0]["src"]).size == (40, 20)


def test_trace_figures_and_csv_links_are_included(hand_made_run):
    run_dir, made = hand_made_run
    traces = run_dir / "traces"
    traces.mkdir()
    Image.new("RGB", (70, 40), "white").save(traces / f"{_stem(made['hostile'])}.png")
    (traces / f"{_stem(made['hostile'])}.csv").write_text("iteration,victim,layer\n1,0,0.5\n")
    page = Page(write_report(run_dir).path.read_text())
    trace = [a for a in page.all("img") if a.get("alt") == "Per-layer gradient similarity per iteration"]
    assert len(trace) == 1 and (trace[0]["width"], trace[0]["height"]) == ("70", "40")
    assert any(a["href"].endswith(".csv") for a in page.all("a"))


def test_report_elsewhere_links_back_and_hostile_directory_names_stay_paths(hand_made_run, tmp_path):
    run_dir, _ = hand_made_run
    odd = tmp_path / "javascript:alert(1)"
    run_dir.rename(odd)
    output = tmp_path / "elsewhere" / "r.html"
    path = write_report(odd, output).path
    hrefs = [a["href"] for a in Page(path.read_text()).all("a") if not a["href"].startswith("#")]
    assert hrefs and all(h.startswith(("./", "../")) and (output.parent / unquote(h)).exists() for h in hrefs)
    assert any(h.startswith("../javascript%3Aalert%281%29/") for h in hrefs)


def test_an_empty_or_old_directory_still_gets_a_page(tmp_path):
    (tmp_path / "empty").mkdir()
    ResultStore(tmp_path / "empty").close()
    text = write_report(tmp_path / "empty").path.read_text()
    assert "No result stored yet" in text and "not recorded" in text and "spec.json is missing" in text


def test_reports_written_at_once_into_one_place_each_write_a_whole_page(hand_made_run):
    from concurrent.futures import ThreadPoolExecutor

    run_dir, _ = hand_made_run
    with ThreadPoolExecutor(4) as pool:
        infos = list(pool.map(lambda _: write_report(run_dir), range(4)))
    assert {info.path for info in infos} == {run_dir / "report.html"}
    text = (run_dir / "report.html").read_text()
    assert text.rstrip().endswith("</html>") and len(Page(text).classed("figure", "victim")) == 5
    assert not list(run_dir.glob(".report.html.*"))


def test_privacy_utility_labels_of_rows_at_one_point_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    from gileak.report.figures import privacy_utility_figure

    rows = [dict(dataset="d", model="m", defense=defense, attack=attack, ssim_mean=0.3, ssim_std=0.0,
                 accuracy_mean=0.8, accuracy_std=0.0) for defense in ("none", "cvb", "precode") for attack in ("ig", "dlg")]
    figure = privacy_utility_figure(rows)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [t for t in figure.findobj(matplotlib.text.Text) if t.get_text().strip() and t.get_visible()
             and t not in figure.axes[0].get_xticklabels() + figure.axes[0].get_yticklabels()]
    labels = [t.get_text() for t in texts]
    for name in ("none", "cvb", "precode", "ig", "dlg"):
        assert labels.count(name) == 1, labels
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i], labels[j])


def test_victim_images_round_trip_and_malformed_files_raise(tmp_path):
    path = save_victim_images(np.full((2, 1, 4, 4), 0.5), np.zeros((2, 1, 4, 4)), tmp_path / "v.npz",
                              cell="c", attack="a", victims=[3, 4])
    images = load_victim_images(path)
    assert images.originals.dtype == np.uint8 and int(images.originals[0, 0, 0, 0]) == 128
    assert images.victims.tolist() == [3, 4] and images.cell == "c" and not list(tmp_path.glob("*.tmp"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UnreadableImages):
        load_victim_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "partial.npz", originals=np.zeros((1, 1, 2, 2), np.uint8))
    with pytest.raises(UnreadableImages, match="lacks"):
        load_victim_images(tmp_path / "partial.npz")


def test_the_report_is_documented_and_the_readme_shows_its_screenshot():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "(docs/report.md)" in readme and "](docs/images/report.png)" in readme
    doc = (root / "docs" / "report.md").read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc) if "://" not in t]
    assert "images/report.png" in targets
    for target in targets:
        assert (root / "docs" / target).exists(), target
    assert 0 < (root / "docs" / "images" / "report.png").stat().st_size < 500_000


# --- the command --------------------------------------------------------------------------------


def _cli(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, " ".join(out.getvalue().split())  # rich wraps long lines


def test_report_command_prints_path_and_size_and_refuses_bad_paths(hand_made_run, tmp_path):
    run_dir, _ = hand_made_run
    code, out = _cli("report", str(run_dir))
    assert code == 0 and f"Report: {run_dir / 'report.html'} (" in out and "KB" in out
    code, out = _cli("report", str(run_dir), "-o", str(tmp_path / "copy.html"))
    assert code == 0 and (tmp_path / "copy.html").is_file()
    code, out = _cli("report", str(tmp_path / "nothing-here"))
    assert code == 2 and "holds no gileak results" in out and "Traceback" not in out
    code, out = _cli("report", str(run_dir), "-o", str(tmp_path))
    assert code == 2 and "is a directory" in out
    store = run_dir / "results.sqlite"
    before = store.read_bytes()
    code, out = _cli("report", str(run_dir), "-o", str(store))
    assert code == 2 and "ending in .html" in out and store.read_bytes() == before


# --- a real run in a real browser -----------------------------------------------------------------

CHROMIUM = os.environ.get("GILEAK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _browser_or_skip():
    """Playwright's sync API, or a skip naming what is missing; with GILEAK_REQUIRE_BROWSER=1
    (CI) a missing browser fails the test instead."""
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set GILEAK_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright is not installed (pip install playwright)")
    if missing:
        message = "browser tests need a real Chromium: " + "; ".join(missing)
        if os.environ.get("GILEAK_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (GILEAK_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    return sync_playwright


class _Broken:
    @staticmethod
    def plugin():
        from gileak import Attack, hookimpl

        class BrokenAttack(Attack):
            name = "broken"
            description = "Fails on purpose, with markup in its reason."

            def attack(self, target, *, seeds, max_iterations, progress=None):
                raise RuntimeError(f"boom {HOSTILE}")

        class Plugin:
            @staticmethod
            @hookimpl
            def register_attacks(register):
                register(BrokenAttack)

        return Plugin


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """A small real matrix run (2 defenses x ig, analytic (not applicable on the CNN) and a
    failing attack; 2 victims, 5 iterations, 1 round, --trace) and the report bench wrote."""
    from gileak.plugins import load_plugins, reset

    run_dir = tmp_path_factory.mktemp("report") / "run"
    reset()
    load_plugins().register(_Broken.plugin(), name="broken-report-test")
    try:
        code, out = _cli("bench", "--datasets", "digits", "--defenses", "none,cvb", "--attacks", "ig,analytic,broken",
                         "--victims", "2", "--iterations", "5", "--rounds", "1", "--trace", "--out", str(run_dir))
    finally:
        reset()
    assert code == 1, out  # the broken attack fails; the rest ran
    assert f"Report: {run_dir / 'report.html'}" in out
    first = (run_dir / "report.html").read_text()
    (run_dir / "report.html").unlink()
    # a resume (everything reused) writes the report again, of everything the directory holds
    code, out = _cli("bench", "--datasets", "digits", "--defenses", "none,cvb", "--attacks", "ig,analytic",
                     "--victims", "2", "--iterations", "5", "--rounds", "1", "--trace", "--out", str(run_dir))
    assert code == 0 and "Resuming" in out and f"Report: {run_dir / 'report.html'}" in out, out
    assert (run_dir / "report.html").read_text().count("boom &lt;script&gt;") == first.count("boom &lt;script&gt;") > 0
    return run_dir / "report.html"


def test_bench_writes_the_report_and_per_victim_images(real_report):
    run_dir = real_report.parent
    assert len(list((run_dir / "reconstructions").glob("*.npz"))) == 2
    text = real_report.read_text()
    assert "boom &lt;script&gt;" in text and "Test accuracy per federated round" in text
    assert text.count('alt="Per-layer gradient similarity per iteration"') == 2
    # each result says which engine ran it (the rule's choice: the CNN's factored step, batched)
    assert text.count("engine batched (chain)") == 1 and text.count("engine batched (factored)") == 1
    assert "<dt>engine</dt>" not in text  # not split into one environment per engine


@pytest.fixture(scope="module")
def browser_api():
    """Checked before the real run is made, so a machine without a browser skips at once."""
    return _browser_or_skip()


@pytest.fixture
def page(browser_api, real_report):
    with browser_api() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.problems = []
            page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page.problems.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else
                    page.problems.append(f"network request {r.url}"))
            page.goto(real_report.as_uri())
            yield page
        finally:
            browser.close()


def _leaderboard(page) -> list[list[str]]:
    return page.eval_on_selector_all("#leaderboard-table tbody tr",
                                     "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText.trim()))")


def test_the_leaderboard_renders_every_row_failed_ones_with_their_reason(page):
    rows = _leaderboard(page)
    assert [(r[2], r[4], r[5]) for r in rows] == [
        ("none", "ig", "ok"), ("none", "analytic", "not applicable"), ("none", "broken", "failed"),
        ("cvb", "ig", "ok"), ("cvb", "analytic", "not applicable"), ("cvb", "broken", "failed")]
    for row in rows:
        assert row[3] == "gradient"  # the client column: the paper's
        if row[4] == "ig":
            assert len(row) == 16 and re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", row[6])
        elif row[4] == "broken":
            assert len(row) == 7 and row[6].startswith("failed") and f"boom {HOSTILE}" in row[6]
        else:
            assert len(row) == 7 and row[6].startswith("not applicable") and "fully connected" in row[6]
    assert page.evaluate("window.__pwned") is None
    assert page.problems == []


def test_clicking_a_header_sorts_and_failed_rows_stay_last(page):
    ssim = page.locator("#leaderboard-table thead th", has_text="SSIM")
    ssim.click()
    rows = _leaderboard(page)
    values = [float(r[6].split(" ± ")[0]) for r in rows[:2]]
    assert values == sorted(values) and all(len(r) == 7 for r in rows[2:])
    assert ssim.get_attribute("aria-sort") == "ascending"
    ssim.click()
    rows = _leaderboard(page)
    values = [float(r[6].split(" ± ")[0]) for r in rows[:2]]
    assert values == sorted(values, reverse=True) and all(len(r) == 7 for r in rows[2:])
    page.locator("#leaderboard-table thead th", has_text="attack").click()
    assert [r[4] for r in _leaderboard(page)] == ["analytic", "analytic", "broken", "broken", "ig", "ig"]
    page.locator("#leaderboard-table thead th", has_text="status").click()
    assert [r[5] for r in _leaderboard(page)] == ["failed"] * 2 + ["not applicable"] * 2 + ["ok"] * 2
    assert page.problems == []


def test_every_image_loads(page):
    count = page.evaluate("document.images.length")
    assert count == 2 * 2 * 2 + 2 + 3  # 2 ok results x 2 victims x (original, reconstruction), traces, figures
    for image in page.locator("img").all():  # lazy images load when they come near the viewport
        image.scroll_into_view_if_needed()
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=15_000)
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.alt)")
    assert broken == []
    assert page.problems == []


def test_readable_on_a_phone_the_table_scrolls_inside_its_box(page):
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator(".scroll").first
    assert box.evaluate("e => e.scrollWidth > e.clientWidth")  # the table scrolls, the page does not
    page.get_by_role("button", name="Close all").click()
    assert page.evaluate("Array.from(document.querySelectorAll('details.row')).every(d => !d.open)")
    page.get_by_role("button", name="Open all").click()
    assert page.evaluate("Array.from(document.querySelectorAll('details.row')).every(d => d.open)")
    assert page.problems == []
