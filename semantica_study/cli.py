r"""The paper-claims study: train every arm of a study file, evaluate it, write REPORT.md.

  bash launch/study.sh                                   # set-up + data + the tiny study
  python -m semantica_study --study=experiments/study_tiny.py --out=studies/tiny
  python -m semantica_study --study=... --only=pairs,reconstruction --seeds=0
  python -m semantica_study --study=... --smoke      # 6 steps, a 2-step eval: wiring only
  python -m semantica_study --study=... --report_only
  python -m semantica_study --study=... --dry_run    # print the commands, run nothing

A study file (experiments/study_*.py) defines `get_study(arg=None) -> dict` (docs/STUDY.md):
arms (name, experiment config spec, seeds, overrides, the claims they serve), the claims (tables
and the checks that turn numbers into verdicts), the guidance scales the tables show, the limits.

For every arm x seed, in `<out>/<arm>/seed<k>/` (sequentially, each phase in a subprocess with a
fresh JAX and `--cpu_devices` fake CPU devices unless XLA_FLAGS already sets a count):
  train    `python -m semantica_jax.main --config=<spec> --workdir=<dir> --config.seed=<k> ...`
           (log: train.log); resumes from the workdir's checkpoints; skipped when metrics.json
           records the requested final step
  eval     `python -m semantica_study _eval <request.json>` (log: eval.log): export of the final
           checkpoint to <dir>/export, then the few-shot eval job on it (`run_eval_job(config,
           dir, export_dir=...)`, the arm's config with the study's `eval.*` overrides);
           skipped when <dir>/eval/export_step_<S>.json exists for the same eval settings
  status   study_status.json: what ran, exit codes, wall seconds per phase (accumulated)
Then `<out>/REPORT.md` + `<out>/report.json` + `<out>/grids/*.png` from whatever results exist
(missing arms are listed as not run). Verdicts are computed from the numbers with the thresholds
printed next to them; nothing in the report is written by hand.

Overrides (`key=value`, dotted config keys): `eval.*` keys go to the eval job only (they never
reach training, so changing them never blocks a resume), all others to training as
`--config.<key>=<value>` flags. Precedence: study < arm < `--set` < `--steps`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from semantica_study.report import write_report
from semantica_study.runner import eval_worker, log_line, run_study, shell_quote
from semantica_study.spec import (
    REPO, REPORT_MD, SMOKE_OVERRIDES, StudyError, load_study, parse_override
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_eval"]:
        return eval_worker(argv[1])
    parser = argparse.ArgumentParser(prog="semantica-study", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=os.path.join(REPO, "experiments", "study_tiny.py"),
                        help="study file[:arg] (default experiments/study_tiny.py)")
    parser.add_argument("--out", default=None, help="study directory (default studies/<name>, +_smoke with --smoke)")
    parser.add_argument("--only", default="", help="comma-separated arms to run (the report covers all)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds to run (default: each arm's own)")
    parser.add_argument("--steps", type=int, default=0, help="override train.num_steps of every arm")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every arm (eval.* -> eval job only); repeatable")
    parser.add_argument("--smoke", action="store_true",
                        help="6 train steps and a tiny eval per arm (checks the wiring, not the claims)")
    parser.add_argument("--report_only", action="store_true", help="write the report from existing results")
    parser.add_argument("--dry_run", action="store_true", help="print each arm's commands, run nothing")
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="fake CPU devices for the runs (default: 2 unless XLA_FLAGS sets a count; "
                             "0 = leave XLA_FLAGS as it is)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the subprocesses")
    parser.add_argument("--compile_cache", default=None,
                        help="JAX compilation cache shared by the runs (default <out>/jax_cache; '' = none)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        out = args.out or os.path.join("studies", study["name"] + ("_smoke" if args.smoke else ""))
        out = os.path.abspath(out)
        cli: dict[str, Any] = dict(SMOKE_OVERRIDES) if args.smoke else {}
        cli.update(dict(parse_override(s) for s in args.set))
        if args.steps:
            cli["train.num_steps"] = int(args.steps)
        only = [x for x in args.only.split(",") if x.strip()]
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or None
        command = "python -m semantica_study " + " ".join(shell_quote(a) for a in argv)
        failed = []
        if not args.report_only:
            statuses = run_study(study, out, only=only, seeds=seeds, cli_overrides=cli, python=args.python,
                                 cpu_devices=args.cpu_devices, dry_run=args.dry_run,
                                 compile_cache=args.compile_cache)
            failed = [k for k, v in statuses.items() if v.get("state") not in ("done", None)]
            if args.dry_run:
                return 0
        write_report(study, out, command=command)
    except StudyError as e:
        print(f"semantica-study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semantica-study: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    log_line(f"report: {os.path.join(out, REPORT_MD)}")
    if failed:
        log_line(f"FAILED: {', '.join(failed)} (see their train.log / eval.log)")
        return 1
    return 0


def run() -> None:
    """Console-script entry (`semantica-study`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
