"""What the prepared launches that ``LoraLinear`` keeps have in common (``ForwardPlan``,
``DxPlan``): a launcher bound once to a tuned config and to inputs of one shape, dtype and device,
valid while the environment switches it was bound under hold."""

from .device_guard import on_input_device
from .env import switches


class BoundPlan:
    """``run`` (the launcher bound to ``cfg`` and to inputs like ``like``: grid, arguments and the
    switches' answers worked out once) and what it was bound for. ``current()``: whether the
    switches it was made under (``env.switches``) still hold. Subclasses check their inputs with
    :meth:`_check` and call ``_run``."""

    __slots__ = ("_run", "cfg", "_switches", "_shape", "_dtype", "_device")
    runs = True  # (LoraLinear also keeps "no plan" answers, whose runs is False)

    def __init__(self, run, cfg, like):
        self._run, self.cfg, self._switches = on_input_device(run), cfg, switches()
        self._shape, self._dtype, self._device = like.shape, like.dtype, like.device

    def current(self) -> bool:
        return switches() == self._switches

    def _check(self, t, name: str) -> None:
        """Raise ValueError unless ``t`` has the shape, dtype and device the plan was made for."""
        if t.shape != self._shape or t.dtype != self._dtype or t.device != self._device:
            raise ValueError(f"this plan takes {name} of shape {tuple(self._shape)}, {self._dtype} on {self._device}; "
                             f"got {tuple(t.shape)}, {t.dtype} on {t.device}")
