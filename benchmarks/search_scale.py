"""The search's driver at cluster scale, by simulation: a logical 64-GPU Ray cluster on this
machine, 1,024 simulated trials at 0.25 GPU each (simulated_trials: the real driver,
searcher, callbacks, storage, selection and report; a synthetic curve instead of training).

    python benchmarks/search_scale.py                  # the figures of benchmarks/README.md, "Scale"
    python benchmarks/search_scale.py --trials 128     # a quick look

Prints: results reported to Tune and epochs the trials ran, a second, at 64, 256 and 1,024
trials (and how long a trial's report to Tune took); the run against its theoretical
minimum; Optuna's ask and tell latency against the trials so far; the driver's CPU time
per Tune result and per epoch, by part (a cProfile window of its main
thread); its memory and the workers'; the files and bytes the experiment leaves; the time
of trials.csv, the re-evaluation, retrain's reading and analysis/report.py. Writes them to
<out>/figures.json. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = "TUNE_REFILLED_SCALE_BENCHMARK"


# ----------------------------------------------------------------------------- the logical cluster

def start_head(gpus: int, cpus: int, tmp: Path) -> str:
    """`ray start --head` with logical GPUs; its processes carry MARKER so they can be ended by pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the trial workers import the simulated trials (benchmarks/simulated_trials.py) from this folder
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, MARKER: "1", "RAY_TMPDIR": str(tmp), "PYTHONPATH": path}
    ray = Path(sys.executable).parent / "ray"  # beside this Python: a virtual environment need not be activated
    started = subprocess.run([str(ray), "start", "--head", f"--port={port}", f"--num-gpus={gpus}", f"--num-cpus={cpus}",
                              "--include-dashboard=false", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=300)
    if started.returncode:
        sys.exit(f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
    return f"127.0.0.1:{port}"


def marked_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"{MARKER}=1".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def stop_head() -> None:
    for pid in marked_pids():  # by pid: `ray stop` would end every Ray on the machine
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its own and its waited-for children's)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def process_kind(pid: int) -> str:
    """raylet, gcs_server, a Ray worker (by its title: ray::ImplicitFunc for a trial, ray::IDLE, ...)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
    except OSError:
        return "gone"
    if not words:
        return "unknown"
    first = words[0].rsplit("/", 1)[-1]
    if first.startswith("ray::"):
        return "worker " + first.split(".")[0]
    if "python" in first and len(words) > 1:
        return words[1].rsplit("/", 1)[-1]
    return first


def torch_in(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


class Memory(threading.Thread):
    """Samples the driver's RSS and the Ray processes' PSS (proportional: shared pages counted once)."""

    def __init__(self, every_s: float = 5.0):
        super().__init__(daemon=True)
        self.every_s, self.samples, self.stopped = every_s, [], threading.Event()
        self.cpu: dict[int, float] = {}  # Ray process -> CPU seconds it had used when last seen
        self.kind: dict[int, str] = {}  # Ray process -> what it is (raylet, gcs_server, a trial's worker, ...)

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, seconds in self.cpu.items():
            out[self.kind[pid]] = out.get(self.kind[pid], 0.0) + seconds
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def run(self):
        while not self.stopped.wait(self.every_s):
            rss = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                           if line.startswith("VmRSS:")).split()[1]) / 1024
            workers = [p for p in marked_pids()]
            for p in workers:
                self.cpu[p] = max(self.cpu.get(p, 0.0), cpu_s(p))
                self.kind.setdefault(p, process_kind(p))
            self.samples.append({"t": time.perf_counter(), "driver_rss_mib": rss, "driver_pss_mib": pss_mib(os.getpid()),
                                 "ray_processes": len(workers), "ray_pss_mib": sum(pss_mib(p) for p in workers),
                                 "available_mib": available_mib()})


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- what the driver does, timed

class Probe:
    """Timings taken around the driver's own functions (wrapped here, in the benchmark only):
    each epoch result a trial record takes in, Optuna's ask and tell, and a cProfile window
    of the driver's main thread (CPU time: time.thread_time) opened at the ask of trial
    `profile_from` for `profile_s` seconds."""

    def __init__(self, profile_from: int, profile_s: float):
        self.results: list[tuple[float, int]] = []  # (time, trials that have reported so far)
        self._reported: set[str] = set()
        self.asks: list[tuple[int, float]] = []  # (trials asked before, seconds)
        self.tells: list[tuple[int, float]] = []
        self.timed: dict[str, float] = {}
        self.profile = cProfile.Profile(timer=time.thread_time)
        self.profile_from, self.profile_s = profile_from, profile_s
        self.window: list[float] = []  # [start, end] of the profile, in perf_counter time
        self._thread_cpu: list[float] = []
        self.run_process_cpu = 0.0
        self.run_cpu: list[float] = []  # the main thread's CPU time at the search's start and end

    def install(self) -> None:
        import optuna

        from refilled.tune import callbacks, search

        probe = self
        ask, tell, on_result = optuna.Study.ask, optuna.Study.tell, callbacks.TrialRecords.on_trial_result

        def timed_ask(study, *a, **k):
            n = len(probe.asks)
            probe._profile_switch(n)
            start = time.perf_counter()
            trial = ask(study, *a, **k)
            probe.asks.append((n, time.perf_counter() - start))
            return trial

        def timed_tell(study, *a, **k):
            start = time.perf_counter()
            out = tell(study, *a, **k)
            probe.tells.append((len(probe.asks), time.perf_counter() - start))
            return out

        def counted_result(self, iteration, trials, trial, result, **info):
            probe._reported.add(trial.trial_id)
            probe.results.append((time.perf_counter(), len(probe._reported)))
            return on_result(self, iteration, trials, trial, result, **info)

        optuna.Study.ask, optuna.Study.tell = timed_ask, timed_tell
        callbacks.TrialRecords.on_trial_result = counted_result
        for name in ("write_trials_table", "reevaluate", "experiment_correlations", "write_cost"):
            setattr(search, name, self._timed(name, getattr(search, name)))

    def _timed(self, name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.timed[name] = self.timed.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    def _profile_switch(self, asked: int) -> None:
        now = time.perf_counter()
        if asked == self.profile_from and not self.window:
            self.window = [now]
            self._thread_cpu = [time.thread_time()]
            self.profile.enable()
        elif len(self.window) == 1 and now - self.window[0] >= self.profile_s:
            self.close_profile()

    def close_profile(self) -> None:
        if len(self.window) == 1:
            self.profile.disable()
            self.window.append(time.perf_counter())
            self._thread_cpu.append(time.thread_time())

    def driver_parts(self) -> dict[str, float]:
        """CPU seconds of the driver's main thread in the profile window, by part."""
        stats = pstats.Stats(self.profile).stats

        def total(match) -> float:
            return sum(ct for (file, _, fn), (_, _, _, ct, _) in stats.items() if match(file.replace("\\", "/"), fn))

        hooks = ("on_trial_start", "on_trial_result", "on_checkpoint", "on_trial_complete", "on_trial_error",
                 "on_trial_recover", "on_step_end", "on_experiment_end", "get_state")
        ours = total(lambda f, fn: f.endswith("refilled/tune/callbacks.py") and fn in hooks)
        ours_in_saves = total(lambda f, fn: f.endswith("refilled/tune/callbacks.py") and fn == "get_state")
        searcher = total(lambda f, fn: f.endswith("refilled/tune/searcher.py")
                         and fn in ("suggest", "on_trial_result", "on_trial_complete", "save"))
        searcher_in_saves = total(lambda f, fn: f.endswith("refilled/tune/searcher.py") and fn == "save")
        loggers = total(lambda f, fn: "/ray/tune/logger/" in f and fn.startswith("log_trial_"))
        asha = total(lambda f, fn: f.endswith("schedulers/async_hyperband.py") and fn == "on_trial_result")
        saves = total(lambda f, fn: f.endswith("execution/tune_controller.py") and fn == "checkpoint")
        step = total(lambda f, fn: f.endswith("execution/tune_controller.py") and fn == "step")
        saves_own = saves - ours_in_saves - searcher_in_saves
        return {"tune_controller_step": step, "our_callbacks": ours, "searcher_optuna": searcher,
                "tune_result_files": loggers, "tune_state_saves": saves_own, "asha": asha,
                "tune_other": step - ours - searcher - loggers - saves_own - asha,
                "main_thread_cpu": self._thread_cpu[1] - self._thread_cpu[0] if len(self._thread_cpu) == 2 else 0.0}


# ----------------------------------------------------------------------------- the figures

def rate_at(results: list[tuple[float, int]], trials: int, window_s: float) -> dict | None:
    """Epoch results handled per second over `window_s` from the first result of the
    `trials`-th trial to report (at 64: once the first 64 trials all run)."""
    start = next((t for t, n in results if n >= trials), None)
    if start is None:
        return None
    inside = [t for t, _ in results if start <= t < start + window_s]
    span = min(window_s, results[-1][0] - start)
    return {"trials": trials, "window_s": round(span, 1), "results": len(inside),
            "per_s": len(inside) / span if span > 0 else float("nan")}


def leaves(folder: Path) -> dict[str, dict[str, int]]:
    kinds: dict[str, dict[str, int]] = {}
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).parts
        if any(p.startswith("checkpoint_") for p in rel):
            kind = "checkpoints"
        elif rel[0].startswith("trial_"):
            kind = path.name if not path.name.startswith("events.out") else "events.out.tfevents"
            kind = f"trial_*/{kind}"
        else:
            kind = rel[0]
        k = kinds.setdefault(kind, {"files": 0, "bytes": 0})
        k["files"] += 1
        k["bytes"] += path.stat().st_size
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]["bytes"]))


def quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    q = statistics.quantiles(values, n=20) if len(values) > 1 else [values[0]] * 19
    return f"median {statistics.median(values) * 1e3:.1f} ms, p95 {q[18] * 1e3:.1f} ms, max {max(values) * 1e3:.1f} ms"


def by_trials_so_far(timings: list[tuple[int, float]], edges=(0, 64, 256, 512, 768, 1024)) -> list[str]:
    lines = []
    for lo, hi in zip(edges, edges[1:]):
        inside = [s for n, s in timings if lo <= n < hi]
        if inside:
            lines.append(f"    trials {lo:>4}-{hi - 1:<4}: {quantiles(inside)} ({len(inside)} calls)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1024)
    parser.add_argument("--concurrent", type=int, default=64, help="trials at once (each a Ray worker process)")
    parser.add_argument("--gpus", type=int, default=64, help="logical GPUs of the head node")
    parser.add_argument("--gpu-per-trial", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=200, help="epochs a trial runs to the end (both stages)")
    parser.add_argument("--rate", type=float, default=160.0,
                        help="epoch results a second the trials would send with a driver that never makes them "
                             "wait (sets the epoch time: concurrent / rate)")
    parser.add_argument("--checkpoint-bytes", type=int, default=1_400_000,
                        help="size of a checkpoint (a CIFAR ResNet-14 student and its SGD momentum: about 1.4 MB)")
    parser.add_argument("--rungs", default="0.3,0.6",
                        help="ASHA's rungs as fractions of --epochs (default 0.3,0.6)")
    parser.add_argument("--reduction-factor", type=float, default=3.0)
    parser.add_argument("--config", default=str(REPO / "search_spaces" / "cifar100_crosstask.yaml"))
    parser.add_argument("--profile-from", type=int, default=128, help="open the profile at this trial's ask")
    parser.add_argument("--profile-s", type=float, default=60.0)
    parser.add_argument("--out", default=None, help="folder for the experiment and figures.json (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the experiment (default: delete it at the end)")
    args = parser.parse_args()

    from simulated_trials import SimulatedTrials

    from refilled.schema.config import load_experiment

    out = Path(args.out or tempfile.mkdtemp(prefix="search_scale-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg, data = load_experiment(args.config)
    n1 = min(cfg.n_training_epochs1, args.epochs // 4)
    cfg = cfg.replace(n_training_epochs1=n1, n_training_epochs2=args.epochs - n1)
    section = {k: v for k, v in (data.get("search") or {}).items() if k not in ("staged", "asha")}
    rungs = [max(1, round(args.epochs * float(f))) for f in args.rungs.split(",")]
    section.update(num_samples=args.trials, max_concurrent=args.concurrent, reuse_actors=True,
                   resources={"cpu": 1, "gpu": args.gpu_per_trial},
                   asha={"rungs": rungs, "reduction_factor": args.reduction_factor},
                   select={"top_k": 4, "seeds": 2})
    epoch_s = args.concurrent / args.rate
    kind = SimulatedTrials(epoch_s=epoch_s, checkpoint_bytes=args.checkpoint_bytes)

    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, RAY_USAGE_STATS_ENABLED="0")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    print(f"search_scale: {args.trials} simulated trials, {args.concurrent} at once, {args.gpu_per_trial} of "
          f"{args.gpus} logical GPUs each, {args.epochs} epochs ({n1} + {args.epochs - n1}), {epoch_s:.3f} s an epoch "
          f"(up to {args.rate:g} results/s), checkpoint every {section.get('checkpoint_every', 1)} epochs of "
          f"{args.checkpoint_bytes / 1e6:.1f} MB; experiment in {out}", flush=True)
    address = start_head(args.gpus, args.concurrent + 8, ray_tmp)
    probe, memory = Probe(args.profile_from, args.profile_s), Memory()
    probe.install()
    memory.start()
    from refilled.tune.search import Outcome, open_search

    started = time.perf_counter()
    probe.run_cpu = [time.thread_time()]
    process_cpu = os.times().user + os.times().system
    try:
        search = open_search(str(out), "scale", cfg, section, kind)
        if search.run(address) is not Outcome.FINISHED:
            sys.exit("search_scale: the search did not finish")
        folder = search.place.folder
    finally:
        probe.close_profile()
        probe.run_cpu.append(time.thread_time())
        probe.run_process_cpu = os.times().user + os.times().system - process_cpu
        probe.profile.dump_stats(str(out / "driver.prof"))
        wall = time.perf_counter() - started
        memory.stopped.set()
        workers_with_torch = sum(torch_in(p) for p in marked_pids())
        import ray

        ray.shutdown()  # before the head goes: a driver whose cluster vanishes is ended by Ray's core
        stop_head()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    figures = report_figures(args, folder, probe, memory, wall, workers_with_torch, out)
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(f"\nfigures: {out / 'figures.json'}")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


def report_figures(args, folder: Path, probe: Probe, memory: Memory, wall: float, workers_with_torch: int,
                   out: Path) -> dict:
    import pandas as pd

    from refilled.store import study as study_store
    from refilled.store.experiments import load_trials, read_results, trial_folders
    from refilled.tune.retrain_runner import choose_config

    trials_csv = pd.read_csv(folder / "trials.csv")
    study = study_store.load(folder, "scale")
    rows = [r for tf in trial_folders(folder) for r in read_results(tf)]
    waits = [r["report_wait_s"] for r in rows if "report_wait_s" in r]  # each report to Tune, flush included
    start = time.perf_counter()
    load_trials(folder)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    choose_config(folder, None, None)
    retrain_read_s = time.perf_counter() - start
    start = time.perf_counter()
    made = subprocess.run([sys.executable, str(REPO / "analysis" / "report.py"), str(folder), "--out", str(out / "report"),
                           "--force"], capture_output=True, text=True)
    report_s = time.perf_counter() - start
    parts = probe.driver_parts()
    window_results = [t for t, _ in probe.results if probe.window and probe.window[0] <= t < probe.window[-1]]
    numbers = [t.number for t in study.trials]
    figures = {
        "trials": len(trial_folders(folder)), "trials_csv_rows": len(trials_csv), "study_trials": len(study.trials),
        "study_numbers_unique": len(set(numbers)) == len(numbers),
        "study_states": {s.name: sum(t.state == s for t in study.trials) for s in {t.state for t in study.trials}},
        "status": trials_csv["status"].value_counts().to_dict(),
        "epoch_results": len(rows), "tune_results": len(probe.results), "wall_s": wall,
        "mean_rate_per_s": len(probe.results) / (probe.results[-1][0] - probe.results[0][0]) if probe.results else 0,
        "epochs_per_s": len(rows) / (probe.results[-1][0] - probe.results[0][0]) if probe.results else 0,
        # the run's floor: waves of `concurrent` trials, each running every epoch (ASHA stops most earlier),
        # and the epochs the trials ran, spread over the `concurrent` slots
        "minimum_s": {"waves": math.ceil(args.trials / args.concurrent) * args.epochs * args.concurrent / args.rate,
                      "epochs_run": len(rows) / args.rate},
        "rates": [r for r in (rate_at(probe.results, m, 30.0) for m in (64, 256, args.trials)) if r],
        "report_wait_s": {"median": statistics.median(waits), "p95": statistics.quantiles(waits, n=20)[18],
                          "mean": statistics.fmean(waits)} if len(waits) > 1 else {},
        "ask_s": probe.asks, "tell_s": probe.tells,
        "profile_window_s": probe.window[-1] - probe.window[0] if len(probe.window) == 2 else 0,
        "profile_results": len(window_results),
        "driver_cpu_s_by_part": parts,
        # the main thread's CPU per result outside the profile window (no profiler's overhead)
        "driver_main_thread_ms_per_result_unprofiled": 1e3 * (probe.run_cpu[1] - probe.run_cpu[0] - parts["main_thread_cpu"])
        / max(len(probe.results) - len(window_results), 1),
        # the same per epoch a trial ran (every epoch in its files; Tune told of some)
        "driver_main_thread_ms_per_epoch_unprofiled": 1e3 * (probe.run_cpu[1] - probe.run_cpu[0] - parts["main_thread_cpu"])
        / max(len(probe.results) - len(window_results), 1) * len(probe.results) / max(len(rows), 1),
        "driver_process_cpu_s": os.times().user + os.times().system,
        "ray_processes_cpu_s": sum(memory.cpu.values()),
        "ray_processes_cpu_s_by_kind": memory.cpu_by_kind(),
        "driver_run_cpu_s": probe.run_process_cpu,
        "memory": {"driver_rss_mib_max": max((s["driver_rss_mib"] for s in memory.samples), default=0),
                   "ray_pss_mib_max": max((s["ray_pss_mib"] for s in memory.samples), default=0),
                   "ray_processes_max": max((s["ray_processes"] for s in memory.samples), default=0),
                   "available_mib_min": min((s["available_mib"] for s in memory.samples), default=0)},
        "workers_with_torch": workers_with_torch,
        "torch_loaded_in_trials": sum(r.get("torch_loaded", 0) for r in rows),
        "files": leaves(folder),
        "seconds": {"trials_csv (in the search)": probe.timed.get("write_trials_table"),
                    "reevaluation (hand-off and simulated runs)": probe.timed.get("reevaluate"),
                    "rung correlations": probe.timed.get("experiment_correlations"),
                    "cost.csv": probe.timed.get("write_cost"),
                    "load_trials again": load_s, "retrain's reading (choose_config)": retrain_read_s,
                    "analysis/report.py": report_s},
        "report_ok": made.returncode == 0, "report_error": made.stderr[-500:] if made.returncode else "",
    }
    show(figures, probe)
    return figures


def show(f: dict, probe: Probe) -> None:
    print(f"\n{f['trials']} trials in the experiment, {f['trials_csv_rows']} rows in trials.csv, {f['study_trials']} "
          f"in the study (numbers unique: {f['study_numbers_unique']}; {f['study_states']}); status {f['status']}")
    print(f"{f['epoch_results']} epochs in the trials' files, {f['tune_results']} results reported to Tune, in "
          f"{f['wall_s']:.0f} s; handled by the driver on average {f['mean_rate_per_s']:.1f} results/s, "
          f"{f['epochs_per_s']:.1f} epochs/s")
    low = f["minimum_s"]
    print(f"the run against its theoretical minimum: {f['wall_s'] / low['waves']:.2f}x of {low['waves']:.0f} s (waves of "
          f"trials x epochs x epoch time), {f['wall_s'] / low['epochs_run']:.2f}x of {low['epochs_run']:.0f} s (the "
          "epochs run, over the concurrent slots)")
    for r in f["rates"]:
        print(f"  from trial {r['trials']:>4} on, {r['window_s']:.0f} s: {r['per_s']:.1f} results/s")
    if f["report_wait_s"]:
        w = f["report_wait_s"]
        print(f"a trial's report waited for the driver: median {w['median'] * 1e3:.0f} ms, p95 {w['p95'] * 1e3:.0f} ms, "
              f"mean {w['mean'] * 1e3:.0f} ms")
    print("Optuna ask:\n" + "\n".join(by_trials_so_far(probe.asks)))
    print("Optuna tell:\n" + "\n".join(by_trials_so_far(probe.tells)))
    n = max(f["profile_results"], 1)
    parts = f["driver_cpu_s_by_part"]
    print(f"driver main thread, {f['profile_window_s']:.0f} s profiled, {f['profile_results']} results: "
          f"CPU ms per epoch result by part:")
    for name, seconds in parts.items():
        print(f"  {name:<22} {seconds / n * 1e3:7.2f} ms")
    print(f"driver main thread outside the profile: {f['driver_main_thread_ms_per_result_unprofiled']:.2f} ms CPU "
          f"per Tune result, {f['driver_main_thread_ms_per_epoch_unprofiled']:.2f} ms per epoch; CPU seconds in all: "
          f"driver process {f['driver_process_cpu_s']:.0f}, Ray's processes "
          f"{f['ray_processes_cpu_s']:.0f} (this machine: {os.cpu_count()} cores x {f['wall_s']:.0f} s); driver in the "
          f"search {f['driver_run_cpu_s']:.0f}")
    print("  Ray's processes by kind: " + ", ".join(f"{k} {v:.0f} s" for k, v in f["ray_processes_cpu_s_by_kind"].items()
                                                   if v >= 1))
    m = f["memory"]
    print(f"memory: driver RSS max {m['driver_rss_mib_max']:.0f} MiB; Ray's {m['ray_processes_max']} processes "
          f"PSS max {m['ray_pss_mib_max']:.0f} MiB; machine available min {m['available_mib_min']:.0f} MiB; "
          f"torch loaded in {f['workers_with_torch']} Ray processes, in {f['torch_loaded_in_trials']} trial reports")
    total_files = sum(v["files"] for v in f["files"].values())
    total_bytes = sum(v["bytes"] for v in f["files"].values())
    print(f"the experiment leaves {total_files} files, {total_bytes / 1e6:.1f} MB:")
    for kind, v in list(f["files"].items())[:10]:
        print(f"  {kind:<32} {v['files']:>7} files {v['bytes'] / 1e6:9.1f} MB")
    print("seconds:")
    for name, s in f["seconds"].items():
        print(f"  {name:<44} {s if s is None else round(s, 2)}")
    if not f["report_ok"]:
        print(f"analysis/report.py failed: {f['report_error']}")


if __name__ == "__main__":
    main()
