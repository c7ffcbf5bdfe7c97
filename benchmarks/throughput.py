"""Throughput, merge time and memory of HAM against PEFT LoRA and the bare backbone (issues 5 and 12).

Everything is measured side by side in ONE run and reported as ratios: the variants are built from one
randomly initialised backbone (same weights), warmed up, then timed in interleaved repetitions (the order rotates
every repetition) and summarised by medians. Per-repetition ratios against a reference measured in the same
repetition are robust to a machine that is shared and noisy.

    python benchmarks/throughput.py                         # CPU preset (small ViT, 64 px, top blocks only)
    python benchmarks/throughput.py --device cuda           # GPU preset: ViT-B/16, 224 px, bf16 autocast, batch 128
    python benchmarks/throughput.py --device cuda --compile # the same through torch.compile

Results go to ``benchmarks/results/throughput_<device>[_compile].json`` and ``.md`` (``--out-dir`` to change).

Variants of the training step (forward + backward + AdamW step on the trainable parameters; a trainable linear
head in every variant):

* ``bare``: the frozen backbone, gradient w.r.t. the blocks' input and the head only (no adapter);
* ``single``: HAM with ``max_groups`` slots all empty: the same kernels as HAM with groups, no groups;
* ``ham``: HAM with every slot occupied (``max_groups`` tasks merged by ``end_task()`` from random adapters);
* ``ham_cap``: HAM with every slot filled to its rank cap ``group_rank`` (the steady state of a long sequence),
  HAMConfig's defaults otherwise (group scalars frozen: the groups are then constant for the whole task, so their
  fused weight is built once and reused by every step);
* ``ham_cap_trained_c``: as ``ham_cap`` with ``train_group_scalars=True`` (design.md's learned ``c_g``: the fused
  weight changes every step and ``c_g`` needs its own gradient);
* ``peft``: a plain PEFT LoRA adapter of the same rank, alpha and target modules (``inject_adapter_in_model``);
* ``single_twin`` (and ``bare_twin`` for inference): a second copy of the reference, timed like the others: the
  spread between twins is the noise floor of the run.

The ``paths`` part times one HAM layer alone on each of its group paths (``lowrank``, ``merged``,
``merged_dense``, and ``auto``, the per-layer choice by cost) at the backbone's layer shapes, slots at their rank cap.

The JSON's top level also holds the issue's keys (`issue_keys`): ``ham_vs_single_step_ratio``,
``ham_vs_peft_step_ratio``, ``folded_vs_bare_inference_ratio``, ``unfolded_vs_bare_inference_ratio``,
``merge_seconds``, ``stored_bytes_T100_vs_T10``, ``peak_memory_T100_vs_T10``, ``machine``, ``versions``, ``command``.

The CPU preset follows the reduced-scale recipe: 64 px, the data decoded once, adapters on the top blocks only,
with the frozen lower blocks' activations computed once and the top blocks (and head) timed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import timm
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from timm.layers import global_pool_nlc
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from ham_lightning import HAMConfig, HAMController, inject  # noqa: E402
from ham_lightning.core.layer import GROUP_PATHS, HAMLayer, group_path_costs  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALL_TRAIN_VARIANTS = ("bare", "single", "ham", "ham_cap", "ham_cap_trained_c", "peft", "single_twin")


@dataclass
class BenchConfig:
    """Every knob of one benchmark run (a preset, then command-line overrides)."""

    device: str = "cpu"
    model: str = "vit_small_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 64
    batch: int = 32
    top_blocks: int | None = 4  # adapted and timed blocks; None: all blocks, images as input
    num_classes: int = 100
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    rank: int = 8
    lora_alpha: float = 32.0
    max_groups: int = 8
    group_rank: int = 32
    amp: str = "none"  # "none" or "bf16" (autocast)
    compile: bool = False
    warmup: int = 3  # warm-up steps per variant
    reps: int = 20  # interleaved repetitions (training)
    infer_reps: int = 30  # interleaved repetitions (inference)
    steps: int = 2  # steps per variant per repetition
    merge_model: str = "vit_base_patch16_224"
    merge_model_kwargs: dict[str, Any] = field(default_factory=dict)
    merge_tasks: int = 48
    memory_tasks: list[int] = field(default_factory=lambda: [10, 50, 100])
    memory_steps: int = 2
    memory_subprocess: bool = True  # CPU: a fresh process, so its RSS is the memory curve's own
    extra_batches: list[int] = field(default_factory=list)  # training part again at these batch sizes
    extra_reps: int | None = None  # repetitions at the extra batch sizes (None: reps)
    parts: list[str] = field(default_factory=lambda: ["train", "infer", "merge", "memory", "paths"])
    # (kind, in, out, input shape) of the layers the ``paths`` part times; ViT-S/16 at 64 px and batch 32, and
    # EfficientNet-Lite0 pointwise convs at 64 px and batch 16 (the CPU protocol's backbone)
    path_shapes: list[tuple[str, int, int, tuple[int, ...]]] = field(default_factory=lambda: [
        ("linear", 384, 1152, (32, 17, 384)), ("linear", 384, 384, (32, 17, 384)),
        ("linear", 1536, 384, (32, 17, 1536)), ("linear", 384, 1152, (2, 17, 384)),
        ("conv", 16, 96, (16, 16, 32, 32)), ("conv", 40, 240, (16, 40, 8, 8)), ("conv", 320, 1280, (16, 320, 2, 2))])
    path_reps: int = 10
    variants: list[str] | None = None  # training variants to build and time (None: all; "single" always)
    threads: int | None = 1  # torch threads; 1 on a shared CPU (oversubscribed threads wreck the timings)
    seed: int = 0


PRESETS: dict[str, BenchConfig] = {
    "cpu": BenchConfig(reps=12, infer_reps=20, path_reps=8),  # about 10 minutes on a loaded 2-core machine
    "cuda": BenchConfig(
        device="cuda", model="vit_base_patch16_224", img_size=224, batch=128, top_blocks=None, amp="bf16",
        warmup=5, reps=20, infer_reps=30, steps=5, merge_tasks=48, memory_steps=3, memory_subprocess=False,
        threads=None, path_reps=20, path_shapes=[
            ("linear", 768, 2304, (128, 197, 768)), ("linear", 768, 768, (128, 197, 768)),
            ("linear", 768, 3072, (128, 197, 768)), ("linear", 3072, 768, (128, 197, 3072)),
            ("linear", 768, 2304, (2, 197, 768)), ("conv", 16, 96, (128, 16, 112, 112)),
            ("conv", 40, 240, (128, 40, 28, 28)), ("conv", 320, 1280, (128, 320, 7, 7))],
    ),
}


def smoke_config(**overrides: Any) -> BenchConfig:
    """The smallest configuration: a 2-block 48-wide ViT on 32 px images, one step per variant (for tests)."""
    tiny = dict(patch_size=8, depth=2, embed_dim=48, num_heads=2)
    cfg = BenchConfig(
        model="vit_tiny_patch16_224", model_kwargs=tiny, img_size=32, batch=4, top_blocks=1, num_classes=10,
        rank=2, max_groups=2, group_rank=4, warmup=1, reps=2, infer_reps=2, steps=1,
        merge_model="vit_tiny_patch16_224", merge_model_kwargs=tiny | {"img_size": 32}, merge_tasks=6,
        memory_tasks=[2, 4], memory_steps=1, memory_subprocess=False, path_reps=2,
        path_shapes=[("linear", 48, 96, (4, 5, 48)), ("conv", 8, 16, (4, 8, 4, 4))],
    )
    return dataclasses.replace(cfg, **overrides)


# -- models ---------------------------------------------------------------------------------------------------
class TopModel(nn.Module):
    """The timed part of a timm ViT: its (remaining) blocks, final norm and head.

    With ``embed`` the input is images (patch embedding in front, frozen); otherwise it is the lower blocks'
    activations computed once. ``input_grad`` makes the blocks' input a leaf that requires grad, so the bare
    frozen backbone runs a backward through every timed block.
    """

    def __init__(self, vit: nn.Module, embed: bool) -> None:
        super().__init__()
        self.vit = vit
        self.embed = embed
        self.input_grad = False

    def forward(self, x: Tensor) -> Tensor:
        vit = self.vit
        if self.embed:
            x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        if self.input_grad:
            x = x.detach().requires_grad_(True)
        x = vit.norm(vit.blocks(x))
        x = global_pool_nlc(x, pool_type=vit.global_pool, num_prefix_tokens=vit.num_prefix_tokens)
        return vit.head(vit.head_drop(vit.fc_norm(x)))


def build_top(cfg: BenchConfig, device: torch.device) -> tuple[TopModel, Tensor, Tensor]:
    """The randomly initialised backbone cut at its top blocks, the (pre-computed) inputs and the labels."""
    torch.manual_seed(cfg.seed)
    vit = timm.create_model(cfg.model, pretrained=False, img_size=cfg.img_size, num_classes=cfg.num_classes,
                            **cfg.model_kwargs).to(device).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=g).to(device)
    depth = len(vit.blocks)
    start = 0 if cfg.top_blocks is None else max(0, depth - cfg.top_blocks)
    if start == 0:
        return TopModel(vit, embed=True), images, labels
    with torch.no_grad():  # the frozen lower blocks run once: their activations are the timed part's input
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[:start]:
            x = block(x)
    vit.blocks = nn.Sequential(*list(vit.blocks)[start:])
    return TopModel(vit, embed=False), x.contiguous(), labels


def ham_config(cfg: BenchConfig, **overrides: Any) -> HAMConfig:
    return HAMConfig(target_modules=list(cfg.targets), rank=cfg.rank, lora_alpha=cfg.lora_alpha,
                     max_groups=cfg.max_groups, group_rank=cfg.group_rank, **overrides)


def inject_ham(model: nn.Module, cfg: BenchConfig, **overrides: Any) -> HAMController:
    with warnings.catch_warnings():  # "proj" also names the patch-embedding conv, which HAM skips
        warnings.simplefilter("ignore")
        return inject(model, ham_config(cfg, **overrides))


@torch.no_grad()
def synthetic_task(controller: HAMController, generator: torch.Generator, scale: float = 0.02) -> None:
    """Random values for the active adapter and its importance, as training a task would leave them."""
    for layer in controller.layers.values():
        for p in (layer.lora_A, layer.lora_B):
            p.add_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * scale)
    for p in controller.scalar_parameters():
        p.add_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * 0.05)


def fill_tasks(controller: HAMController, tasks: int, seed: int) -> None:
    """Merge ``tasks`` synthetic task adapters with ``end_task()``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(tasks):
        synthetic_task(controller, g)
        controller.end_task()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_train_variants(cfg: BenchConfig, template: TopModel) -> dict[str, TopModel]:
    """The training variants, each a deep copy of ``template`` (same frozen weights)."""
    wanted = set(cfg.variants or ALL_TRAIN_VARIANTS) | {"single"}
    variants: dict[str, TopModel] = {}
    if "bare" in wanted:
        bare = copy.deepcopy(template)
        for p in bare.parameters():
            p.requires_grad_(False)
        bare.input_grad = True
        variants["bare"] = bare
    to_cap = cfg.max_groups * -(-cfg.group_rank // cfg.rank)  # tasks that fill every slot to its rank cap
    default_c = HAMConfig().train_group_scalars
    for name, tasks, train_c in (("single", 0, default_c), ("ham", cfg.max_groups, default_c),
                                 ("ham_cap", to_cap, default_c), ("ham_cap_trained_c", to_cap, True)):
        if name in wanted:
            model = copy.deepcopy(template)
            ham = inject_ham(model, cfg, train_group_scalars=train_c)
            fill_tasks(ham, tasks, cfg.seed + 1)
            variants[name] = model
    if "peft" in wanted:
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=list(variants["single"].ham_controller.layers))  # exactly HAM's targets
        variants["peft"] = inject_adapter_in_model(lora, copy.deepcopy(template))
    if "single_twin" in wanted:
        variants["single_twin"] = copy.deepcopy(variants["single"])
    for model in variants.values():
        for p in model.vit.head.parameters():
            p.requires_grad_(True)
        model.train()
    return variants


