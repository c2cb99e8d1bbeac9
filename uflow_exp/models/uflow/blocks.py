"""A faster drop-in for FrEIA's ``AllInOneBlock``, numerically the same for the U-flow's configuration.

FrEIA applies the block's hard channel permutation as a C x C 1x1 convolution (O(C^2) per pixel, in the
forward and again in the backward pass); here it is an exact channel gather (O(C)), derived from the
block's own ``w_perm``, so the authors' checkpoints, each with its own random permutations, load
unchanged. The element-wise work around the coupling (soft-clamped affine, global affine, permutation)
is about ten memory-bound passes in eager mode; ``compile_coupling=True`` fuses it into a few kernels
with ``torch.compile``. Under bfloat16 autocast the subnets' convolutions run in bfloat16 and everything
after them in float32.
"""

from __future__ import annotations

import functools
import itertools
import logging

import FrEIA.modules as fm
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class _ChannelGather(torch.autograd.Function):
    """``x[:, index]`` for a permutation ``index``. The gradient is gathered back through ``inverse``
    rather than scatter-added (autograd's default for indexing): exact for a permutation, and a plain
    parallel copy."""

    @staticmethod
    def forward(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def _coupling_eager(
    x1: torch.Tensor,
    x2: torch.Tensor,
    a: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    index: torch.Tensor,
    inverse: torch.Tensor,
    clamp: float,
    jac: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward block after its subnet: ``gather((x1 | x2 * exp(s) + t) * scale + offset)`` with
    ``s = clamp * tanh(a_s / 10)``, ``t = a_t / 10`` and per-channel ``scale``, ``offset`` of shape (C,),
    and the coupling's log-det ``sum s`` (or None)."""
    c1, c2 = x1.shape[1], x2.shape[1]
    # split rather than slice: the backward of two slices zero-fills two full-size gradients
    a_s, a_t = torch.split(a * 0.1, c2, dim=1)
    sub_jac = clamp * torch.tanh(a_s)
    x2 = torch.addcmul(a_t, x2, torch.exp(sub_jac))
    per_channel = (1, -1) + (1,) * (a.dim() - 2)
    scale, offset = scale.view(per_channel), offset.view(per_channel)
    y = torch.cat(
        (torch.addcmul(offset[:, :c1], x1, scale[:, :c1]), torch.addcmul(offset[:, c1:], x2, scale[:, c1:])),
        1,
    )
    log_jac_det = torch.sum(sub_jac, dim=tuple(range(1, a.dim()))) if jac else None
    return _ChannelGather.apply(y, index, inverse), log_jac_det


_coupling_compiled = None  # one compiled function (dynamic shapes) serves every block and stage
_compile_failed = False


def _coupling(compiled: bool, *args):
    """The coupling, through ``torch.compile`` when ``compiled``.

    Each new input shape costs a compile (seconds on CPU, which needs a C++ compiler; GPUs need
    triton), cached on disk across processes. If compiling fails, the eager path takes over with a
    warning, for the rest of the process.
    """
    global _coupling_compiled, _compile_failed
    if compiled and not _compile_failed:
        if _coupling_compiled is None:
            _coupling_compiled = torch.compile(_coupling_eager, dynamic=True)
        try:
            return _coupling_compiled(*args)
        except Exception as error:  # any toolchain failure; a genuine error recurs in eager
            log.warning("torch.compile of the flow coupling failed, continuing in eager mode: %s", error)
            _compile_failed = True
    return _coupling_eager(*args)


def _permutation_index(w: torch.Tensor) -> torch.Tensor | None:
    """``i`` such that ``conv(x, w) == x[:, i]`` when ``w`` is a hard permutation matrix, else None."""
    matrix = w.detach().flatten(1)
    index = matrix.argmax(dim=1)
    is_permutation = torch.equal(matrix, F.one_hot(index, matrix.shape[1]).to(matrix.dtype)) and bool(
        torch.bincount(index, minlength=matrix.shape[1]).eq(1).all()
    )
    return index if is_permutation else None


class FastAllInOneBlock(fm.AllInOneBlock):
    """``AllInOneBlock`` with the same parameters and results, faster for hard permutations.

    Configurations the fast path does not cover (soft permutations, i.e. any ``w_perm`` that is not a
    permutation matrix, GIN, Householder, reverse permutation) run FrEIA's code.
    ``compile_coupling`` runs the forward coupling's element-wise work through ``torch.compile``.
    """

    def __init__(self, dims_in, dims_c=None, compile_coupling: bool = False, **kwargs):
        super().__init__(dims_in, [] if dims_c is None else dims_c, **kwargs)
        self.compile_coupling = compile_coupling
        if kwargs.get("global_affine_type", "SOFTPLUS") == "SOFTPLUS":
            # FrEIA's activation is a lambda, which cannot be pickled; the same function as a method can.
            self.global_scale_activation = self._softplus_scale
        self._fast = not (self.GIN or self.householder or self.reverse_pre_permute)
        self._gather_cache: dict[str, tuple] = {}

    def _softplus_scale(self, a: torch.Tensor) -> torch.Tensor:
        return 0.1 * self.softplus(a)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # A loaded (or assigned) w_perm carries its own permutation.
        self._gather_cache.clear()

    def _gather_indices(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The gather index of permutation matrix ``name`` and its inverse; recomputed when the matrix
        changes in place (version) or moves (device)."""
        w = getattr(self, name)
        key = (w._version, w.device)
        cached = self._gather_cache.get(name)
        if cached is None or cached[0] != key:
            # Built outside inference mode even when first called in it (predict, test): an inference
            # tensor kept here would break a later autograd-tracked call (training, ONNX tracing).
            with torch.inference_mode(False):
                index = _permutation_index(w)
                cached = (key, None if index is None else (index, torch.argsort(index)))
            self._gather_cache[name] = cached
        return cached[1]

    def _subnet(self, x1: torch.Tensor, c) -> torch.Tensor:
        """The subnet on ``x1`` and the conditions. A condition that is the same for every sample (the
        positional encoding: expanded, batch stride 0) passes the first convolution once, on one
        sample, and is broadcast over the batch: the same sum, without the batch-fold work (and no
        input gradient) for its channels. Written here because a coupling subnet sees the condition
        only as extra input channels."""
        if not self.conditional:
            return self.subnet(x1)
        first = self.subnet[0] if isinstance(self.subnet, nn.Sequential) else None
        shared = all(t.shape[0] == 1 or t.stride(0) == 0 for t in c)
        plain_conv = isinstance(first, nn.Conv2d) and first.groups == 1 and first.padding_mode == "zeros"
        if not (shared and plain_conv):
            return self.subnet(torch.cat([x1, *c], 1))
        split = x1.shape[1]
        conv = functools.partial(
            F.conv2d, stride=first.stride, padding=first.padding, dilation=first.dilation
        )
        h = conv(x1, first.weight[:, :split], first.bias)
        h = h + conv(torch.cat([t[:1] for t in c], 1), first.weight[:, split:])
        for layer in itertools.islice(self.subnet, 1, None):  # slicing a Sequential builds a new module
            h = layer(h)
        return h

    def forward(self, x, c=None, rev=False, jac=True):
        indices = self._gather_indices("w_perm_inv" if rev else "w_perm") if self._fast else None
        if indices is None:
            # FrEIA's coupling would sum the log-det in the autocast dtype: it runs in full precision
            with torch.autocast(x[0].device.type, enabled=False):
                return super().forward(x, [] if c is None else c, rev=rev, jac=jac)
        index, inverse = indices
        x = x[0]
        scale = self.global_scale_activation(self.global_scale)
        if rev:
            x = (_ChannelGather.apply(x, index, inverse) - self.global_offset) / scale
        x1, x2 = torch.split(x, self.splits, dim=1)
        # Under autocast (trainer.precision=bf16-mixed) only the subnet's convolutions run in bfloat16:
        # the coupling, the latents and the log-det stay in the features' precision.
        a = self._subnet(x1, c).to(x1.dtype)
        if rev:
            a = a * 0.1
            sub_jac = self.clamp * torch.tanh(a[:, : self.splits[1]])
            out = torch.cat((x1, (x2 - a[:, self.splits[1] :]) * torch.exp(-sub_jac)), 1)
            log_jac_det = -torch.sum(sub_jac, dim=self.sum_dims) if jac else None
        else:
            # Flat per-channel affine: torch.compile keeps parameters' shapes static, which would compile
            # each stage's channel count separately.
            offset = self.global_offset.flatten()
            out, log_jac_det = _coupling(
                self.compile_coupling, x1, x2, a, scale.flatten(), offset, index, inverse, self.clamp, jac
            )
        if log_jac_det is not None:
            log_jac_det = log_jac_det + (-1) ** rev * out[0, :1].numel() * torch.sum(torch.log(scale))
        return (out,), log_jac_det


class PixelShuffleUpsampling(fm.IRevNetUpsampling):
    """FrEIA's ``IRevNetUpsampling`` (same state dict, same channel order) as ``pixel_shuffle``: a pure
    data movement where FrEIA runs a transposed convolution with a 0/1 kernel, so it is exact in any
    dtype (autocast would round the convolution's output to bfloat16) and costs no arithmetic."""

    def forward(self, x, c=None, jac=True, rev=False):
        shuffle = F.pixel_unshuffle if rev else F.pixel_shuffle
        return (shuffle(x[0], 2),), 0.0
