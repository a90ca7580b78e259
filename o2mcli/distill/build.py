"""The engine for one run: students, KD modules, the mode's source and objective, and the generators."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Callable

import torch

from o2mcli.diffusion.gaussian import DiffusionTerms
from o2mcli.diffusion.schedulers import schedule_terms
from o2mcli.distill.engine import Distiller, Hyper, Student
from o2mcli.distill.features import feature_match
from o2mcli.distill.losses import build_kd_loss, kd_class
from o2mcli.distill.modes import MODES
from o2mcli.errors import O2MError
from o2mcli.models.parametrization import Parametrization, parametrization_of
from o2mcli.runtime.dist import DistState, Placement, place_students


def _run_basics(seed: int, scheduler_config: dict) -> tuple[torch.Generator, torch.Generator, DiffusionTerms]:
    """Every run's generators (the plan's, and the data's root, the same on every rank) and schedule terms."""
    # Denormal floats (near-clean buffer samples, tiny gradients) slow CPU kernels several-fold;
    # flushing them to zero costs no accuracy that matters (measured: DKDM step 1.07x -> 1.00x).
    torch.set_flush_denormal(True)
    gen_plan = torch.Generator().manual_seed(seed)
    gen_data = torch.Generator().manual_seed((seed + 1_000_003) % 2**63)
    return gen_plan, gen_data, schedule_terms(scheduler_config)


def make_distiller(cfg: Any, student_unet: torch.nn.Module, teacher: Any, plan: Any, device: torch.device,
                   dist: DistState, make_source: Callable[[DiffusionTerms, torch.device], Any],
                   feature_pairs: dict[str, str] | None = None,
                   student_param: Parametrization | None = None) -> Distiller:
    """Students, KD modules, source and generators for ``cfg``: the engine a run trains (and benchmarks time).

    ``make_source(terms, device)`` builds the data source; ``cfg.mode`` names the objective. The students
    are placed on the processes (``place_students``): this rank builds the ones it trains and stand-ins for
    the others. Randomness is per step and per batch, independent of the placement (see the engine).
    ``feature_pairs`` (student block -> teacher block) pair feature-KD points whose names
    differ (a BK-SDM template records them); without them blocks pair by name. ``student_param``: what the
    students output (default: the teacher's parametrization); KD and L_simple compare in it.
    """
    placement = place_students(cfg.students, dist)
    _check_group_batch(placement, cfg.batch_size)
    gen_plan, gen_data, terms = _run_basics(cfg.seed, teacher.scheduler_config)
    torch.manual_seed(cfg.seed)
    source = make_source(terms, device)
    init_unet = copy.deepcopy(teacher.denoiser if cfg.init == "teacher" else student_unet).cpu()
    tunet = teacher.denoiser.cpu()
    s_ch: dict[str, int] = {}
    t_ch: dict[str, int] = {}
    pairs = None
    if kd_class(cfg.kd).needs_features:
        pairs = feature_pairs if cfg.init != "teacher" else None  # (a teacher copy pairs with itself by name)
        _, s_ch, t_ch, pairs = feature_match(init_unet, tunet, pairs)
    tunet.to(device)
    hyper = Hyper(batch_size=cfg.batch_size, lr=cfg.lr, lr_warmup=cfg.lr_warmup, weight_decay=cfg.weight_decay,
                  ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip)
    students = []
    held = placement.held()
    for k in range(cfg.students):
        if k not in held:
            students.append(Student.remote(k, hyper))
            continue
        g = torch.Generator().manual_seed(cfg.seed + 7919 * k)  # each student's KD heads, reproducibly
        kd = build_kd_loss(cfg.kd, s_ch, t_ch, g).to(device)
        students.append(Student(k, copy.deepcopy(init_unet).to(device).train(), kd, hyper, dist,
                                placement.group(k), placement.group_size(k)))
    teacher_param = parametrization_of(teacher.scheduler_config)
    student_param = student_param or teacher_param
    objective = replace(MODES.resolve(cfg.mode).objective(cfg, teacher.denoiser, init_unet, source), param=student_param)
    return Distiller(teacher=tunet, students=students, source=source, plan=plan, objective=objective, terms=terms,
                     hyper=hyper, device=device, dist=dist, gen_plan=gen_plan, gen_data=gen_data,
                     feature_pairs={s: t for s, t in (pairs or {}).items() if s != t}, placement=placement,
                     teacher_param=teacher_param, student_param=student_param)


def _check_group_batch(placement: Placement, batch_size: int) -> None:
    """A student trained by G ranks splits its batch in G equal slices (DDP averages the slices' gradients)."""
    G = placement.group_size(0)
    if G > 1 and batch_size % G:
        raise O2MError(f"--batch-size {batch_size}: {placement.world} processes train each of the {placement.K} "
                       f"students in groups of {G}, which split its batch evenly; use a multiple of {G}")


def make_trainer(model: torch.nn.Module, scheduler_config: dict, images: torch.Tensor, hyper: Hyper,
                 vlb_weight: float, seed: int, device: torch.device, dist: DistState,
                 labels: torch.Tensor | None = None, null_class: int | None = None,
                 label_dropout: float = 0.0) -> Distiller:
    """Plain DDPM training as the engine's special case: one student, no teacher, no KD, real images, L_diff.

    ``images`` are in the model's range [-1, 1]; the generators are seeded as a distillation run's are. Under
    torchrun the W ranks train the one model data-parallel, each on its slice of the ``batch_size`` batch.
    ``labels`` train a class-conditional model, each label dropped to ``null_class`` with probability
    ``label_dropout``.
    """
    from o2mcli.distill.objective import Objective
    from o2mcli.distill.plan import TimestepPlan
    from o2mcli.distill.sources import ImageSource

    placement = place_students(1, dist)
    _check_group_batch(placement, hyper.batch_size)
    gen_plan, gen_data, terms = _run_basics(seed, scheduler_config)
    kd = build_kd_loss("none", {}, {}, torch.Generator().manual_seed(seed)).to(device)
    student = Student(0, model.to(device).train(), kd, hyper, dist, placement.group(0), placement.group_size(0))
    source = ImageSource(images, terms, device, labels, null_class, label_dropout)
    param = parametrization_of(scheduler_config)  # what the model learns to output
    return Distiller(teacher=None, students=[student], source=source,
                     plan=TimestepPlan((0, terms.T), 0.0),
                     objective=Objective(alpha=0.0, vlb_weight=vlb_weight, param=param),
                     terms=terms, hyper=hyper, device=device, dist=dist, gen_plan=gen_plan, gen_data=gen_data,
                     placement=placement, student_param=param)
