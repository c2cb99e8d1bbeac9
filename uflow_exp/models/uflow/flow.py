"""The U-shaped normalizing flow as a FrEIA graph.

Coarsest scale first: a stage of ``flow_steps`` AllInOne blocks, then a channel split whose second
part is that scale's latent and whose first part is pixel-shuffled up (IRevNet upsampling) and
concatenated after the next finer scale's features. The finest stage's output is the last latent.
Node creation order fixes ``module_list`` indices, which must match the reference checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import FrEIA.framework as ff
import FrEIA.modules as fm
from torch import nn

from uflow_exp.utils.shapes import as_shape

from .blocks import FastAllInOneBlock, PixelShuffleUpsampling


def subnet_factory(kernel_size: int, channels_ratio: float):
    """The coupling subnet: conv k x k, ReLU, conv k x k, with 'same' padding."""

    def build(c_in: int, c_out: int) -> nn.Module:
        hidden = int(c_in * channels_ratio)
        return nn.Sequential(
            nn.Conv2d(c_in, hidden, kernel_size, padding="same"),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, kernel_size, padding="same"),
        )

    return build


def _flow_stage(
    node, steps: int, block_args: dict, channels_ratio: float, fast: bool, condition=None, kernel: int = 3
):
    stage = []
    for step in range(steps):
        node = ff.Node(
            node,
            FastAllInOneBlock if fast else fm.AllInOneBlock,
            {
                "subnet_constructor": subnet_factory(kernel if step % 2 == 0 else 1, channels_ratio),
                **block_args,
            },
            conditions=None if condition is None else [condition],
            name=f"flow{node.output_dims[0][-1]}_step{step}",
        )
        stage.append(node)
    return stage


def _check_options(flow_steps: int, subnet_kernel: int, fast: bool, compile_coupling: bool) -> None:
    if flow_steps < 1:
        raise ValueError(f"flow_steps must be >= 1, got {flow_steps}")
    if subnet_kernel < 1 or subnet_kernel % 2 == 0:
        raise ValueError(f"subnet_kernel must be an odd kernel size >= 1, got {subnet_kernel}")
    if compile_coupling and not fast:
        raise ValueError("compile_coupling needs the fast blocks (fast=True); FrEIA's blocks run eagerly")


def build_uflow_graph(
    channels: Sequence[int],
    sizes: Sequence[int | tuple[int, int]],
    flow_steps: int = 4,
    affine_clamp: float = 2.0,
    subnet_channels_ratio: float = 1.0,
    subnet_kernel: int = 3,
    permute_soft: bool = False,
    fast: bool = True,
    compile_coupling: bool = False,
    position_channels: int = 0,
) -> ff.GraphINN:
    """The U-flow over per-scale inputs ``(channels[i], *sizes[i])`` (a size: H = W, or (H, W)),
    finest first.

    The graph returns one latent per scale, finest first. ``fast`` builds it from ``FastAllInOneBlock``
    (same parameters and results, faster), whose coupling ``compile_coupling`` runs through
    ``torch.compile``, and upsamples by ``PixelShuffleUpsampling`` (FrEIA's numbers); ``fast=False``
    builds it from FrEIA's own blocks, the reference.

    ``position_channels`` > 0 makes every coupling subnet of scale ``i`` also see a condition of that
    many channels at the scale's size (``UFlow`` passes a positional encoding, finest scale first);
    0 is the reference graph, which takes no conditions.
    """
    _check_options(flow_steps, subnet_kernel, fast, compile_coupling)
    sizes = [as_shape(s) for s in sizes]
    block_args = {"affine_clamping": affine_clamp, "permute_soft": permute_soft}
    if fast:
        block_args["compile_coupling"] = compile_coupling
    inputs = [
        ff.InputNode(c, *s, name=f"input_{i}") for i, (c, s) in enumerate(zip(channels, sizes, strict=True))
    ]
    conditions = (
        [ff.ConditionNode(position_channels, *s, name=f"position_{i}") for i, s in enumerate(sizes)]
        if position_channels
        else [None] * len(sizes)
    )
    flow_stage = partial(
        _flow_stage, steps=flow_steps, block_args=block_args, channels_ratio=subnet_channels_ratio, fast=fast
    )
    nodes, outputs = [], []
    current = inputs[-1]
    for scale in range(len(inputs) - 1, 0, -1):
        stage = flow_stage(current, condition=conditions[scale], kernel=subnet_kernel)
        volume = stage[-1].output_dims[0][0]
        kept = volume // 8 * 4
        split = ff.Node(
            stage[-1], fm.Split, {"section_sizes": (kept, volume - kept), "dim": 0}, name=f"split_{scale}"
        )
        up = ff.Node(
            split.out0, PixelShuffleUpsampling if fast else fm.IRevNetUpsampling, {}, name=f"up_{scale}"
        )
        current = ff.Node([inputs[scale - 1].out0, up.out0], fm.Concat, {"dim": 0}, name=f"cat_{scale}")
        outputs.append(ff.OutputNode(split.out1, name=f"z_{scale}"))
        nodes += [*stage, split, up, current]
    stage = flow_stage(current, condition=conditions[0], kernel=subnet_kernel)
    outputs.append(ff.OutputNode(stage[-1], name="z_0"))
    nodes += stage
    condition_nodes = [c for c in conditions if c is not None]
    return ff.GraphINN(inputs + condition_nodes + nodes + outputs[::-1], force_tuple_output=True)
