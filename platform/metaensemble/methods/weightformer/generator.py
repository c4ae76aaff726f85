"""Parameter generators: WeightFormer and the MLP baseline, registered as models.

Both map an ensemble's per-layer rows to the student's rows::

    out = generator([X_1, ..., X_L])     # X_l: [V, K, C_out_l, row_len_l]  (V views)
    out["rows"][l]                       # [V, C_out_l, row_len_l], base + residual
    out["cross"][l]                      # [V, d_model], the [cross] input of layer l
    out["mask_l1"]                       # scalar, mean |attention-mask bias|

The residual is predicted in units of each segment's RMS over the ensemble (weights,
bias, BN scale, BN statistics differ in scale by orders of magnitude), multiplied by a
learned per-layer scale (``residual_scale`` at initialisation) and added to the base
row: teacher 1's (``base="anchor"``), the teachers' mean (``base="mean"``), or a learned
mix of the teachers' values (``base="mix"``, uniform at initialisation). ``mean`` and
``mix`` do not depend on the teachers' order, so an order-invariant generator can return
its base exactly.

The mix keeps each hidden unit coherent across the layers it connects (``coherent``, on
by default). Each teacher token scores its teacher for its unit: ``s_l[k, r]``. A weight
joins two units, unit ``r`` of layer l and unit ``c`` of layer l-1 that it reads, so
its value is mixed with ``softmax_k(s_l[k, r] + s_{l-1}[k, c])``; a unit's bias and norm
values with ``softmax_k(s_l[k, r])``. A unit that prefers teacher k takes its incoming
row and the next layer's matching column from teacher k together (``coherent_mix``).
This needs a plain chain of layers (``align.chain``); on any other student, and with
``coherent=False``, every row is mixed on its own scores (unit r's row and the next
layer's column r can then come from different teachers).

The decoder has no learned offset: the correction is linear in each row's pooled output
state (no output bias, no per-chunk output offset, no bias in the final norm), so no part
of it is one vector added to every ensemble's rows alike; a zero state decodes to a zero
correction. (The states themselves also carry position, layer and model-id embeddings,
which attention mixes with the teachers' values.)

``generator(xs, cutoff=[0.0, 0.25])``: view v's token embeddings of a random contiguous
``cutoff[v]`` fraction of each layer's teacher tokens are zeroed (span cutoff, a view the
consistency loss compares with the full one); the base always sees every row.
Rows longer than ``chunk`` are cut into chunks, embedded by one per-layer projection and
pooled, so no layer needs a projection as wide as its rows; a shorter row is one chunk of
its own length (nothing is padded to ``chunk``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.errors import ConfigError
from metaensemble.methods.weightformer.align import chain, incoming_weight
from metaensemble.methods.weightformer.tokens import Layout, build_layout, num_chunks, segment_ids
from metaensemble.models.registry import create_model, register_model

POS_FEATURES = 32


def student_skeleton(student: str, student_kwargs: dict[str, Any] | None, num_classes: int, in_chans: int,
                     img_size: int) -> tuple[nn.Module, Layout]:
    """A freshly built student and its token layout."""
    m = create_model(student, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **(student_kwargs or {}))
    return m, build_layout(m, torch.zeros(2, in_chans, img_size, img_size))


def segment_scale(x: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Per view, each column's segment RMS over the ensemble: x [V, K, R, L] -> [V, L]
    (detached: a scale, not something to learn through)."""
    x = x.detach()
    sq = x.pow(2).mean(dim=(1, 2))  # [V, L]
    width = torch.bincount(seg, minlength=n_seg).to(x.dtype)
    per_seg = torch.zeros(x.shape[0], n_seg, dtype=x.dtype, device=x.device).index_add_(1, seg, sq) / width
    return per_seg.sqrt().clamp_min(1e-6)[:, seg]


