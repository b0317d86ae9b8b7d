"""Ctrl-C and SIGTERM: a training run's last.pt holds the last completed epoch; say how to go on, exit 130.

In a sweep the way on is the same sweep command into the same folder (`common.check_sweep_dir` resumes it).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from lora_cls.conf.overrides import override_value, split_override
from lora_cls.runs.folder import RunDir


def caused_by_interrupt(exc: BaseException) -> bool:
    """True when a KeyboardInterrupt (Ctrl-C, or SIGTERM via terminate) is in the exception's chain: a library
    that catches it mid-operation and raises its own error still means the user stopped the run."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def interrupted(run_dir: Path, overrides: list[str], training: bool = True, sweep_dir: Path | None = None,
                argv: list[str] | None = None) -> None:
    """Ctrl-C: a training run's last.pt (written at every epoch end) holds the last completed epoch; say how to
    go on. Other commands, and a training run stopped before its first checkpoint, have nothing to resume.
    In a sweep the way on is the same sweep command into the same folder (`check_sweep_dir`)."""
    last = RunDir(run_dir).last
    if training and sweep_dir is None and (Path(run_dir) / "cv.json").is_file():  # a cross-validation
        done = sorted(p.parent.name for p in Path(run_dir).glob("fold_*/metrics.json"))
        print(f"\ninterrupted: the cross-validation's finished folds ({', '.join(done) or 'none yet'}) are kept, "
              f"and the fold in progress goes on from its last completed epoch.\n"
              f"resume with:\n  {run_resume_command(overrides, run_dir)}", file=sys.stderr)
        sys.exit(130)
    if training and sweep_dir is not None:
        command = sweep_resume_command(sys.argv[1:] if argv is None else argv, sweep_dir)
        print(f"\ninterrupted: the sweep stopped in job {run_dir.name}; finished jobs are kept in {sweep_dir}.\n"
              f"resume the sweep with:\n  {command}", file=sys.stderr)
    elif not training:
        print("\ninterrupted.", file=sys.stderr)
    elif not last.is_file():
        print(f"\ninterrupted before the first checkpoint; nothing to resume in {run_dir}.", file=sys.stderr)
    else:
        print(f"\ninterrupted: the epoch in progress is lost; {last} holds the last completed epoch.",
              file=sys.stderr)
        print(f"resume with:\n  {run_resume_command(overrides, run_dir)}", file=sys.stderr)
    sys.exit(130)


def run_resume_command(overrides: list[str], run_dir: str | Path) -> str:
    """The same lora-train command line, into `run_dir` (trainer.resume=auto then continues from its last.pt)."""
    kept = [o for o in overrides if split_override(o)[0] != "hydra.run.dir"]
    return " ".join(["lora-train", *[shlex.quote(o) for o in kept], shlex.quote(f"hydra.run.dir={run_dir}")])


def terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, Slurm pre-emption) stops like Ctrl-C: last.pt kept, resume hint


def sweep_resume_command(argv: list[str], sweep_dir: str | Path) -> str:
    """The same sweep command line, into `sweep_dir` (check_sweep_dir then resumes it)."""
    kept = [a for a in argv if split_override(a)[0] != "hydra.sweep.dir"]
    return " ".join(["lora-train", *[shlex.quote(a) for a in kept], shlex.quote(f"hydra.sweep.dir={sweep_dir}")])


def interrupted_outside_jobs(argv: list[str], config_name: str) -> None:
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if not (multirun and config_name == "train"):
        print("\ninterrupted.", file=sys.stderr)
        sys.exit(130)
    sweep_dir = override_value([a for a in argv if not a.startswith("-")], "hydra.sweep.dir")
    if sweep_dir is None and HydraConfig.initialized():
        sweep_dir = str(HydraConfig.get().sweep.dir)
    if sweep_dir is None:
        print("\ninterrupted: jobs that ended are kept in the sweep folder; resume with the same command and "
              "hydra.sweep.dir=<that folder>.", file=sys.stderr)
        sys.exit(130)
    print(f"\ninterrupted: jobs that ended are kept in {sweep_dir}.\nresume the sweep with:\n  "
          f"{sweep_resume_command(argv, sweep_dir)}", file=sys.stderr)
    sys.exit(130)
