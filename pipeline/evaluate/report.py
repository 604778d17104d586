"""The HTML report: one self-contained file, every string from the data escaped.

Captions, references, image ids and reasons come from users' data, so each is
passed through ``html.escape`` before it touches the page; the only script is the
constant sorting code below. Thumbnails are embedded as data URIs.
"""
from __future__ import annotations

import base64
import io
import logging
from html import escape
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Optional

from tqdm import tqdm

from pipeline.evaluate.chart import CHART_METRICS, LABELS

log = logging.getLogger(__name__)
# Thumbnails come from downloaded images; refuse to decode anything bigger than this.
MAX_THUMB_PIXELS = 64_000_000
TABLE_METRICS = ("cider", "bleu_4", "meteor", "rouge_l", "spice", "clip_s", "refclip_s", "control_clip_s",
                 "xe_cider")
COLUMN_LABELS = {**LABELS, "control_clip_s": "control CLIP-S", "xe_cider": "cross-entropy CIDEr"}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}
#images th{cursor:pointer;user-select:none}
#images th:after{content:" \\2195";color:#999}
td.num{text-align:right;font-variant-numeric:tabular-nums}
ul{margin:0;padding-left:1.2em}
.gen{font-weight:600}
.ctl{color:#777;font-size:90%}
.note{color:#555}
"""
# Sorts the images table by the clicked column; numbers by data-v, text otherwise.
_SCRIPT = """
document.querySelectorAll('#images th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = document.querySelector('#images tbody');
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col], y = b.cells[col];
      var u = x.dataset.v, v = y.dataset.v, r;
      if (u !== undefined && v !== undefined) { r = parseFloat(u) - parseFloat(v); }
      else { r = x.textContent.localeCompare(y.textContent); }
      return asc ? r : -r;
    });
    rows.forEach(function(row){ body.appendChild(row); });
  });
});
"""


def thumbnail_uri(image: bytes, size: int) -> Optional[str]:
    """A JPEG data URI of at most size×size pixels, or None for an unreadable image."""
    from pipeline.formats.imaging import open_image

    try:
        with open_image(image) as img:
            if img.width * img.height > MAX_THUMB_PIXELS:
                return None
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=80)
    except Exception:  # a hostile image raises anything; it only loses its thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def collect_thumbnails(images_dir: Path, keys: Iterable[str], size: int) -> dict[str, str]:
    """Thumbnails of the wanted keys found in the image tar shards (missing ones are left out)."""
    from pipeline.formats.image_shards import ImageShardError, iter_shard, list_shards

    wanted = set(keys)
    found: dict[str, str] = {}
    for shard in tqdm(list_shards(images_dir), desc="report thumbnails", unit="shard"):
        if len(found) == len(wanted):
            break
        try:
            for sample in iter_shard(shard):
                key = sample.key if sample.key in wanted else sample.key.rpartition("/")[2]
                if key in wanted and key not in found and sample.image:
                    uri = thumbnail_uri(sample.image, size)
                    if uri:
                        found[key] = uri
        except ImageShardError as err:
            log.warning("report: skipping thumbnails of %s (%s)", shard, err)
    return found


def select_rows(per_image: Mapping[Hashable, Mapping[str, float]], limit: int) -> list[Hashable]:
    """Image ids best CIDEr first; when there are more than ``limit``, the best and worst halves."""
    order = sorted(per_image, key=lambda i: -per_image[i]["cider"])
    if len(order) <= limit:
        return order
    best = (limit + 1) // 2
    return order[:best] + order[len(order) - (limit - best):]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else escape(str(value))


def _summary(metrics: Mapping[str, Any]) -> str:
    has_xe = any(f"xe_{m}" in metrics for m in CHART_METRICS)
    columns = [("", "model"), *([("xe_", "cross-entropy model (before SCST)")] if has_xe else []),
               ("baseline_", "constant baseline"), ("control_", "shuffled-image control")]
    head = "<tr><th>metric</th>" + "".join(f"<th>{escape(label)}</th>" for _, label in columns) + "</tr>"
    rows = []
    for m in CHART_METRICS:
        if m not in metrics:
            continue
        cells = [metrics.get(f"{prefix}{m}", "–") for prefix, _ in columns]
        rows.append(f"<tr><th>{LABELS[m]}</th>" + "".join(f'<td class="num">{_fmt(c)}</td>' for c in cells) + "</tr>")
    notes = []
    for key, text in (("images", "images scored"), ("cider_vs_xe", "CIDEr ÷ cross-entropy model's CIDEr"),
                      ("cider_vs_baseline", "CIDEr ÷ baseline CIDEr"),
                      ("cider_vs_control", "CIDEr ÷ control CIDEr"), ("baseline_caption", "baseline caption"),
                      ("clipscore_model", "CLIPScore model"), ("clipscore_skipped", "CLIPScore skipped"),
                      ("spice_skipped", "SPICE skipped"), ("baseline_skipped", "baseline skipped"),
                      ("control_skipped", "control skipped"), ("xe_skipped", "cross-entropy model skipped"),
                      ("images_without_result", "reference images without a result")):
        if metrics.get(key) is not None:
            notes.append(f"<tr><th>{escape(text)}</th><td colspan={len(columns)}>{_fmt(metrics[key])}</td></tr>")
    return f"<table id=summary>{head}{''.join(rows)}{''.join(notes)}</table>"


def render_report(
    metrics: Mapping[str, Any],
    per_image: Mapping[Hashable, Mapping[str, float]],
    captions: Mapping[Hashable, str],
    references: Mapping[Hashable, list[str]],
    limit: int,
    thumbnails: Optional[Mapping[str, str]] = None,
    control_captions: Optional[Mapping[Hashable, str]] = None,
    chart_png: Optional[bytes] = None,
    title: str = "Caption evaluation",
    xe_captions: Optional[Mapping[Hashable, str]] = None,
) -> str:
    """The report as one HTML string."""
    thumbnails = thumbnails or {}
    ids = select_rows(per_image, limit)
    metric_cols = [m for m in TABLE_METRICS if any(m in per_image[i] for i in ids)]
    show_images = bool(thumbnails)  # no image column at all when there are no thumbnails
    head = ("<tr><th>rank</th>" + ("<th>image</th>" if show_images else "")
            + "<th>image id</th><th>generated caption</th><th>references</th>"
            + "".join(f"<th>{escape(COLUMN_LABELS[m])}</th>" for m in metric_cols) + "</tr>")
    rank_of = {i: r for r, i in enumerate(sorted(per_image, key=lambda i: -per_image[i]["cider"]), 1)}
    body = []
    for i in ids:
        thumb = thumbnails.get(str(i))
        img = f'<img src="{escape(thumb)}" alt="">' if thumb else '<span class="note">no image</span>'
        img = f"<td>{img}</td>" if show_images else ""
        refs = "".join(f"<li>{escape(r)}</li>" for r in references[i])
        ctl = ""
        if control_captions and i in control_captions:
            ctl = f'<div class="ctl">control: {escape(control_captions[i])}</div>'
        if xe_captions and i in xe_captions:
            ctl = f'<div class="ctl">cross-entropy model: {escape(xe_captions[i])}</div>' + ctl
        scores = "".join(f'<td class="num" data-v="{per_image[i][m]!r}">{per_image[i][m]:.3f}</td>'
                         if isinstance(per_image[i].get(m), float) else '<td class="num">–</td>' for m in metric_cols)
        body.append(
            f'<tr><td class="num" data-v="{rank_of[i]}">{rank_of[i]}</td>{img}<td>{escape(str(i))}</td>'
            f'<td><div class="gen">{escape(captions[i])}</div>{ctl}</td><td><ul>{refs}</ul></td>{scores}</tr>'
        )
    shown = (f"all {len(ids)} images" if len(ids) == len(per_image)
             else f"the best {(limit + 1) // 2} and worst {limit - (limit + 1) // 2} of {len(per_image)} images")
    chart = ""
    if chart_png:
        chart = f'<p><img alt="metrics chart" src="data:image/png;base64,{base64.b64encode(chart_png).decode("ascii")}"></p>'
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>{_summary(metrics)}{chart}"
        f"<h2>Images</h2><p class=note>Showing {shown}, best CIDEr first; click a column header to sort.</p>"
        f"<table id=images><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
