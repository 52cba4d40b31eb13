"""The `search` and `retrain` subcommands. Ray is imported only when one runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from refilled.runs.final_retrain import RUN_KINDS


def add_tune_commands(sub, add_config_args, config_from_args, fresh_folder) -> None:
    p = sub.add_parser(
        "search", help="Ray Tune search (Optuna TPE + ASHA) over tau1, tau2, lambd, learning rates",
        description="Search the space in the experiment file's `search:` section. The teacher is trained "
                    "(or copied from --teacher) once into the experiment folder, trials run both stages on "
                    "train/validation, ASHA stops weak ones, Optuna (TPE) proposes the next. At the end it "
                    "prints a table of trials, runs the best trials again with more seeds (search.select: the best "
                    "mean wins, selection.csv), writes best_config.yaml and the cost ledger (cost.csv; "
                    "search.budget_hours stops starting trials once spent). With `staged:` in the search section "
                    "it runs two phases: stage-1 keys (tau1, lr1, ...) by validation NCM accuracy with stage-1-only "
                    "trials, then the other keys with trials that start stage 2 from the chosen embedding. One driver "
                    "per experiment: the driver holds a lease (driver.lease in the experiment, its heartbeat renewed "
                    "while it runs, and in a folder a lock on driver.lease.lock), and a second `search` on the same "
                    "experiment is refused; --resume takes over the lease of a driver that died: at once on the same "
                    "machine with a folder (the kernel dropped its lock), otherwise once its heartbeat is older than "
                    "the timeout (120 s; TUNE_REFILLED_LEASE_TIMEOUT). TensorBoard: "
                    "`tensorboard --logdir <storage>/<name>`; Optuna: "
                    "`optuna-dashboard <storage>/<name>/optuna.journal`.")
    add_config_args(p, required=False)  # --config is optional with --resume: checked in cmd_search
    p.add_argument("--name", help="experiment name (default: the config file's name)")
    p.add_argument("--storage", default="experiments",
                   help="where experiments live: a folder (on a cluster, one every node mounts) or a URI pyarrow "
                        "understands, e.g. s3://bucket/experiments (default: experiments)")
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: start Ray on this machine")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted experiment (--name/--storage) without rerunning finished trials; "
                        "refused while another driver runs it, and takes over the lease of one that died (at once on "
                        "the same machine with a folder; otherwise once its heartbeat is older than "
                        "TUNE_REFILLED_LEASE_TIMEOUT, default 120 s)")
    p.add_argument("--teacher", metavar="PATH", help="teacher checkpoint to use: one `pretrain` made, or an authors' "
                                                     "released .model file (architecture from the teacher_* keys); "
                                                     "default: the one `pretrain` makes, pretrained into the "
                                                     "experiment if missing")
    p.add_argument("--num-samples", type=int, help="number of trials (search.num_samples)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (search.resources.cpu)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed, e.g. 0.25 (search.resources.gpu)")
    p.add_argument("--max-concurrent", type=int, help="most trials at once (search.max_concurrent; 0 = no limit)")
    p.set_defaults(run=lambda args: cmd_search(args, config_from_args))
    add_retrain_command(sub)


def cmd_search(args: argparse.Namespace, config_from_args) -> int:
    from refilled.errors import UserError
    from refilled.store.storage import Place
    from refilled.tune.search import SearchRun, open_search  # no Ray yet: a live driver is refused in a second

    if args.resume:
        if args.name is None and not args.config:
            raise UserError("--resume needs --name (and --storage if not the default) of the experiment to continue")
        search = open_search(args.storage, name_of(args))
        check_resume_flags(search, args, config_from_args)
    else:
        if not args.config:
            raise UserError("search needs --config FILE (e.g. search_spaces/digits.yaml), or --resume --name NAME")
        cfg, experiment = config_from_args(args)
        section = search_section(args, experiment.get("search"))
        place = Place.named(args.storage, name_of(args))
        search = SearchRun.new(cfg, section, place, teacher=args.teacher)  # --teacher refused now if it does not fit
    return search.run(args.address, args.teacher).value


def name_of(args: argparse.Namespace) -> str:
    """The experiment's name: --name as given (an empty one is refused, not replaced), else the config file's."""
    return args.name if args.name is not None else Path(args.config).stem


# the search section's keys the command line sets, and their flags
SEARCH_FLAGS = {"num_samples": ("num_samples", "--num-samples"), "max_concurrent": ("max_concurrent", "--max-concurrent"),
                "resources.cpu": ("cpus_per_trial", "--cpus-per-trial"),
                "resources.gpu": ("gpus_per_trial", "--gpus-per-trial")}


def search_section(args: argparse.Namespace, section: dict | None) -> dict:
    """The `search:` section with the command line's --num-samples, --max-concurrent,
    --cpus-per-trial and --gpus-per-trial in it."""
    section = dict(section or {})
    given = section.get("resources")
    if given is not None and not isinstance(given, dict):
        return section  # not a mapping: the settings' own check refuses it in one line
    resources = dict(given or {})
    for key, (attr, _) in SEARCH_FLAGS.items():
        value = getattr(args, attr)
        if value is not None:
            if key.startswith("resources."):
                resources[key.removeprefix("resources.")] = value
            else:
                section[key] = value
    if resources:
        section["resources"] = resources
    return section


def _flat(section: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in section.items():
        if isinstance(value, dict) and value and key != "space":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def check_resume_flags(search, args: argparse.Namespace, config_from_args) -> None:
    """--resume continues the experiment as its experiment.yaml has it: a --config, a config
    override (--tau1, --set) or a search flag (--num-samples, ...) that would change it is
    refused in one line, before anything is written; one that changes nothing is said to be
    not needed, and --teacher not used where the experiment has its teacher."""
    import sys

    from refilled.errors import UserError
    from refilled.schema.config import FIELDS, parse_overrides
    from refilled.schema.search import parse_search
    from refilled.store.layout import TEACHER_FILE

    where = search.place.location
    overrides = {k for k in FIELDS if getattr(args, f"set_{k}", None) is not None}
    flags = (["--config"] if args.config else []) + [f"--{k}" for k in sorted(overrides)] + \
        (["--set"] if args.set else []) + [flag for attr, flag in SEARCH_FLAGS.values() if getattr(args, attr) is not None]
    if args.teacher and (search.place.folder / TEACHER_FILE).is_file():
        print(f"note: --teacher is not used: {where} has its {TEACHER_FILE}, the teacher its trials were trained with",
              file=sys.stderr)
    if not flags:
        return
    refused = f"--resume continues {where} as it was written; {{}} would change it ({{}}): start a new search with " \
              "--name OTHER, or leave them out"
    try:
        cfg, experiment = config_from_args(args, search.cfg)
        section = search_section(args, experiment.get("search") if args.config else search.settings.to_section())
        given = _flat(parse_search(section, cfg).to_section())
    except UserError as e:
        raise UserError(refused.format("/".join(flags), e)) from None
    set_keys = set(parse_overrides(args.set))
    was_cfg, now_cfg = search.cfg.to_dict(), cfg.to_dict()
    was = _flat(search.settings.to_section())
    changes, blamed = [], []
    for key in sorted(set(was_cfg) | set(now_cfg)):
        if was_cfg.get(key) != now_cfg.get(key):
            changes.append(f"{key} {_value(was_cfg.get(key))} -> {_value(now_cfg.get(key))}")
            blamed.append(f"--{key}" if key in overrides else "--set" if key in set_keys else "--config")
    for key in sorted(set(was) | set(given)):
        if was.get(key) != given.get(key):
            changes.append(f"search.{key} {_value(was.get(key))} -> {_value(given.get(key))}")
            attr, flag = SEARCH_FLAGS.get(key, (None, "--config"))
            blamed.append(flag if attr and getattr(args, attr) is not None else "--config")
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise UserError(refused.format("/".join(dict.fromkeys(blamed)), shown))
    print(f"note: --resume continues {where} as it was written: {', '.join(flags)} "
          f"{'is' if len(flags) == 1 else 'are'} not needed (the same as its experiment.yaml)", file=sys.stderr)


def add_retrain_command(sub) -> None:
    p = sub.add_parser(
        "retrain", help="retrain the best configuration on train+validation (or the tuned shots) and test it",
        description="Retrain the configuration an experiment's search chose (the best mean of the re-evaluated "
                    "top trials, selection.csv; without a re-evaluation, the best stage-2 validation accuracy "
                    "among trials that reached stage 2) with flag_tuning off: train + validation (with val_per_class: the same "
                    "shots the search trained on, so that the tuned regime is the tested one), the full epoch budget, "
                    "the experiment's teacher, N seeds. The model each run ends with is tested once on the "
                    "test split. Beside it, with the same seeds, shots, epochs and evaluation (--arms): REFILLED at "
                    "the experiment's own config values, untuned (what the search bought), and the student alone "
                    "(cross-entropy: what REFILLED bought); each gain is given seed by seed: its standard error and "
                    "the seeds won and lost (on a small test set a few seeds rarely settle it). Writes results.json and "
                    "summary.md. Into the experiment (<experiment>/retrain) it is the experiment's one writer: it "
                    "holds its lease as `search` does, and is refused while a search or another retrain runs; with "
                    "--out elsewhere it reads the trials of a running search as they are now and says so on stderr.")
    p.add_argument("--experiment", required=True, metavar="PATH",
                   help="experiment made by `search`: its folder, or its URI (e.g. s3://bucket/experiments/digits)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3, at most 1000)")
    p.add_argument("--out", metavar="DIR", help="output folder (default <experiment>/retrain, uploaded there "
                                                "for a URI experiment): new, empty, or one these commands wrote; "
                                                "never inside the experiment")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--trial", metavar="ID", help="retrain this trial's configuration instead of the chosen one")
    choice.add_argument("--config", metavar="FILE", help="retrain this config file instead")
    p.add_argument("--arms", default=",".join(RUN_KINDS), type=_arms,
                   help=f"which arms run, comma-separated (default all: {','.join(RUN_KINDS)}): refilled is the "
                        "tuned configuration, refilled_untuned the experiment's own config values, student_alone "
                        "cross-entropy alone")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-baseline: the tuned configuration alone, no arm to compare it with (as --arms refilled)")
    p.add_argument("--force", action="store_true", help="replace results already in --out, or write into an --out "
                                                        "folder that holds files of other programs")
    p.add_argument("--address", help="Ray cluster to run the seeds on as tasks ('auto' or host:port)")
    p.add_argument("--teacher", metavar="FILE", help="use this teacher instead of the experiment's: one `pretrain` "
                                                     "made, or an authors' released .model file (its architecture "
                                                     "from the config's teacher_* keys)")
    p.set_defaults(run=cmd_retrain)


def _arms(text: str) -> tuple[str, ...]:
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    wrong = [a for a in arms if a not in RUN_KINDS]
    if wrong or "refilled" not in arms:
        raise argparse.ArgumentTypeError(f"--arms takes refilled and any of {', '.join(RUN_KINDS[1:])}, "
                                         f"comma-separated, got {text!r}")
    return arms


def cmd_retrain(args: argparse.Namespace) -> int:
    from refilled.runs.final_retrain import markdown
    from refilled.tune.retrain_runner import RetrainRequest, retrain

    results, written = retrain(RetrainRequest(args.experiment, seeds=args.seeds, out=args.out, trial=args.trial,
                                              config=args.config, force=args.force,
                                              arms=args.arms if args.baseline else ("refilled",),
                                              address=args.address, teacher=args.teacher))
    print(markdown(results))
    print(f"wrote {written}/results.json and summary.md")
    return 0
