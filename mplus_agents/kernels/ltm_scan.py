"""Score bounds for every long-term token from an int8 copy of the keys (driver of `ltm_scan.c`).

`ScanKeys` holds one layer's keys as int8 panels (one scale per token over all KV heads) plus, per token, how
far the int8 copy may be from the key the exact path scores (`err`) and the copy's norm. `bounds()` turns a
prompt's query vectors (`index.base.query_vectors`) into, for every token, a lower and an upper bound of its
exact `max_z` / `max_logit` score; `index/scan.py` uses them to rescore only the tokens that can matter.

Why one scale per token and not per head (as the int8 store has): the kernel sums a whole 192-wide row in
integers before it scales, which is what lets one VNNI instruction do 64 multiply-adds. The bound does not care
how the copy was made, only how far it is from the exact keys, and `err` measures exactly that.

Why a per-channel divisor first: a layer's key channels differ in size by 40x (SmolLM2 layer 15: mean |k| from
0.3 to 13), so a per-token scale set by the loudest channel leaves the quiet ones a few int8 steps, and the
bounds come out 1.35 standard deviations wide. Keys are stored divided by each channel's mean magnitude and
queries multiplied by it (q.k is unchanged), which evens the channels out before the int8 rounding.

`reference_bounds` is the same arithmetic in torch: the kernel's test reference.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from mplus_agents import quant

PANEL = 16
"""Tokens per panel (one 512-bit register of int32 sums)."""

QUERY_FIELDS = 6
"""Per query: scale, 128 * sum of its int8 values, norm, error norm, standardisation mean, 1 / std."""


def rounding_slack(dim: int) -> float:
    """Relative slack (times |q| |k|) for the rounding of the exact path's own float32 product.

    A dot product of `dim` terms is within dim * 2^-24 * |q| |k| of the real one; times 4 for margin. (The exact
    path widens half-precision and int8 keys to float32 before its product, so one slack serves every store.)
    """
    return 4.0 * dim * 2.0**-24


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 rows [m, D], scale [m] float32, error norm |x - dequantised| [m] float64) of float rows [m, D]."""
    q, scale = quant.quantize(x)
    err = (x.double() - q.double() * scale.double().unsqueeze(1)).norm(dim=1)
    return q, scale, err


