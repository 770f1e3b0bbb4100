"""``LoraLinear``: a frozen compressed base plus trainable LoRA adapters."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from . import ops
from .ops import plans_possible
from .autograd import PlannedLoraLinearFunction, StepPlans, add_lora, lora_linear_forward, lora_linear_function
from .formats import FORMATS, CompressedWeight, check_dense_weight, format_class
from .lora_init import INITS, init_lora, lora_scaling
from .reference import check_input, transform_or_forward_ad_active


def check_rank(rank, N: int, K: int, name: str = "") -> None:
    where = f" for layer {name!r}" if name else ""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}{where}")
    if not 1 <= rank <= min(N, K):
        raise ValueError(f"rank must be between 1 and min(out, in) = {min(N, K)}{where} ([{N}, {K}]), got {rank}")


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# state-dict key of the base's metadata (int64: N, K, then the format's own): the module's extra state
META_KEY = getattr(nn.modules.module, "_EXTRA_STATE_KEY_SUFFIX", "_extra_state")


# a kept answer "this input signature was met once" (LoraLinear makes its plan if it comes again)
_SEEN = object()


class LoraLinear(nn.Module):
    """``y = x·Ŵᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + b`` with ``Ŵ`` a frozen compressed weight.

    Attributes: ``lora_A`` ``[r, K]`` and ``lora_B`` ``[N, r]`` (trainable parameters),
    ``scaling``, ``base`` (the format object: :class:`~loraq.formats.Int1Weight`,
    :class:`~loraq.formats.Sparse4x4Weight` or :class:`~loraq.formats.DenseWeight`) and ``bias``
    (a frozen parameter or ``None``). The base's tensors are buffers, so ``.to()``,
    ``.half()``, ``state_dict()`` and ``load_state_dict()`` work as for any module.
    Build one with :meth:`from_linear`.
    """

    def __init__(
        self,
        base: CompressedWeight,
        rank: int = 8,
        alpha: Optional[float] = None,
        rslora: bool = False,
        dropout: float = 0.0,
        bias: Optional[torch.Tensor] = None,
        lora_A: Optional[torch.Tensor] = None,
        lora_B: Optional[torch.Tensor] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(base, CompressedWeight):
            raise TypeError(f"base must be a loraq format object, got {type(base).__name__}")
        N, K = base.shape
        check_rank(rank, N, K)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if alpha is not None and not float(alpha) > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS} or None, got {backend!r}")
        ops.load_backends()  # once per process, here rather than inside a torch.compile trace
        self.in_features, self.out_features = K, N
        self.compression = base.kind
        self.rank, self.alpha, self.rslora = rank, float(rank if alpha is None else alpha), bool(rslora)
        self.scaling = lora_scaling(rank, self.alpha, rslora)
        self.backend = backend
        self.base = base
        dev, dt = base.device, base.dtype
        A = torch.zeros(rank, K, device=dev, dtype=dt) if lora_A is None else lora_A.detach().to(dev, dt)
        B = torch.zeros(N, rank, device=dev, dtype=dt) if lora_B is None else lora_B.detach().to(dev, dt)
        if tuple(A.shape) != (rank, K) or tuple(B.shape) != (N, rank):
            raise ValueError(f"lora_A/lora_B must be [{rank}, {K}] and [{N}, {rank}], got "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")
        # Contiguous copies: the same values then give the same results after a save/load round trip.
        self.lora_A = nn.Parameter(A.clone(memory_format=torch.contiguous_format))
        self.lora_B = nn.Parameter(B.clone(memory_format=torch.contiguous_format))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dev, dt).clone(), requires_grad=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True

    # -- the base: its tensors live in buffers named base_<tensor> -------------------------
    @property
    def base(self) -> CompressedWeight:
        cls = format_class(self.compression)
        buffers = self._buffers
        tensors = tuple(buffers["base_" + n] for n in cls._tensor_names)
        if torch.compiler.is_compiling():  # no cache inside a trace: it would be a side effect
            return cls(**self._meta, **dict(zip(cls._tensor_names, tensors)))
        # built once per set of buffers (a forward runs this): .to(), .half() and the setter
        # replace the buffers, load_state_dict copies into them. Compared by id: the cache holds
        # the tensors, so no other tensor can take one of their ids.
        ids = tuple(map(id, tensors))
        cached = self.__dict__.get("_base_cache")
        if cached is not None and cached[0] == ids:
            return cached[2]
        value = cls(**self._meta, **dict(zip(cls._tensor_names, tensors)))
        self.__dict__["_base_cache"] = (ids, tensors, value)
        return value

    @base.setter
    def base(self, value: CompressedWeight) -> None:
        if value.kind != self.compression or tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"base must be a {self.compression} weight of shape "
                             f"{(self.out_features, self.in_features)}, got {value!r}")
        self.__dict__.pop("_plans", None)  # they hold the old base's tensors
        self._meta = value.meta()
        for n, t in value.tensors().items():
            self.register_buffer(f"base_{n}", t.contiguous(), persistent=True)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cpu() replace the buffers: drop the cached format object, which still
        # holds the old tensors (they would stay alive, on the old device, until the next forward)
        self.__dict__.pop("_base_cache", None)
        self.__dict__.pop("_plans", None)  # .half() keeps the Parameter objects: their plans would be stale
        return super()._apply(fn, *args, **kwargs)

    # -- the base's metadata travels in the state dict, so a load into a layer compressed otherwise
    # (another int1 group size or scale mode, or N or K within the same packed tensor sizes) is refused
    def _meta_codes(self) -> list:
        cls = format_class(self.compression)
        return [self.out_features, self.in_features] + [
            cls._encode_meta(n, self._meta[n]) for n in cls._meta_names if n != "shape"]

    def _describe_meta(self, codes) -> str:
        cls = format_class(self.compression)
        names = ["out_features", "in_features"] + [n for n in cls._meta_names if n != "shape"]
        if len(codes) != len(names):
            return str(codes)
        values = codes[:2] + [cls._decode_meta(n, c) for n, c in zip(names[2:], codes[2:])]
        return ", ".join(f"{n}={v}" for n, v in zip(names, values))

    def get_extra_state(self) -> torch.Tensor:
        # the standard place for module metadata (torch.distributed.checkpoint knows the key);
        # a tensor, so that safetensors holds it
        return torch.tensor(self._meta_codes(), dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        """Nothing to set: ``_load_from_state_dict`` compared it with this layer's before loading."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + META_KEY
        saved = state_dict.get(key)
        if saved is not None:
            codes = saved.reshape(-1).tolist() if isinstance(saved, torch.Tensor) else list(saved)
            if codes != self._meta_codes():
                error_msgs.append(
                    f"the {self.compression} base of {prefix[:-1] or 'this layer'!r} was compressed with "
                    f"{self._describe_meta(codes)}, this layer with {self._describe_meta(self._meta_codes())}")
                return  # nothing of this layer is loaded
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if saved is None and key in missing_keys:  # a state dict saved before the metadata existed
            missing_keys.remove(key)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compression: str = "int1",
        rank: int = 8,
        alpha: Optional[float] = None,
        rslora: bool = False,
        init: str = "gaussian",
        loftq_iters: int = 1,
        dropout: float = 0.0,
        group_size: Optional[int] = None,
        scale: str = "mean_abs",
        backend: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "LoraLinear":
        """Compress ``linear``'s weight and attach LoRA adapters.

        Args:
            linear: the ``nn.Linear`` to replace (left untouched).
            compression: ``"int1"``, ``"sparse4x4"`` or ``"dense"``.
            rank: LoRA rank ``r``, ``1 <= r <= min(in, out)``.
            alpha: LoRA alpha (default ``rank``); ``s = alpha/r`` or ``alpha/sqrt(r)`` with ``rslora``.
            init: ``"gaussian"`` (B = 0), ``"svd"`` (best rank-r repair of ``W − Ŵ``) or ``"loftq"``.
            loftq_iters: alternation steps for ``init="loftq"``.
            dropout: LoRA dropout on the adapter's input.
            group_size: int1 inputs per scale (``None``: one scale per row).
            scale: int1 scale, ``"mean_abs"`` or ``"onebit"``.
            backend: ``None`` (``LORAQ_BACKEND``/auto), ``"cuda"``, ``"triton"`` or ``"reference"``.
            generator: RNG for the gaussian init.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if compression not in FORMATS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {sorted(FORMATS)}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        W = linear.weight.detach()
        check_dense_weight(W, "linear.weight")
        check_rank(rank, *W.shape)
        s = lora_scaling(rank, alpha, rslora)
        base, A, B = init_lora(W, compression, rank, s, init, loftq_iters, group_size, scale, generator)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(base, rank, alpha, rslora, dropout, bias, A, B, backend)

    # -- behaviour ---------------------------------------------------------------------------
    def enable_adapter(self) -> None:
        self.adapter_enabled = True

    def disable_adapter(self) -> None:
        """Compute only the compressed base (and bias) until :meth:`enable_adapter`."""
        self.adapter_enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is torch.Tensor and not torch.compiler.is_compiling():
            y = self._planned(x)  # eager calls: a prepared launch (ops.forward_plan), in training too
            if y is not None:
                return y
        check_input(x, self.in_features)
        device = x.device.type
        if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
            # the kernels run in the autocast dtype, and nothing inside is cast again
            x = x.to(torch.get_autocast_dtype(device))
            with torch.autocast(device, enabled=False):
                return self._forward(x)
        return self._forward(x)

    # -- eager calls through prepared launches ----------------------------------------------
    # A small batch's kernel takes microseconds on the GPU; the checks, backend choice and tuner
    # lookup before it take tens of microseconds of Python. On the second call of a given input
    # shape, dtype and device (and autocast, LoRA dropout or not) on the same tensors, the layer
    # makes ops.forward_plan's prepared launch for it and, from the third, while nothing it depends
    # on changes, calls it directly: the same kernel on the same tensors. Where a gradient is wanted
    # it runs inside PlannedLoraLinearFunction, whose backward keeps ops.dx_plan's for dX.
    _MAX_PLANS = 32  # input signatures kept (a generation's prompts come in many lengths)

    def _plan_tensors(self):
        """``(A, B, bias)`` a call would use, or None where a plan must not be used: a
        parametrized or sharded parameter (not in ``_parameters``)."""
        params = self._parameters
        if self.adapter_enabled:
            A, B = params.get("lora_A"), params.get("lora_B")
            if A is None or B is None:
                return None
        else:
            A = B = None
        if "bias" in params:
            bias = params["bias"]
        elif self.__dict__.get("bias", 0) is None:
            bias = None
        else:  # a bias computed by a parametrization: the full path reads it each call
            return None
        return A, B, bias

    def __setattr__(self, name, value):
        if isinstance(value, torch.Tensor):  # a new parameter or buffer: plans must not keep the old one
            self.__dict__.pop("_plans", None)
        super().__setattr__(name, value)

    def __getstate__(self):
        # pickle and deepcopy: plans hold launch closures (not picklable) bound to this layer's tensors
        state = super().__getstate__()
        state.pop("_plans", None)
        return state

    def _planned(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The forward through a kept plan, or None: the caller takes the full path. Where a
        gradient is wanted, the plan runs inside ``PlannedLoraLinearFunction``, whose backward
        computes ``dX`` through kept plans too."""
        if not plans_possible(x):  # plans are the kernels' (the GPU's, or their interpreter's in tests)
            return None
        tensors = self._plan_tensors()  # first: a parametrized layer leaves here, cheaply
        if tensors is None:
            return None
        dev = x.device.type
        cast = None  # under autocast: the dtype x and the layer's tensors are computed in
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            cast = torch.get_autocast_dtype(dev)
            if not x.is_floating_point() or cast not in (torch.float16, torch.bfloat16):
                return None
        if transform_or_forward_ad_active():
            return None
        # what a plan was made for: each tensor's identity and storage, and the LoRA factors' and
        # bias's layout (a replaced parameter or buffer, .to(), a new base, .data =, a view or
        # resize_ at the same address mean new plans; values changed in place, as by
        # load_state_dict, are read by the kernels). The base's buffers change layout only with a
        # new base (the setter), so they are checked by identity and storage (the layout costs
        # 0.9 µs a tensor)
        buffers = tuple(self._buffers.values())
        owner = (tuple(map(id, tensors + buffers)),
                 tuple(0 if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors),
                 tuple(0 if t is None else t.data_ptr() for t in buffers), self.scaling, self.backend)
        # LoRA dropout active: the adapter sees another input than the base, so the plan is the
        # base's (and bias's) alone, and the adapter's path is added as the full path adds it
        split = tensors[0] is not None and self.training and not isinstance(self._modules["lora_dropout"], nn.Identity)
        key = (x.shape, x.dtype if cast is None else cast, x.device, cast is not None, split)
        kept = self.__dict__.get("_plans")
        if kept is None or kept[0] != owner:
            # new tensors: no plan this call. A layer whose tensors change every call (offloading
            # hooks) never makes one, and plans never hold tensors the layer no longer has.
            self.__dict__["_plans"] = (owner, OrderedDict([(key, _SEEN)]), {})
            return None
        plans = kept[1]
        plan = plans.get(key)
        if plan is not None and plan is not _SEEN:
            if not plan.current():  # a switch changed (LORAQ_*): the full path; the next call, a new plan
                plans[key] = _SEEN
                return None
            plans.move_to_end(key)  # least recently used first out
            if not plan.runs:
                return None
            if cast is None:
                return self._run_plan(plan, x, split, tensors, tensors)
            # as the full path: x in the autocast dtype, the kernels' torch ops not cast again
            x, read = x.to(cast), self._autocast_copies(tensors, cast, kept[2])
            with torch.autocast(dev, enabled=False):
                return self._run_plan(plan, x, split, tensors, read)
        if x.dim() == 0 or x.shape[-1] != self.in_features or not x.is_floating_point():
            return None  # the full path raises the error
        while len(plans) >= self._MAX_PLANS and key not in plans:
            plans.popitem(last=False)
        if plan is None:
            # a signature met for the first time: remembered, and a plan made if it comes again
            # (shapes that never come again, as with dynamic padding, cost a dict entry, no plan)
            plans[key] = _SEEN
            return None
        if cast is not None:
            x = x.to(cast)
        A, B, bias = tensors if cast is None else self._autocast_copies(tensors, cast, kept[2])
        if split:
            A = B = None
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        with torch.no_grad():  # the kernel a plan launches is the one a step's forward runs
            made = ops.forward_plan(x2, self.base, A, B, 1.0 if split else self.scaling, bias, self.backend)
        if made is None and x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # none in a capture (a new problem is not tuned there): ask again after it
        plans[key] = ops.NoPlan() if made is None else StepPlans(made, (A, B))
        plans.move_to_end(key)
        return None  # this call takes the full path too (it tunes the problem if it is new)

    def _run_plan(self, plan, x, split, tensors, read):
        """``y`` for ``x`` through ``plan`` (a ``StepPlans``), which reads ``read`` (the layer's
        ``(A, B, bias)``, or their copies in x's dtype under autocast); where a gradient is wanted
        (as the full path decides it), inside ``PlannedLoraLinearFunction``, the gradients going
        to ``tensors``. ``split``: LoRA dropout is active, the plan computes the base alone and the
        adapter's path is added on the dropped-out input."""
        A, B, bias = tensors
        K = self.in_features
        xl = None
        if split:
            # the same dropout call on the same x as the full path's, before any view of x: the
            # same random numbers, and autograd meets x's two uses in the full path's order (the
            # order in which it sums their gradients into dX)
            xl = self._modules["lora_dropout"](x)
            if xl is x:  # a dropout that returned its input (p = 0): the full path's computation
                return self._forward(x, xl)
        x2 = x if x.dim() == 2 else x.reshape(-1, K)
        xl2 = None if xl is None else xl if xl.dim() == 2 else xl.reshape(-1, K)
        if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
            y = PlannedLoraLinearFunction.apply(x2, xl2, A, B, bias, self.base, self.scaling, self.backend, plan,
                                                None if read is tensors or A is None else read[:2])
        else:
            y = plan.forward(x2)
            if xl2 is not None:
                y = add_lora(y, xl2, read[0], read[1], self.scaling)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def _autocast_copies(tensors, dtype, copies: dict):
        """``tensors`` (``A, B, bias``) in ``dtype`` for plans under autocast: each one itself if
        it is in ``dtype``, else a copy kept in ``copies`` (so that plans can read it at the
        same address), copied again on every call, as the full path casts it on every call: a
        write through ``.data`` leaves no trace (no version counter moves) that could tell when
        a copy would be stale."""
        out = []
        for i, t in enumerate(tensors):
            if t is None or t.dtype == dtype:
                out.append(t)
                continue
            kept = copies.get((i, dtype))  # by dtype too: plans of fp16 and bf16 autocast each read theirs
            if kept is None:
                # a normal tensor even under inference_mode (an inference tensor could not be
                # copied into outside it): written in place in either mode
                with torch.inference_mode(False), torch.no_grad():
                    kept = copies[i, dtype] = t.detach().to(dtype, memory_format=torch.contiguous_format)
            else:
                with torch.no_grad():
                    kept.copy_(t)
            out.append(kept)
        return tuple(out)

    def _forward(self, x: torch.Tensor, dropped: Optional[torch.Tensor] = None) -> torch.Tensor:
        # parameters through _parameters rather than Module.__getattr__ (host time on every call);
        # getattr where they are not there (a parametrization, FSDP's flat parameters).
        # dropped: lora_dropout(x) when the caller has called it already
        params = self._parameters
        if self.adapter_enabled:
            A = params["lora_A"] if "lora_A" in params else self.lora_A
            B = params["lora_B"] if "lora_B" in params else self.lora_B
            # x_lora None: the adapter sees x itself (no dropout active), the fused single-pass path
            if dropped is not None:
                x_lora = dropped
            else:
                x_lora = None if not self.training or isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout(x)
        else:
            A = B = x_lora = None
        bias = params["bias"] if "bias" in params else self.bias  # a plain attribute when there is none
        args = (x, x_lora, A, B, bias, self.base, self.scaling, self.backend)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, bias)):
            return lora_linear_function().apply(*args)
        return lora_linear_forward(*args)  # no gradient wanted: the same computation without autograd

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``Ŵ + s·B·A`` (without the adapter if it is disabled), in the base dtype."""
        acc = torch.promote_types(self.base.dtype, torch.float32)
        W = self.base.dequantize().to(acc)
        if self.adapter_enabled:
            W = W + self.scaling * (self.lora_B.to(acc) @ self.lora_A.to(acc))
        return W.to(self.base.dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``Ŵ + s·B·A`` and the bias (e.g. for export)."""
        W = self.merged_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=W.device, dtype=W.dtype)
        lin.weight.copy_(W)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def layer_config(self) -> dict:
        """What :func:`loraq.load` needs to rebuild this layer without its dense weight."""
        return {
            "compression": self.compression, "in_features": self.in_features, "out_features": self.out_features,
            "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
            "dropout": float(getattr(self.lora_dropout, "p", 0.0)), "bias": self.bias is not None,
            "group_size": self._meta.get("group_size"), "scale": self._meta.get("scale_mode", "mean_abs"),
            "dtype": str(self.base.dtype).replace("torch.", ""),
        }

    def extra_repr(self) -> str:
        base = self.base
        lora = (self.lora_A.numel() + self.lora_B.numel()) * self.lora_A.element_size()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, compression={self.compression}, "
            f"rank={self.rank}, scaling={self.scaling:.4g}, bias={self.bias is not None}, "
            f"base={format_bytes(base.nbytes)} ({base.bits_per_weight:.3g} bits/weight, "
            f"dense {format_bytes(base.dense_nbytes)}), lora={format_bytes(lora)}"
            + ("" if self.adapter_enabled else ", adapter disabled")
        )
