"""BatchEnsemble layers, the conversion of any registry model, and the fold.

A BatchEnsemble layer holds one shared weight W (and bias b) and, per member m, a factor
r_m over its input features and s_m over its output features:

    y_m = s_m * (W (r_m * x) + b)          (conv: W convolved; bias scaled by s_m too)

r and s start at exactly 1, so every member starts as the plain layer. The input batch
is member-major: rows [m*B:(m+1)*B] belong to member m (``tile``). BatchNorm and every
other norm stay shared.

``fold`` turns a BatchEnsemble model into the plain model it was converted from, with the
mean factors r_bar, s_bar: W' = W * r_bar[in] * s_bar[out], b' = b * s_bar. The folded
model is exactly the BatchEnsemble model with every member's factors set to the means; it
is not the mean of the members' outputs (the gap is the covariance of r and s across
members). ``fold(exact=True)`` gives each layer the mean of the members' own weights
instead, W' = W * mean_m(s_m r_m^T) (the same b'): still one plain layer, it differs from
the mean-factor fold by that covariance, and is still not the mean of the outputs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.errors import ConfigError

SHARED = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
"""Layers with parameters that all members share as they are."""
FACTORS = ("r", "s")


def tile(x: torch.Tensor, members: int) -> torch.Tensor:
    """[B, ...] -> [members * B, ...], member-major (rows [m*B:(m+1)*B] are member m's)."""
    return x.repeat(members, *([1] * (x.dim() - 1)))


def _rows(factor: torch.Tensor, n: int, members: int, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Factor [M, F] broadcast to the member-major rows of ``x`` along feature ``dim``."""
    if n % members:
        raise ValueError(f"a BatchEnsemble layer of {members} members got a batch of {n} rows, "
                         f"not a multiple of {members}: tile the input with batchensemble.tile")
    f = factor.repeat_interleave(n // members, dim=0)  # [n, F]
    shape = [n] + [1] * (x.dim() - 1)
    shape[dim] = factor.shape[1]
    return f.view(shape)


def members_mean_scale(r: torch.Tensor, s: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """mean_m s_m[o] * r_m[i(o, j)], the factor on each entry of W [out, in/groups] that
    makes W the mean of the members' own weights. r [M, in], s [M, out]; output o (of
    group o // (out/groups)) reads input i(o, j) = group * in/groups + j."""
    m, n_in = r.shape
    n_out = s.shape[1]
    per_group = torch.einsum("mgo,mgi->goi", s.view(m, groups, n_out // groups), r.view(m, groups, n_in // groups))
    return per_group.reshape(n_out, n_in // groups) / m


class BEConv2d(nn.Conv2d):
    """A Conv2d with ``members`` rank-1 factors: r over input, s over output channels."""

    def __init__(self, *args, members: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.members = members
        self.r = nn.Parameter(torch.ones(members, self.in_channels))
        self.s = nn.Parameter(torch.ones(members, self.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = self._conv_forward(x * _rows(self.r, n, self.members, x, 1), self.weight, None)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y * _rows(self.s, n, self.members, y, 1)

    def folded(self, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') of the plain conv with the mean factors (``exact``: W' the mean of the
        members' own weights); b' = b * s_bar either way."""
        r, s = self.r.mean(0), self.s.mean(0)
        if exact:
            w = self.weight * members_mean_scale(self.r, self.s, self.groups)[:, :, None, None]
            return w, None if self.bias is None else self.bias * s
        g = self.groups
        per_group_in = self.in_channels // g
        # weight [out, in/g, kh, kw]: output o (group o // (out/g)) reads input channels
        # group * in/g + j for j < in/g.
        r_w = r.view(g, per_group_in).repeat_interleave(self.out_channels // g, dim=0)
        w = self.weight * r_w[:, :, None, None] * s[:, None, None, None]
        return w, None if self.bias is None else self.bias * s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, members={self.members}"


class BELinear(nn.Linear):
    """A Linear with ``members`` rank-1 factors: r over input, s over output features."""

    def __init__(self, *args, members: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.members = members
        self.r = nn.Parameter(torch.ones(members, self.in_features))
        self.s = nn.Parameter(torch.ones(members, self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = F.linear(x * _rows(self.r, n, self.members, x, x.dim() - 1), self.weight, self.bias)
        return y * _rows(self.s, n, self.members, y, y.dim() - 1)

    def folded(self, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') as ``BEConv2d.folded``."""
        r, s = self.r.mean(0), self.s.mean(0)
        w = self.weight * members_mean_scale(self.r, self.s) if exact else self.weight * r[None, :] * s[:, None]
        return w, None if self.bias is None else self.bias * s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, members={self.members}"


BE_LAYERS = (BEConv2d, BELinear)


def _convert(layer: nn.Module, members: int) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        be: nn.Module = BEConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, members=members,
            device=layer.weight.device, dtype=layer.weight.dtype,
        )
    else:
        be = BELinear(layer.in_features, layer.out_features, layer.bias is not None, members=members,
                      device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        be.weight.copy_(layer.weight)
        if layer.bias is not None:
            be.bias.copy_(layer.bias)
    return be


def check_convertible(model: nn.Module) -> None:
    """Raise ConfigError naming every layer that holds parameters but is neither a
    Conv2d/Linear (converted) nor a norm (shared): converting it silently would leave a
    layer that every member shares without anyone having said so."""
    bad = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear, *SHARED)):
            continue
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if own:
            bad.append(f"{name or '(root)'} ({type(mod).__name__}: {', '.join(own)})")
    if bad:
        raise ConfigError(
            "cannot make a BatchEnsemble of this model: these layers hold parameters but are neither "
            "Conv2d/Linear (which get member factors) nor BatchNorm/LayerNorm/GroupNorm (which stay "
            f"shared): {'; '.join(bad)}"
        )


def to_batchensemble(model: nn.Module, members: int) -> nn.Module:
    """``model`` with every Conv2d and Linear replaced by its BatchEnsemble layer of
    ``members`` members (weights copied, factors 1), in place; norms stay shared. The
    model keeps its ``me_spec`` (the plain architecture ``fold`` rebuilds)."""
    if members < 1:
        raise ConfigError(f"a BatchEnsemble needs at least 1 member, got {members}")
    check_convertible(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Linear)) and not isinstance(child, BE_LAYERS):
                setattr(parent, name, _convert(child, members))
    model.be_members = members  # type: ignore[attr-defined]
    return model


def members_of(model: nn.Module) -> int:
    m = getattr(model, "be_members", None)
    if m is None:
        raise ValueError("not a BatchEnsemble model (made by to_batchensemble)")
    return int(m)


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every r and s of the model's BatchEnsemble layers."""
    return [getattr(m, f) for m in model.modules() if isinstance(m, BE_LAYERS) for f in FACTORS]


@torch.no_grad()
def fold(model: nn.Module, exact: bool = False) -> nn.Module:
    """The plain network of ``model``'s architecture (``me_spec``) whose convs and linears
    carry the mean factors folded in (``exact``: each the mean of the members' own
    weights, W * mean_m s_m r_m^T); every other tensor (BatchNorm affine and running
    statistics included) is copied. Same device, eval mode."""
    from metaensemble.models import create_model

    spec = getattr(model, "me_spec", None)
    if spec is None:
        raise ValueError("fold needs the model's me_spec (build it with models.create_model)")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, BE_LAYERS):
            w, b = mod.folded(exact)
            prefix = f"{name}." if name else ""
            state[f"{prefix}weight"] = w.detach().clone()
            if b is not None:
                state[f"{prefix}bias"] = b.detach().clone()
            for f in FACTORS:
                del state[f"{prefix}{f}"]
    plain = create_model(spec["arch"], **spec["kwargs"])
    plain.load_state_dict(state, strict=True)
    device = next(iter(state.values())).device if state else torch.device("cpu")
    return plain.to(device).eval()


@torch.no_grad()
def with_mean_factors(model: nn.Module) -> nn.Module:
    """A copy of the BatchEnsemble ``model`` with every member's r and s set to their mean
    over members: all members then compute the same function, which ``fold`` must equal."""
    out = copy.deepcopy(model)
    for p in factor_parameters(out):
        p.copy_(p.mean(0, keepdim=True).expand_as(p))
    return out
