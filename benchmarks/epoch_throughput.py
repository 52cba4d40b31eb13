#!/usr/bin/env python
"""Images/s of one training epoch: this project's path against the authors' per-batch path.

Three epochs are timed, each on the same CIFAR-shaped data, networks, batch
size and threads:
  stage1        stage-1 relationship matching, triplet form
  stage1_tuple  stage-1 tuple form (the authors' flag_merge)
  stage2        stage-2 local classifier distillation (global centres)

and each along three paths:
  reference     what the authors' code does per batch: a DataLoader over PIL
                images with torchvision transforms (num_workers=0), a teacher
                forward every batch, a Python loop grouping the triplets (tuple
                form), loss.item() every batch (benchmarks/_reference.py)
  ours-nobank   this project's loop (refilled.method.train.train_epochs with
                refilled.method.stages): uint8 images on the device, augmented in whole
                batches, vectorised grouping; the teacher still runs every batch
  ours          the same with the teacher-embedding bank: a lookup per batch

The bank build (the teacher on every image x augmentation variant, once per
experiment) is not part of an epoch; its time is printed separately, with the
number of epochs after which it has paid for itself. By default it is
estimated from the measured rate of the bank build's own inner step (building
the real bank of 2,560 CIFAR images x 162 variants takes about 40 minutes on
2 CPU cores); --full-bank builds it for real. Bank contents do not change the
cost of a lookup, so the timed bank holds random half-precision values unless
--full-bank is given.

Data: random uint8 images (CIFAR itself cannot be downloaded here), labels
spread evenly over --classes classes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import OtherLoad, Sections, check_idle, machine, sync, wait_until_idle
from _reference import cifar_loader, reference_epoch

from refilled.data import augment
from refilled.data.device import to_device
from refilled.data.sources import CIFAR100_MEAN, CIFAR100_STD, ImageSet
from refilled.data.splits import Task
from refilled.method.bank import TeacherBank, teacher_embeddings
from refilled.method.networks import build_network
from refilled.method.stages import LocalClassifierDistillation, RelationMatching
from refilled.method.train import STAGE1, STAGE2, global_centers, train_epochs
from refilled.runtime import autocast, keep_freed_memory, prepare_model, resolve_device
from refilled.schema.config import Config

VARIANTS = ("stage1", "stage1_tuple", "stage2")
PATHS = ("reference", "ours-nobank", "ours")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2560, help="training images (default 2560)")
    p.add_argument("--classes", type=int, default=100, help="classes (default 100)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--teacher-depth", type=int, default=40, help="teacher WRN depth (default 40)")
    p.add_argument("--teacher-width", type=int, default=2, help="teacher WRN width (default 2)")
    p.add_argument("--depth", type=int, default=16, help="student WRN depth (default 16)")
    p.add_argument("--width", type=int, default=1, help="student WRN width (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto: CUDA if present")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {', '.join(PATHS)}")
    p.add_argument("--repeats", type=int, default=1, help="timed epochs per (variant, path); the median counts")
    p.add_argument("--warmup-batches", type=int, default=2, help="untimed batches before each timed epoch")
    p.add_argument("--bank-sample-batches", type=int, default=2,
                   help="build batches timed to estimate the bank build (default 2)")
    p.add_argument("--bank-batch", type=int, default=512,
                   help="images per teacher forward in the bank build (default 512, TeacherBank.build's)")
    p.add_argument("--full-bank", action="store_true", help="build the real bank (slow on CPU) instead of estimating")
    p.add_argument("--mallopt", action="store_true",
                   help="keep freed memory in glibc malloc's heap (no mmap/munmap of big blocks, no trimming) "
                        "for the whole process, i.e. for both paths: shows the page-fault cost of the default")
    p.add_argument("--profile", action="store_true",
                   help="also profile a few batches of our banked stage-1 epoch (torch.profiler)")
    p.add_argument("--max-other-load", type=float, default=0.05,
                   help="retry a timed epoch during which other processes used more than this fraction of "
                        "the CPU (default 0.05)")
    p.add_argument("--tries", type=int, default=3, help="attempts per timed epoch (default 3)")
    p.add_argument("--max-wait", type=float, default=120,
                   help="seconds to wait for the machine to become idle before a retry (default 120)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    args.paths = [v for v in args.paths.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}")
    for v in args.paths:
        if v not in PATHS:
            p.error(f"unknown path {v!r}")
    return args


def sgd(params, cfg: Config, lr: float) -> torch.optim.SGD:
    """The optimiser both paths use (the project's and the authors': SGD, Nesterov momentum)."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.mo, weight_decay=cfg.wd, nesterov=True)


