"""Rules for layers with per-channel parameters, narrowed to the layouts they read: an
unfolded eval-mode ``BatchNorm``, an ``nn.Linear`` head, and a conv with what is fused
into it (``ConvSite``, emitted as one unit by ``units.py``).
"""

from __future__ import annotations

from torch import nn

from ..context import batchnorm_affine
from .base import Rule, _first_channel_arg, _KeepsChannels, frozen


class BatchNorm(_KeepsChannels):
    """Eval-mode BatchNorm not folded into a conv (pre-activation blocks, after an add): a
    per-channel affine map, emitted narrowed to its input's layout."""

    kind = "batchnorm"
    _config = ("num_features", "eps", "momentum", "affine", "track_running_stats")
    modules = frozen(
        {"BatchNorm2d": (nn.BatchNorm2d, _config), "BatchNorm1d": (nn.BatchNorm1d, _config)}
    )

    def understands(self, node, ctx):
        bn = ctx.modules[node.target]
        rank = len(ctx.shape(node) or ())
        expected = 4 if isinstance(bn, nn.BatchNorm2d) else 2
        return bn.running_mean is not None and rank == expected and super().understands(node, ctx)

    def constants(self, node, ctx):
        scale, shift = batchnorm_affine(ctx.modules[node.target])
        return ctx.const[node.args[0]] * scale + shift

    def emit(self, node, ctx):
        bn = ctx.modules[node.target]
        if ctx.is_full(node):
            return ctx.copy(node)
        keep = ctx.layout[node]
        narrow = type(bn)(int(keep.numel()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
        state = {k: (v[keep] if v.dim() == 1 else v) for k, v in bn.state_dict().items()}
        narrow.load_state_dict(state)
        return ctx.call_module(
            ctx.own_name(node), ctx.cast(narrow.eval()), (ctx.env[node.args[0]],)
        )


class Linear(Rule):
    """``nn.Linear`` on ``[N, C]``: narrowed to the layout it reads, the constant input
    channels folded into its bias. On other ranks (a Linear over NHWC channels) opaque."""

    kind = "linear"
    modules = frozen({"Linear": (nn.Linear, ("in_features", "out_features"))})

    def understands(self, node, ctx):
        return len(node.args) == 1 and not node.kwargs

    def narrows(self, node, ctx) -> bool:
        source = _first_channel_arg(node, ctx)
        return source is not None and len(ctx.shape(source)) == 2

    def tie(self, node, ctx):
        if not self.narrows(node, ctx):
            super().tie(node, ctx)

    def emit(self, node, ctx):
        from ..units import linear_unit

        module = linear_unit(ctx, node, narrow=self.narrows(node, ctx))
        return ctx.call_module(ctx.own_name(node), module, (ctx.env[node.args[0]],))


class ConvSite(Rule):
    """A conv and what is fused into it (``patterns.Site``): the whole chain becomes one
    unit at its last node; the others emit nothing (nothing else reads them)."""

    kind = "conv"

    def constants(self, node, ctx):
        site = ctx.site_of[node]
        if node is not site.out:
            return ctx.varying(node)
        from ..units import site_constants

        return site_constants(ctx, site)

    def tie(self, node, ctx):
        site = ctx.site_of[node]
        if node is not site.out:
            return
        if site.residual is not None:
            ctx.uf.union(site.out, site.residual)
        if ctx.choices[site.name].kind in ("group", "torch"):
            ctx.uf.force_full(site.out)
            ctx.uf.force_full(site.conv.args[0])

    def emit(self, node, ctx):
        site = ctx.site_of[node]
        if node is not site.out:
            return None
        from ..units import conv_unit

        args = (ctx.env[site.conv.args[0]],)
        if site.residual is not None:
            args += (ctx.env[site.residual],)
        return ctx.call_module(site.name, conv_unit(ctx, site), args)
