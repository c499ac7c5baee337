"""The run report: ``<save_root>/<run>/report.html``, one self-contained page to look at a run.

``write_report(run_dir)`` reads only the run folder, as ``mimictest.train`` leaves it:

- ``config.json``: the script, its UPPERCASE constants and the ``TrainConfig``;
- ``metrics.jsonl``: training rows (``loss``, ``lr``, ``samples_per_s``, ``data_wait_frac``) and
  evaluation rows (``eval/...``);
- ``eval_step<N>[_<execution>].json``: each evaluation's summary and episodes;
- ``summary[_<execution>].json``: the success over the last K evaluations and the best one;
- ``videos/step<N>[_<execution>]/*.mp4``: rollout videos.

The page holds the training curves (loss, LR, samples/s, data wait), the success rate with its 95%
Wilson interval against step (per task when there are several), the evaluation table, the last
evaluation's videos, the hyperparameters and the machine. Plots are matplotlib PNGs and videos
base64 mp4s, both inlined as data URIs, so the file opens anywhere with no network. It is written
atomically: a reader sees the previous report or the new one.

    python -m mimictest.report Save/<run>
"""

from __future__ import annotations

import base64
import datetime
import glob
import html
import io
import json
import os
import platform
import re
import sys

import numpy as np
import torch

from mimictest.atomic import write_text
from mimictest.precision import cpu_description, cpu_model

REPORT_NAME = "report.html"
VIDEOS_PER_EXECUTION = 4  # the last evaluation's first videos of each execution setting
MAX_VIDEO_BYTES = 16 * 2**20  # a larger video is linked, not embedded
_EVAL_FILE = re.compile(r"eval_step(\d+)(_.+)?\.json")
_VIDEO_NAME = re.compile(r"(?:rank(\d+)|(.+))_episode(\d+)\.mp4")


def write_report(run_dir: str) -> str:
    """Write ``<run_dir>/report.html`` from the run folder's files; returns its path."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder not found: {run_dir!r}; give a Save/<run> folder that training wrote")
    run = load_run(run_dir)
    if not run["train"] and not run["evaluations"] and not run["config"]:
        raise FileNotFoundError(f"{run_dir!r} holds no config.json, metrics.jsonl or eval_step<N>.json; is it a run "
                                "folder that mimictest.train wrote?")
    page = render(run)
    path = os.path.join(run_dir, REPORT_NAME)
    write_text(path, page)
    return path


def load_run(run_dir: str) -> dict:
    """Everything the report shows, read from ``run_dir``.

    Returns ``{"dir", "name", "config", "train": {step: row}, "evaluations": {execution tag: [(step,
    eval file)]}, "summaries": {tag: summary file}}``. A step logged twice (a run relaunched after
    a kill logs again what the kill lost) keeps its last row.
    """
    config = _read_json(os.path.join(run_dir, "config.json"))
    train = {}
    for row in _read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "loss" in row:
            train[int(row["step"])] = row
    evaluations: dict[str, list[tuple[int, dict]]] = {}
    for path in glob.glob(os.path.join(run_dir, "eval_step*.json")):
        match = _EVAL_FILE.fullmatch(os.path.basename(path))
        if match:
            evaluations.setdefault(match.group(2) or "", []).append((int(match.group(1)), _read_json(path)))
    evaluations = dict(sorted(evaluations.items()))  # the default execution ("") first
    for results in evaluations.values():
        results.sort(key=lambda item: item[0])
    summaries = {tag: s for tag in evaluations if (s := _read_json(os.path.join(run_dir, f"summary{tag}.json")))}
    return {"dir": run_dir, "name": os.path.basename(os.path.normpath(run_dir)), "config": config or {},
            "train": dict(sorted(train.items())), "evaluations": evaluations,
            "summaries": summaries}


def render(run: dict) -> str:
    """The report's HTML for a ``load_run`` result."""
    config = run["config"]
    title = f"{run['name']}: {config.get('script', 'mimictest run')}"
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>{_e(title)}</h1>", f"<p class=note>{_e(run['dir'])} &middot; written {written}</p>",
             _headline(run), "<h2>Training</h2>", _training_section(run["train"]), "<h2>Success</h2>",
             _success_section(run["evaluations"]), "<h2>Evaluations</h2>", _evaluation_tables(run),
             "<h2>Rollout videos</h2>", _videos_section(run), "<h2>Hyperparameters</h2>", _config_section(config),
             "<h2>Machine</h2>", _machine_section(run)]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n<title>{_e(title)}</title>\n"
            f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1180px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; font-size: 13px; } img.plot { max-width: 100%; display: block; margin: 6px 0; }
