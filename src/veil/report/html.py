"""One self-contained HTML report over run records.

``write_report(run_dirs, out_file)`` writes a single page with no network access needed to view it:
images are embedded as base64 PNG data URIs and the style sheet is inline. It holds a metrics table
across runs and, per run, the clean / poisoned / amplified-residual image grid, the
modification-magnitude histogram (Table 3 of the multinomial paper), the training curve, and any
figures (``RUN/figures/*.png``) and tables (``RUN/tables/*.json``) that defenses or sweeps added.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import veil
from veil import records as rec
from veil.records import RunRecord, atomic_write_bytes
from veil.report.images import png_bytes, sample_grid

log = logging.getLogger(__name__)

PURPOSE = (
    "veil exists so that defenses get tested against the strongest invisible backdoor attacks before "
    "attackers use them; use it for research on models and data you own."
)

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1300px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:36px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{margin:18px 0 6px} .meta{color:#666;font-size:.9em} .purpose{background:#f4f6fa;border-left:4px solid #5470c6;padding:8px 12px}
table{border-collapse:collapse;margin:8px 0;font-size:.88em} th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#eef1f6} td.l,th.l{text-align:left} tr:nth-child(even) td{background:#fafafa}
.scroll{overflow-x:auto} figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}
figcaption{font-size:.85em;color:#555} img.px{image-rendering:pixelated} .row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.note{color:#8a5a00;font-size:.9em}
"""


