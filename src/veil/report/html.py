"""One self-contained HTML report across finished runs.

The page needs no network: images are embedded as base64 PNG data URIs, CSS is inline, and there
is no JavaScript, web font or external link. It reads only run records (see :mod:`veil.records`):

- ``config.json`` and ``metrics.json`` for the metrics table across runs (scales as written by
  :func:`veil.metrics.stealth_metrics`: MSE on the 0-255 scale, L1 on ``[0, 1]``, L-inf in grey
  levels, the modification histogram in percent of sub-pixels);
- ``samples.safetensors`` (keys ``clean`` and ``poisoned``) for the clean / poisoned / amplified
  residual grid of each run;
- ``history.json`` for the per-epoch chart and table; ``environment.json`` for one line of
  provenance; ``metrics.json["notes"]`` are shown as notes;
- extension points for attacks, defenses and sweeps: in the run folder and in every sub-folder of
  it (such as ``RUN/defenses/NAME/``), every PNG under ``figures/`` (captioned with its path) and
  every ``tables/*.json`` of the form ``{"title": str, "columns": [...], "rows": [[...], ...]}``
  (optional keys: ``"header"``, rows of ``[label, colspan]`` drawn instead of ``columns``;
  ``"left"``, the number of left-aligned leading columns; ``"note"``, a line under the table).
  Report-level tables of the same form (a sweep's summary) are passed as ``tables=[...]``.

Missing keys and ``None`` values show as "–"; a missing or unreadable samples file, history,
figure or table is noted on the page and logged, not fatal. A run folder that is missing or not
finished raises :class:`veil.errors.RecordError` before anything is written.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import veil
from veil.errors import CheckpointError, RecordError
from veil.records import ENVIRONMENT, POISON_INDICES, SAMPLES, RunRecord, atomic_write_bytes
from veil.report.images import sample_grid_png

log = logging.getLogger(__name__)

#: shown under the title of every report
PURPOSE = (
    "veil exists so that defenses get tested against the strongest invisible attacks before "
    "attackers use them; for research on models and data you own."
)
#: at most this many sample images per run are shown in the grid
MAX_SAMPLES = 12
#: nearest-neighbour upscaling of sample images in the report (32x32 shows at 96x96)
GRID_SCALE = 3
#: placeholder for missing values
DASH = "\u2013"

FIGURES_DIR = "figures"
TABLES_DIR = "tables"

_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --head: #f2f4f8; --accent: #2f5aa8; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI",
       Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg); background: #fff; }
main { max-width: 1500px; margin: 0 auto; }
header { border-bottom: 2px solid var(--accent); padding-bottom: 10px; margin-bottom: 20px; }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 32px 0 10px; font-size: 20px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { margin: 18px 0 8px; font-size: 15px; color: var(--muted); text-transform: uppercase;
     letter-spacing: .04em; }
h4 { margin: 12px 0 6px; font-size: 14px; }
.meta { color: var(--muted); margin: 2px 0; }
.purpose { margin: 8px 0 0; font-style: italic; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 4px 0 8px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: var(--head); font-weight: 600; text-align: center; }
td.text, th.text { text-align: left; }
tbody tr:nth-child(even) td { background: #fafbfc; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 2px 0 6px; }
table.metrics { font-size: 13px; }
table.metrics th { white-space: normal; min-width: 48px; padding: 4px 6px; vertical-align: bottom; }
table.metrics td { padding: 4px 6px; }
th.group { vertical-align: middle; border-bottom: 2px solid var(--accent); }
a { color: var(--accent); text-decoration: none; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.row > div { min-width: 0; max-width: 100%; }
figure { margin: 8px 0 16px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
img.pixel { image-rendering: pixelated; image-rendering: crisp-edges; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.note { color: #8a5a00; white-space: pre-line; }
.empty { color: var(--muted); font-style: italic; }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--accent); }
pre { background: var(--head); padding: 8px 10px; overflow-x: auto; font-size: 12px; }
section.run { margin-bottom: 28px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line);
         padding-top: 8px; }
"""