def autocast(cfg: BenchConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_train_step(model: nn.Module, x: Tensor, labels: Tensor, cfg: BenchConfig, device: torch.device,
                    compiled: nn.Module | None = None) -> Callable[[], None]:
    """One training step (zero grad, forward, loss, backward, AdamW step) of ``model`` on the fixed batch."""
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    run = compiled if compiled is not None else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(cfg, device):
            logits = run(x)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    return step


def make_infer_step(model: nn.Module, x: Tensor, cfg: BenchConfig, device: torch.device) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(cfg, device):
            model(x)

    return step


# -- timing ---------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], None]], cfg: BenchConfig, device: torch.device,
                     reps: int) -> dict[str, list[float]]:
    """Seconds per step of each variant in each repetition; warm-up first, order rotated every repetition."""
    names = list(steps)
    for name in names:
        for _ in range(cfg.warmup):
            steps[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(cfg.steps):
                steps[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / cfg.steps)
    return times


def median_ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over repetitions of ``time[name] / time[ref]`` measured in the same repetition."""
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))


def summarise(times: dict[str, list[float]], batch: int, refs: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in times.items():
        med = statistics.median(values)
        row = {"ms": med * 1e3, "ms_min": min(values) * 1e3, "img_per_s": batch / med}
        for ref in refs:
            if ref in times:
                row[f"ratio_vs_{ref}"] = median_ratio(times, name, ref)
        out[name] = row
    return out


def sync_free(step: Callable[[], None], device: torch.device) -> bool | None:
    """Whether ``step`` runs without a host-device synchronisation (CUDA's sync debug mode; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], None]) -> float:
    """Floating-point operations of one call of ``fn`` (matrix products and attention; PyTorch's counter)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_ceiling(device: torch.device, cfg: BenchConfig) -> dict[str, float]:
    """Measured rate of one large matrix product (the arithmetic ceiling the step rates are compared with).

    The fastest of 10 products, not their median: a ceiling is the best the machine did (on the 2-core CPU a
    1024-wide product's median was under half its best, so steps came out above "the ceiling").
    """
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    if cfg.model_kwargs:  # smoke: tiny
        n = 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    samples = []
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n**3 / min(samples) / 1e12}


# -- the four measurements ------------------------------------------------------------------------------------
def bench_train(cfg: BenchConfig, device: torch.device, ceiling_tflops: float, variants: dict[str, TopModel],
                x: Tensor, labels: Tensor) -> dict[str, Any]:
    """Interleaved training steps of every variant; per-variant medians, ratios, FLOPs and rates."""
    steps = {}
    for name, model in variants.items():
        compiled = torch.compile(model) if cfg.compile else None
        steps[name] = make_train_step(model, x, labels, cfg, device, compiled)
    flops = {}
    for name, model in variants.items():  # counted on an eager copy, outside the timing, after one step (so a
        step = make_train_step(copy.deepcopy(model), x, labels, cfg, device)  # weight cached across steps is
        step()  # not counted as if built every step)
        flops[name] = count_flops(step)
    times = time_interleaved(steps, cfg, device, cfg.reps)
    rows = summarise(times, cfg.batch, ["single", "peft", "bare"])
    for name, row in rows.items():
        row["gflop_per_img"] = flops[name] / cfg.batch / 1e9
        row["tflops"] = flops[name] / (row["ms"] / 1e3) / 1e12
        row["fraction_of_ceiling"] = row["tflops"] / ceiling_tflops
    return {"rows": rows, "raw_s": times,
            "sync_free_step": {name: sync_free(steps[name], device) for name in ("single", "ham")}}


def bench_train_and_infer(cfg: BenchConfig, device: torch.device, ceiling_tflops: float) -> dict[str, Any]:
    template, x, labels = build_top(cfg, device)
    variants = build_train_variants(cfg, template)
    out: dict[str, Any] = {"timed_blocks": len(template.vit.blocks), "tokens_per_image": int(
        x.shape[1]) if x.dim() == 3 else None, "ham_layers": len(variants["ham"].ham_controller.layers)}
    ranks = {name: variants[name].ham_controller.layers for name in ("ham", "ham_cap", "ham_cap_trained_c")
             if name in variants}
    out["group_rank_used"] = {name: next(iter(layers.values()))._active_group_rank for name, layers in ranks.items()}
    if "train" in cfg.parts:
        train = bench_train(cfg, device, ceiling_tflops, variants, x, labels)
        out["train"], out["train_raw_s"], out["sync_free_step"] = train["rows"], train["raw_s"], train[
            "sync_free_step"]
    if "infer" in cfg.parts and {"ham", "peft"} <= set(variants):
        ham_model = variants["ham"]
        folded = copy.deepcopy(ham_model)
        folded.ham_controller.fold()
        infer_models = {"bare": copy.deepcopy(template), "ham_folded": folded, "ham_unfolded": ham_model,
                        "peft_unmerged": variants["peft"], "bare_twin": copy.deepcopy(template)}
        steps = {}
        for name, model in infer_models.items():
            model.eval()
            steps[name] = make_infer_step(torch.compile(model) if cfg.compile else model, x, cfg, device)
        times = time_interleaved(steps, cfg, device, cfg.infer_reps)
        out["infer"] = summarise(times, cfg.batch, ["bare"])
        out["infer_raw_s"] = times
    if "train" in cfg.parts and cfg.extra_batches:
        del variants, template
        out["train_extra_batches"] = {}
        for batch in cfg.extra_batches:  # the same variants (same weights, same seed) at another batch size
            cfg_b = dataclasses.replace(cfg, batch=batch, reps=cfg.extra_reps or cfg.reps)
            template, x, labels = build_top(cfg_b, device)
            variants = build_train_variants(cfg_b, template)
            out["train_extra_batches"][str(batch)] = bench_train(cfg_b, device, ceiling_tflops, variants, x,
                                                                 labels)
            del variants, template
    return out


def bench_merge(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """Time each ``end_task()`` of a sequence on a full-size backbone, by kind: open a slot, join, join + SVD."""
    torch.manual_seed(cfg.seed)
    model = timm.create_model(cfg.merge_model, pretrained=False, num_classes=0, **cfg.merge_model_kwargs)
    model = model.to(device).eval()
    ham = inject_ham(model, cfg)
    first = next(iter(ham.layers.values()))
    g = torch.Generator().manual_seed(cfg.seed + 2)
    records = []
    for task in range(cfg.merge_tasks):
        synthetic_task(ham, g)
        before = [int(v) for v in first.group_rank_used.tolist()]
        synchronize(device)
        start = time.perf_counter()
        decision = ham.end_task()
        synchronize(device)
        seconds = time.perf_counter() - start
        kind = "open" if decision.opened else (
            "join_svd" if before[decision.group] + cfg.rank > cfg.group_rank else "join_concat")
        records.append({"task": task, "kind": kind, "ms": seconds * 1e3})
    by_kind = {}
    for kind in ("open", "join_concat", "join_svd"):
        values = [r["ms"] for r in records if r["kind"] == kind]
        if values:
            by_kind[kind] = {"n": len(values), "ms_median": statistics.median(values), "ms_max": max(values)}
    worst = max(v["ms_median"] for v in by_kind.values())
    return {"model": cfg.merge_model, "layers": len(ham.layers),
            "params_adapted": sum(layer.base.weight.numel() for layer in ham.layers.values()),
            "by_kind": by_kind, "ms_worst_kind_median": worst, "records": records}


def _tensor_bytes(tensors: Iterator[Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _live_training_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], None]) -> int:
    """Bytes of every tensor a training step holds at its peak (end of forward): parameters, buffers, tensor
    attributes of modules (caches), gradients, optimizer state and the activations saved for backward."""
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    held = list(model.parameters()) + list(model.buffers())
    held += [v for m in model.modules() for v in vars(m).values() if isinstance(v, Tensor)]
    held += [p.grad for p in model.parameters() if p.grad is not None]
    held += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    return _tensor_bytes(iter(held + saved))


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: ``/proc/self/clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_bytes() -> tuple[int, int]:
    """(peak since the last reset, current) resident set size of this process in bytes (Linux)."""
    status = Path("/proc/self/status").read_text()
    field_kb = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
                if line.startswith(("VmHWM", "VmRSS"))}
    peak = field_kb.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return peak, field_kb.get("VmRSS", 0) * 1024


def bench_memory(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """Stored adapter bytes and peak training memory after ``memory_tasks`` merged tasks (one model, one
    optimizer for the whole sequence, as in training)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    template, x, labels = build_top(cfg, device)
    model = template
    ham = inject_ham(model, cfg)
    for p in model.vit.head.parameters():
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(cfg, device):
            logits = model(x)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    def measure(tasks: int, note: str) -> dict[str, Any]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            reset = _reset_peak_rss()
        for _ in range(cfg.memory_steps):
            step()
        live = _live_training_bytes(model, optimizer, step)
        tensors = ham.state_dict()["tensors"]
        row = {"tasks": tasks, "note": note, "groups": ham.num_groups, "slot_ranks": first.group_rank_used.tolist(),
               "stored_adapter_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
               "history_json_bytes": len(json.dumps([d.to_dict() for d in ham.history])),
               "live_tensor_bytes": live}
        if device.type == "cuda":
            synchronize(device)
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            row["allocated_before_steps"] = before
        else:
            row["peak_bytes"], row["rss_bytes"] = _rss_bytes()
            row["peak_rss_reset"] = reset
        return row

    first = next(iter(ham.layers.values()))
    g = torch.Generator().manual_seed(cfg.seed + 3)
    rows, at_cap = [], False
    for done in range(1, max(cfg.memory_tasks) + 1):
        synthetic_task(ham, g)
        ham.end_task()
        if done in cfg.memory_tasks:
            rows.append(measure(done, ""))
        elif not at_cap and all(int(r) == cfg.group_rank for r in first.group_rank_used.tolist()):
            rows.append(measure(done, "first task with every slot at its rank cap"))
        at_cap = at_cap or all(int(r) == cfg.group_rank for r in first.group_rank_used.tolist())
    kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS over the steps"
    return {"peak_kind": kind, "rows": rows}


def bench_memory_isolated(cfg: BenchConfig) -> dict[str, Any]:
    """`bench_memory` in a fresh Python process, so that the peak RSS belongs to that model alone."""
    payload = json.dumps(dataclasses.asdict(cfg))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-worker", payload],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _path_layer(kind: str, in_f: int, out_f: int, cfg: BenchConfig, device: torch.device, path: str) -> HAMLayer:
    """One HAM layer with every slot filled to its rank cap (random factors, seeded: the same for every path)."""
    torch.manual_seed(cfg.seed)
    base = nn.Linear(in_f, out_f) if kind == "linear" else nn.Conv2d(in_f, out_f, 1)
    layer = HAMLayer(base, cfg.rank, cfg.max_groups, cfg.group_rank, cfg.lora_alpha / cfg.rank,
                     nn.Parameter(torch.ones(())), nn.Parameter(torch.ones(cfg.max_groups)), group_path=path)
    g = torch.Generator().manual_seed(cfg.seed + 4)
    for slot in range(cfg.max_groups):
        layer.set_slot(slot, torch.randn(out_f, cfg.group_rank, generator=g) * 0.01,
                       torch.randn(cfg.group_rank, in_f, generator=g) * 0.01)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    return layer.to(device)


def bench_paths(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """One HAM layer's training step (forward, backward, SGD step on its adapter and scalars: the merged weight
    is rebuilt every step, as in training) on each group path, slots at their rank cap, interleaved."""
    rows = []
    timing = dataclasses.replace(cfg, warmup=max(1, cfg.warmup - 1), steps=1)
    for kind, in_f, out_f, shape in cfg.path_shapes:
        x = torch.randn(*shape, device=device, requires_grad=True)
        steps, layers = {}, {}
        for path in GROUP_PATHS:
            layer = layers[path] = _path_layer(kind, in_f, out_f, cfg, device, path)
            optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B, layer.importance, layer.group_scalars], lr=1e-3)

            def step(layer: HAMLayer = layer, optimizer: torch.optim.Optimizer = optimizer, x: Tensor = x) -> None:
                optimizer.zero_grad(set_to_none=True)
                with autocast(cfg, device):
                    y = layer(x)
                y.float().square().mean().backward()
                optimizer.step()

            steps[path] = step
        times = time_interleaved(steps, timing, device, cfg.path_reps)
        tokens = x.numel() // in_f if kind == "linear" else shape[0] * shape[2] * shape[3]
        with torch.enable_grad():
            chosen, _ = layers["auto"]._plan(tokens, torch.float32)
        ms = {path: statistics.median(v) * 1e3 for path, v in times.items()}
        fastest = min((p for p in GROUP_PATHS if p != "auto"), key=ms.__getitem__)
        rows.append({"kind": kind, "in": in_f, "out": out_f, "shape": list(shape), "tokens": tokens,
                     "k": cfg.max_groups * cfg.group_rank, "ms": ms, "auto_chose": chosen, "fastest": fastest,
                     "auto_vs_fastest": median_ratio(times, "auto", fastest),
                     "auto_vs_merged": median_ratio(times, "auto", "merged"),
                     "model_costs": group_path_costs(in_f, out_f, cfg.max_groups * cfg.group_rank, tokens, True)})
    return {"rows": rows}


# -- report ---------------------------------------------------------------------------------------------------
def metadata(cfg: BenchConfig, device: torch.device, command: str) -> dict[str, Any]:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "device": device.type, "python": platform.python_version(),
        "torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "config": dataclasses.asdict(cfg),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["cuda"] = torch.version.cuda
    return meta


def headline(results: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    """The issue's targets as measured ratios."""
    gpu = cfg.device == "cuda"
    heads: dict[str, Any] = {}
    train, infer = results.get("train"), results.get("infer")
    limit = 1.10  # issue 12: on CPU and on GPU
    # (name, variant, measure, target, passes)
    checks: list[tuple[str, str, str, str, Callable[[float], bool] | None]] = [
        ("train_ham_cap_vs_single", "ham_cap", "ratio_vs_single", f"<= {limit:.2f}", lambda v: v <= limit),
        ("train_ham_cap_trained_c_vs_single", "ham_cap_trained_c", "ratio_vs_single", "(reported: c trained)",
         None),
        ("train_ham_vs_single", "ham", "ratio_vs_single", "(reported)", None),
        ("train_ham_cap_vs_peft", "ham_cap", "ratio_vs_peft", "< 1 (aim 0.5)" if gpu else "(reported)",
         (lambda v: v < 1) if gpu else None),
        ("train_ham_vs_peft", "ham", "ratio_vs_peft", "(reported)", None),
        ("train_ham_cap_vs_bare", "ham_cap", "ratio_vs_bare", "(reported)", None),
        ("train_noise_single_twin_vs_single", "single_twin", "ratio_vs_single", "(noise floor)", None),
        ("train_ham_cap_fraction_of_ceiling", "ham_cap", "fraction_of_ceiling", "(reported)", None),
    ]
    tables = [("", train or {})] + [(f"_batch{b}", extra["rows"])
                                    for b, extra in results.get("train_extra_batches", {}).items()]
    for suffix, rows in tables:
        for name, variant, measure, target, passes in checks:
            if variant in rows and measure in rows[variant]:
                value = rows[variant][measure]
                heads[name + suffix] = {"value": value, "target": target} | (
                    {"met": passes(value)} if passes else {})
    if infer:
        folded = infer["ham_folded"]["ratio_vs_bare"]
        heads["infer_folded_vs_bare"] = {"value": folded, "target": "within 2%", "met": abs(folded - 1) <= 0.02}
        raw = results.get("infer_raw_s", {})
        if "bare_twin" in raw:  # against both copies of the bare backbone: the per-copy spread cancels
            pair = statistics.median(f / math.sqrt(a * b) for f, a, b in zip(raw["ham_folded"], raw["bare"],
                                                                              raw["bare_twin"]))
            heads["infer_folded_vs_both_bare_copies"] = {"value": pair, "target": "within 2%",
                                                         "met": abs(pair - 1) <= 0.02}
        heads["infer_unfolded_vs_bare"] = {"value": infer["ham_unfolded"]["ratio_vs_bare"], "target": "(reported)"}
        heads["infer_noise_bare_twin_vs_bare"] = {"value": infer["bare_twin"]["ratio_vs_bare"],
                                                  "target": "(noise floor)"}
    merge = results.get("merge")
    if merge:
        heads["merge_s"] = {"value": merge["ms_worst_kind_median"] / 1e3, "target": "< 1 s (GPU)",
                            "met": merge["ms_worst_kind_median"] < 1e3}
    memory = results.get("memory")
    if memory and len(memory["rows"]) >= 2:
        rows = memory["rows"]
        listed = [r for r in rows if not r["note"]]
        by_tasks = {r["tasks"]: r for r in listed}
        hi = listed[-1]
        pairs = [(by_tasks.get(10, listed[0]), "")] + [(r, "_at_cap") for r in rows if r["note"]]
        for lo, label in pairs:
            for key in ("stored_adapter_bytes", "peak_bytes", "live_tensor_bytes"):
                ratio = hi[key] / lo[key]
                heads[f"memory_{key}_{hi['tasks']}_vs_{lo['tasks']}{label}"] = {
                    "value": ratio, "target": "<= 1.05" if not label else "(slots at cap)", "met": ratio <= 1.05}
    return heads


def issue_keys(results: dict[str, Any]) -> dict[str, Any]:
    """The keys issue 12 names, flat (None where the part was not run).

    ``ham_vs_*_step_ratio``: 8 groups at the rank cap (``ham_cap``), HAMConfig's defaults; ``merge_seconds``: the
    median of the slowest kind of boundary (joining past the rank cap: QR + SVD) on the ViT-B/16-sized model;
    memory: the last listed task count against 10 (or the first listed).
    """
    meta = results["meta"]
    train, infer, merge, memory = (results.get(k) for k in ("train", "infer", "merge", "memory"))

    def ratio(variant: str, ref: str) -> float | None:
        return (train or {}).get(variant, {}).get(f"ratio_vs_{ref}")

    keys: dict[str, Any] = {
        "ham_vs_single_step_ratio": ratio("ham_cap", "single"),
        "ham_vs_peft_step_ratio": ratio("ham_cap", "peft"),
        "ham_trained_scalars_vs_single_step_ratio": ratio("ham_cap_trained_c", "single"),
        "ham_rank8_slots_vs_single_step_ratio": ratio("ham", "single"),
        "folded_vs_bare_inference_ratio": infer["ham_folded"]["ratio_vs_bare"] if infer else None,
        "unfolded_vs_bare_inference_ratio": infer["ham_unfolded"]["ratio_vs_bare"] if infer else None,
        "merge_seconds": merge["ms_worst_kind_median"] / 1e3 if merge else None,
        "merge_seconds_max": max(r["ms"] for r in merge["records"]) / 1e3 if merge else None,
        "stored_bytes_T100_vs_T10": None, "peak_memory_T100_vs_T10": None,
    }
    if memory:
        listed = {r["tasks"]: r for r in memory["rows"] if not r["note"]}
        lo, hi = listed.get(10, min(listed.values(), key=lambda r: r["tasks"])), max(
            listed.values(), key=lambda r: r["tasks"])
        keys["stored_bytes_T100_vs_T10"] = hi["stored_adapter_bytes"] / lo["stored_adapter_bytes"]
        keys["peak_memory_T100_vs_T10"] = hi["peak_bytes"] / lo["peak_bytes"]
        keys["memory_tasks_compared"] = [lo["tasks"], hi["tasks"]]
    keys["machine"] = {k: meta.get(k) for k in ("device", "cpu", "cpu_count", "torch_threads", "gpu", "platform")}
    keys["versions"] = {k: meta.get(k) for k in ("python", "torch", "timm", "peft", "cuda")}
    keys["command"] = meta["command"]
    return keys


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _train_table(train: dict[str, dict[str, float]], ranks: dict[str, Any], cfg: dict[str, Any]) -> str:
    ranks = {name: ranks.get(name, "?") for name in ("ham", "ham_cap", "ham_cap_trained_c")}
    names = {"bare": "frozen backbone (input grad + head)", "single": "HAM, slots empty (single adapter)",
             "ham": f"HAM, {cfg['max_groups']} slots occupied (rank {ranks['ham']} each)",
             "ham_cap": f"HAM, {cfg['max_groups']} slots at rank cap ({ranks['ham_cap']} each)",
             "ham_cap_trained_c": f"HAM, slots at rank cap ({ranks['ham_cap_trained_c']}), group scalars trained",
             "peft": f"PEFT LoRA r={cfg['rank']}", "single_twin": "HAM, slots empty, second copy (noise)"}
    rows = [[names[n], f"{r['ms']:.2f}", f"{r['img_per_s']:.1f}", _r(r.get("ratio_vs_single")),
             _r(r.get("ratio_vs_peft")), _r(r.get("ratio_vs_bare")), f"{r['gflop_per_img']:.3f}",
             f"{r['tflops'] * 1e3:.1f}", f"{100 * r['fraction_of_ceiling']:.0f}%"] for n, r in train.items()]
    return _table(["variant", "ms/step", "img/s", "vs single", "vs PEFT", "vs bare", "GFLOP/img", "GFLOP/s",
                   "of ceiling"], rows)


def markdown(results: dict[str, Any]) -> str:
    meta, cfg = results["meta"], results["meta"]["config"]
    where = meta.get("gpu") or f"{meta['cpu']}, {meta['cpu_count']} cores, {meta['torch_threads']} torch threads"
    parts = [f"## HAM throughput on {meta['device']} ({where})",
             f"torch {meta['torch']}, timm {meta['timm']}, peft {meta['peft']}; `{meta['command']}`; {meta['date']}",
             f"{cfg['model']} at {cfg['img_size']} px, batch {cfg['batch']}, "
             f"{results.get('timed_blocks')} timed block(s), {results.get('ham_layers')} adapted layers "
             f"({', '.join(cfg['targets'])}), rank {cfg['rank']}, max_groups {cfg['max_groups']}, group_rank "
             f"{cfg['group_rank']}, amp {cfg['amp']}, compile {cfg['compile']}; medians of {cfg['reps']} "
             f"(training) / {cfg['infer_reps']} (inference) interleaved repetitions x {cfg['steps']} steps; ratios "
             f"are medians of per-repetition ratios. Matmul ceiling: "
             f"{results['ceiling']['tflops'] * 1e3:.0f} GFLOP/s ({results['ceiling']['dtype']}, "
             f"n={results['ceiling']['n']})."]
    if "train" in results:
        parts += ["### Training step (forward + backward + AdamW); ratios are step-time ratios",
                  _train_table(results["train"], results["group_rank_used"], cfg)]
    for batch, extra in results.get("train_extra_batches", {}).items():
        parts += [f"### Training step at batch {batch} (same variants)",
                  _train_table(extra["rows"], results["group_rank_used"], cfg)]
    if "infer" in results:
        rows = [[n, f"{r['ms']:.2f}", f"{r['img_per_s']:.1f}", _r(r.get("ratio_vs_bare"))]
                for n, r in results["infer"].items()]
        parts += ["### Inference (forward, inference_mode)", _table(["variant", "ms/batch", "img/s", "vs bare"],
                                                                    rows)]
    if "merge" in results:
        m = results["merge"]
        rows = [[k, str(v["n"]), f"{v['ms_median']:.1f}", f"{v['ms_max']:.1f}"] for k, v in m["by_kind"].items()]
        parts += [f"### One task-boundary merge (`end_task()`), {m['model']}, {m['layers']} layers "
                  f"({m['params_adapted'] / 1e6:.1f} M adapted weights)",
                  _table(["kind", "merges", "median ms", "max ms"], rows)]
    if "memory" in results:
        mem = results["memory"]
        rows = [[str(r["tasks"]) + (f" ({r['note']})" if r["note"] else ""), str(r["groups"]),
                 "/".join(str(k) for k in r["slot_ranks"]), f"{r['stored_adapter_bytes']:,}",
                 f"{r['live_tensor_bytes'] / 2**20:.2f}", f"{r['peak_bytes'] / 2**20:.1f}",
                 f"{r['history_json_bytes']:,}"] for r in mem["rows"]]
        parts += ["### Memory against the number of merged tasks", _table(
            ["tasks", "groups", "slot ranks (first layer)", "stored adapter bytes", "live tensors at peak (MiB)",
             f"peak: {mem['peak_kind']} (MiB)", "history JSON bytes"], rows)]
    if "paths" in results:
        rows = [[f"{r['kind']} {r['in']}->{r['out']}", "x".join(map(str, r["shape"])), f"{r['tokens']:,}"]
                + [f"{r['ms'][p]:.2f}" for p in GROUP_PATHS] + [r["auto_chose"], r["fastest"], _r(r["auto_vs_fastest"]),
                                                                _r(r["auto_vs_merged"])]
                for r in results["paths"]["rows"]]
        parts += [f"### One HAM layer's training step by group path (ms; {cfg['max_groups']} slots at rank "
                  f"{cfg['group_rank']}, scalars trained)", _table(
                      ["layer", "input", "rows", *GROUP_PATHS, "auto chose", "fastest", "auto / fastest",
                       "auto / merged"], rows)]
    keys = [k for k in ("ham_vs_single_step_ratio", "ham_vs_peft_step_ratio", "ham_frozen_scalars_vs_single_step_ratio",
                        "ham_rank8_slots_vs_single_step_ratio", "folded_vs_bare_inference_ratio",
                        "unfolded_vs_bare_inference_ratio", "merge_seconds", "merge_seconds_max",
                        "stored_bytes_T100_vs_T10", "peak_memory_T100_vs_T10") if results.get(k) is not None]
    parts += ["### Issue 12 keys", _table(["key", "value"], [[k, _r(results[k])] for k in keys])]
    rows = [[k, _r(v["value"]), v["target"], {True: "yes", False: "no"}.get(v.get("met"), "-")]
            for k, v in results["headline"].items()]
    parts += ["### Against the issue's targets", _table(["measure", "value", "target", "met"], rows)]
    return "\n\n".join(parts) + "\n"


def run(cfg: BenchConfig, out_dir: Path | None = RESULTS_DIR, command: str = "") -> dict[str, Any]:
    """Run every part of the benchmark named in ``cfg.parts``; write JSON and Markdown to ``out_dir``."""
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results: dict[str, Any] = {"meta": metadata(cfg, device, command), "ceiling": matmul_ceiling(device, cfg)}
    if "train" in cfg.parts or "infer" in cfg.parts:
        results.update(bench_train_and_infer(cfg, device, results["ceiling"]["tflops"]))
    if "merge" in cfg.parts:
        results["merge"] = bench_merge(cfg, device)
    if "memory" in cfg.parts:
        isolated = cfg.memory_subprocess and device.type == "cpu"
        results["memory"] = bench_memory_isolated(cfg) if isolated else bench_memory(cfg, device)
    if "paths" in cfg.parts:
        results["paths"] = bench_paths(cfg, device)
    results["headline"] = headline(results, cfg)
    results.update(issue_keys(results))
    results["markdown"] = markdown(results)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"throughput_{device.type}" + ("_compile" if cfg.compile else "")
        (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
        (out_dir / f"{stem}.md").write_text(results["markdown"])
    return results


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=sorted(PRESETS), default="cpu", help="preset and device")
    p.add_argument("--smoke", action="store_true", help="the tiny configuration used by the tests")
    p.add_argument("--model")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--top-blocks", type=int, help="adapt and time only the top N blocks (0: all blocks)")
    p.add_argument("--targets", nargs="+")
    p.add_argument("--rank", type=int)
    p.add_argument("--max-groups", type=int)
    p.add_argument("--group-rank", type=int)
    p.add_argument("--amp", choices=["none", "bf16"])
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile every variant")
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--infer-reps", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--merge-model")
    p.add_argument("--merge-tasks", type=int)
    p.add_argument("--memory-tasks", type=int, nargs="+")
    p.add_argument("--extra-batches", type=int, nargs="+", help="time the training part again at these batches")
    p.add_argument("--extra-reps", type=int, help="repetitions at the extra batch sizes")
    p.add_argument("--parts", nargs="+", choices=["train", "infer", "merge", "memory", "paths"])
    p.add_argument("--variants", nargs="+", choices=ALL_TRAIN_VARIANTS, help="training variants (default: all)")
    p.add_argument("--path-reps", type=int, help="interleaved repetitions of the paths part")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        return BenchConfig(**json.loads(args.memory_worker)), args
    cfg = smoke_config(device=args.device) if args.smoke else copy.deepcopy(PRESETS[args.device])
    overrides = {k: getattr(args, k) for k in ("model", "img_size", "batch", "targets", "rank", "max_groups",
                                               "group_rank", "amp", "compile", "warmup", "reps", "infer_reps", "steps",
                                               "merge_model", "memory_tasks", "merge_tasks", "parts", "extra_batches",
                                               "extra_reps", "variants", "path_reps")
                 if getattr(args, k) is not None}
    if args.top_blocks is not None:
        overrides["top_blocks"] = args.top_blocks or None
    if args.threads is not None:
        overrides["threads"] = args.threads or None
    return dataclasses.replace(cfg, **overrides), args


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(argv)
    if args.memory_worker:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        print(json.dumps(bench_memory(cfg, torch.device(cfg.device))))
        return
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run(cfg, args.out_dir, command.strip())
    print(results["markdown"])


if __name__ == "__main__":
    main()