def random_cifar(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % n_classes).astype(np.int64)
    return images, labels


def device_task(images, labels, n_classes: int, device: torch.device):
    held = ImageSet(images[:256], labels[:256])
    task = Task("student", list(range(n_classes)), ImageSet(images, labels), held, "validation",
                CIFAR100_MEAN, CIFAR100_STD)
    return to_device(task, augment.for_data("CIFAR-100"), device)


def new_student(args, n_classes: int, device: torch.device, seed: int):
    torch.manual_seed(seed)
    return build_network("wide_resnet", n_classes, depth=args.depth, width=args.width, dropout_rate=0.3).to(device)


def estimate_bank_build(teacher, data, sample_batches: int, batch: int) -> tuple[float, float, float]:
    """(images/s of the bank build's inner step, estimated seconds for the whole bank,
    CPU share other processes took meanwhile).

    The step is refilled.method.bank.TeacherBank.build's: `batch` images (512 there),
    one variant, augment.train_view, teacher.embed under autocast, to half precision."""
    n_variants, done = data.aug.n_variants, 0
    rng = np.random.default_rng(0)

    def step(start: int, variant: int) -> int:
        images = data.train_x[start:start + batch]
        variants = torch.full((len(images),), variant, device=data.device)
        with torch.no_grad(), autocast(data.device):
            teacher.embed(augment.train_view(images, data.aug, variants, data.mean, data.std)).half()
        return len(images)

    step(0, 0)  # warm-up
    sync(data.device)
    with OtherLoad() as load:
        start = time.perf_counter()
        for b in range(sample_batches):
            done += step((b * batch) % max(data.n_train - batch + 1, 1), int(rng.integers(n_variants)))
        sync(data.device)
        rate = done / (time.perf_counter() - start)
    return rate, data.n_train * n_variants / rate, load.fraction


def time_ours(variant: str, args, data, warm, teacher_fn, centers, device) -> tuple[float, float]:
    """(seconds of one epoch of this project's loop, CPU share other processes took meanwhile)."""
    cfg = Config()
    student = prepare_model(new_student(args, data.n_classes, device, args.seed), device)
    student.train()
    if variant == "stage2":
        method = LocalClassifierDistillation(student, teacher_fn, centers, data.n_classes, cfg.tau2, cfg.lambd)
        optimizer, stage = sgd(student.parameters(), cfg, cfg.lr2), STAGE2
    else:
        method = RelationMatching(student, teacher_fn, cfg.tau1, cfg.stage1_scale, variant == "stage1_tuple", cfg.margin)
        optimizer, stage = sgd(student.feature_parameters(), cfg, cfg.lr1), STAGE1

    def epoch(on):
        for _ in train_epochs(method, optimizer, lambda e: 0.05, on, n_epochs=1, batch_size=args.batch_size,
                              seed=args.seed, stage=stage):
            pass

    epoch(warm)
    sync(device)
    with OtherLoad() as load:
        start = time.perf_counter()
        epoch(data)  # ends with its one host sync (the epoch's loss means)
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, load.fraction


def time_reference(variant: str, args, images, labels, teacher, centers, device
                   ) -> tuple[float, float, int, Sections]:
    cfg = Config()
    student = new_student(args, args.classes, device, args.seed)
    lr = cfg.lr2 if variant == "stage2" else cfg.lr1
    optimizer = sgd(student.parameters(), cfg, lr)
    loader = cifar_loader(images, labels, CIFAR100_MEAN, CIFAR100_STD, args.batch_size, args.seed)
    kw = dict(tau1=cfg.tau1, scale=cfg.stage1_scale, tau2=cfg.tau2, lambd=cfg.lambd, centers=centers,
              n_classes=args.classes, device=device)
    reference_epoch(variant, loader, teacher, student, optimizer, Sections(device),
                    max_batches=args.warmup_batches, **kw)
    sections = Sections(device)
    sync(device)
    with OtherLoad() as load:
        start = time.perf_counter()
        reference_epoch(variant, loader, teacher, student, optimizer, sections, **kw)
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, load.fraction, len(loader), sections


