"""Compiled sampling (``o2m sample --compile``, ``o2m score --compile``): each denoiser torch.compiled once.

Why: at sampling batch sizes a pruned UNet's step is bound by kernel launches and memory-bound elementwise ops, not by
its MACs (issue #25: 4.0x fewer MACs sampled 1.29x faster in eager bf16 on an H200). Inductor fuses the elementwise
ops (GroupNorm + SiLU, the residual adds) into few kernels, and on CUDA, CUDA graphs replay a whole forward as one
launch.

What :func:`compile_denoiser` does, in place, to one model or each student of a group:

* ``module.compile(dynamic=False, ...)``: the module's ``__call__`` is compiled; its type, parameters and state-dict
  keys stay as they were, so ``family_of(model)`` (the module's type) and saving still work. The compiled region is the
  whole forward (the tiny UNet traces as one graph, no break: ``tests/test_compile.py``); the sampler loop, the
  scheduler's step and a group's routing by timestep stay eager Python, the only graph boundary.
* channels-last weights and inputs for models with 2-D convolutions (the layout cuDNN's and oneDNN's fastest
  convolutions take; inductor then keeps it through the fused ops);
* on CUDA, bf16 weights (sampling already runs under bf16 autocast, so the fp32 masters only cost a cast per weight
  per call) and ``mode="reduce-overhead"``: CUDA graphs, the launch overhead gone.

Shapes are static (``dynamic=False``): each distinct input shape compiles once, and the sampler makes a bounded
number of them per architecture: the batch, the smaller last batch, and each doubled for classifier-free guidance,
so at most four; students of one architecture share one compiled graph (torch.compile traces parameters as inputs).
Padding the last batch instead would save one compile but sample padding rows every step; a recompile is cheaper
than that for any run of more than a few batches. The recompile limit is raised to cover those shapes.

Compile time is paid on the first call of each shape (inductor compiles lazily): those calls are the *warm-up*, timed
apart (synchronized) into :attr:`CompileRecord.warmup_s`, so throughput can exclude it; later calls are not synced.

When compiling fails (no C compiler for inductor's CPU code, an unsupported Python, a model dynamo cannot trace), one
``note:`` line says so and the model runs eagerly from then on; the record says it ran eager and why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from o2mcli.devices import synchronize
from o2mcli.models.group import StudentGroup
from o2mcli.outputs import notice

# Distinct input shapes one architecture may see in a sampling run (batch and last batch, each with and without
# guidance's doubling), times a margin for a score run that times another batch size with the same model.
SHAPES_PER_MODEL = 8

# torch.compile, as a module attribute so a test can make it fail the way a missing compiler does.
_torch_compile: Callable[..., Callable[..., Any]] = torch.compile
_compiled_modules = 0  # modules compiled in this process (the recompile limit covers their shapes)


@dataclass
class CompileRecord:
    """How a model was compiled and what that cost: the manifest's and throughput record's ``compile`` entry."""

    device: str
    mode: str  # torch.compile's mode: "default", or "reduce-overhead" (CUDA graphs) on CUDA
    channels_last: bool
    weights_dtype: str
    ran: str = "compiled"  # "eager" once compiling failed
    fallback: Optional[str] = None  # why it fell back to eager
    warmup_s: float = 0.0  # seconds of the first (compiling) calls of each input shape, synchronized
    shapes: int = 0  # distinct input shapes compiled
    warm_calls: int = 1  # calls per shape counted as warm-up (CUDA graphs: the warm-up run, then the recording)
    seen: dict = field(default_factory=dict, repr=False)  # (module id, signature) -> calls so far (up to warm_calls)
    modules: list = field(default_factory=list, repr=False)  # the compiled modules, to undo on a fallback

    def summary(self) -> dict[str, Any]:
        """The JSON-able record (no per-call state)."""
        return {"ran": self.ran, "mode": self.mode, "channels_last": self.channels_last,
                "weights_dtype": self.weights_dtype, "warmup_s": round(self.warmup_s, 4), "shapes": self.shapes,
                **({"fallback": self.fallback} if self.fallback else {})}

    def fall_back(self, why: str) -> None:
        """Run every compiled module eagerly from now on, and say so once."""
        for m in self.modules:
            m._compiled_call_impl = None  # nn.Module.__call__ then takes its eager path
        if self.ran == "eager":
            return
        self.ran, self.fallback = "eager", why
        notice(f"--compile: torch.compile failed ({why}); sampling continues eagerly")


def members(model: nn.Module) -> list[nn.Module]:
    """The denoisers to compile: each student of a group (its routing by timestep stays Python), or the model."""
    return list(model.students) if isinstance(model, StudentGroup) else [model]


def has_conv2d(model: nn.Module) -> bool:
    """Whether channels-last can pay off: the model has 2-D convolutions (a UNet; a DiT's patch embedding too)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def compile_denoiser(model: nn.Module, device: torch.device, mode: Optional[str] = None) -> CompileRecord:
    """Compile ``model`` (one denoiser or each student of a group) in place for inference on ``device``; returns the
    record the manifest keeps. ``mode``: torch.compile's (default: "reduce-overhead" on CUDA, "default" elsewhere).

    The model is changed in place (layout, on CUDA the weights' dtype): pass a copy where its eager self is still
    needed. A failure to compile is not raised: see :class:`CompileRecord` (``ran``, ``fallback``).
    """
    cuda = device.type == "cuda"
    mode = mode or ("reduce-overhead" if cuda else "default")
    nets = members(model)
    channels_last = all(has_conv2d(m) for m in nets)
    rec = CompileRecord(device=str(device), mode=mode, channels_last=channels_last,
                        weights_dtype="bfloat16" if cuda else str(next(model.parameters()).dtype).replace("torch.", ""),
                        warm_calls=2 if mode == "reduce-overhead" else 1)
    import torch._dynamo.config as dynamo_config

    # Each (architecture, shape) is one cache entry of nn.Module._call_impl's code, shared by every module compiled in
    # this process: past the limit dynamo would run new shapes eagerly, silently, so it grows with the modules.
    global _compiled_modules
    _compiled_modules += len(nets)
    need = SHAPES_PER_MODEL * _compiled_modules
    if dynamo_config.recompile_limit < need:
        dynamo_config.recompile_limit = need
    for m in nets:
        m.eval()
        if cuda:
            m.to(dtype=torch.bfloat16)
        if channels_last:
            m.to(memory_format=torch.channels_last)
    for m in nets:
        try:
            compiled = _torch_compile(m._call_impl, dynamic=False, mode=mode)
        except Exception as e:  # e.g. "Dynamo is not supported on this Python": raised at torch.compile itself
            rec.fall_back(_one_line(e))
            return rec
        m._compiled_call_impl = _Guarded(m, compiled, rec)
        rec.modules.append(m)
    return rec


class _Guarded:
    """A compiled module's ``__call__``: inputs made channels-last, each new shape's first calls timed as warm-up and
    guarded (a compile failure there falls back to eager), CUDA graph outputs copied out of the graph's pool."""

    def __init__(self, module: nn.Module, compiled: Callable[..., Any], rec: CompileRecord) -> None:
        self.module, self.compiled, self.rec = module, compiled, rec
        self.graphs = rec.mode == "reduce-overhead"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.rec.channels_last:
            args = tuple(_channels_last(a) for a in args)
            kwargs = {k: _channels_last(v) for k, v in kwargs.items()}
        key = (id(self.module), _signature(args, kwargs))
        calls = self.rec.seen.get(key, 0)
        if calls >= self.rec.warm_calls:
            return self._run(args, kwargs)
        device = torch.device(self.rec.device)
        synchronize(device)
        t0 = time.perf_counter()
        try:
            out = self._run(args, kwargs)
            synchronize(device)
        except Exception as e:
            # Run it eagerly: an error of the call itself (a bad input) raises here as it would without --compile;
            # only when eager succeeds was it the compiler's failure.
            self.module._compiled_call_impl = None
            out = self.module._call_impl(*args, **kwargs)
            self.rec.fall_back(_one_line(e))
            return out
        self.rec.warmup_s += time.perf_counter() - t0
        self.rec.seen[key] = calls + 1
        self.rec.shapes += calls == 0
        return out

    def _run(self, args: tuple, kwargs: dict) -> Any:
        if not self.graphs:
            return self.compiled(*args, **kwargs)
        # CUDA graphs: a new step begins (the previous outputs may be overwritten), and the outputs are copied out
        # of the graph's memory pool, which the next replay reuses (a multistep scheduler keeps past outputs).
        torch.compiler.cudagraph_mark_step_begin()
        out = self.compiled(*args, **kwargs)
        from torch.utils._pytree import tree_map_only

        return tree_map_only(torch.Tensor, torch.clone, out)


def _channels_last(v: Any) -> Any:
    return v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v


def _signature(args: tuple, kwargs: dict) -> tuple:
    """Shapes and dtypes of the tensor inputs (and nested dicts of them): what a static-shape compile keys on."""
    def one(v: Any) -> Any:
        if torch.is_tensor(v):
            return (tuple(v.shape), v.dtype)
        if isinstance(v, dict):
            return tuple(sorted((k, one(x)) for k, x in v.items()))
        if isinstance(v, (tuple, list)):
            return tuple(one(x) for x in v)
        return type(v).__name__ if v is None or isinstance(v, (int, float, bool)) else repr(type(v))

    return tuple(one(a) for a in args) + tuple(sorted((k, one(v)) for k, v in kwargs.items()))


def _one_line(e: BaseException) -> str:
    """An exception as a short line: its type and the first line of its message."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