.videos { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #444; max-width: 320px; }
video { width: 320px; background: #000; display: block; }
.headline { font-size: 15px; } .ok { color: #1a7f37; } .fail { color: #b42318; }
code { font-size: 12px; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def _headline(run: dict) -> str:
    """Last step, and per execution the pooled success of the last K evaluations and the best one."""
    lines = []
    if run["train"]:
        last = list(run["train"].values())[-1]
        lines.append(f"trained to step {last['step']} (loss {last['loss']:.4g})")
    for tag, summary in run["summaries"].items():
        pooled_key = next((k for k in summary if k.startswith("success_last_")), None)
        line = f"<b>{_e(summary.get('execution', tag.lstrip('_') or 'default'))}</b>:"
        if pooled_key:
            pooled = summary[pooled_key]
            steps = ", ".join(str(s) for s in pooled["steps"])
            line += (f" success {pooled['success_rate']:.1f}% (95% CI {_interval(pooled)}) over the last "
                     f"{len(pooled['steps'])} evaluation(s) (step {steps}; {pooled['episodes']} episodes)")
        if "best" in summary:
            best = summary["best"]
            line += f"; best {best['success_rate']:.1f}% (95% CI {_interval(best)}) at step {best['step']}"
        lines.append(line)
    return "<p class=headline>" + "<br>".join(lines or ["nothing trained or evaluated yet"]) + "</p>"


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure  # imported here: matplotlib takes a second to import

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _png(fig, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img class=plot alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _training_section(train: dict[int, dict]) -> str:
    """Loss (log scale when positive, with a running mean over long runs), LR, samples/s and data wait."""
    if not train:
        return "<p class=note>no training steps logged (an evaluation-only run, or no log yet)</p>"
    steps = np.array(list(train))
    fig, axes = _figure(2, 2, 11.5, 6.2)
    panels = [("loss", "training loss", 1.0), ("lr", "learning rate", 1.0),
              ("samples_per_s", "samples / s (all processes)", 1.0), ("data_wait_frac", "waiting for data (%)", 100.0)]
    for ax, (key, label, scale) in zip(axes.flat, panels):
        have = [s for s in steps if key in train[s]]
        values = np.array([train[s][key] for s in have], dtype=float) * scale
        ax.plot(have, values, lw=1, color="#1f77b4", alpha=0.45 if key == "loss" and len(values) > 50 else 1.0,
                marker="." if len(values) < 30 else None)
        if key == "loss" and len(values) > 50:
            width = max(len(values) // 50, 2)
            kernel = np.ones(width) / width
            ax.plot(have[width - 1:], np.convolve(values, kernel, mode="valid"), lw=1.6, color="#1f77b4",
                    label=f"running mean of {width}")
            ax.legend(fontsize=8)
        if key == "loss" and len(values) and np.all(values > 0) and values.max() / values.min() > 10:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        _step_axis(ax, steps[-1])
    return _png(fig, "training curves")


def _success_section(evaluations: dict[str, list[tuple[int, dict]]]) -> str:
    """Success (%) with its Wilson interval against step, per execution; and per task when there are several."""
    if not evaluations:
        return "<p class=note>no evaluation yet</p>"
    last_step = max(s for results in evaluations.values() for s, _ in results)
    fig, axes = _figure(1, 1, 8, 3.6)
    ax = axes[0, 0]
    for i, (tag, results) in enumerate(evaluations.items()):
        _interval_line(ax, [(s, r["summary"]) for s, r in results], _execution(tag, results), i)
    ax.set_title("success rate, all episodes (band: 95% Wilson interval)", fontsize=10)
    _success_axes(ax, last_step)
    ax.legend(fontsize=8)
    parts = [_png(fig, "success rate against step")]
    tasks = list(dict.fromkeys(t for results in evaluations.values() for _, r in results for t in r["summary"]["tasks"]))
    if len(tasks) > 1:
        cols = min(len(tasks), 4)
        rows = -(-len(tasks) // cols)
        fig, axes = _figure(rows, cols, 11.5, 2.4 * rows + 0.4)
        for ax, task in zip(axes.flat, tasks):
            for i, (tag, results) in enumerate(evaluations.items()):
                points = [(s, r["summary"]["tasks"][task]) for s, r in results if task in r["summary"]["tasks"]]
                _interval_line(ax, points, _execution(tag, results), i)
            ax.set_title(task, fontsize=9)
            _success_axes(ax, last_step)
        for ax in list(axes.flat)[len(tasks):]:
            ax.set_visible(False)
        parts.append(_png(fig, "success rate per task against step"))
    return "\n".join(parts)


def _interval_line(ax, points: list[tuple[int, dict]], label: str, index: int) -> None:
    """One execution's success against step: markers, the interval as error bars, and as a band between points."""
    steps = [s for s, _ in points]
    rate = [v["success_rate"] for _, v in points]
    lo = [v["success_ci95"][0] for _, v in points]
    hi = [v["success_ci95"][1] for _, v in points]
    line, = ax.plot(steps, rate, marker="osD^v"[index % 5], ms=5, lw=1.5, label=label, mfc="none")
    if len(points) > 1:
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    # Clipped at 0: summaries written before wilson_interval held the rate inside by construction
    # can have 50/50's upper bound a rounding error below 100%.
    yerr = [np.maximum(np.subtract(rate, lo), 0), np.maximum(np.subtract(hi, rate), 0)]
    ax.errorbar(steps, rate, yerr=yerr, fmt="none",
                ecolor=line.get_color(), alpha=0.6, capsize=3)


def _success_axes(ax, last_step: int) -> None:
    ax.set_ylim(-3, 103)
    ax.set_ylabel("success (%)", fontsize=9)
    _step_axis(ax, last_step)


def _step_axis(ax, last_step: int) -> None:
    """Steps from 0 to the last one on integer ticks, so every plot of the page shares its x range."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0, last_step * 1.03 + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step", fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


def _execution(tag: str, results: list[tuple[int, dict]]) -> str:
    """The execution setting's name (``chunk[1:5]``, ``ensemble(0.01)``...) as the evaluation recorded it."""
    return str(results[-1][1]["summary"].get("execution", tag.lstrip("_") or "default"))


def _interval(v: dict) -> str:
    lo, hi = v["success_ci95"]
    return f"{lo:.1f}-{hi:.1f}"


def _evaluation_tables(run: dict) -> str:
    """Every evaluation (one row each), then the last evaluation's per-task table when there are several tasks."""
    evaluations = run["evaluations"]
    if not evaluations:
        return "<p class=note>no evaluation yet</p>"
    optional = [("mean_max_coverage", "mean max coverage"), ("eval_seconds", "seconds"),
                ("worker_restarts", "worker restarts")]
    shown = [(k, name) for k, name in optional if any(k in r["summary"] for res in evaluations.values() for _, r in res)]
    head = ["step", "execution", "success %", "95% CI", "episodes", "mean length", "mean max score",
            *(name for _, name in shown)]
    rows = []
    for tag, results in evaluations.items():
        for step, result in results:
            s = result["summary"]
            cells = [str(step), _e(_execution(tag, results)), f"{s['success_rate']:.1f}", _interval(s),
                     str(s["episodes"]), f"{s['mean_length']:.0f}", f"{s['mean_max_score']:.3g}"]
            cells += [f"{s[k]:.3g}" if k in s else "" for k, _ in shown]
            rows.append(cells)
    parts = [_table(head, rows, numeric_from=2)]
    for tag, results in evaluations.items():
        step, result = results[-1]
        tasks = result["summary"]["tasks"]
        if len(tasks) > 1:
            task_rows = [[_e(t), f"{v['success_rate']:.1f}", _interval(v), str(v["episodes"]), f"{v['mean_length']:.0f}"]
                         for t, v in tasks.items()]
            mean = result["summary"].get("mean_task_success")
            if mean is not None:
                task_rows.append(["<b>mean over tasks</b>", f"{mean:.1f}", "", "", ""])
            parts.append(f"<p>per task at step {step}, {_e(_execution(tag, results))}:</p>")
            parts.append(_table(["task", "success %", "95% CI", "episodes", "mean length"], task_rows, numeric_from=1))
    return "\n".join(parts)


def _table(head: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    """An HTML table of already escaped cells; columns from ``numeric_from`` on are right-aligned."""
    out = ["<table>", "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td class=num>{c}</td>" if i >= numeric_from else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _videos_section(run: dict) -> str:
    """The first videos of the last evaluation of each execution, each captioned with its episode's outcome."""
    figures = []
    for tag, results in run["evaluations"].items():
        step, result = results[-1]
        folder = os.path.join(run["dir"], "videos", f"step{step}{tag}")
        paths = sorted(glob.glob(os.path.join(folder, "*.mp4")), key=_video_order)[:VIDEOS_PER_EXECUTION]
        tasks = list(result["summary"]["tasks"])
        for path in paths:
            caption = f"step {step}, {_execution(tag, results)}: {_video_caption(os.path.basename(path), result, tasks)}"
            size = os.path.getsize(path)
            rel = os.path.relpath(path, run["dir"])
            if size > MAX_VIDEO_BYTES:
                figures.append(f"<figure><p class=note><a href=\"{_e(rel)}\">{_e(rel)}</a> ({size / 2**20:.0f} MB, "
                               f"not embedded)</p><figcaption>{caption}</figcaption></figure>")
                continue
            with open(path, "rb") as fh:
                data = base64.b64encode(fh.read()).decode()
            figures.append(f'<figure><video controls loop muted autoplay playsinline preload=auto title="{_e(rel)}" '
                           f'src="data:video/mp4;base64,{data}"></video><figcaption>{caption}</figcaption></figure>')
    if not figures:
        return "<p class=note>no rollout videos (num_videos=0, or no evaluation yet)</p>"
    return "<div class=videos>\n" + "\n".join(figures) + "\n</div>"


def _video_order(path: str) -> tuple:
    match = _VIDEO_NAME.fullmatch(os.path.basename(path))
    return (0, int(match.group(3)), match.group(2) or "") if match else (1, 0, os.path.basename(path))


def _video_caption(name: str, result: dict, tasks: list[str]) -> str:
    """``rank<r>_episode<j>.mp4`` (one task) or ``<task>_episode<j>.mp4``, matched to its episode record."""
    match = _VIDEO_NAME.fullmatch(name)
    if match is None:
        return _e(name)
    rank, task, episode = match.group(1), match.group(2), int(match.group(3))
    task = task if task is not None else (tasks[0] if tasks else "")
    for record in result.get("episodes", []):
        if record.get("task") == task and record.get("episode") == episode and (rank is None or record.get("rank") == int(rank)):
            outcome = "<span class=ok>success</span>" if record["success"] else "<span class=fail>failure</span>"
            seed = f", seed {record['seed']}" if record.get("seed") is not None else ""
            return f"{_e(task)} episode {episode}: {outcome}, {record['length']} steps{_e(seed)}"
    return f"{_e(task)} episode {episode}"


def _config_section(config: dict) -> str:
    """The script's constants and the ``TrainConfig``, side by side; any other ``config.json`` entries after them."""
    if not config:
        return "<p class=note>no config.json in the run folder</p>"
    parts = []
    for key, title in (("constants", "script constants"), ("train", "TrainConfig")):
        values = config.get(key) or {}
        rows = [[f"<code>{_e(name)}</code>", f"<code>{_e(json.dumps(value))}</code>"] for name, value in values.items()]
        parts.append(f"<div><p><b>{title}</b></p>{_table(['name', 'value'], rows, numeric_from=2)}</div>")
    others = [[f"<code>{_e(k)}</code>", f"<code>{_e(json.dumps(v))}</code>"] for k, v in config.items()
              if k not in ("script", "constants", "train")]  # the script is in the title
    if others:
        parts.append(f"<div><p><b>run</b></p>{_table(['name', 'value'], others, numeric_from=2)}</div>")
    return "<div style=\"display:flex;gap:24px;flex-wrap:wrap\">" + "".join(parts) + "</div>"


def _machine_section(run: dict) -> str:
    """The machine that wrote the report (it runs in the training process), and the CPU the evaluations recorded."""
    name, flags = cpu_model()
    rows = [["CPU", _e(cpu_description())]]
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        rows.append(["GPU", _e(", ".join(f"{g} x{gpus.count(g)}" for g in dict.fromkeys(gpus)))])
    else:
        rows.append(["GPU", "none (CUDA not available)"])
    rows.append(["software", _e(f"Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}")])
    for tag, summary in run["summaries"].items():
        if "cpu" in summary and (summary["cpu"], summary.get("cpu_flags", [])) != (name, flags):
            rows.append([f"evaluated on ({_e(summary.get('execution', tag))})",
                         _e(f"{summary['cpu']} ({', '.join(summary.get('cpu_flags', []))})")])
    return "<p class=note>the machine that wrote this report</p>" + _table(["", ""], rows, numeric_from=2)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON ({err}); was it written by another tool?") from None


def _read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; a last line cut short (the run was killed while writing it) is left out."""
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        lines = fh.read().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path!r} line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        raise SystemExit("usage: python -m mimictest.report RUN_DIR  (a Save/<run> folder)")
    try:
        print(write_report(args[0]))
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