def _img(data: bytes, alt: str, pixelated: bool = False, width: int | None = None) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    cls = ' class="px"' if pixelated else ""
    w = f' width="{width}"' if width else ""
    return f'<img{cls}{w} alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _num(value: Any, spec: str = ".4f", percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, (int, float)):
        return f"{value * 100:.2f}" if percent else format(value, spec)
    return html.escape(str(value))


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(c))}</th>' for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="{"l" if i < left else ""}">{c if isinstance(c, _Raw) else html.escape(str(c))}</td>'
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _poison_text(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    if config.get("attack") == "none":
        return "–"
    count = metrics.get("poison_count")
    if config.get("poison_count"):
        return f"{config['poison_count']}"
    rate = config.get("poison_rate")
    return f"{rate} ({count})" if rate is not None else str(count)


def _summary_rows(runs: list[tuple[str, RunRecord, dict[str, Any], dict[str, Any]]]) -> list[list[Any]]:
    rows = []
    for name, _, config, m in runs:
        s = m.get("stealth") or {}
        t = m.get("timings") or {}
        rows.append([
            name,
            config.get("attack", "–"),
            config.get("dataset", "–"),
            config.get("model", "–"),
            _num(config.get("width"), "d"),
            _num(config.get("image_size"), "d"),
            _num(config.get("epochs"), "d"),
            _poison_text(config, m),
            _num(config.get("target"), "d"),
            _num(m.get("clean_accuracy"), percent=True),
            _num(m.get("attack_success_rate"), percent=True),
            _num(s.get("psnr"), ".2f"),
            _num(s.get("ssim"), ".4f"),
            _num(s.get("mse"), ".3f"),
            _num(s.get("lpips"), ".5f"),
            _num(s.get("l1"), ".5f"),
            _num(s.get("linf"), "d"),
            _num(t.get("train_seconds"), ".0f"),
        ])
    return rows


def _history_chart(history: list[dict[str, Any]]) -> bytes | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.get("epoch") for h in history]
    fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=100)
    for key, label in (("clean_accuracy", "clean accuracy"), ("attack_success_rate", "attack success rate")):
        ys = [h.get(key) for h in history]
        if any(y is not None for y in ys):
            ax.plot(epochs, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _run_section(name: str, record: RunRecord, config: dict[str, Any], m: dict[str, Any]) -> str:
    parts = [f'<h2 id="{html.escape(name)}">{html.escape(name)}</h2>']
    parts.append(
        f'<p class="meta">attack <b>{html.escape(str(config.get("attack")))}</b> · dataset '
        f'{html.escape(str(config.get("dataset")))} · model {html.escape(str(config.get("model")))} · seed '
        f'{html.escape(str(config.get("seed")))} · folder {html.escape(str(record.root))}</p>'
    )
    env = {}
    if record.path(rec.ENVIRONMENT).is_file():
        env = record.environment()
        parts.append(
            f'<p class="meta">veil {html.escape(str(env.get("veil_version")))} · torch '
            f'{html.escape(str(env.get("torch_version")))} · device {html.escape(str(env.get("device")))} · git '
            f'{html.escape(str(env.get("git_sha") or "–")[:12])}</p>'
        )
    for note in m.get("notes") or []:
        parts.append(f'<p class="note">{html.escape(str(note))}</p>')
    row = []
    if record.path(rec.SAMPLES).is_file():
        samples = record.samples()
        grid = sample_grid(samples["clean"], samples["poisoned"], scale=3)
        row.append(f"<figure>{_img(png_bytes(grid), 'clean, poisoned and amplified residual', pixelated=True)}"
                   "<figcaption>clean (top), poisoned (middle), amplified residual |poisoned − clean| (bottom)</figcaption></figure>")
    chart = _history_chart(record.history())
    if chart:
        row.append(f"<figure>{_img(chart, 'training curve')}<figcaption>per-epoch clean accuracy and attack success rate</figcaption></figure>")
    if row:
        parts.append(f'<div class="row">{"".join(row)}</div>')
    hist = (m.get("stealth") or {}).get("histogram")
    if hist:
        parts.append("<h3>Modification magnitude (share of sub-pixels, %)</h3>")
        parts.append(_table(["grey levels", *hist.keys()], [["share %", *(f"{v:.3f}" for v in hist.values())]]))
    history = record.history()
    if history:
        parts.append("<h3>Training history</h3>")
        parts.append(_table(
            ["epoch", "loss", "train acc %", "clean acc %", "ASR %", "seconds"],
            [[h.get("epoch"), _num(h.get("loss")), _num(h.get("train_accuracy"), percent=True),
              _num(h.get("clean_accuracy"), percent=True), _num(h.get("attack_success_rate"), percent=True),
              _num(h.get("seconds"), ".1f")] for h in history],
        ))
    parts.extend(_extras(record))
    return "\n".join(parts)


def _extras(record: RunRecord) -> list[str]:
    """Figures and tables added to the run by defenses, sweeps and later analyses."""
    parts: list[str] = []
    for folder in sorted({p.parent for p in record.root.rglob("figures/*.png")}):
        figs = sorted(folder.glob("*.png"))
        rel = folder.relative_to(record.root)
        parts.append(f"<h3>Figures ({html.escape(str(rel))})</h3><div class=\"row\">")
        for f in figs:
            parts.append(f"<figure>{_img(f.read_bytes(), f.stem)}<figcaption>{html.escape(f.name)}</figcaption></figure>")
        parts.append("</div>")
    for f in sorted(record.root.rglob("tables/*.json")):
        try:
            t = json.loads(f.read_text())
            parts.append(f"<h3>{html.escape(str(t.get('title', f.stem)))}</h3>")
            parts.append(_table([str(c) for c in t["columns"]], [[_cell(v) for v in r] for r in t["rows"]]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("skipping unreadable table %s (%s)", f, exc)
    return parts


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def write_report(run_dirs: Sequence[str | Path], out_file: str | Path, title: str = "veil report") -> Path:
    """Write one self-contained HTML page over finished runs.

    Args:
        run_dirs: run folders (each must hold a finished run).
        out_file: the HTML file to write (atomically).
        title: page title.

    Raises:
        RecordError: a folder is missing or not a finished run.
    """
    runs = []
    names: dict[str, int] = {}
    for d in run_dirs:
        record = RunRecord(d).require()
        name = record.root.name or str(record.root)
        if name in names:  # two folders with the same name: qualify by parent
            name = f"{record.root.parent.name}/{name}"
        names[name] = 1
        runs.append((name, record, record.config(), record.metrics()))
    columns = ["run", "attack", "dataset", "model", "width", "size", "epochs", "poison rate (count)", "target",
               "clean acc %", "ASR %", "PSNR", "SSIM", "MSE", "LPIPS", "L1", "L-inf", "train s"]
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">generated {now} by veil {html.escape(veil.__version__)} · {len(runs)} run(s)</p>',
        f'<p class="purpose">{html.escape(PURPOSE)}</p>',
        "<h2>Metrics</h2>",
        _table(columns, _summary_rows(runs), left=4),
        '<p class="meta">Clean accuracy on the whole test set; attack success rate over test images whose true label '
        "differs from the target; PSNR, SSIM and MSE on the 0–255 scale, L1 = Σ|x−x′|/(C·H·W) on [0, 1], L-inf in grey "
        "levels, averaged over poisoned test images.</p>",
    ]
    body.extend(_run_section(name, record, config, m) for name, record, config, m in runs)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    out = Path(out_file)
    atomic_write_bytes(out, page.encode("utf-8"))
    log.info("wrote report %s (%d runs)", out, len(runs))
    return out