class ScanKeys:
    """One layer's long-term keys as int8 panels that grow with the store (rows below `rows` never change).

    Memory: D + 12 bytes per token (204 on SmolLM2): a quarter of the float32 keys.
    """

    def __init__(self, lib: ctypes.CDLL, dim: int, slack: float) -> None:
        self.lib, self.dim, self.slack = lib, dim, slack
        self.dpad = -(-dim // 4) * 4
        self.rows = 0
        self.panels = torch.zeros(0, self.dpad // 4 * 64, dtype=torch.uint8)
        self.aux = torch.zeros(3, 0, dtype=torch.float32)
        """Per token: int8 scale, error bound |k - k~| (with rounding slack), norm |k~|."""
        self._tail = torch.zeros(0, dim, dtype=torch.float32)
        """The float rows of the last, partly filled panel: repacked with the next rows."""
        self.channel: torch.Tensor | None = None
        """[dim] float32 divisor of each key channel (set from the first rows added; fixed after that)."""

    def add(self, keys: torch.Tensor) -> None:
        """Append float rows [m, ...] (the keys exactly as the exact path scores them)."""
        if keys.shape[0] == 0:
            return
        start = self.rows - self._tail.shape[0]  # first row of the partial panel, repacked with the new rows
        new = keys.reshape(keys.shape[0], -1).float().cpu()
        if new.shape[1] != self.dim:
            raise ValueError(f"keys of width {new.shape[1]} added to a scan copy of width {self.dim}")
        if self.channel is None:
            self.channel = channel_divisor(new)
        rows = (torch.cat([self._tail, new]) if self._tail.shape[0] else new).contiguous()
        total = start + rows.shape[0]
        need = -(-total // PANEL)
        if need > self.panels.shape[0]:
            cap = max(need, 2 * self.panels.shape[0], 64)
            grown = torch.full((cap, self.panels.shape[1]), 128, dtype=torch.uint8)  # unused rows: int8 zeros
            grown[: self.panels.shape[0]] = self.panels
            aux = torch.zeros(3, cap * PANEL, dtype=torch.float32)
            aux[:, : self.aux.shape[1]] = self.aux
            self.panels, self.aux = grown, aux
        self.lib.mp_scan_pack(
            _ptr(rows), _ptr(self.channel), rows.shape[0], self.dim, start, self.dpad // 4, ctypes.c_float(self.slack),
            _ptr(self.panels), _ptr(self.aux), self.aux.shape[1],
        )
        self.rows = total
        keep = total % PANEL
        self._tail = rows[rows.shape[0] - keep :].clone() if keep else rows[:0]


def channel_divisor(x: torch.Tensor) -> torch.Tensor:
    """Each channel's mean magnitude over rows x [m, D] (an even sample of at most 65,536 rows); channels near
    silent get 1/1000 of the loudest's."""
    mag = x[:: max(1, x.shape[0] // 65536)].abs().mean(dim=0)
    top = float(mag.max()) if mag.numel() else 0.0
    if not math.isfinite(top) or top <= 0.0:
        return torch.ones_like(mag)
    return mag.clamp_min(top * 1e-3)


def reference_pack(x: torch.Tensor, slack: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What `ScanKeys.add` builds from float rows [m, D] (m a multiple of PANEL), in torch: (panels, aux [3, m]).

    The kernel's test reference: same bytes, fields equal up to float rounding.
    """
    q, scale, err = quantize_rows(x)
    deq = q.double() * scale.double().unsqueeze(1)
    err = err + slack * x.double().norm(dim=1)
    dpad = -(-x.shape[1] // 4) * 4
    q = torch.nn.functional.pad(q, (0, dpad - x.shape[1]))
    m = x.shape[0]
    unsigned = (q.to(torch.int16) + 128).to(torch.uint8)
    panels = unsigned.reshape(m // PANEL, PANEL, dpad // 4, 4).permute(0, 2, 1, 3).reshape(m // PANEL, dpad // 4 * 64)
    return panels, torch.stack([scale, _up(err), _up(deq.norm(dim=1))])


def _up(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the float32 at or above each value."""
    f = x.float()
    return torch.where(f.double() < x, torch.nextafter(f, torch.full_like(f, math.inf)), f)


def query_groups(t: int) -> list[tuple[int, int]]:
    """(first token, size) of the kernel's query groups: 16s, then 8, 4, 2, 1 (`sc_group_size` in ltm_scan.c)."""
    out, r = [], 0
    while r < t:
        g = next(size for size in (16, 8, 4, 2, 1) if t - r >= size)
        out.append((r, g))
        r += g
    return out


@dataclass
class Queries:
    """A prompt's query vectors as the kernel reads them."""

    q8: torch.Tensor
    """[T, dpad] int8."""
    words: torch.Tensor
    """The same values as int32 words of 4, each query group stored transposed ([D/4][G])."""
    fields: torch.Tensor
    """[T, QUERY_FIELDS] float32."""


def pack_queries(qv: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None, keys: ScanKeys) -> Queries:
    """Query vectors [T, D] for the kernel over `keys` (multiplied by its channel divisors). `mean`/`std` [T]
    standardise each query's logits (max_z); None for max_logit."""
    t, d = qv.shape
    dpad = keys.dpad
    qf = qv.detach().float().cpu()
    if keys.channel is not None:
        qf = qf * keys.channel
    q, scale, err = quantize_rows(qf)
    q = torch.nn.functional.pad(q, (0, dpad - d))
    fields = torch.empty(t, QUERY_FIELDS, dtype=torch.float32)
    fields[:, 0] = scale
    fields[:, 1] = 128.0 * q.sum(dim=1, dtype=torch.int64).float()
    fields[:, 2] = _up(qf.double().norm(dim=1))
    fields[:, 3] = _up(err)
    fields[:, 4] = 0.0 if mean is None else mean.float().cpu()
    fields[:, 5] = 1.0 if std is None else 1.0 / std.float().cpu()
    rows = q.contiguous().view(torch.int32)  # [T, dpad / 4]
    words = torch.cat([rows[r : r + g].T.reshape(-1) for r, g in query_groups(rows.shape[0])])
    return Queries(q.contiguous(), words.contiguous(), fields.contiguous())


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


@dataclass
class Bounds:
    """Every token's exact score lies in [lo, hi]; per panel of PANEL tokens, the max of each (real tokens)."""

    hi: torch.Tensor
    lo: torch.Tensor
    panel_hi: torch.Tensor
    panel_lo: torch.Tensor


def bounds(lib: ctypes.CDLL, keys: ScanKeys, rows: int, q: Queries, *, plain: bool = False) -> Bounds:
    """Bounds for the first `rows` tokens. `plain` forces the portable C path (the VNNI path's reference)."""
    panels = -(-rows // PANEL)
    hi = torch.empty(panels * PANEL, dtype=torch.float32)
    lo = torch.empty(panels * PANEL, dtype=torch.float32)
    phi = torch.empty(panels, dtype=torch.float32)
    plo = torch.empty(panels, dtype=torch.float32)
    # Local references: a concurrent `add` may swap in grown arrays, and these must outlive the call.
    panel_data, aux = keys.panels, keys.aux
    if rows > min(keys.rows, aux.shape[1]):
        raise ValueError(f"{rows} rows asked of a scan copy holding {keys.rows}")
    lib.mp_scan_bounds(
        _ptr(panel_data), _ptr(aux), aux.shape[1], rows, keys.dpad // 4, _ptr(q.words), _ptr(q.fields),
        q.q8.shape[0], _ptr(hi), _ptr(lo), _ptr(phi), _ptr(plo), int(plain),
    )
    return Bounds(hi[:rows], lo[:rows], phi, plo)


def list_above(lib: ctypes.CDLL, b: Bounds, cut: float) -> tuple[torch.Tensor, float]:
    """(ascending indices with hi >= cut (NaN included), the largest hi below cut: a bound for all others)."""
    cap = 65536  # uninitialised, so a roomy first buffer costs nothing; more listed tokens: one more pass
    below = ctypes.c_float()
    n = b.hi.numel()
    while True:
        out = torch.empty(cap, dtype=torch.int64)
        m = lib.mp_scan_list(_ptr(b.hi), _ptr(b.panel_hi), n, ctypes.c_float(cut), _ptr(out), cap, ctypes.byref(below))
        if m <= cap:
            return out[:m], float(below.value)
        cap = m


def rescore(
    lib: ctypes.CDLL, rows: torch.Tensor, qv: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """[m] exact scores max_t (qv_t . row - mean_t) / std_t of float rows [m, D] (the reference: ScoreContext)."""
    rows = rows.float().reshape(rows.shape[0], -1).contiguous()
    qf = qv.float().contiguous()
    mean, std = mean.float().contiguous(), std.float().contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.float32)
    m, d = rows.shape
    lib.mp_scan_rescore(_ptr(rows), m, d, _ptr(qf), qf.shape[0], _ptr(mean), _ptr(std), _ptr(out))
    return out


def reference_bounds(keys: ScanKeys, rows: int, q: Queries) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in torch (float32 throughout, integer sums in int64): its test reference."""
    panels = keys.panels[: -(-rows // PANEL)]
    d4 = keys.dpad // 4
    unsigned = panels.reshape(-1, d4, PANEL, 4).permute(0, 2, 1, 3).reshape(-1, keys.dpad)[:rows]
    kq = unsigned.to(torch.int64)
    qq = q.q8.to(torch.int64)
    fields = q.fields
    dot = (qq @ kq.T - fields[:, 1:2].to(torch.int64)).float()  # [T, rows], exact integers
    sk, ek, nk = keys.aux[0, :rows], keys.aux[1, :rows], keys.aux[2, :rows]
    logit = dot * (sk.unsqueeze(0) * fields[:, 0:1])
    err = fields[:, 2:3] * ek.unsqueeze(0) + fields[:, 3:4] * nk.unsqueeze(0)
    centred = logit - fields[:, 4:5]
    inv = fields[:, 5:6]
    return ((centred + err) * inv).amax(dim=0), ((centred - err) * inv).amax(dim=0)
