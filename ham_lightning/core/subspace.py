"""Keep a new task's adapter away from earlier tasks' inputs (GPM / InfLoRA-style projection of ``A``).

A task adapter changes a layer's output by ``s a B A x``. If the rows of ``A`` are orthogonal to the subspace
spanned by earlier tasks' inputs ``x`` of that layer, the adapter leaves those inputs' outputs unchanged, so the
features of old classes drift far less, and a head fitted on them (ridge, NCM, frozen rows) stays valid.

`InputSubspace` accumulates each HAM layer's input second moment ``sum x x^T`` while hooks are on
(`collect`), turns it into a projector ``P = U U^T`` onto the top principal directions holding an ``energy``
fraction of it (`update`, after each task), and `project_` replaces every ``A`` by ``A (I - P)``. Moments and
projectors are fixed-size buffers (``in x in`` per layer), so the state is in the model's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ham_lightning.core.distributed import sum_increments
from ham_lightning.core.layer import HAMLayer


def _flat_inputs(layer: HAMLayer, x: Tensor) -> Tensor:
    """The layer's inputs as rows ``(N, in)``: tokens of a Linear, pixels of a 1x1 conv."""
    if x.dim() == 4:  # (B, C, H, W) into a 1x1 conv
        return x.permute(0, 2, 3, 1).reshape(-1, layer.in_features)
    return x.reshape(-1, layer.in_features)


@contextmanager
def input_moments(layers: dict[str, HAMLayer], moments: dict[str, Tensor]) -> Iterator[None]:
    """While active, every forward of ``layers[name]`` adds its inputs' ``x^T x`` to ``moments[name]``."""
    handles = []
    for name, layer in layers.items():
        def hook(module: nn.Module, args: tuple[Tensor, ...], moment: Tensor = moments[name]) -> None:
            x = _flat_inputs(module, args[0].detach()).float()  # type: ignore[arg-type]
            # float32 products of one batch, summed in float64 (a float64 product of a 1152-wide layer's
            # inputs was most of a task boundary's time on CPU: docs/performance.md).
            moment.add_((x.T @ x).to(moment.dtype))

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class InputSubspace(nn.Module):
    """Per-layer principal input subspace of the tasks seen so far, and the projection of new adapters off it.

    With ``slots > 1`` there is one subspace per group slot (``HAMConfig.protect_scope="group"``): a task's inputs
    go to the slot it joined, and a new adapter is kept off the slot it will join only. `slot` (set by the
    controller) says which one `collect`, `update`, `project_` and `ranks` act on.

    Args:
        layers: the controller's HAM layers by name.
        energy: fraction of the accumulated input energy the kept subspace spans (GPM's threshold); 0 disables.
        slots: 1 (one subspace of every task) or the number of group slots (one each).
    """

    def __init__(self, layers: dict[str, HAMLayer], energy: float = 0.95, slots: int = 1) -> None:
        super().__init__()
        if not 0.0 <= energy < 1.0:
            raise ValueError(f"energy must be in [0, 1) (0 disables the projection), got {energy}")
        self.energy, self.slots = energy, slots
        #: The slot the next collect / update / project_ acts on (with ``slots > 1``).
        self.slot = 0
        self._layers = dict(layers)  # not submodules: the model owns them
        self._keys = {name: name.replace(".", "__") for name in layers}
        lead = (slots,) if slots > 1 else ()
        for name, layer in layers.items():
            key = self._keys[name]
            self.register_buffer(f"moment__{key}", torch.zeros(*lead, layer.in_features, layer.in_features,
                                                               dtype=torch.float64))
            self.register_buffer(f"projector__{key}", torch.zeros(*lead, layer.in_features, layer.in_features))
        self.register_buffer("rank", torch.zeros(*lead, len(layers), dtype=torch.long))

    def _of_slot(self, t: Tensor) -> Tensor:
        return t[self.slot] if self.slots > 1 else t

    def moment(self, name: str) -> Tensor:
        return self._of_slot(getattr(self, f"moment__{self._keys[name]}"))

    def projector(self, name: str) -> Tensor:
        return self._of_slot(getattr(self, f"projector__{self._keys[name]}"))

    def _ranks(self) -> Tensor:
        return self._of_slot(self.rank)

    @contextmanager
    def collect(self) -> Iterator[None]:
        """While active, every forward of a HAM layer adds its inputs' ``x^T x`` to that layer's moment (of
        `slot`); under DDP each rank adds its share and the shares are summed over the ranks on exit."""
        moments = {name: self.moment(name) for name in self._layers}
        with input_moments(self._layers, moments), sum_increments(list(moments.values())):
            yield

    @torch.no_grad()
    def update(self, energy: float | None = None) -> None:
        """Projectors onto the smallest set of principal directions holding ``energy`` (default: the
        subspace's) of each layer's moment (of `slot`)."""
        energy = self.energy if energy is None else energy
        for i, name in enumerate(self._layers):
            moment = self.moment(name)
            if energy == 0.0 or not moment.any():
                continue
            eigvals, eigvecs = torch.linalg.eigh(moment)  # ascending
            eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
            cumulative = eigvals.cumsum(0) / eigvals.sum()
            k = int((cumulative < energy).sum()) + 1
            U = eigvecs[:, :k]
            self.projector(name).copy_((U @ U.T).to(self.projector(name).dtype))
            self._ranks()[i] = k

    @torch.no_grad()
    def project_(self) -> None:
        """``A <- A (I - P)`` for every layer's active adapter, ``P`` of `slot` (after each optimizer step and a
        reset)."""
        if self.energy == 0.0:
            return
        for (name, layer), rank in zip(self._layers.items(), self._ranks().tolist()):
            if rank > 0:
                A = layer.lora_A
                A.sub_(A @ self.projector(name).to(A.dtype))

    def ranks(self) -> dict[str, int]:
        """Dimension of each layer's protected subspace (out of its input width)."""
        return {name: int(r) for name, r in zip(self._layers, self._ranks().tolist())}
