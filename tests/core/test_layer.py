"""`HAMLayer` against a plain autograd reference: outputs and gradients on every path, and the fused cache.

The reference is the formula of design.md section 1 written densely,
``y = W0 x + s (sum_g c_g B_g A_g x + a B A x)``, so that autograd gives the gradient of every trainable
tensor (lora_A, lora_B, importance, group_scalars, the input) without any of the layer's hand-written code.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ham_lightning.core.layer import GROUP_PATHS, HAMLayer, group_path_costs

IN, OUT, RANK, GROUPS, GROUP_RANK, SCALING = 7, 5, 3, 4, 4, 2.0
#: Occupied slots -> their used rank (several: ranks differ, so the rank-major layout has zero rows).
OCCUPANCY = {"none": {}, "one": {1: 4}, "several": {0: 4, 2: 1, 3: 3}}


def make_layer(kind: str, occupancy: dict[int, int], *, dtype: torch.dtype = torch.float64, bias: bool = True,
               stride: int = 1, padding: int = 0, path: str = "auto", in_f: int = IN, out_f: int = OUT,
               groups: int = GROUPS, group_rank: int = GROUP_RANK, seed: int = 0) -> HAMLayer:
    g = torch.Generator().manual_seed(seed)
    base = (nn.Linear(in_f, out_f, bias=bias) if kind == "linear"
            else nn.Conv2d(in_f, out_f, 1, stride=stride, padding=padding, bias=bias)).to(dtype)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    importance = nn.Parameter(torch.tensor(1.3, dtype=dtype))
    scalars = nn.Parameter(torch.randn(groups, generator=g, dtype=dtype))
    layer = HAMLayer(base, RANK, groups, group_rank, SCALING, importance, scalars, group_path=path)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=dtype))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=dtype))
    for slot, k in occupancy.items():
        layer.set_slot(slot, torch.randn(out_f, k, generator=g, dtype=dtype),
                       torch.randn(k, in_f, generator=g, dtype=dtype))
    return layer


def reference(layer: HAMLayer, x: Tensor) -> Tensor:
    """The dense formula, with the layer's own tensors (so autograd reaches the same leaves)."""
    base = layer.base
    delta = layer.importance * layer.lora_B @ layer.lora_A
    for g in range(layer.max_groups):
        if bool(layer.group_occupied[g]):
            k = int(layer.group_rank_used[g])
            delta = delta + layer.group_scalars[g] * layer.group_B[:, :k, g] @ layer.group_A[:k, g, :]
    weight = base.weight.reshape(layer.out_features, layer.in_features) + layer.scaling * delta.to(base.weight.dtype)
    if layer.is_conv:
        return F.conv2d(x, weight[:, :, None, None], base.bias, base.stride, base.padding, base.dilation)
    return F.linear(x, weight, base.bias)


def make_input(kind: str, dtype: torch.dtype = torch.float64, seed: int = 1, in_f: int = IN) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, in_f) if kind == "linear" else (2, in_f, 5, 6)
    return torch.randn(shape, generator=g, dtype=dtype).requires_grad_(True)


def trainable(layer: HAMLayer) -> dict[str, Tensor]:
    return {"lora_A": layer.lora_A, "lora_B": layer.lora_B, "importance": layer.importance,
            "group_scalars": layer.group_scalars}


def grads(fn, layer: HAMLayer, x: Tensor, weight: Tensor) -> tuple[Tensor, dict[str, Tensor | None]]:
    """Output of ``fn(x)`` and the gradients of ``(output * weight).sum()`` w.r.t. the input and every parameter."""
    for t in list(trainable(layer).values()) + [x]:
        t.grad = None
    y = fn(x)
    (y * weight).sum().backward()
    out = {name: None if t.grad is None else t.grad.clone() for name, t in trainable(layer).items()}
    out["x"] = None if x.grad is None else x.grad.clone()
    return y.detach(), out


def assert_matches_reference(layer: HAMLayer, x: Tensor, atol: float = 1e-10) -> None:
    weight = torch.randn(reference(layer, x).shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    y_ref, g_ref = grads(lambda t: reference(layer, t), layer, x, weight)
    y, g = grads(layer, layer, x, weight)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=0)
    for name, expected in g_ref.items():
        if expected is None and name == "group_scalars" and g[name] is not None:
            assert torch.all(g[name] == 0), name  # no occupied slot: zero (DDP), where the reference has none
        elif expected is None:
            assert g[name] is None, name
        else:
            assert g[name] is not None, f"{name}: no gradient"
            torch.testing.assert_close(g[name], expected, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def assert_output_matches(layer: HAMLayer, x: Tensor, atol: float = 1e-10) -> None:
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), atol=atol, rtol=0)