# --------------------------------------------------------------------------- formatting helpers


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """``value`` as a float, or ``None`` if it is missing or not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def fmt_percent(value: Any, digits: int = 2) -> str:
    """A fraction in ``[0, 1]`` as a percentage (``0.9512`` -> ``"95.12%"``); "–" if missing."""
    x = _num(value)
    if x is None:
        return DASH if value is None else _esc(value)
    if math.isnan(x) or math.isinf(x):
        return DASH
    return f"{100.0 * x:.{digits}f}%"


def fmt_float(value: Any, spec: str = ".4f") -> str:
    """A number with the format ``spec``; ``inf`` as "∞", missing or NaN as "–"."""
    x = _num(value)
    if x is None:
        return DASH if value is None else _esc(value)
    if math.isnan(x):
        return DASH
    if math.isinf(x):
        return "\u221e" if x > 0 else "-\u221e"
    return format(x, spec)


def fmt_int(value: Any) -> str:
    """An integer count; a non-integral number keeps its fraction (``"2.5"``)."""
    x = _num(value)
    if x is None:
        return DASH if value is None else _esc(value)
    if math.isnan(x) or math.isinf(x):
        return DASH
    return str(int(x)) if x.is_integer() else f"{x:g}"


def fmt_seconds(value: Any) -> str:
    """Seconds as ``"12.3 s"``, ``"4 min 05 s"`` or ``"1 h 02 min"``."""
    x = _num(value)
    if x is None:
        return DASH if value is None else _esc(value)
    if math.isnan(x) or math.isinf(x):
        return DASH
    if x < 60:
        return f"{x:.1f} s"
    m, s = divmod(round(x), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def fmt_size(value: Any) -> str:
    """Image size: ``32`` -> ``"32"``, ``[32, 32]`` -> ``"32×32"``."""
    if isinstance(value, (list, tuple)):
        return "\u00d7".join(fmt_int(v) for v in value) if value else DASH
    return fmt_int(value)


def fmt_cell(value: Any) -> str:
    """Generic table cell, escaped: floats with 4 significant digits, containers as JSON."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return _esc(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return fmt_float(value, ".4g")
    if isinstance(value, (list, tuple, dict)):
        return _esc(json.dumps(value, default=str))
    return _esc(value)


