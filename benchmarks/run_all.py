r"""Every benchmark in one command: prints markdown tables, writes one JSON.

  python benchmarks/run_all.py                       # full run (~40-60 min on a 2-core CPU)
  python benchmarks/run_all.py --quick               # smoke run on tiny shapes (< 1 min)
  python benchmarks/run_all.py --only=train,sampler --json=/tmp/bench.json

Sections (docs/PERFORMANCE.md explains each number):
  train     train-step MFU: achieved FLOP/s (XLA cost analysis of the step / median step time)
            against a float32 matmul peak measured in the same process around every step
            (benchmarks/train_bench.py); tiny and S denoisers, 1 device and data-parallel over
            2/4/8 fake CPU devices (one process per device count)
  encoder   frozen-encoder images/s (benchmarks/encoder_bench.py) and the training speed-up that
            cached tokens give: the tiny train step with the DINOv2-S/14 encoder in-graph vs cached
  data      input pipeline pairs/s vs decode-only (benchmarks/data_bench.py, when present)
  sampler   DDPM-256 and DDIM-50 images/s, tiny and S (benchmarks/sampler_bench.py)
  memory    peak host RSS of a short training run (benchmarks/memory_bench.py) and the compiled
            per-device memory of the step (from the train rows)

--quick runs train, sampler, encoder and memory in ONE process on one device with tiny shapes
(8/16 channels, 16 px, a 2-layer ViT), 1-2 timed calls each: it checks that every section runs
and produces numbers, not what they are. The data section needs --with_data in quick mode.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import train_bench  # noqa: E402

SECTIONS = ("train", "encoder", "data", "sampler", "memory")
QUICK_SETS = ("model.channels=(8,16)", "data.image_size=16", "model.attn_resolution=8",
              "encoder.size=tiny")


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return info


def _table(header: str, rows: list[str]) -> str:
    return "\n".join([header, *rows])


# ============================================================================ quick (one process)
def quick_child(out_path: str) -> None:
    """All sections on tiny shapes in this process (1 CPU device, XLA optimisations off so that
    the compiles are quick: the numbers only show that each section works)."""
    train_bench._set_devices_env(1)
    import resource

    import jax

    jax.config.update("jax_disable_most_optimizations", True)
    import encoder_bench
    import sampler_bench

    result: dict = {}
    cfg = train_bench.bench_config("tiny", 4, QUICK_SETS)
    kept: dict = {}
    row = train_bench.bench_step(cfg, rounds=1, steps_per_round=2, peak_n=512, keep=kept)
    row["config"] = "tiny-quick"
    result["train"] = [row]
    # Encoder: the config's ViT (tiny) forward at the train batch; in quick mode the caching
    # speed-up is estimated as (cached step + encoder forward) / cached step.
    model, params, forward = encoder_bench.build("dinov2", cfg.encoder.size, 14, 28, 28)
    first, per_call = encoder_bench.time_forward(forward, params, cfg.batch_size, 28, 2)
    cached_s = row["step_s_median"]
    result["encoder"] = {
        "rows": [{"size": cfg.encoder.size, "image_size": 28, "batch": cfg.batch_size,
                  "compile_and_first_s": first, "images_per_s": cfg.batch_size / per_call}],
        "caching": {"config": "tiny-quick (estimated: cached step + encoder forward)",
                    "encoder": f"{cfg.encoder.size} ViT at 28 px", "step_s_in_graph": cached_s + per_call,
                    "step_s_cached": cached_s, "speedup": (cached_s + per_call) / cached_s}}
    result["sampler"] = []
    for sampler, steps in (("ddpm", 256), ("ddim", 50)):
        s = sampler_bench.bench_sampler(cfg, sampler=sampler, num_steps=steps, batch=2,
                                        measure_steps=2, repeats=1, **kept)
        s["config"] = "tiny-quick"
        result["sampler"].append(s)
    result["memory"] = {"runs": [{"config": "tiny-quick (this benchmark process)",
                                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}],
                        "compiled": [{"config": r["config"], "devices": r["devices"], "batch": r["batch"],
                                      **r["compiled_bytes_per_device"]} for r in result["train"]]}
    with open(out_path, "w") as f:
        json.dump(result, f)


# ============================================================================ full sections
def run_train(args) -> list[dict]:
    rows = []
    plan = [("tiny", d) for d in args.tiny_devices] + [("S", d) for d in args.s_devices]
    for name, devices in plan:
        batch = args.s_batch if name == "S" else train_bench.DEFAULT_BATCH[name]
        rounds, steps = (3, 3) if name == "tiny" else (args.s_rounds, 2)
        try:
            rows.append(train_bench.run_child(name, devices, batch,
                                              [f"--rounds={rounds}", f"--steps={steps}"]))
            print(train_bench.format_row(rows[-1]), flush=True)
        except Exception as e:  # one failed row should not lose the others
            print(f"| {name} | {devices} | failed: {str(e).splitlines()[0][:100]} |", flush=True)
    return rows


def run_encoder(args) -> dict:
    out = os.path.join(tempfile.mkdtemp(prefix="bench_enc_"), "encoder.json")
    cmd = [sys.executable, os.path.join(HERE, "encoder_bench.py"), "--sizes=S,B",
           "--resolutions=28,224", "--iters=3", f"--json={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
    print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith("|")), flush=True)
    result = json.load(open(out)) if os.path.exists(out) else {"error": proc.stderr[-2000:]}
    # Training speed-up from cached tokens: the tiny step with the encoder in-graph vs cached.
    cached = train_bench.run_child("tiny", 2, 32, ["--rounds=2", "--steps=3"])
    ingraph = train_bench.run_child("tiny", 2, 32, ["--rounds=2", "--steps=3",
                                                    "--set=encoder.cached_tokens=False"])
    result["caching"] = {"config": "tiny (batch 32, 2 devices)", "encoder": "DINOv2-S/14 at 28 px",
                         "step_s_in_graph": ingraph["step_s_median"],
                         "step_s_cached": cached["step_s_median"],
                         "speedup": ingraph["step_s_median"] / cached["step_s_median"]}
    c = result["caching"]
    print(f"tiny train step: encoder in-graph {c['step_s_in_graph']:.3f} s, cached tokens "
          f"{c['step_s_cached']:.3f} s: caching is {c['speedup']:.2f}x faster", flush=True)
    return result


def run_data(args) -> dict:
    script = os.path.join(HERE, "data_bench.py")
    if not os.path.exists(script):
        return {"skipped": "benchmarks/data_bench.py is not present"}
    out = os.path.join(tempfile.mkdtemp(prefix="bench_data_"), "data.json")
    cmd = [sys.executable, script, f"--out={out}"]
    if args.quick:
        cmd += ["--pages=24", "--pairs=64", "--repeats=1", "--skip_multiprocess"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
    print("\n".join(ln for ln in proc.stdout.splitlines() if ln.strip()), flush=True)
    if os.path.exists(out):
        return json.load(open(out))
    return {"error": f"data_bench.py exited {proc.returncode}: {proc.stderr[-2000:]}"}


def run_sampler(args) -> list[dict]:
    rows = []
    plan = [("tiny", "ddpm", 256, 8, 0), ("tiny", "ddim", 50, 8, 0),
            ("S", "ddpm", 256, 2, 4), ("S", "ddim", 50, 2, 4)]
    print(_table(__import__("sampler_bench").HEADER, []), flush=True)
    import sampler_bench
    for name, sampler, steps, batch, measure in plan:
        cmd = [sys.executable, os.path.join(HERE, "sampler_bench.py"), f"--config={name}",
               f"--sampler={sampler}", f"--num_steps={steps}", f"--batch={batch}",
               f"--measure_steps={measure}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
        got = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if got:
            rows.append(got[-1])
            print(sampler_bench.format_row(got[-1]), flush=True)
        else:
            print(f"| {name} | {sampler} failed: {proc.stderr[-300:]} |", flush=True)
    return rows


def run_memory(args, train_rows) -> dict:
    import memory_bench
    runs = []
    for name, steps, devices, batch in (("tiny", 20, 2, 32), ("S", 2, 2, 8)):
        try:
            runs.append(memory_bench.measure(name, steps=steps, devices=devices, batch=batch))
            r = runs[-1]
            print(f"peak RSS of a {r['train_steps']}-step {name} training run (batch {batch}, "
                  f"{devices} devices): {r['peak_rss_mib']:.0f} MiB", flush=True)
        except Exception as e:
            print(f"memory run {name} failed: {str(e)[:300]}", flush=True)
    compiled = [{"config": r["config"], "devices": r["devices"], "batch": r["batch"],
                 **(r["compiled_bytes_per_device"] or {})} for r in train_rows]
    return {"runs": runs, "compiled": compiled}


# ============================================================================ report
def report(result: dict) -> str:
    lines = []
    if result.get("train"):
        lines += ["### Train step (MFU = achieved / same-process float32 matmul peak)",
                  train_bench.HEADER, *[train_bench.format_row(r) for r in result["train"]], ""]
    enc = result.get("encoder") or {}
    if enc.get("rows"):
        lines += ["### Encoder", "| size | px | batch | images/s |", "|---|---|---|---|",
                  *[f"| {r['size']} | {r['image_size']} | {r['batch']} | {r['images_per_s']:.1f} |"
                    for r in enc["rows"]], ""]
    if enc.get("caching"):
        c = enc["caching"]
        lines += [f"Cached tokens ({c['config']}, {c['encoder']}): step {c['step_s_in_graph']:.3f} s "
                  f"in-graph vs {c['step_s_cached']:.3f} s cached = {c['speedup']:.2f}x", ""]
    if result.get("sampler"):
        import sampler_bench
        lines += ["### Sampler", sampler_bench.HEADER,
                  *[sampler_bench.format_row(r) for r in result["sampler"]], ""]
    mem = result.get("memory") or {}
    if mem:
        lines += ["### Memory"]
        for r in mem.get("runs", []):
            lines.append(f"- peak RSS, {r['config']}: {r['peak_rss_mib']:.0f} MiB")
        for r in mem.get("compiled", []):
            if r.get("temp") is not None:
                lines.append(f"- compiled step, {r['config']} on {r['devices']} device(s): "
                             f"arguments {r['arguments'] / 2**20:.0f} MiB, temporaries "
                             f"{r['temp'] / 2**20:.0f} MiB, outputs {r['outputs'] / 2**20:.0f} MiB per device")
        lines.append("")
    data = result.get("data")
    if data:
        lines += ["### Input pipeline", "```", json.dumps(data, indent=1)[:3000], "```"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--with_data", action="store_true", help="quick mode: run the data section too")
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--json", default=os.path.join(HERE, "results.json"))
    p.add_argument("--tiny_devices", default="1,2")
    # 4 and 8 fake devices need > 24 GiB for S: every device holds a full replica of params, EMA
    # and both Adam moments (1.4 GB) plus its activations.
    p.add_argument("--s_devices", default="1,2")
    p.add_argument("--s_batch", type=int, default=8)
    p.add_argument("--s_rounds", type=int, default=2)
    p.add_argument("--quick_child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick_child:
        quick_child(args.quick_child)
        return {}
    args.tiny_devices = [int(d) for d in args.tiny_devices.split(",") if d]
    args.s_devices = [int(d) for d in args.s_devices.split(",") if d]
    only = set(args.only.split(","))
    t0 = time.time()
    result: dict = {"machine": machine(), "quick": bool(args.quick)}
    if args.quick:
        out = os.path.join(tempfile.mkdtemp(prefix="bench_quick_"), "quick.json")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--quick_child={out}"],
                              capture_output=True, text=True, cwd=REPO, timeout=1800)
        if proc.returncode or not os.path.exists(out):
            raise RuntimeError(f"quick benchmark failed:\n{proc.stderr[-3000:]}")
        result.update({k: v for k, v in json.load(open(out)).items() if k in only})
        if args.with_data and "data" in only:
            result["data"] = run_data(args)
        else:
            result["data"] = {"skipped": "quick mode (pass --with_data)"}
    else:
        if "train" in only:
            print(train_bench.HEADER, flush=True)
            result["train"] = run_train(args)
        if "encoder" in only:
            result["encoder"] = run_encoder(args)
        if "data" in only:
            result["data"] = run_data(args)
        if "sampler" in only:
            result["sampler"] = run_sampler(args)
        if "memory" in only:
            result["memory"] = run_memory(args, result.get("train", []))
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.time() - t0
    print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print("wrote", args.json)
    return result


if __name__ == "__main__":
    main()