# -- gradients ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", GROUP_PATHS)
@pytest.mark.parametrize("occupancy", list(OCCUPANCY))
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradients_equal_the_reference_in_float64(kind: str, occupancy: str, path: str) -> None:
    layer = make_layer(kind, OCCUPANCY[occupancy], path=path)
    assert_matches_reference(layer, make_input(kind))


@pytest.mark.parametrize("path", GROUP_PATHS)
def test_conv_with_stride_padding_and_no_bias(path: str) -> None:
    layer = make_layer("conv", OCCUPANCY["several"], bias=False, stride=2, padding=1, path=path)
    assert_matches_reference(layer, make_input("conv"))


@pytest.mark.parametrize("path", GROUP_PATHS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_pointwise_conv_runs_as_a_linear_map_on_any_input_layout(layout: str, path: str) -> None:
    """A stride-1 1x1 conv takes the per-pixel linear route (a channels-last view): exact for any input strides."""
    layer = make_layer("conv", OCCUPANCY["several"], path=path)
    assert layer._pointwise and not make_layer("conv", {}, stride=2)._pointwise
    x = make_input("conv").detach()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # a non-contiguous input: every other column of a wider map
        x = torch.cat([x, x], dim=-1)[..., ::2]
    assert_matches_reference(layer, x.requires_grad_(True))
    assert layer(x).shape == (2, OUT, 5, 6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("path", GROUP_PATHS)
def test_frozen_scalars_and_an_input_without_grad(kind: str, path: str) -> None:
    layer = make_layer(kind, OCCUPANCY["several"], path=path)
    layer.group_scalars.requires_grad_(False)
    layer.importance.requires_grad_(False)
    assert_matches_reference(layer, make_input(kind).detach())  # x.grad and the scalars' grads stay None


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_empty_slots_take_part_in_the_graph(kind: str) -> None:
    """DDP without find_unused_parameters needs a gradient (zero) for every parameter, slots empty or not."""
    for occupancy in OCCUPANCY.values():
        layer = make_layer(kind, occupancy)
        layer(make_input(kind)).sum().backward()
        for name, p in trainable(layer).items():
            assert p.grad is not None, name
        empty = [g for g in range(GROUPS) if g not in occupancy]
        assert torch.all(layer.group_scalars.grad[empty] == 0)


def test_trainable_base_falls_back_to_plain_autograd() -> None:
    layer = make_layer("linear", OCCUPANCY["several"])
    layer.base.weight.requires_grad_(True)
    x = make_input("linear")
    assert_matches_reference(layer, x)
    layer.base.weight.grad = None
    reference(layer, x).sum().backward()
    expected = layer.base.weight.grad.clone()
    layer.base.weight.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(layer.base.weight.grad, expected)


def test_double_backward_raises_rather_than_being_wrong() -> None:
    layer = make_layer("linear", OCCUPANCY["one"])
    x = make_input("linear")
    (gx,) = torch.autograd.grad((layer(x) ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


# -- the per-layer choice of path -----------------------------------------------------------------------------
def test_auto_picks_the_cheapest_path_by_shape_and_rows() -> None:
    k = 256  # 8 slots at rank 32
    # a wide layer with many rows: the merged weight plus rank-k projections
    costs = group_path_costs(768, 2304, k, tokens=25_000, rebuild=True)
    assert min(costs, key=costs.get) == "merged"
    # the same layer with few rows per step: rebuilding the merged weight does not pay
    costs = group_path_costs(768, 2304, k, tokens=64, rebuild=True)
    assert min(costs, key=costs.get) == "lowrank"
    # a small pointwise conv: the dense weight gradient is cheaper than the rank-k projections
    costs = group_path_costs(16, 96, k, tokens=32 * 32 * 32, rebuild=True)
    assert min(costs, key=costs.get) == "merged_dense"
    # and the layer follows it
    layer = make_layer("linear", {g: 4 for g in range(GROUPS)}, in_f=3, out_f=4, dtype=torch.float32)
    assert layer._plan(tokens=10_000, dtype=torch.float32) == ("merged_dense", True)
    with torch.no_grad():
        assert layer._plan(tokens=10_000, dtype=torch.float32) == ("merged", False)  # inference: cached merge
    layer.group_scalars.requires_grad_(False)
    assert layer._plan(tokens=1, dtype=torch.float32) == ("merged", False)  # built once per task
    with pytest.raises(ValueError, match="group_path must be one of"):
        layer.group_path = "dense"


# -- the fused cache ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fused_cache_is_reused_while_nothing_changes(kind: str) -> None:
    layer = make_layer(kind, OCCUPANCY["several"])
    x = make_input(kind)
    with torch.no_grad():
        layer(x)
        first = layer._fused[1]
        layer(x)
    assert layer._fused[1] is first
    with torch.inference_mode():  # an inference-mode call reuses it too, and training can use it afterwards
        layer(x)
    assert layer._fused[1] is first
    assert layer._fused[1].grad_fn is None
    layer.group_scalars.requires_grad_(False)  # frozen scalars: one build serves training for the whole task
    assert_matches_reference(layer, x)
    first = layer._fused[1]
    assert_matches_reference(layer, x)
    assert layer._fused[1] is first


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fused_cache_follows_every_change(kind: str) -> None:
    layer = make_layer(kind, OCCUPANCY["several"])
    x = make_input(kind)
    g = torch.Generator().manual_seed(5)
    assert_output_matches(layer, x)

    layer.set_slot(1, torch.randn(OUT, 2, generator=g, dtype=torch.float64),  # a merge into a new slot
                   torch.randn(2, IN, generator=g, dtype=torch.float64))
    assert_output_matches(layer, x)
    B, A = layer.slot_factors(0)
    layer.set_slot(0, 3 * B, A)  # an in-place merge into an occupied slot
    assert_output_matches(layer, x)

    for make_opt in (lambda p: torch.optim.SGD(p, lr=0.5, foreach=False),
                     lambda p: torch.optim.SGD(p, lr=0.5, foreach=True),
                     lambda p: torch.optim.AdamW(p, lr=0.5, fused=True)):  # fused: no version-counter bump
        opt = make_opt([layer.group_scalars])
        layer(x).sum().backward()
        before = layer.group_scalars.detach().clone()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(before, layer.group_scalars.detach())
        assert_output_matches(layer, x)

    with torch.no_grad():
        layer.group_scalars.mul_(-1.5)  # in place, as a merge rule would
    assert_output_matches(layer, x)
    layer.group_occupied[2] = False  # occupancy alone
    assert_output_matches(layer, x)
    with torch.no_grad():
        layer.base.weight.add_(0.25)  # the frozen weight itself
    assert_output_matches(layer, x)

    other = make_layer(kind, OCCUPANCY["one"], seed=7)  # load_state_dict through a parent module
    parent = nn.Sequential(layer)
    parent.load_state_dict(nn.Sequential(other).state_dict())
    assert layer._active_group_rank == 4
    assert_output_matches(layer, x)
    assert_matches_reference(layer, x)

    layer.float()  # .to(): the cache goes with the old tensors
    assert layer._fused is None
    assert_output_matches(layer, x.float(), atol=1e-4)
    layer.double()
    assert_output_matches(layer, x)


def test_refresh_after_a_write_through_data() -> None:
    """``.data`` bypasses the version counters; `refresh` is the documented way back."""
    layer = make_layer("linear", OCCUPANCY["several"])
    x = make_input("linear")
    assert_output_matches(layer, x)
    layer.group_scalars.data.mul_(2.0)
    layer.refresh()
    assert_output_matches(layer, x)


# -- dtypes, copies, compile ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", GROUP_PATHS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bf16_autocast_is_close_to_the_float32_reference(kind: str, path: str) -> None:
    layer = make_layer(kind, OCCUPANCY["several"], dtype=torch.float32, path=path)
    x = make_input(kind, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    expected = reference(layer, x).detach()
    torch.testing.assert_close(y.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)
    for name, p in trainable(layer).items():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bf16_weights(kind: str) -> None:
    layer = make_layer(kind, OCCUPANCY["several"], dtype=torch.float32)
    layer.base.to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.float32
    x = make_input(kind, torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.group_scalars.grad is not None


def test_pickle_and_deepcopy_keep_outputs() -> None:
    layer = make_layer("conv", OCCUPANCY["several"])
    x = make_input("conv")
    with torch.no_grad():
        layer(x)  # a cache exists
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for copied in (torch.load(buf, weights_only=False), copy.deepcopy(layer)):
        assert_matches_reference(copied, x)
        copied.set_slot(0, torch.zeros(OUT, 1, dtype=torch.float64), torch.zeros(1, IN, dtype=torch.float64))
        assert_output_matches(copied, x)
    assert_output_matches(layer, x)  # the copies' merges did not touch the original


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_torch_compile_matches_the_reference(kind: str) -> None:
    torch._dynamo.reset()
    layer = make_layer(kind, OCCUPANCY["several"])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = make_input(kind)
    assert_matches_reference(layer, x)  # eager first: a cache exists, compile must not use it stale
    weight = torch.randn(reference(layer, x).shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    y_ref, g_ref = grads(lambda t: reference(layer, t), layer, x, weight)
    y, g = grads(compiled, layer, x, weight)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    for name, expected in g_ref.items():
        torch.testing.assert_close(g[name], expected, atol=1e-10, rtol=0)
    with torch.no_grad():
        layer.group_scalars.mul_(2.0)
    torch.testing.assert_close(compiled(x).detach(), reference(layer, x).detach(), atol=1e-10, rtol=0)
