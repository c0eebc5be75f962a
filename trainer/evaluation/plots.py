"""The figures researchers read a run by, as PNG bytes: metric-against-CFG curves of a sampler sweep and held-out loss
per timestep against training steps.

matplotlib's object API (`Figure`, no pyplot): no global figure state and no display backend inside a Ray job.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

SAMPLER_COLOURS = {"euler": "tab:blue", "heun": "tab:orange", "rk4": "tab:green"}
STEP_MARKERS = ("o", "s", "^", "D", "v", "P")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def sweep_figure(rows: Sequence[Mapping[str, Any]], metrics: Sequence[tuple[str, str]],
                 chosen: Mapping[str, Any] | None = None, title: str = "") -> bytes:
    """One panel per (metric key, axis label), the metric against CFG scale, one line per sampler and step count.

    `rows` are sweep rows (`sampler`, `steps`, `cfg`, `metrics`); `chosen` (a row's `sampler`/`steps`/`cfg`) is
    ringed in every panel: the setting the headline figures use.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * len(metrics), 4.2), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    step_counts = sorted({row["steps"] for row in rows})
    lines: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        lines.setdefault((row["sampler"], row["steps"]), []).append(row)
    for axis, (key, label) in zip(axes, metrics, strict=True):
        for (sampler, steps), points in sorted(lines.items()):
            points = sorted(points, key=lambda row: row["cfg"])
            axis.plot([row["cfg"] for row in points], [row["metrics"][key] for row in points],
                      color=SAMPLER_COLOURS.get(sampler, "black"),
                      marker=STEP_MARKERS[step_counts.index(steps) % len(STEP_MARKERS)],
                      linestyle="-" if step_counts.index(steps) % 2 == 0 else "--", label=f"{sampler}, {steps} steps")
        if chosen is not None:
            (value,) = [row["metrics"][key] for row in rows
                        if (row["sampler"], row["steps"], row["cfg"]) == (chosen["sampler"], chosen["steps"],
                                                                           chosen["cfg"])]
            axis.plot([chosen["cfg"]], [value], marker="o", markersize=16, markerfacecolor="none",
                      markeredgecolor="red", linestyle="none", label="the demo's setting")
        axis.set_xlabel("CFG scale")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return _png(figure)


def validation_figure(history: Sequence[Mapping[str, float]], title: str = "") -> bytes:
    """Held-out loss against training step: one line per timestep bin (`val_loss_t<t>`) and their mean (`val_loss`)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    history = sorted(history, key=lambda entry: entry["step"])
    steps = [entry["step"] for entry in history]
    bins = sorted({key for entry in history for key in entry if key.startswith("val_loss_t")},
                  key=lambda key: float(key.removeprefix("val_loss_t")))
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axis = figure.subplots()
    colours = colormaps["viridis"]
    for index, key in enumerate(bins):
        axis.plot(steps, [entry.get(key, float("nan")) for entry in history], marker=".",
                  color=colours(index / max(1, len(bins) - 1)), label=f"t = {key.removeprefix('val_loss_t')}")
    axis.plot(steps, [entry["val_loss"] for entry in history], color="black", linestyle="--", linewidth=2,
              label="mean over t")
    axis.set_xlabel("training step")
    axis.set_ylabel("held-out flow-matching loss (velocity MSE)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, title="noise level t (1 = pure noise)", title_fontsize=8)
    if title:
        axis.set_title(title)
    return _png(figure)
