"""When EPIC selects: every ``interval`` epochs from the warm-up on, until the last lr decay."""

from __future__ import annotations

from dataclasses import dataclass

from .._validation import check_int

__all__ = ["SelectionSchedule"]


@dataclass(frozen=True)
class SelectionSchedule:
    """Epochs (0-based) at whose start a selection round runs.

    The authors' rule: a round runs at the start of epoch ``e`` when ``e % interval == 0``,
    ``e >= warmup`` and ``e <= until``. ``until`` is the last learning-rate decay epoch in the
    paper (rounds run up to and including it); with ``until`` before the warm-up ends there is
    no round at all.

    Args:
        warmup: epochs trained on all data before the first round (K in the paper).
        interval: epochs between rounds (T: 2 or 5 for 40 epochs, 10 for 200, 1 in transfer).
        until: the last epoch at which a round may run (inclusive); ``None``: to the end.
    """

    warmup: int = 1
    interval: int = 1
    until: int | None = None

    def __post_init__(self) -> None:
        check_int("warmup", self.warmup, minimum=0)
        check_int("interval", self.interval, minimum=1)
        if self.until is not None:
            check_int("until", self.until, minimum=0)

    def is_selection_epoch(self, epoch: int) -> bool:
        """Whether a round runs at the start of ``epoch``."""
        if epoch < self.warmup or (self.until is not None and epoch > self.until):
            return False
        return epoch % self.interval == 0

    def epochs(self, total: int) -> list[int]:
        """All selection epochs in a run of ``total`` epochs."""
        return [e for e in range(total) if self.is_selection_epoch(e)]
