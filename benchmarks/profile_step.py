r"""Where a train step's time goes: per-HLO-op time from a jax.profiler trace, by category.

  python benchmarks/profile_step.py --config=S --devices=1 --batch=4
  python benchmarks/profile_step.py --config=tiny --devices=2 --top=40 --set=model.remat=True

Compiles the trainer's step as benchmarks/train_bench.py does, traces `--steps` calls with
`jax.profiler`, reads the trace's per-op events (XLA:CPU names each thunk after its HLO
instruction) and classifies every instruction by what the compiled HLO says it computes:
convolution (forward / input-grad / filter-grad, told apart by the HLO's dim labels and window),
dot, reduce, transpose/copy, elementwise, collective. Prints the share of each category and the
top ops with their shapes. The trace is kept in `--logdir` (TensorBoard's profile plugin reads it).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_bench  # noqa: E402


def _instructions(hlo_text: str) -> dict[str, str]:
    """instruction name -> its HLO line (every computation), plus fused computations' bodies."""
    lines: dict[str, str] = {}
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            bodies[current] = []
            continue
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if m:
            lines[m.group(1)] = m.group(2)
            if current is not None:
                bodies[current].append(m.group(2))
    out = {}
    for name, text in lines.items():
        called = re.findall(r"calls=%?([\w.\-]+)", text)
        body = " ".join(" ".join(bodies.get(c, [])) for c in called)
        out[name] = text + " || " + body
    return out


PARAM_SHAPES: set = set()  # output shapes of parameters ("f32[3,3,128,128]"), filled by main


def classify(text: str) -> str:
    head = text.split("||")[0]
    out_shape = head.split("{")[0].split(" ")[0]
    if re.search(r"all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all", head):
        return "collective"
    if "convolution(" in text:
        if "lhs_dilate" in text or "rhs_reversal" in text:
            return "conv input-grad"
        m = re.search(r"dim_labels=(\S+?)[,\s]", text)
        if m and m.group(1).startswith("f01b") or (m and "->" in m.group(1) and
                                                    m.group(1).split("_")[0][-1] == "f"
                                                    and m.group(1).split("_")[0][0] != "b"):
            return "conv filter-grad"
        return "conv"
    if out_shape in PARAM_SHAPES and "dot(" not in text:
        return "param-sized (optimizer, EMA)"
    if " dot(" in text or "dot(" in head or "custom-call" in head and "matmul" in text:
        return "dot"
    if "custom-call" in head:
        return "custom-call"
    if "reduce(" in text or "reduce-window" in text:
        return "reduce"
    if re.search(r"\b(transpose|copy)\(", text) and not re.search(r"\b(add|multiply|exponential)\(", text):
        return "transpose/copy"
    return "elementwise/other"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="S")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--logdir", default="")
    p.add_argument("--category", default="", help="list only ops of this category")
    p.add_argument("--dump_hlo", default="", help="write the compiled HLO text here")
    args = p.parse_args(argv)
    train_bench._set_devices_env(args.devices)
    import jax
    from semantica_jax import train

    config = train_bench.bench_config(args.config, args.batch or train_bench.DEFAULT_BATCH[args.config],
                                      tuple(args.set))
    trainer = train.build_trainer(config)
    compiled = trainer.lower_train_step().compile()
    hlo = compiled.as_text()
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(hlo)
    names = _instructions(hlo)
    for leaf in jax.tree.leaves(trainer.abstract_state.params):
        if leaf.size > 1024:
            PARAM_SHAPES.add("f32[" + ",".join(str(d) for d in leaf.shape) + "]")
    state = trainer.init_state(jax.random.PRNGKey(0))
    enc = trainer.load_encoder_params()
    batch = train_bench.random_batch(trainer)
    for _ in range(2):
        state, _, ok = compiled(state, enc, batch)
    jax.block_until_ready(state)
    logdir = args.logdir or tempfile.mkdtemp(prefix="step_profile_")
    t0 = time.perf_counter()
    jax.profiler.start_trace(logdir)
    for _ in range(args.steps):
        state, _, ok = compiled(state, enc, batch)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - t0) / args.steps
    path = sorted(glob.glob(os.path.join(logdir, "plugins/profile/*/*.trace.json.gz")))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in names:
            per_op[e["name"]] += e["dur"] / 1e6 / args.steps
    cats = collections.Counter()
    for n, t in per_op.items():
        cats[classify(names[n])] += t
    total = sum(per_op.values())
    print(f"{args.config} on {args.devices} device(s), batch {config.batch_size}: "
          f"{wall:.3f} s/step wall (traced), {total:.3f} s of op time summed over threads")
    for c, t in cats.most_common():
        print(f"  {c:20s} {t:8.3f} s  {100 * t / total:5.1f} %")
    by_source = collections.Counter()
    for n, t in per_op.items():
        m = re.search(r'op_name="([^"]*)"', names[n].split("||")[0])
        path = m.group(1) if m else "?"
        # drop the jit/jvp/transpose wrappers and module instance names: what remains says which
        # layer kind and primitive produced the op ("GroupNorm ... /reduce_sum").
        parts = [q for q in path.split("/") if not re.match(
            r"^(jit\(.*\)|jvp\(.*\)|transpose\(.*\)|(down|up|mid)_\w+|UNet|while|body|closed_call|"
            r"checkpoint|remat.*|rematted_computation|cond|branch_\d+_fun)$", q)]
        key = "/".join(parts[-2:]) or path
        by_source[key] += t
    print(f"top {args.top} sources (op_name, module instances dropped; s/step):")
    for k, t in by_source.most_common(args.top):
        print(f"  {t:7.3f}  {100 * t / total:5.1f} %  {k[:100]}")
    print(f"top {args.top} ops (s/step):")
    ops = [(n, t) for n, t in per_op.most_common() if not args.category
           or classify(names[n]) == args.category][:args.top]
    for n, t in ops:
        head = names[n].split("||")[0]
        shape = head.split(" ")[0][:60]
        print(f"  {t:7.3f}  {classify(names[n]):18s} {n:32s} {shape}")
    print("trace:", logdir)


if __name__ == "__main__":
    main()
