"""``minitrain compare``: one self-contained page from the runs' event logs, checked as a browser
sees it (headless Chromium: the page renders, every image loads, the console shows no error), and
the viz report checked the same way."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from minitrain.commands.cli import main
from minitrain.records.curves import smooth

FIRST_PARTY_PLUGINS = {"viz"}
BROWSER = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it)"
)

PROBE = """<script>
(function () {  /* first in <head>: hears every error the page raises, then reports at load */
  var errors = [], original = console.error;
  console.error = function () { errors.push(Array.prototype.map.call(arguments, String).join(" "));
                                original.apply(console, arguments); };
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t !== window && t.tagName ? "failed to load " + t.tagName + " " + (t.src || t.href)
                                              : String(e.message));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("unhandled rejection: " + e.reason); });
  window.addEventListener("load", function () {
    var images = Array.prototype.map.call(document.images, function (img) {
      return {src: (img.getAttribute("src") || "").slice(0, 40), complete: img.complete, width: img.naturalWidth};
    });
    var out = document.createElement("pre");
    out.id = "minitrain-probe";
    out.textContent = JSON.stringify({title: document.title, text: document.body.innerText.length,
                                      images: images, errors: errors});
    document.body.appendChild(out);
  });
})();
</script>"""


def browse(page, tmp_path) -> dict:
    """Open a copy of ``page`` (next to it, so relative links resolve) in headless Chromium with
    the probe above, and return what the probe saw, plus the console lines Chromium logged."""
    probed = page.with_name(f".probe-{page.name}")
    probed.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    result = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--enable-logging=stderr",
            "--log-level=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    probed.unlink()
    found = re.search(r'<pre id="minitrain-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the page never finished loading; chromium said: {result.stderr[-2000:]}"
    seen = json.loads(
        found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    )
    seen["console"] = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return seen


def fit(recipe, run_dir, *args):
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--no-plugin", "console", *args]) == 0
    return run_dir


@pytest.fixture
def two_runs(recipe, tmp_path):
    return [
        fit(recipe, tmp_path / "runs" / "fast", "--set", "epochs=2", "--set", "lr=0.3"),
        fit(recipe, tmp_path / "runs" / "slow", "--set", "epochs=3", "--set", "lr=0.05"),
    ]


def test_compare_writes_one_page_from_the_event_logs(two_runs, tmp_path, capsys):
    for run in two_runs:  # nothing but the logs and the run files: no plots were drawn
        assert not (run / "plots").exists()
    out = tmp_path / "pages" / "fast-vs-slow.html"
    assert main(["compare", *map(str, two_runs), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    images = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]+)"', page)
    assert images == ["Training loss", "Validation loss", "Validation acc", "Learning rate (end of epoch)"]
    assert "Comparing 2 runs" in page and page.count("tiny_recipe") == 2
    differ = page[page.index("Settings that differ") : page.index("Final metrics")]
    assert re.search(r"<th>lr</th><td>0.3</td><td>0.05</td>", differ)
    assert re.search(r"<th>epochs</th><td>2</td><td>3</td>", differ) and "batch_size" not in differ
    assert page.count(">finished<") == 2


def test_compare_gives_each_run_its_own_status_metrics_and_curves(two_runs, tmp_path):
    """Three runs that differ in status and figures: each row, each final value and each curve's
    label belong to their own run."""
    from minitrain.commands.compare import _figures
    from minitrain.records.curves import COLORS
    from minitrain.records.formats import format_value
    from minitrain.records.rundir import read_run

    fast, slow = two_runs
    killed = tmp_path / "runs" / "killed"  # slow's copy, its process killed before it logged its end
    shutil.copytree(slow, killed)
    log = killed / "events.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))
    out = tmp_path / "three.html"
    assert main(["compare", str(fast), str(slow), str(killed), "-o", str(out)]) == 0
    page = out.read_text()
    runs = [read_run(path, steps=True) for path in (fast, slow, killed)]
    assert [run.status for run in runs] == ["finished", "finished", "killed"]
    finals = page[page.index("Final metrics") :]
    names = re.findall(r"<th>([a-z_]+)</th>", finals)[1:]  # after "run"
    for run in runs:
        status = re.search(rf">{run.name}</span></td><td>tiny_recipe</td><td class=\"status-(\w+)\">", page).group(1)
        assert status == run.status
        row = re.search(rf'<td class="run"><span[^>]*></span>{run.name}</td>(.*?)</tr>', finals).group(1)
        values = re.findall(r'<td class="num">([^<]*)</td>', row)
        assert values == [format_value(run.final_metrics.get(k)) for k in names]
    assert runs[0].final_metrics["val_loss"] != runs[1].final_metrics["val_loss"]
    for title, figure in _figures(runs, [run.name for run in runs]):
        if title != "Validation loss":
            continue
        lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
        for i, run in enumerate(runs):
            assert list(lines[run.name].get_ydata()) == [v for _, v in run.values("val_loss")]
            assert lines[run.name].get_color() == COLORS[i]


def test_compare_draws_a_summed_loss_per_sample_and_says_wall_time(two_runs, tmp_path):
    """A run that records its loss as summed over each batch (run.json's loss_reduction) is drawn
    per sample, on the scale of a run whose loss is a mean; the duration column says what it is."""
    from minitrain.commands.compare import _figures
    from minitrain.records.rundir import read_run

    fast, slow = two_runs
    info = json.loads((fast / "run.json").read_text())
    (fast / "run.json").write_text(json.dumps(info | {"loss_reduction": "sum"}))
    logged = [json.loads(line) for line in (fast / "events.jsonl").read_text().splitlines()]
    sums = [e["loss"] for e in logged if e["event"] == "BatchEnd"]
    runs = [read_run(path, steps=True) for path in two_runs]
    title, figure = next(iter(_figures(runs, ["fast", "slow"])))
    assert title == "Training loss" and figure.axes[0].get_ylabel() == "loss per sample"
    raw = [line for line in figure.axes[0].get_lines() if line.get_alpha() == 0.2]  # the faint raw values
    assert list(raw[0].get_ydata()) == pytest.approx([loss / 16 for loss in sums])
    out = tmp_path / "page.html"
    assert main(["compare", *map(str, two_runs), "-o", str(out)]) == 0
    assert "<th>steps</th><th>wall time</th>" in out.read_text()


def test_compare_refuses_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["compare", str(tmp_path / "plain")]) == 2
    assert "not a minitrain run directory" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing")]) == 2


def test_smoothing_starts_at_the_first_value_and_skips_non_finite():
    assert smooth([2.0, 2.0, 2.0], span=5) == [2.0, 2.0, 2.0]
    values = smooth([1.0, float("nan"), 3.0], span=3)
    assert values[0] == 1.0 and values[1] != values[1] and 1.0 < values[2] < 3.0
    assert smooth([5.0, 1.0], span=1) == [5.0, 1.0]


@needs_browser
def test_the_comparison_page_renders_in_a_browser(two_runs, tmp_path):
    out = tmp_path / "compare.html"
    assert main(["compare", *map(str, two_runs), "-o", str(out)]) == 0
    seen = browse(out, tmp_path)
    assert seen["title"] == "minitrain: comparing 2 runs" and seen["text"] > 300
    assert len(seen["images"]) == 4
    assert all(image["complete"] and image["width"] > 0 for image in seen["images"]), seen["images"]
    assert seen["errors"] == [] and seen["console"] == []


@needs_browser
def test_the_report_renders_in_a_browser(recipe, tmp_path):
    run = fit(recipe, tmp_path / "run", "--set", "epochs=2", "--plugin", "viz")
    seen = browse(run / "report.html", tmp_path)
    assert seen["title"] == "tiny_recipe: run"
    assert len(seen["images"]) >= 4 and all(image["complete"] and image["width"] > 0 for image in seen["images"])
    assert seen["errors"] == [] and seen["console"] == []


@needs_browser
def test_the_browser_check_sees_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><html><head><title>t</title></head><body><p>text</p>"
        '<img src="missing.png"><script>console.error("boom")</script></body></html>'
    )
    seen = browse(page, tmp_path)
    assert seen["images"][0]["width"] == 0
    assert "boom" in seen["errors"] and any("failed to load IMG" in e for e in seen["errors"])
    assert any("boom" in line for line in seen["console"])
