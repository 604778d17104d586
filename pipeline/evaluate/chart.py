"""The metrics chart: model vs cross-entropy model vs constant-caption baseline vs shuffled-image control."""
from __future__ import annotations

import io
from typing import Mapping, Optional

CHART_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "clip_s",
                 "refclip_s")
LABELS = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4",
          "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE", "clip_s": "CLIP-S",
          "refclip_s": "RefCLIP-S"}


def metrics_chart(
    model: Mapping[str, float],
    baseline: Optional[Mapping[str, float]] = None,
    control: Optional[Mapping[str, float]] = None,
    xe: Optional[Mapping[str, float]] = None,
) -> bytes:
    """A grouped bar chart as PNG bytes; a series is drawn only where it has the metric."""
    # The Agg canvas on a bare Figure: no display, no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [m for m in CHART_METRICS if isinstance(model.get(m), (int, float))]
    series = [("model", model, "#1f77b4"), ("cross-entropy model (before SCST)", xe, "#2ca02c"),
              ("constant baseline", baseline, "#ff7f0e"), ("shuffled-image control", control, "#7f7f7f")]
    series = [s for s in series if s[1]]
    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 2), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for n, (label, values, colour) in enumerate(series):
        xs = [i + (n - (len(series) - 1) / 2) * width for i in range(len(names))]
        ys = [float(values.get(m) or 0.0) for m in names]
        bars = ax.bar(xs, ys, width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(names)), [LABELS[m] for m in names])
    ax.set_ylabel("score")
    ax.set_title("Caption metrics (pycocoevalcap; CLIPScore)")
    ax.margins(y=0.2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
