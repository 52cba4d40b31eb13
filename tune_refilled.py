#!/usr/bin/env python
"""tune-refilled: tune REFILLED (CVPR 2020 cross-task distillation) and test the result.

Subcommands
  pretrain  train the teacher on the source task and save it
  train     one run of both REFILLED stages (the authors' main.py)
  search    a Ray Tune search over tau1, tau2, lambd and learning rates
  retrain   retrain the best configuration on train+validation and test it

Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared CPU (Ray trials side
# by side, a laptop) spinning threads of one process starve the others' work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from refilled.errors import Diverged, UserError, one_line, os_error_line

EXAMPLES = """examples:
  python tune_refilled.py train --config search_spaces/digits.yaml
  python tune_refilled.py train --config search_spaces/digits.yaml --tuning --tau1 2 --lambd 5
  python tune_refilled.py pretrain --config search_spaces/cifar100_standard.yaml --data_root ~/data
  python tune_refilled.py search --config search_spaces/digits.yaml
  python tune_refilled.py retrain --experiment experiments/digits
"""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from refilled.schema.config import FIELDS

    p.add_argument("--config", required=required, metavar="FILE",
                   help="experiment or config YAML, e.g. search_spaces/digits.yaml")
    group = p.add_argument_group("config overrides (any key of the config schema, refilled/config.py)")
    for name, f in FIELDS.items():
        default = f.description or (f.default if f.default is not None else "null")
        group.add_argument(f"--{name}", dest=f"set_{name}", metavar="V", default=None,
                           help=f"(default {default})")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. --set point=[30,45]")


def config_from_args(args: argparse.Namespace, base=None):
    """The experiment file's config with the command line's overrides applied; without
    --config, `base` (a resumed experiment's config) with them, and no file."""
    from refilled.schema.config import from_dict, load_experiment, parse_overrides

    cfg, experiment = load_experiment(args.config) if args.config or base is None else (base, {})
    overrides = parse_overrides(args.set)
    for key, value in vars(args).items():
        if key.startswith("set_") and value is not None:
            overrides[key[4:]] = parse_overrides([f"x={value}"])["x"]
    if getattr(args, "tuning", False):
        given = overrides.get("flag_tuning", True)
        if given is not True and str(given).lower() not in ("true", "1", "yes"):
            raise UserError(f"--tuning and --flag_tuning {str(given).lower()} contradict each other: give one of them")
        overrides["flag_tuning"] = True
    return from_dict(overrides, cfg), experiment


def fresh_folder(path: Path, force: bool = False) -> Path:
    """The output folder if this command may write there (refilled.store.paths: new, empty, or
    one these commands wrote; else only with --force; never the repository's code). The
    folder is made by the command once its checks have passed."""
    from refilled.store.paths import output_folder

    return output_folder(path, force)


# ----------------------------------------------------------------------------- pretrain

def cmd_pretrain(args) -> int:
    cfg, _ = config_from_args(args)  # before importing torch: bad input is reported at once
    from refilled.runs.single_run import pretrain
    from refilled.store.paths import output_file

    out = output_file(args.out, args.force) if args.out else None
    path, metrics = pretrain(cfg, out, force=args.force)
    print(f"teacher saved to {path}: epoch {metrics['chosen_epoch']} of {cfg.teacher_epochs}, chosen on validation "
          f"({metrics['chosen_val_accuracy']:.4f}); its test accuracy on the source task: {metrics['test_accuracy']:.4f}")
    return 0


# ----------------------------------------------------------------------------- train

def cmd_train(args) -> int:
    import time

    cfg, _ = config_from_args(args)  # before importing torch: bad input is reported at once
    out = fresh_folder(Path(args.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}"), args.force)
    from refilled.runs.single_run import train_once
    from refilled.store import paths

    ours = not out.exists() or not any(out.iterdir())  # nothing of the user's in it: ours to clean up
    with paths.filling(out, ours):  # Ctrl-C, a divergence, an error: nothing left that would block the rerun
        summary = train_once(cfg, out, teacher_path=args.teacher)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print(f"wrote {out}/metrics.json, {out}/student.pt and TensorBoard events "
          f"({shlex.join(['tensorboard', '--logdir', str(out)])})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # the name it was started by: the console script `tune-refilled`, else the script
    prog = "tune-refilled" if Path(sys.argv[0]).name == "tune-refilled" else "tune_refilled.py"
    parser = Parser(prog=prog, description=__doc__, epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("pretrain", help="train the teacher on the source task and save it",
                       description="Train the teacher on the source classes as the authors' pretrain.py does "
                                   "(teacher_* keys: SGD Nesterov, multi-step decay at teacher_point), keep the "
                                   "epoch with the best accuracy on a validation part of the source training images "
                                   "(teacher_val_fraction; the authors choose it on test), save it and print its "
                                   "test accuracy on the source task.")
    add_config_args(p)
    p.add_argument("--out", metavar="PATH", help="where to save the teacher (default: runs/teachers/<data>-<net>-<hash>.pt, "
                                                 "which train/search reuse)")
    p.add_argument("--force", action="store_true", help="overwrite an existing teacher file")
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser("train", help="one run of both REFILLED stages (the authors' main.py)",
                       description="Stage 1 (relationship matching) then stage 2 (local classifier "
                                   "distillation) for one config. Without --tuning it trains on "
                                   "train+validation and reports test accuracy after the last epoch; with "
                                   "--tuning it trains on train and reports validation accuracy every epoch.")
    add_config_args(p)
    p.add_argument("--tuning", action="store_true", help="use the tuning splits (flag_tuning: train / validation)")
    p.add_argument("--teacher", metavar="PATH", help="teacher checkpoint: one `pretrain` made, or an authors' "
                                                     "released .model file (its architecture from the teacher_* "
                                                     "keys; another architecture or class count is refused). "
                                                     "Default: the one `pretrain` makes for this config, trained "
                                                     "first if missing")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/train-<time>)")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty --out")
    p.set_defaults(run=cmd_train)

    # search / retrain: Ray is imported only when one of them runs
    from refilled.tune.commands import add_tune_commands

    add_tune_commands(sub, add_config_args, config_from_args, fresh_folder)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from refilled.runtime import keep_freed_memory  # after parse_args: --help stays quick (no torch)

    keep_freed_memory()  # this process trains (pretrain, train, retrain) or builds the bank
    try:
        return args.run(args)
    except UserError as e:
        return fail(str(e))
    except Diverged as e:  # the config's fault, said in one line
        return fail(f"{e}; lower the learning rates (lr1, lr2) or loss weights (lambd, loss_scale1)")
    except OSError as e:  # the operating system refused (permissions, a full disk, ...): said in one line
        if (line := os_error_line(e)) is None:
            raise
        return fail(line)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def fail(message: str) -> int:
    """The one place an error is printed: one line (refilled.errors.one_line), exit code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
