"""The run report of a real tiny run (expert demos -> 2 training steps -> an evaluation, then an
evaluation-only run with temporal ensembling), opened in headless Chromium: the plots are drawn,
the videos play for their real length, and the tables hold the evaluation files' numbers."""

import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import imageio.v3 as iio
import numpy as np
import pytest

from mimictest.demos.lift import generate_lift_demos
from mimictest.precision import cpu_model
from mimictest.report import write_report

TINY = os.path.join(os.path.dirname(__file__), "tiny_lift.py")
ENV = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                    "(Debian: apt-get install chromium; .ci/run installs it)")
C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours: the two executions
# Reports back, once every video has its metadata: durations, sizes, the plots' boxes, the page height.
PROBE = """<script>
window.addEventListener('load', () => {
  const videos = [...document.querySelectorAll('video')];
  const report = () => document.body.setAttribute('data-probe', JSON.stringify({
    durations: videos.map(v => v.duration), sizes: videos.map(v => [v.videoWidth, v.videoHeight]),
    plots: [...document.querySelectorAll('img.plot')].map(i => {
      const r = i.getBoundingClientRect(); return [r.left, r.top + window.scrollY, r.width, r.height]; }),
    height: document.documentElement.scrollHeight}));
  Promise.all(videos.map(v => v.readyState >= 1 ? 0 : new Promise(done => {
    v.addEventListener('loadedmetadata', done); v.addEventListener('error', done); }))).then(report);
});
</script>"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run folder: trained 2 steps and evaluated (2 episodes), then evaluated again with ensembling."""
    root = tmp_path_factory.mktemp("report")
    demos = str(root / "lift.hdf5")
    assert generate_lift_demos(demos, episodes=2, seed=0)["successes"] >= 1
    for extra in ([], ["--eval-only-ensemble"]):
        out = subprocess.run([sys.executable, TINY, demos, str(root / "save"), "2", "2", *extra], env=ENV,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return str(root / "save" / "tiny")


class _Tables(HTMLParser):
    """The text of every table cell, as ``tables[i][row][col]``."""

    def __init__(self) -> None:
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def tables(page: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def chromium(tmp_path, *args: str) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
                          f"--user-data-dir={tmp_path / 'chromium-profile'}", *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_report_contents(run):
    path = write_report(run)
    assert path == os.path.join(run, "report.html")
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")], "the atomic write leaves no temporary file"
    page = open(path).read()
    assert "http://" not in page and "https://" not in page and "<script" not in page, "self-contained, no network"

    found = tables(page)
    evaluation = found[0]
    assert evaluation[0][:4] == ["step", "execution", "success %", "95% CI"]
    expected = []
    for name in ("eval_step2.json", "eval_step2_ensemble0.01.json"):
        s = json.load(open(os.path.join(run, name)))["summary"]
        lo, hi = s["success_ci95"]
        expected.append(["2", s["execution"], f"{s['success_rate']:.1f}", f"{lo:.1f}-{hi:.1f}", str(s["episodes"])])
    assert [row[:5] for row in evaluation[1:]] == expected

    constants = dict(row for row in found[1][1:])
    assert constants["MAX_STEPS"] == "2" and constants["DATASET"].endswith('lift.hdf5"')
    train_config = dict(row for row in found[2][1:])
    assert train_config["batch_size"] == "16" and train_config["lr_schedule"] == '"cosine"'
    machine = dict(row for row in found[-1][1:])
    assert machine["CPU"].startswith(cpu_model()[0])

    # One embedded video per execution, byte for byte the evaluation's mp4.
    videos = sorted(glob.glob(os.path.join(run, "videos", "*", "*.mp4")))
    assert len(videos) == 2 and page.count("<video") == 2
    for video in videos:
        assert iio.imread(video, plugin="FFMPEG").shape[0] > 0
    assert "failure" in page or "success" in page, "each video is captioned with its episode's outcome"


def test_report_before_any_evaluation(run, tmp_path):
    """A run folder as training leaves it before its first evaluation, with a last line cut by a kill."""
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(os.path.join(run, "config.json"), early)
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    train_lines = [line for line in lines if '"loss"' in line]
    (early / "metrics.jsonl").write_text("\n".join(train_lines) + "\n" + train_lines[-1][:25])
    page = open(write_report(str(early))).read()
    assert "no evaluation yet" in page and page.count("<img class=plot") == 1
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        write_report(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        write_report(str(tmp_path / "empty"))


def test_report_of_a_perfect_run_whose_bound_rounded_below_100(run, tmp_path):
    """50/50 saved with an upper bound of 99.99999999999999 (summaries written before the fix) still plots."""
    perfect = tmp_path / "perfect"
    shutil.copytree(run, perfect)
    for name in os.listdir(perfect):
        if name.startswith("eval_step") and name.endswith(".json"):
            saved = json.load(open(perfect / name))
            for summary in [saved["summary"], *saved["summary"].get("tasks", {}).values()]:
                summary["success_rate"], summary["success_ci95"] = 100.0, [92.86523998213858, 99.99999999999999]
            json.dump(saved, open(perfect / name, "w"))
    page = open(write_report(str(perfect))).read()
    assert "92.9-100.0" in page and page.count("<img class=plot") == 2, "the success plot is drawn"


@needs_chromium
def test_report_renders_in_chromium(run, tmp_path):
    page = open(write_report(run)).read()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, "--window-size=1280,1000", "--virtual-time-budget=20000", "--dump-dom", probe.as_uri())
    marker = 'data-probe="'
    assert marker in dom, "the probe did not report: a video never loaded its metadata?"
    found = json.loads(dom.split(marker)[1].split('"')[0].replace("&quot;", '"'))

    # Each video plays for its frames / fps, as decoded by Chromium.
    videos = sorted(glob.glob(os.path.join(run, "videos", "*", "*.mp4")))
    for duration, size, path in zip(found["durations"], found["sizes"], videos):
        meta = iio.immeta(path, plugin="FFMPEG")
        frames = iio.imread(path, plugin="FFMPEG")
        assert duration == pytest.approx(len(frames) / meta["fps"], abs=0.1) and duration > 0
        assert size == [frames.shape[2], frames.shape[1]]

    # The plots are drawn: in the screenshot, each plot's box holds axes, text and curves in line colours.
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--window-size=1280,{found['height']}", "--virtual-time-budget=5000",
             f"--screenshot={shot}", pathlib.Path(run, "report.html").as_uri())
    image = iio.imread(shot)[..., :3].astype(int)
    assert len(found["plots"]) == 2  # training curves, success (one task, so no per-task grid)
    for i, (x, y, w, h) in enumerate(found["plots"]):
        assert w > 300 and h > 200
        region = image[int(y):int(y + h), int(x):int(x + w)]
        ink = (region.sum(-1) < 600).mean()
        assert 0.01 < ink < 0.5, f"plot {i}: {ink:.3f} of its pixels are drawn"
        for colour in (C0, C1) if i == 1 else (C0,):
            near = (np.abs(region - colour).max(-1) < 40).sum()
            assert near > 50, f"plot {i}: the line colour {colour} covers only {near} pixels"