def _get(mapping: Any, *keys: str) -> Any:
    """Nested ``mapping[k1][k2]...``; ``None`` as soon as a level is missing or not a dict."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    caption: str | None = None,
    text_columns: Iterable[int] = (),
    header: Sequence[Sequence[Any]] | None = None,
    css_class: str = "",
) -> str:
    """An HTML table. ``columns`` and ``header`` labels are escaped here; cells must already be
    escaped and formatted. ``header``, if given, replaces ``columns`` by rows of ``[label, span]``."""
    text_cols = set(text_columns)

    def cls(i: int) -> str:
        return ' class="text"' if i in text_cols else ""

    table_class = f' class="{css_class}"' if css_class else ""
    out = [f'<div class="scroll"><table{table_class}>']
    if caption:
        out.append(f"<caption>{_esc(caption)}</caption>")
    out.append("<thead>")
    if header:
        for level, hrow in enumerate(header):
            cells = []
            for label, span in hrow:
                group = ' class="group"' if level < len(header) - 1 and str(label) else ""
                colspan = f' colspan="{int(span)}"' if int(span) > 1 else ""
                cells.append(f"<th{group}{colspan}>{_esc(label)}</th>")
            out.append("<tr>" + "".join(cells) + "</tr>")
    else:
        out.append("<tr>" + "".join(f"<th{cls(i)}>{_esc(c)}</th>" for i, c in enumerate(columns)) + "</tr>")
    out.append("</thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _valid_header(header: Any, width: int) -> bool:
    """Whether ``header`` is a list of rows of ``[label, span]`` whose spans each sum to ``width``."""
    if not isinstance(header, list) or not header:
        return False
    for hrow in header:
        if not isinstance(hrow, list):
            return False
        try:
            spans = [int(span) for _, span in hrow]
        except (TypeError, ValueError):
            return False
        if sum(spans) != width or any(s < 1 for s in spans):
            return False
    return True


def json_table_html(table: Mapping[str, Any], name: str = "table") -> str:
    """Render a JSON table ``{"title", "columns", "rows"[, "header", "left", "note"]}`` as HTML.

    Raises:
        TypeError: ``table`` is not a mapping.
        ValueError: ``columns`` is not a list or ``rows`` not a list of lists.
    """
    if not isinstance(table, Mapping):
        raise TypeError("a table must be a JSON object")
    columns, rows = table.get("columns"), table.get("rows")
    if not isinstance(columns, list) or not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ValueError("'columns' must be a list and 'rows' a list of lists")
    width = max([len(columns)] + [len(r) for r in rows])
    labels = [str(c) for c in columns] + [""] * (width - len(columns))
    body = [[fmt_cell(v) for v in r] + [""] * (width - len(r)) for r in rows]
    left = table.get("left")
    if isinstance(left, int) and not isinstance(left, bool):
        text_cols = list(range(left))
    else:
        text_cols = [i for i in range(width) if any(isinstance(r[i], str) for r in rows if i < len(r))]
    header = table.get("header")
    header = header if _valid_header(header, width) else None
    parts = [_table(labels, body, caption=str(table.get("title") or name), text_columns=text_cols, header=header)]
    if table.get("note"):
        parts.append(f'<p class="meta">{_esc(table["note"])}</p>')
    return "\n".join(parts)


# --------------------------------------------------------------------------- per-run content


class _Run:
    """Everything the report reads from one finished run."""

    def __init__(self, root: Path, name: str, anchor: str) -> None:
        self.record = RunRecord(root).require()
        self.root = root
        self.name = name
        self.anchor = anchor
        self.config: dict[str, Any] = self._dict(self.record.config(), "config.json")
        self.metrics: dict[str, Any] = self._dict(self.record.metrics(), "metrics.json")
        self.notes: list[str] = (
            [str(n) for n in self.metrics.get("notes") or [] if n]
            if isinstance(self.metrics.get("notes"), list)
            else []
        )
        try:
            history = self.record.history()
        except RecordError as exc:
            log.warning("run %s: %s", root, exc)
            self.notes.append(str(exc))
            history = []
        self.history: list[dict[str, Any]] = (
            [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
        )

    def _dict(self, obj: Any, name: str) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise RecordError(f"{self.root / name} does not hold a JSON object")
        return obj

    @property
    def clean_reference(self) -> bool:
        """A run without an attack (its poison rate, count and target mean nothing)."""
        return self.config.get("attack") in ("none", "clean")

    def poison_count(self) -> Any:
        """The number of poisoned training images: as measured (metrics), as asked (config), or
        as recorded in ``poison_indices.json``."""
        count = self.metrics.get("poison_count")
        if count is None:
            count = self.config.get("poison_count")
        if count is None and self.record.path(POISON_INDICES).is_file():
            try:
                count = len(self.record.poison_indices().get("poison", []))
            except (RecordError, AttributeError, TypeError):
                count = None
        return count


#: (group, columns) of the metrics table; the first column is the run name
_METRIC_GROUPS = [
    ("setup", ["attack", "dataset", "model", "width", "image size", "epochs", "poison rate", "poison count", "target"]),
    ("results", ["clean acc.", "ASR", "PSNR (dB)", "SSIM", "MSE", "LPIPS", "L1", "L\u221e", "train time"]),
]


def _metrics_row(run: _Run) -> list[str]:
    c, m = run.config, run.metrics
    psnr = _get(m, "stealth", "psnr")
    if psnr is None and _num(_get(m, "stealth", "identical_fraction")) == 1.0:
        psnr = math.inf  # no test image was changed at all
    attacked = not run.clean_reference
    return [
        f'<a href="#{run.anchor}">{_esc(run.name)}</a>',
        fmt_cell(c.get("attack")),
        fmt_cell(c.get("dataset")),
        fmt_cell(c.get("model")),
        fmt_cell(c.get("width")),
        fmt_size(c.get("image_size")),
        fmt_int(c.get("epochs")),
        # an absolute poison count in the config overrides the rate
        fmt_percent(c.get("poison_rate")) if attacked and c.get("poison_count") is None else DASH,
        fmt_int(run.poison_count()) if attacked else DASH,
        fmt_cell(c.get("target")) if attacked else DASH,
        fmt_percent(m.get("clean_accuracy")),
        fmt_percent(m.get("attack_success_rate")),
        fmt_float(psnr, ".2f"),
        fmt_float(_get(m, "stealth", "ssim"), ".4f"),
        fmt_float(_get(m, "stealth", "mse"), ".3f"),
        fmt_float(_get(m, "stealth", "lpips"), ".4f"),
        fmt_float(_get(m, "stealth", "l1"), ".5f"),
        fmt_int(_get(m, "stealth", "linf")),
        fmt_seconds(_get(m, "timings", "train_seconds")),
    ]


def _metrics_table(runs: Sequence[_Run]) -> str:
    header = [
        [["", 1]] + [[group, len(cols)] for group, cols in _METRIC_GROUPS],
        [["run", 1]] + [[c, 1] for _, cols in _METRIC_GROUPS for c in cols],
    ]
    columns = ["run"] + [c for _, cols in _METRIC_GROUPS for c in cols]
    return _table(
        columns, [_metrics_row(r) for r in runs], text_columns=[0, 1, 2, 3], header=header, css_class="metrics"
    )


def _samples_html(run: _Run) -> str:
    if not run.record.path(SAMPLES).is_file():
        return f'<p class="empty">no {SAMPLES} in this run</p>'
    try:
        tensors = run.record.samples()
        clean, poisoned = tensors["clean"][:MAX_SAMPLES], tensors["poisoned"][:MAX_SAMPLES]
        png = sample_grid_png(clean, poisoned, scale=GRID_SCALE)
    except (CheckpointError, KeyError, ValueError, TypeError) as exc:
        log.warning("run %s: cannot draw samples (%s)", run.root, exc)
        return f'<p class="note">cannot draw samples: {_esc(exc)}</p>'
    k = int(clean.shape[0])
    return (
        f'<figure><img class="pixel" src="{_data_uri(png)}" alt="{_esc(run.name)} samples">'
        f"<figcaption>{k} test images: clean (top), poisoned (middle), and the residual "
        "|poisoned \u2212 clean| amplified so that the largest change in the batch is white "
        "(gain in the row label)</figcaption></figure>"
    )


def _histogram_html(run: _Run) -> str:
    hist = _get(run.metrics, "stealth", "histogram")
    modified = _get(run.metrics, "stealth", "modified_fraction")
    parts = []
    if isinstance(hist, dict) and hist:
        known = [v for v in (_num(v) for v in hist.values()) if v is not None]
        # veil writes percentages (summing to 100); accept fractions (summing to 1) too
        factor = 100.0 if known and sum(known) <= 1.0 + 1e-6 else 1.0
        cells = [DASH if _num(v) is None else f"{factor * _num(v):.3f}%" for v in hist.values()]  # type: ignore[operator]
        parts.append(
            _table(
                ["|\u0394| (grey levels)"] + [str(k) for k in hist],
                [["share of sub-pixels"] + cells],
                text_columns=[0],
            )
        )
    else:
        parts.append('<p class="empty">no modification histogram recorded</p>')
    parts.append(f'<p class="meta">modified sub-pixels: {fmt_percent(modified)}</p>')
    return "\n".join(parts)


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    out = []
    for h in history:
        x = _num(h.get(key))
        out.append(math.nan if x is None else x)
    return out


def history_chart_png(history: list[dict[str, Any]], title: str = "") -> bytes:
    """Clean accuracy and attack success rate (in %) against epoch as a PNG line chart.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [i + 1 if math.isnan(e) else e for i, e in enumerate(_series(history, "epoch"))]
    fig = Figure(figsize=(5.2, 2.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, label, colour in (
        ("clean_accuracy", "clean accuracy", "#2f5aa8"),
        ("attack_success_rate", "attack success rate", "#c0392b"),
    ):
        # epochs where the value was not measured are left out, and the measured ones joined
        points = [(e, 100.0 * y) for e, y in zip(epochs, _series(history, key)) if not math.isnan(y)]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=label, color=colour)
    distinct = sorted({e for e in epochs if not math.isnan(e)})
    if 0 < len(distinct) <= 12:  # few epochs: a tick at each
        ax.set_xticks(distinct)
        ax.set_xlim(distinct[0] - 0.5, distinct[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _history_html(run: _Run) -> str:
    if not run.history:
        return '<p class="empty">no per-epoch history recorded</p>'
    try:
        chart = (
            f'<figure><img src="{_data_uri(history_chart_png(run.history))}" alt="{_esc(run.name)} history"></figure>'
        )
    except Exception as exc:  # noqa: BLE001 -- a plotting failure must not lose the whole report
        log.warning("run %s: cannot plot history (%s)", run.root, exc)
        chart = f'<p class="note">cannot plot history: {_esc(exc)}</p>'
    columns: list[tuple[str, str, Any]] = [
        ("epoch", "epoch", fmt_int),
        ("loss", "loss", lambda v: fmt_float(v, ".4f")),
        ("train_accuracy", "train acc.", fmt_percent),
        ("clean_accuracy", "clean acc.", fmt_percent),
        ("attack_success_rate", "ASR", fmt_percent),
        ("seconds", "time", fmt_seconds),
    ]
    shown = [
        c
        for c in columns
        if c[0] in ("epoch", "clean_accuracy", "attack_success_rate") or any(c[0] in h for h in run.history)
    ]
    rows = [[fmt(h.get(key)) for key, _, fmt in shown] for h in run.history]
    table = _table([label for _, label, _ in shown], rows)
    return f'<div class="row"><div>{chart}</div><div>{table}</div></div>'


def _extra_folders(root: Path) -> list[Path]:
    """The run folder and every sub-folder of it with a ``figures/`` or ``tables/`` folder
    (e.g. ``RUN/defenses/NAME``), the run folder first; folders inside a ``figures/`` or
    ``tables/`` folder are not searched again."""
    found = set()
    for kind in (FIGURES_DIR, TABLES_DIR):
        for path in root.rglob(kind):
            rel = path.relative_to(root).parts[:-1]
            if path.is_dir() and not {FIGURES_DIR, TABLES_DIR} & set(rel) and not any(p.startswith(".") for p in rel):
                found.add(path.parent)
    return sorted(found, key=lambda p: (p != root, p.relative_to(root).as_posix()))


def _figures_html(folder: Path, run: _Run) -> str:
    figures = folder / FIGURES_DIR
    if not figures.is_dir():
        return ""
    parts = []
    for path in sorted(p for p in figures.rglob("*") if p.is_file() and p.suffix.lower() == ".png"):
        caption = path.relative_to(run.root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("run %s: cannot read %s (%s)", run.root, path, exc)
            parts.append(f'<p class="note">cannot read {_esc(caption)}: {_esc(exc)}</p>')
            continue
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            log.warning("run %s: %s is not a PNG file; skipped", run.root, path)
            parts.append(f'<p class="note">{_esc(caption)}: not a PNG file</p>')
            continue
        parts.append(
            f'<figure><img src="{_data_uri(data)}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'
        )
    return '<div class="row">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>" if parts else ""


def _tables_html(folder: Path, run: _Run) -> str:
    tables = folder / TABLES_DIR
    if not tables.is_dir():
        return ""
    parts = []
    for path in sorted(tables.glob("*.json")):
        rel = path.relative_to(run.root).as_posix()
        try:
            parts.append(json_table_html(json.loads(path.read_text()), name=path.stem))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("run %s: cannot read table %s (%s)", run.root, path, exc)
            parts.append(f'<p class="note">cannot read table {_esc(rel)}: {_esc(exc)}</p>')
    return "\n".join(parts)


def _extras_html(run: _Run) -> str:
    parts = []
    for folder in _extra_folders(run.root):
        content = _figures_html(folder, run) + _tables_html(folder, run)
        if not content:
            continue
        rel = folder.relative_to(run.root).as_posix()
        if folder == run.root:
            heading = "figures and tables"
        elif rel.startswith("defenses/") and rel.count("/") == 1:
            heading = "defense: " + rel.split("/", 1)[1]
        else:
            heading = rel
        parts.append(f"<h3>{_esc(heading)}</h3>\n{content}")
    return "\n".join(parts)


def _environment(run: _Run) -> tuple[str, str]:
    """One provenance line (veil, torch, device, git) and a collapsed block with the whole
    ``environment.json``; empty strings when the run has none."""
    if not run.record.path(ENVIRONMENT).is_file():
        return "", ""
    try:
        env = run.record.environment()
    except RecordError as exc:
        return f'<p class="note">{_esc(exc)}</p>', ""
    if not isinstance(env, dict):
        return "", ""
    items = [
        ("veil", env.get("veil_version")),
        ("torch", env.get("torch_version")),
        ("device", env.get("device")),
        ("git", str(env["git_sha"])[:12] if env.get("git_sha") else None),
    ]
    text = " \u00b7 ".join(f"{k} {_esc(v)}" for k, v in items if v is not None)
    env_json = _esc(json.dumps(env, indent=2, sort_keys=True, default=str))
    line = f'<p class="meta">{text}</p>' if text else ""
    return line, f"<details><summary>environment</summary><pre>{env_json}</pre></details>"


def _run_section(run: _Run) -> str:
    c = run.config
    subtitle = " \u00b7 ".join(
        f"{k} {fmt_cell(c.get(k))}" for k in ("attack", "dataset", "model", "seed") if c.get(k) is not None
    )
    config_json = _esc(json.dumps(run.config, indent=2, sort_keys=True, default=str))
    env_line, env_details = _environment(run)
    return "\n".join(
        [
            f'<section class="run" id="{run.anchor}">',
            f"<h2>{_esc(run.name)}</h2>",
            f'<p class="meta">{subtitle}</p>' if subtitle else "",
            f'<p class="meta">folder: <code>{_esc(run.root)}</code></p>',
            env_line,
            *(f'<p class="note">note: {_esc(n)}</p>' for n in run.notes),
            "<h3>samples</h3>",
            _samples_html(run),
            "<h3>modification histogram</h3>",
            _histogram_html(run),
            "<h3>training history</h3>",
            _history_html(run),
            _extras_html(run),
            f"<details><summary>configuration</summary><pre>{config_json}</pre></details>",
            env_details,
            "</section>",
        ]
    )


def _load_runs(run_dirs: Sequence[str | Path]) -> list[_Run]:
    roots = [Path(d) for d in run_dirs]
    names = [r.name or str(r) for r in roots]
    counts = {n: names.count(n) for n in names}
    # two folders with the same name (e.g. runs/a/seed0 and runs/b/seed0): qualify by parent
    names = [f"{r.parent.name}/{n}" if counts[n] > 1 else n for r, n in zip(roots, names)]
    return [_Run(root, name, f"run-{i}") for i, (root, name) in enumerate(zip(roots, names))]


# --------------------------------------------------------------------------- public API


def render_report(
    run_dirs: Sequence[str | Path],
    title: str = "veil report",
    tables: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The report page as an HTML string (see :func:`write_report`)."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise RecordError("no run folders given for the report")
    runs = _load_runs(run_dirs)  # validates every run before anything is drawn
    summary = []
    for i, table in enumerate(tables):
        try:
            summary.append(json_table_html(table, name=f"table {i + 1}"))
        except (ValueError, TypeError) as exc:
            log.warning("report table %d skipped (%s)", i + 1, exc)
            summary.append(f'<p class="note">table {i + 1} skipped: {_esc(exc)}</p>')
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    body = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body><main>",
        "<header>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">generated {_esc(generated)} by veil {_esc(veil.__version__)} \u00b7 {len(runs)} run{"s" if len(runs) != 1 else ""}</p>',
        f'<p class="purpose">{_esc(PURPOSE)}</p>',
        "</header>",
        "<h2>metrics</h2>",
        _metrics_table(runs),
        (
            '<p class="meta">clean acc.: accuracy on the clean test set; ASR: attack success rate on poisoned test '
            "images whose true label differs from the target. PSNR, SSIM, MSE (0\u2013255 scale), LPIPS, L1 (mean "
            "on [0, 1]) and L\u221e (grey levels) compare poisoned with clean test images.</p>"
        ),
        *summary,
        *(_run_section(r) for r in runs),
        f"<footer>veil {_esc(veil.__version__)} \u00b7 self-contained report: every image and style is inside this file</footer>",
        "</main></body>",
        "</html>",
    ]
    return "\n".join(part for part in body if part) + "\n"


def write_report(
    run_dirs: Sequence[str | Path],
    out_file: str | Path,
    title: str = "veil report",
    tables: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write one self-contained HTML report across finished runs.

    Args:
        run_dirs: run folders (see :mod:`veil.records`); each must exist and be finished.
        out_file: the HTML file to write (parent folders are created); written atomically with
            :func:`veil.records.atomic_write_bytes`.
        title: page title and heading.
        tables: report-level tables (e.g. a sweep's summary from :func:`veil.sweep.sweep_table`),
            each ``{"title", "columns", "rows"}`` with optional ``"header"``, ``"left"`` and
            ``"note"`` (see the module docstring); drawn under the metrics table.

    Returns:
        ``out_file`` as a :class:`~pathlib.Path`.

    Raises:
        RecordError: ``run_dirs`` is empty, a run folder is missing or not finished, or its
            ``config.json`` or ``metrics.json`` is unreadable. Nothing is written then.

    Example:
        >>> write_report(["runs/clean", "runs/badnets"], "report.html")  # doctest: +SKIP
        PosixPath('report.html')
    """
    out = Path(out_file)
    page = render_report(run_dirs, title=title, tables=tables)
    atomic_write_bytes(out, page.encode("utf-8"))
    count = 1 if isinstance(run_dirs, (str, Path)) else len(run_dirs)
    log.info("wrote report on %d run(s) to %s", count, out)
    return out