def profile_ours(args, warm, teacher_fn, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    cfg = Config()
    student = prepare_model(new_student(args, warm.n_classes, device, args.seed), device)
    student.train()
    method = RelationMatching(student, teacher_fn, cfg.tau1, cfg.stage1_scale, False, cfg.margin)
    optimizer = sgd(student.feature_parameters(), cfg, cfg.lr1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in train_epochs(method, optimizer, lambda e: 0.05, warm, n_epochs=1, batch_size=args.batch_size,
                          seed=args.seed, stage=STAGE1):
        pass
    with profile(activities=activities) as prof:
        for _ in train_epochs(method, optimizer, lambda e: 0.05, warm, n_epochs=1, batch_size=args.batch_size,
                              seed=args.seed, stage=STAGE1):
            pass
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of our banked stage-1 epoch on {warm.n_train} images (top ops by self time):")
    print(prof.key_averages().table(sort_by=sort, row_limit=18))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(machine(device))
    if args.mallopt:
        print("glibc malloc: " + ("M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB (refilled.runtime.keep_freed_memory)"
                                  if keep_freed_memory() else "not glibc or mallopt refused: --mallopt ignored"))
    print(f"data: {args.images} random uint8 images 3x32x32, {args.classes} classes; batch {args.batch_size}; "
          f"teacher WRN-{args.teacher_depth}-{args.teacher_width}, student WRN-{args.depth}-{args.width}; "
          f"device {device}")
    if wait_until_idle(args.max_wait) >= args.max_other_load:
        print(f"(the machine did not become idle within {args.max_wait:.0f} s; going on)")
    check_idle("before")

    images, labels = random_cifar(args.images, args.classes, args.seed)
    data = device_task(images, labels, args.classes, device)
    n_warm = min(args.images, args.warmup_batches * args.batch_size)
    warm = device_task(images[:n_warm], labels[:n_warm], args.classes, device)
    torch.manual_seed(args.seed + 1)
    teacher = build_network("wide_resnet", args.classes, depth=args.teacher_depth, width=args.teacher_width,
                            dropout_rate=0.3)
    teacher_ref = teacher.to(device).eval()  # the reference: plain fp32, default memory format
    teacher_ours = prepare_model(build_network("wide_resnet", args.classes, depth=args.teacher_depth,
                                               width=args.teacher_width, dropout_rate=0.3), device).eval()
    teacher_ours.load_state_dict(teacher_ref.state_dict())
    for net in (teacher_ref, teacher_ours):
        for p in net.parameters():
            p.requires_grad_(False)

    # ---- the bank: built (or its build estimated), then read as the project reads it
    n_variants = data.aug.n_variants
    print(f"\nteacher bank: {data.n_train} images x {n_variants} variants x {teacher_ours.embedding_dim} dims, fp16 "
          f"= {data.n_train * n_variants * teacher_ours.embedding_dim * 2 / 2**20:.0f} MiB")
    tmp = tempfile.TemporaryDirectory()
    if args.full_bank:
        sync(device)
        start = time.perf_counter()
        built = TeacherBank.build(teacher_ours, data, batch_size=args.bank_batch, progress=True)
        sync(device)
        build_s = time.perf_counter() - start
        build_rate = data.n_train * n_variants / build_s
        array = built.embeddings.cpu().numpy()
        print(f"  bank build (measured): {build_s:.1f} s ({build_rate:.0f} images/s)")
    else:
        for attempt in range(args.tries):
            build_rate, build_s, other = estimate_bank_build(teacher_ours, data, args.bank_sample_batches,
                                                             args.bank_batch)
            if not other > args.max_other_load:
                break
            print(f"  (other processes took {100 * other:.0f}% of the CPU during the bank-build sample)")
            wait_until_idle(args.max_wait, args.max_other_load)
        array = np.random.default_rng(0).standard_normal((data.n_train, n_variants, teacher_ours.embedding_dim),
                                                         dtype=np.float32).astype(np.float16)
        print(f"  bank build (estimated from {args.bank_sample_batches} timed build batches of {args.bank_batch} at "
              f"{build_rate:.0f} images/s): {build_s:.0f} s = {build_s / 60:.1f} min")
    if device.type == "cpu":
        bank = TeacherBank.load(TeacherBank(array).save(Path(tmp.name) / "bank.npy"))  # memory-mapped, as trials read it
    else:
        bank = TeacherBank(array).to(device)
    centers = global_centers(teacher_ours, bank, data)
    fns = {"ours": teacher_embeddings(teacher_ours, bank), "ours-nobank": teacher_embeddings(teacher_ours, None)}

    # ---- the epochs
    results: dict[tuple[str, str], float] = {}
    splits: dict[str, tuple[Sections, int]] = {}
    disturbed = []

    def measure(variant: str, path: str) -> tuple[float, float]:
        """One timed epoch, retried while other processes took a share of the CPU."""
        for attempt in range(args.tries):
            if path == "reference":
                seconds, other, n_batches, sections = time_reference(variant, args, images, labels, teacher_ref,
                                                                     centers, device)
                splits[variant] = (sections, n_batches)
            else:
                seconds, other = time_ours(variant, args, data, warm, fns[path], centers, device)
            if not other > args.max_other_load:
                break
            print(f"  ({path}: other processes took {100 * other:.0f}% of the CPU during this epoch"
                  f"{'; waiting for an idle machine and retrying' if attempt + 1 < args.tries else ''})", flush=True)
            if attempt + 1 < args.tries:
                wait_until_idle(args.max_wait, args.max_other_load)
        return seconds, other

    for variant in args.variants:
        print(f"\n{variant}:", flush=True)
        for path in args.paths:
            times, others = [], []
            for _ in range(args.repeats):
                seconds, other = measure(variant, path)
                times.append(seconds)
                others.append(other)
            seconds = statistics.median(times)
            results[(variant, path)] = args.images / seconds
            if max(others) > args.max_other_load:
                disturbed.append(f"{variant}/{path}")
            print(f"  {path:<12s} {args.images / seconds:8.1f} images/s   (epoch {seconds:.1f} s, other processes "
                  f"{100 * max(others):.0f}% of the CPU)", flush=True)
        if variant in splits:
            sections, n_batches = splits[variant]
            print("  reference per-batch split:")
            print(sections.report(n_batches))

    # ---- summary
    check_idle("after")
    print("\nsummary (images/s; ratio to the reference measured in this run)")
    head = f"  {'epoch':<14s}" + "".join(f"{p:>14s}" for p in args.paths)
    if "reference" in args.paths:
        head += "".join(f"{p + '/ref':>18s}" for p in args.paths if p != "reference")
    print(head)
    for variant in args.variants:
        row = f"  {variant:<14s}" + "".join(f"{results[(variant, p)]:14.1f}" for p in args.paths)
        if "reference" in args.paths:
            ref = results[(variant, "reference")]
            row += "".join(f"{results[(variant, p)] / ref:17.2f}x" for p in args.paths if p != "reference")
        print(row)
    if "reference" in args.paths:
        print("  teacher-forward share of the reference batch: " + ", ".join(
            f"{v} {100 * splits[v][0].seconds['teacher forward'] / sum(splits[v][0].seconds.values()):.0f}%"
            for v in args.variants))
    if {"ours", "ours-nobank"} <= set(args.paths):
        print(f"\nbank build {'measured' if args.full_bank else 'estimate'}: {build_s:.0f} s for "
              f"{data.n_train} x {n_variants} teacher forwards (once per experiment, shared by all trials)")
        for variant in args.variants:
            saved = args.images / results[(variant, "ours-nobank")] - args.images / results[(variant, "ours")]
            if saved > 0:
                print(f"  {variant:<14s} saves {saved:5.1f} s per epoch -> the bank pays for itself after "
                      f"{build_s / saved:.0f} epochs (summed over all trials of the experiment)")
            else:
                print(f"  {variant:<14s} the bank saves no time per epoch here")
    if disturbed:
        print(f"\nWARNING: other processes were using the CPU during {', '.join(disturbed)}; "
              "rerun on an idle machine for figures to record.")
    if args.profile:
        profile_ours(args, warm, fns["ours"], device)
    tmp.cleanup()


if __name__ == "__main__":
    main()
