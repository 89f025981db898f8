"""Plots of eval results (matplotlib, drawn off-screen) as uint8 RGB arrays: PNGs beside the
eval JSON, TensorBoard images, the model card's figures.

  per_class_bars(result)      class-consistency per class and guidance scale, with the judge's
                              accuracy on real images of each class (its ceiling) marked
  tradeoff_plot({name: result})  class-consistency vs pixel diversity over the guidance scales,
                              one curve per result (e.g. pairs vs reconstruction), with the
                              real images' diversity and the judge's ceiling marked

A result is the eval job's dict (`by_guidance` -> numbers incl. `per_group`); class-consistency
is the judge's where the result has it, else the probe's.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # off-screen: no display on servers, same pixels everywhere
    import matplotlib.pyplot as plt

    return plt


def _to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    out = np.array(rgba[..., :3], np.uint8)
    _pyplot().close(fig)
    return out


def consistency_key(result: dict) -> str:
    """The class-consistency the plots show: the judge's where present, else the probe's."""
    first = next(iter(result["by_guidance"].values()))
    return "class_consistency_judge" if "class_consistency_judge" in first else "class_consistency"


def per_class_bars(result: dict, class_names: Sequence[str] = ()) -> np.ndarray:
    """Grouped bars: class-consistency of each class (x) at each guidance scale (one colour
    each); a black tick per class marks the judge's accuracy on that class's real images."""
    from semantica_jax.images import class_names_for

    plt = _pyplot()
    key = consistency_key(result)
    by = result["by_guidance"]
    groups = [e["group"] for e in next(iter(by.values()))["per_group"]]
    names = class_names_for(groups, tuple(class_names))
    n, k = len(groups), len(by)
    width = 0.8 / max(k, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * n + 2.0), 3.6), dpi=100)
    x = np.arange(n)
    for i, (g, r) in enumerate(by.items()):
        values = {e["group"]: e.get(key, np.nan) for e in r["per_group"]}
        ax.bar(x - 0.4 + width * (i + 0.5), [values.get(gr, np.nan) for gr in groups], width,
               label=f"guidance {g} (mean {r[key]:.2f})")
    ceiling = result.get("judge_accuracy_real_per_group") if key == "class_consistency_judge" else None
    if ceiling:
        ax.scatter(x, [ceiling.get(gr, np.nan) for gr in groups], marker="_", s=400, c="black", zorder=3,
                   label="judge on real images (ceiling)")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.3)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("class-consistency" + (" (judge)" if key == "class_consistency_judge" else " (probe)"))
    ax.set_title(f"{result.get('tag', '')}: class-consistency per class", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=k + 1, frameon=False)
    fig.tight_layout()
    return _to_array(fig)


def tradeoff_plot(results: Mapping[str, dict], title: str = "class-consistency vs diversity") -> np.ndarray:
    """One curve per named result: (pixel diversity, class-consistency) at each guidance scale,
    points labelled with the scale; dashed lines at the real same-class images' pixel diversity
    and at the judge's accuracy on real images."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=100)
    real_div, ceiling = [], []
    for name, result in results.items():
        key = consistency_key(result)
        by = result["by_guidance"]
        xs = [r["pixel_diversity"] for r in by.values()]
        ys = [r[key] for r in by.values()]
        ax.plot(xs, ys, marker="o", label=name)
        for g, xv, yv in zip(by, xs, ys):
            ax.annotate(f"g{g}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
        real_div += [r.get("pixel_diversity_real") for r in by.values() if r.get("pixel_diversity_real")]
        if key == "class_consistency_judge" and result.get("judge_accuracy_real"):
            ceiling.append(result["judge_accuracy_real"])
    if real_div:
        ax.axvline(float(np.mean(real_div)), ls="--", c="grey", lw=1, label="real same-class diversity")
    if ceiling:
        ax.axhline(float(np.mean(ceiling)), ls=":", c="black", lw=1, label="judge on real images")
    ax.set_xlabel("pixel diversity among one condition's variations")
    ax.set_ylabel("class-consistency")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _to_array(fig)