def sinusoid(pos: torch.Tensor, dim: int = POS_FEATURES) -> torch.Tensor:
    """[N] integer positions -> [N, dim] sin/cos features (any width, no table)."""
    freq = torch.exp(torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    ang = pos.float()[:, None] * freq[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


def distance_bucket(d: torch.Tensor, buckets: int) -> torch.Tensor:
    """|r_i - r_j| -> bucket: 0 for 0, then 1 + floor(log2 d), capped at ``buckets - 1``."""
    b = torch.where(d > 0, 1 + torch.log2(d.clamp_min(1).float()).floor().long(), torch.zeros_like(d))
    return b.clamp_max(buckets - 1)


class _RowCodec(nn.Module):
    """Per-layer chunked row <-> d_model maps, in segment-RMS units. A layer's chunk is
    ``min(chunk, row_len)``. Decoding is linear in the hidden state (no bias, the per-chunk
    embedding scales it): a zero state decodes to a zero correction."""

    def __init__(self, layout: Layout, d_model: int, chunk: int, in_mult: int = 1, residual_scale: float = 0.05,
                 out_init: float = 0.02) -> None:
        super().__init__()
        if not residual_scale > 0:
            raise ConfigError(f"residual_scale must be positive (the correction's initial scale), got {residual_scale}")
        self.widths = [min(chunk, ly.row_len) for ly in layout.layers]
        # the correction's scale, learned per layer (log-parametrised, so it stays positive)
        self.log_scale = nn.Parameter(torch.full((len(layout.layers),), math.log(residual_scale)))
        self.inp = nn.ModuleList(nn.Linear(w * in_mult, d_model) for w in self.widths)
        self.out = nn.ModuleList(nn.Linear(d_model, w, bias=False) for w in self.widths)
        self.chunk_in = nn.ParameterList(nn.Parameter(torch.randn(num_chunks(ly, w), d_model) * 0.02)
                                         for ly, w in zip(layout.layers, self.widths, strict=True))
        # per chunk, a scaling of the state it is decoded from (1 + this): not an offset,
        # which would be a correction no teacher has any say in
        self.chunk_out = nn.ParameterList(nn.Parameter(torch.randn(num_chunks(ly, w), d_model) * 0.02)
                                          for ly, w in zip(layout.layers, self.widths, strict=True))
        # Per row and segment, a multiplicative correction of the base: rescaling a
        # neuron's weights or a BN scale is the correction most often needed, and a
        # low-dimensional state reconstructs it poorly as an additive row.
        self.gain = nn.ModuleList(nn.Linear(d_model, len(ly.segments), bias=False) for ly in layout.layers)
        for li, ly in enumerate(layout.layers):
            self.register_buffer(f"seg{li}", segment_ids(ly), persistent=False)
        self.n_seg = [len(ly.segments) for ly in layout.layers]
        # The additive head starts at a transformer's usual std (a correction of about 1% of
        # each segment's RMS, so every input, the previous layers' included, visibly moves
        # the output); the multiplicative gain, one very sensitive direction, near zero.
        for lin in self.out:
            nn.init.normal_(lin.weight, std=out_init)
        for lin in self.gain:
            nn.init.normal_(lin.weight, std=1e-3 / math.sqrt(d_model))

    def seg(self, li: int) -> torch.Tensor:
        return getattr(self, f"seg{li}")

    def chunks(self, li: int, x: torch.Tensor) -> torch.Tensor:
        """[..., L] -> [..., n_chunks, width] (layer ``li``'s chunk width), zero-padded."""
        w = self.widths[li]
        n = math.ceil(x.shape[-1] / w)
        return F.pad(x, (0, n * w - x.shape[-1])).unflatten(-1, (n, w))

    def encode(self, li: int, xn: torch.Tensor) -> torch.Tensor:
        """Normalised rows [..., R, L * in_mult chunks] -> [..., R, d]; chunk embeddings pooled."""
        return (self.inp[li](xn) + self.chunk_in[li]).mean(dim=-2)

    def decode(self, li: int, h: torch.Tensor, base: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Hidden rows h [V, R, d] -> the residual [V, R, L] on ``base`` [V, R, L]:
        base * gain(h) per segment + an additive row in units of the segment RMS ``scale`` [V, L],
        both times the layer's learned scale (``residual_scale`` at initialisation): a
        layer-wide gain is one very sensitive direction (it rescales every neuron at once),
        and undamped it makes SGD diverge in tens of steps."""
        y = self.out[li](h.unsqueeze(-2) * (1.0 + self.chunk_out[li])).flatten(-2)[..., :base.shape[-1]]
        g = self.gain[li](h)[..., self.seg(li)]  # [V, R, L]
        return self.log_scale[li].exp() * (base * g + y * scale[:, None, :])

    def zero_residual_(self) -> None:
        with torch.no_grad():
            for lin in [*self.out, *self.gain]:
                lin.weight.zero_()


class _Block(nn.Module):
    """Pre-LN transformer block whose attention takes an additive [H, N, N] bias."""

    def __init__(self, d: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        if d % heads:
            raise ConfigError(f"d_model={d} is not divisible by heads={heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, ff_mult * d), nn.GELU(), nn.Linear(ff_mult * d, d))

    def forward(self, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        v_, n, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(v_, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.unsqueeze(0))
        h = h + self.proj(a.transpose(1, 2).reshape(v_, n, d))
        return h + self.ff(self.ln2(h))


BASES = ("anchor", "mean", "mix")


def unit_links(layout: Layout) -> list[torch.Tensor | None]:
    """Per layer, which unit of the layer before it each column of its rows reads: a
    LongTensor [row_len] holding that unit (0..R_prev-1) on the incoming-weight columns
    and R_prev on the others (bias, norm values); None for the first layer. All None when
    the layout is not a plain chain (``align.chain``): there the input of a layer is not
    simply the layer before it."""
    try:
        chain(layout)
    except ConfigError:
        return [None] * len(layout.layers)
    links: list[torch.Tensor | None] = [None]
    for prev, layer in zip(layout.layers[:-1], layout.layers[1:], strict=True):
        w = incoming_weight(layer)
        per_unit = w.width // prev.rows  # kernel positions per input unit (dim 1 is the unit)
        link = torch.full((layer.row_len,), prev.rows, dtype=torch.long)
        link[w.start:w.start + w.width] = torch.arange(w.width) // per_unit
        links.append(link)
    return links


def coherent_mix(x: torch.Tensor, scores: torch.Tensor, prev: torch.Tensor | None = None,
                 link: torch.Tensor | None = None) -> torch.Tensor:
    """Teachers' rows x [V, K, R, L] mixed into [V, R, L]. ``scores`` [V, K, R]: each
    unit's score of each teacher. With ``prev`` [V, K, R_prev] (the layer before's scores)
    and ``link`` (``unit_links``), the value in column j of row r is mixed with
    ``softmax_k(scores[k, r] + prev[k, link[j]])``, a score of 0 for columns that read no
    unit; without, with ``softmax_k(scores[k, r])``."""
    if prev is None or link is None:
        return (x * scores.softmax(dim=1).unsqueeze(-1)).sum(dim=1)
    s_in = F.pad(prev, (0, 1))[..., link.to(x.device)]  # [V, K, L]
    w = (scores.unsqueeze(-1) + s_in.unsqueeze(2)).softmax(dim=1)  # [V, K, R, L]
    return (x * w).sum(dim=1)


def cutoff_keep(v: int, k: int, r: int, cutoff: list[float] | None, device) -> torch.Tensor | None:
    """[V, K, R] 0/1: per view, a random contiguous span of ``cutoff[v]`` of the K*R
    teacher tokens zeroed (at least one token when the fraction is positive)."""
    if not cutoff or not any(c > 0 for c in cutoff):
        return None
    keep = torch.ones(v, k * r, device=device)
    for i, c in enumerate(cutoff):
        if c > 0:
            n = max(1, min(k * r - 1, round(c * k * r)))
            start = int(torch.randint(0, k * r - n + 1, (1,)))
            keep[i, start:start + n] = 0.0
    return keep.view(v, k, r)


class WeightFormer(nn.Module):
    """The transformer generator (see the module docstring). Switches for ablations:
    ``mask`` (learnable attention-mask bias), ``cross_layer`` ([cross] flow between
    layers), ``base`` (anchor, mean or mix), ``coherent`` (the mix keeps units coherent
    across layers); shift consistency is a loss (the method's).
    ``mask_init``: std of the mask bias at initialisation (0: all zero)."""

    def __init__(self, layout: Layout, *, d_model: int = 64, depth: int = 2, heads: int = 4, max_teachers: int = 8,
                 chunk: int = 256, mask: bool = True, cross_layer: bool = True,
                 base: Literal["anchor", "mean", "mix"] = "mix", ff_mult: int = 2, dist_buckets: int = 8,
                 residual_scale: float = 0.05, mask_init: float = 0.0, out_init: float = 0.02,
                 coherent: bool = True) -> None:
        super().__init__()
        if base not in BASES:
            raise ConfigError(f"base must be one of {', '.join(BASES)}, got {base!r}")
        self.layout, self.max_teachers, self.base = layout, max_teachers, base
        self.links = unit_links(layout) if coherent and base == "mix" else [None] * len(layout.layers)
        self.use_mask, self.cross_layer, self.dist_buckets = mask, cross_layer, dist_buckets
        self.codec = _RowCodec(layout, d_model, chunk, residual_scale=residual_scale, out_init=out_init)
        self.mix_score = nn.Linear(d_model, 1) if base == "mix" else None
        if self.mix_score is not None:  # uniform weights (the mean) at initialisation
            nn.init.zeros_(self.mix_score.weight)
            nn.init.zeros_(self.mix_score.bias)
        self.model_id = nn.Embedding(max_teachers + 1, d_model)
        self.pos = nn.Linear(POS_FEATURES, d_model)
        self.layer_emb = nn.Embedding(len(layout.layers), d_model)
        self.cross0 = nn.Parameter(torch.randn(d_model) * 0.02)
        self.cross_proj = nn.Linear(d_model, d_model) if cross_layer else None
        self.blocks = nn.ModuleList(_Block(d_model, heads, ff_mult) for _ in range(depth))
        self.mask_bias = nn.Parameter(torch.randn(heads, max_teachers + 1, max_teachers + 1, dist_buckets) * mask_init
                                      ) if mask else None
        self.norm = nn.LayerNorm(d_model, bias=False)  # no offset every row would decode alike
        self._index_cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def token_ids(self, k: int, rows: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(model ids [N], relative positions [N], distance buckets [N, N]) of a layer's
        sequence of 1 + k * rows tokens; [cross] has id 0 and position 0."""
        key = (k, rows, str(device))
        if key not in self._index_cache:
            ids = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, k + 1).repeat_interleave(rows)])
            pos = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(rows).repeat(k)])
            dist = (pos[:, None] - pos[None, :]).abs()
            self._index_cache[key] = (ids.to(device), pos.to(device), distance_bucket(dist, self.dist_buckets).to(device))
        return self._index_cache[key]

    def attention_bias(self, ids: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor | None:
        if self.mask_bias is None:
            return None
        return self.mask_bias[:, ids[:, None], ids[None, :], buckets]  # [H, N, N]

    def forward(self, xs: list[torch.Tensor], cutoff: list[float] | None = None) -> dict[str, Any]:
        v, k = xs[0].shape[:2]
        if not 2 <= k <= self.max_teachers:
            raise ConfigError(f"ensemble of {k} teachers; this generator takes 2 to max_teachers={self.max_teachers}")
        cross_in = self.cross0.expand(v, -1)
        rows_out, cross_inputs, mix_scores = [], [], []
        prev = None
        for li, (x, layer) in enumerate(zip(xs, self.layout.layers, strict=True)):
            r = layer.rows
            scale = segment_scale(x, self.codec.seg(li), self.codec.n_seg[li])  # [V, L]
            xn = self.codec.chunks(li, x / scale[:, None, None, :])  # [V, K, R, nc, width]
            tok = self.codec.encode(li, xn)  # [V, K, R, d]
            keep = cutoff_keep(v, k, r, cutoff, x.device)
            if keep is not None:
                tok = tok * keep.unsqueeze(-1)
            ids, pos, buckets = self.token_ids(k, r, x.device)
            # every token also reads the previous layer's [cross] output directly, besides
            # through attention to the [cross] token: generated layers condition on earlier ones
            tok = (tok + self.model_id(ids[1:]).view(k, r, -1) + self.pos(sinusoid(pos[1:1 + r])) + self.layer_emb.weight[li]
                   + cross_in[:, None, None, :])
            h = torch.cat([cross_in.unsqueeze(1), tok.reshape(v, k * r, -1)], dim=1)
            cross_inputs.append(cross_in)
            bias = self.attention_bias(ids, buckets)
            for blk in self.blocks:
                h = blk(h, bias)
            h = self.norm(h)
            th = h[:, 1:].reshape(v, k, r, -1)
            pooled = th.mean(dim=1)  # [V, R, d]
            if self.mix_score is not None:
                scores = self.mix_score(th).squeeze(-1)  # [V, K, R]
                base = coherent_mix(x, scores, prev, self.links[li])
                prev = scores
                mix_scores.append(scores)
            else:
                base = x[:, 0] if self.base == "anchor" else x.mean(dim=1)
            rows_out.append(base + self.codec.decode(li, pooled, base, scale))
            cross_in = self.cross_proj(h[:, 0]) if self.cross_proj is not None else self.cross0.expand(v, -1)
        mask_l1 = self.mask_bias.abs().mean() if self.mask_bias is not None else xs[0].new_zeros(())
        return {"rows": rows_out, "cross": cross_inputs, "mask_l1": mask_l1, "mix_scores": mix_scores}

    def zero_residual_(self) -> None:
        """Zero correction and, for ``base="mix"``, uniform weights: the output is the base
        (anchor or mean) exactly."""
        self.codec.zero_residual_()
        if self.mix_score is not None:
            with torch.no_grad():
                self.mix_score.weight.zero_()
                self.mix_score.bias.zero_()


class MLPGenerator(nn.Module):
    """Baseline: per layer, a 2-layer MLP from the K teachers' row r (concatenated,
    chunk by chunk) to the student's row r; no attention, no cross-layer flow."""

    def __init__(self, layout: Layout, *, ensemble_size: int = 4, hidden: int = 256, chunk: int = 256,
                 base: Literal["anchor", "mean"] = "mean", residual_scale: float = 0.05) -> None:
        super().__init__()
        if base not in ("anchor", "mean"):
            raise ConfigError(f"the MLP generator's base must be 'anchor' or 'mean', got {base!r}")
        self.layout, self.k, self.base = layout, ensemble_size, base
        self.codec = _RowCodec(layout, hidden, chunk, in_mult=ensemble_size, residual_scale=residual_scale)
        self.act = nn.GELU()

    def forward(self, xs: list[torch.Tensor], cutoff: list[float] | None = None) -> dict[str, Any]:
        v, k = xs[0].shape[:2]
        if k != self.k:
            raise ConfigError(f"ensemble of {k} teachers; this MLP generator was built for exactly {self.k}")
        rows_out = []
        for li, x in enumerate(xs):
            scale = segment_scale(x, self.codec.seg(li), self.codec.n_seg[li])
            xn = self.codec.chunks(li, x / scale[:, None, None, :])  # [V, K, R, nc, width]
            xn = xn.permute(0, 2, 3, 1, 4).flatten(-2)  # [V, R, nc, K*width]
            hid = self.act(self.codec.inp[li](xn) + self.codec.chunk_in[li]).mean(dim=-2)  # [V, R, hidden]
            base = x[:, 0] if self.base == "anchor" else x.mean(dim=1)
            rows_out.append(base + self.codec.decode(li, hid, base, scale))
        return {"rows": rows_out, "cross": [], "mask_l1": xs[0].new_zeros(()), "mix_scores": []}

    def zero_residual_(self) -> None:
        self.codec.zero_residual_()


def _attach_student(gen: nn.Module, student: str, student_kwargs: dict[str, Any] | None, num_classes: int,
                    in_chans: int, img_size: int) -> nn.Module:
    gen.student_spec = {"arch": student, "kwargs": {"num_classes": num_classes, "in_chans": in_chans,
                                                    "img_size": img_size, **(student_kwargs or {})}}
    return gen


@register_model("weightformer")
def weightformer(num_classes: int, in_chans: int, img_size: int, student: str = "convnet",
                 student_kwargs: dict[str, Any] | None = None, d_model: int = 64, depth: int = 2, heads: int = 4,
                 max_teachers: int = 8, chunk: int = 256, mask: bool = True, cross_layer: bool = True,
                 base: str = "mix", ff_mult: int = 2, dist_buckets: int = 8,
                 residual_scale: float = 0.05, mask_init: float = 0.0, out_init: float = 0.02,
                 coherent: bool = True) -> WeightFormer:
    """WeightFormer for students ``student(**student_kwargs)`` on this dataset shape."""
    _, layout = student_skeleton(student, student_kwargs, num_classes, in_chans, img_size)
    gen = WeightFormer(layout, d_model=d_model, depth=depth, heads=heads, max_teachers=max_teachers, chunk=chunk,
                       mask=mask, cross_layer=cross_layer, base=base, ff_mult=ff_mult, dist_buckets=dist_buckets,
                       residual_scale=residual_scale, mask_init=mask_init, out_init=out_init,
                       coherent=coherent)  # type: ignore[arg-type]
    return _attach_student(gen, student, student_kwargs, num_classes, in_chans, img_size)


@register_model("mlp_generator")
def mlp_generator(num_classes: int, in_chans: int, img_size: int, student: str = "convnet",
                  student_kwargs: dict[str, Any] | None = None, ensemble_size: int = 4, hidden: int = 256,
                  chunk: int = 256, base: str = "mean", residual_scale: float = 0.05) -> MLPGenerator:
    """The MLP generator baseline for the same students (exactly ``ensemble_size`` teachers)."""
    _, layout = student_skeleton(student, student_kwargs, num_classes, in_chans, img_size)
    gen = MLPGenerator(layout, ensemble_size=ensemble_size, hidden=hidden, chunk=chunk, base=base,
                       residual_scale=residual_scale)  # type: ignore[arg-type]
    return _attach_student(gen, student, student_kwargs, num_classes, in_chans, img_size)


GENERATORS = ("weightformer", "mlp_generator")
