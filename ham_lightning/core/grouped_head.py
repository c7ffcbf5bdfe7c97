"""`GroupedHead`: one statistics head per group slot, each input scored by the head of the slot it is routed to.

With routing (`HAMConfig.routing`) an input's features come from its own group's delta; a head per group then
compares it only with the classes of that group's tasks, and each group's head has the whole feature expansion
and its own regularisation for its classes alone (issue 22, item 1: per-group heads whose scores are compared). On
frozen Lite0 features of the mixed-domain sequence a ridge head per domain was 4.5 points above one ridge head over
every class (docs/results.md): the one head spends its capacity and one ``lam`` on telling the domains apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ham_lightning.core.head import StatisticsHead
from ham_lightning.core.routing import Routes


class GroupedHead(StatisticsHead):
    """``num_groups`` statistics heads made by ``factory``; ``class_slot`` records the slot each class's task
    joined (`on_group`, called by the sequence driver after the merge). A batch of the statistics pass updates the
    head of its classes' slot; ``forward(features, slots)`` scores each input with the head of its slot, among that
    slot's classes (``-inf`` elsewhere), divided by that head's ``temperature`` where it has one (ridge), so one
    softmax calibrates every input whichever group scored it. The inner heads are driven by this one only."""

    def __init__(self, in_features: int, num_classes: int, num_groups: int,
                 factory: Callable[[], StatisticsHead]) -> None:
        super().__init__(in_features, num_classes)
        self.heads = nn.ModuleList(factory() for _ in range(num_groups))
        if not all(getattr(h, "needs_statistics", False) for h in self.heads):
            raise ValueError("GroupedHead needs statistics heads (ncm, ridge, aligned): a head trained by gradient "
                             "has no per-group statistics to fit.")
        self.register_buffer("class_slot", torch.full((num_classes,), -1, dtype=torch.long))
        self._touched: set[int] = set()  # heads updated since their last fit (not state: a pass runs in one go)

    def on_group(self, group: int) -> None:
        """The current task's classes belong to slot ``group`` from now on."""
        if not 0 <= group < len(self.heads):
            raise ValueError(f"group {group} out of range for {len(self.heads)} group heads")
        self.class_slot[self.current.to(self.class_slot.device)] = group

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        slots = self.class_slot[labels]
        if bool((slots < 0).any()):
            raise RuntimeError("GroupedHead.update got classes that belong to no group yet: the sequence driver "
                               "calls on_group(group) after the merge, before the statistics pass.")
        for g in torch.unique(slots).tolist():
            rows = slots == g
            head = self.heads[g]
            current = self.current & (self.class_slot == g)  # the task's classes in this slot: current there
            if not torch.equal(head.current, current):
                head.start_task(torch.nonzero(current).flatten().tolist())
            head.update(features[rows], labels[rows])
            self._touched.add(g)

    def fit(self) -> None:
        for g in sorted(self._touched):
            self.heads[g].fit()
        self._touched.clear()

    def forward(self, features: Tensor, slots: Routes | Tensor | None = None) -> Tensor:
        """Scores of every class; each input's come from its slot's head, on that slot's classes (``slots``: the
        forward's `Routes`, already grouped by slot, or one slot per input; -1 for none: such an input gets
        ``-inf`` everywhere)."""
        if slots is None:
            raise ValueError("GroupedHead scores an input with its group's head: pass the routed slot of every input "
                             "(HAMModule does, from the controller's routes).")
        routes = slots if isinstance(slots, Routes) else Routes.of(slots)
        if routes.slots.shape[0] != features.shape[0]:
            raise ValueError(f"{routes.slots.shape[0]} routed slots for {features.shape[0]} inputs: pass the routes "
                             "of the forward that computed these features.")
        out = features.new_full((features.shape[0], self.num_classes), float("-inf"))
        for g, rows in routes.members:
            rows = rows.to(features.device)
            head = self.heads[g]
            scores = head.forward(features[rows])  # .forward: the statistics pass hooks only this head
            temperature = getattr(head, "temperature", None)
            if temperature is not None:  # calibrated scores: a softmax of them is the group head's probabilities
                scores = scores / temperature.to(scores)
            own = (self.class_slot == g).to(scores.device)
            out[rows] = scores.masked_fill(~own, float("-inf")).to(out.dtype)
        return out

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities: the scores are already divided by their group head's temperature (ridge), so
        every input's softmax is under its own group's calibration."""
        return torch.softmax(logits, dim=-1)

    def summary(self) -> dict[str, float]:
        return {f"group{g}_{k}": v for g, h in enumerate(self.heads) if bool((self.class_slot == g).any())
                for k, v in h.summary().items()}

