"""CUDA path of ``nvfp4_linear``: the small-M Hopper kernel in ``csrc/nvfp4_gemv.cu``.

The kernel is plain CUDA C++ with a C entry point, built once with ``nvcc`` into a shared library
(cached under ``$FP4REASON_CACHE`` or ``~/.cache/fp4reason``, keyed by the source hash) and called
through ctypes on torch's current stream. It therefore does not depend on torch's C++ ABI and builds
in seconds. It is registered as the custom op ``fp4reason::nvfp4_linear`` (with a fake impl) so it
works under CUDA-graph capture and torch.compile.

The weight is repacked once (``prepare_nvfp4`` -> :class:`TiledNVFP4`, same bytes, tile order; see
``tile_nvfp4``). Passing a plain ``NVFP4Tensor`` on CUDA also works: it is tiled on first use and the
result cached on the object (doubling its memory); the decode engine should call ``prepare_nvfp4``
before capture and keep only the prepared object.

Dispatch: M <= 16, K % 128 == 0, sm_90+, bf16/fp16 input -> the kernel; anything else (prefill,
odd K, fp32) -> dequantize + ``F.linear`` on the GPU (correct, not fast). The grid is a fixed number of
CTAs per SM that share the weight's (row block, 128-k chunk) units evenly (stream-K, ``grid_ctas``). Row
blocks shared by several CTAs are summed in one fp32 workspace with arrival counters per device,
allocated on first use outside graph capture (``prepare_nvfp4`` does it eagerly) and left zeroed by every
launch. Calls on concurrent streams must not share a device's workspace (a call inside capture with no
workspace yet runs one CTA per row block).
"""

import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fp4reason.formats import NVFP4Tensor
from fp4reason.kernels.reference import rms_norm_reference, silu_mul_reference

_SRC = Path(__file__).with_name("csrc") / "nvfp4_gemv.cu"
CHUNK = 128
MAX_M = 16
_WS_ROWS = 1 << 17  # split-K is used for N up to this many rows
# kernel variant (csrc launch_variant): 0/1/4/6 = 2 row tiles per warp (128 rows per CTA), 2/3/5 = 1
# (64 rows); 4/5/6 stage the activations through a CTA-wide shared-memory ring instead of per-warp
# registers (6: 8 stages); 7/8 = 16-row CTAs whose 4 warps split the k range (4/8 stages); 9 = 64 rows,
# k split in two; 10 / 11 = 4 / 9 with each segment's activations staged whole in shared memory (XF);
# 12 / 13 = 10 / 11 staging the whole rows and applying the add + RMSNorm before them (nvfp4_norm_linear).
# None = variant 9 for wide N at M <= 8, else 4 (variant_for; H100 sweeps, benchmarks/NOTES.md v6, v10).
_variant: int | None = int(os.environ["FP4REASON_VARIANT"]) if "FP4REASON_VARIANT" in os.environ else None
_ROWS_PER_CTA = {0: 128, 1: 128, 2: 64, 3: 64, 4: 128, 5: 64, 6: 128, 7: 16, 8: 16, 9: 64, 10: 128, 11: 64}
_ROWS_PER_CTA |= {12: 128, 13: 64}
if _variant is not None and _variant not in range(12):
    raise ValueError(f"FP4REASON_VARIANT must be 0..11 (12 / 13 are nvfp4_norm_linear's), got {_variant}")
_XF_OF, _XF_BASE = {4: 10, 9: 11}, {10: 4, 11: 9}
_NORM_OF = {4: 12, 9: 13, 10: 12, 11: 13}
# XF is used where a CTA's staged activations take at most this many KB (0 = never; NOTES.md v18)
_xf_kb = int(os.environ.get("FP4REASON_XF", "0"))
_XF_LIMIT = 160 * 1024  # above this a forced 10 / 11 runs as 4 / 9 (the ring takes 37 KB of the 227)
# programmatic dependent launch: None = on (v5 sweep: equal or faster on every 8B linear but Qwen3 gate_up at
# M=16; v4, with more instructions per weight, had lost on the large ones)
_pdl: int | None = int(os.environ["FP4REASON_PDL"]) if "FP4REASON_PDL" in os.environ else None
# CTAs per SM of the stream-K grid (grid_ctas); 0 = the split-K policy (split_count); None = the default:
# split-K up to M = 8, 4 per SM above (H100 sweep, benchmarks/NOTES.md v8)
_MIN_CHUNKS = 4
_ctas_per_sm: int | None = (
    int(os.environ["FP4REASON_CTAS_PER_SM"]) if "FP4REASON_CTAS_PER_SM" in os.environ else None
)


def _cache_dir() -> Path:
    return Path(os.environ.get("FP4REASON_CACHE", Path.home() / ".cache" / "fp4reason"))


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (shutil.which("nvcc"), os.path.join(home, "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError("nvcc not found (needed once to build the NVFP4 kernel); set CUDA_HOME or PATH")


def nvdisasm() -> str | None:
    """Path of CUDA's SASS disassembler (on PATH, or the ``nvidia-cuda-nvdisasm`` wheel), or None: the SASS
    checks (``tests/test_kernel_sass.py``, ``benchmarks/sass_diff.py``) need it, the kernel does not."""
    found = shutil.which("nvdisasm")
    spec = importlib.util.find_spec("nvidia")
    if found is None and spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            for cand in Path(base).glob("cu*/bin/nvdisasm"):
                found = str(cand)
    return found


def build_library(force: bool = False) -> Path:
    """Compile ``csrc/nvfp4_gemv.cu`` to a cached shared library and return its path."""
    src = _SRC.read_bytes()
    out = _cache_dir() / f"nvfp4_gemv-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [_nvcc(), "-O3", "-std=c++17", "-arch=sm_90", "-shared", "-Xcompiler", "-fPIC"]
    cmd += ["-o", tmp, str(_SRC)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"building the NVFP4 kernel failed:\n{' '.join(cmd)}\n{res.stderr}")
    os.replace(tmp, out)
    return out


_P, _I = ctypes.c_void_p, ctypes.c_int
# The ctypes signatures of the library's extern "C" functions (a CPU test checks them against the source).
_SIGNATURES = {
    "fp4r_nvfp4_gemv": [_P] * 7 + [_I] * 8 + [_P],
    "fp4r_nvfp4_norm_gemv": [_P] * 4 + [ctypes.c_float] + [_P] * 6 + [_I] * 8 + [_P],
    "fp4r_dense_gemv": [_P] * 6 + [_I] * 9 + [_P],
}


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_library()))
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = _I
    return lib


@functools.cache
def available() -> bool:
    """True when a sm_90+ GPU is present and the kernel library builds and loads."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return False
    try:
        _lib()
    except (RuntimeError, OSError) as e:
        warnings.warn(f"NVFP4 CUDA kernel unavailable, using dequantize + matmul: {e}", stacklevel=2)
        return False
    return True


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch for our Triton kernels on ``device`` (Hopper and newer, not the Triton
    interpreter, ``FP4REASON_PDL_OPS`` unset or 1): each waits for the previous grid before its first read,
    then lets the next kernel launch, so an NVFP4 projection after it streams its first weights meanwhile."""
    return (
        device.type == "cuda"
        and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes")
        and os.environ.get("FP4REASON_PDL_OPS", "1") == "1"
        and _capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9
    )


@functools.cache
def _capability(device: int) -> int:
    return torch.cuda.get_device_capability(device)[0]


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_workspaces: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _workspaces:
        if torch.cuda.is_current_stream_capturing():
            return None
        _workspaces[idx] = (
            torch.zeros(_WS_ROWS * 16, dtype=torch.float32, device=device),
            torch.zeros(_WS_ROWS // 16, dtype=torch.int32, device=device),  # one per row block
        )
    return _workspaces[idx]


# dense BF16/FP16 weights (fp4r_dense_gemv): 2 / 3 = 64-row CTAs, 4 / 8 stages; 7 / 8 = 16-row CTAs whose 4
# warps split k (7: the fastest at M = 1 on 6 of the 8 shape x layout cells of the H100 bench, NOTES v17)
DENSE_VARIANTS = (2, 3, 7, 8)
_dense_variant = int(os.environ.get("FP4REASON_DENSE_VARIANT", "7"))
if _dense_variant not in DENSE_VARIANTS:
    raise ValueError(f"FP4REASON_DENSE_VARIANT must be one of {DENSE_VARIANTS}, got {_dense_variant}")


def variant_for(m: int, n: int = 0, device: int = 0, gated: bool = False, dense: bool = False) -> int:
    """Kernel variant: 9 (64-row CTAs, each row tile streamed by two warps splitting k) when N gives >= 2
    such CTAs per SM without split-K, and above M = 8 (activations in registers: 3 CTAs per SM) only if
    they fit one wave: gate_up, 10 % faster than 4 at M = 1 (H100 sweep, benchmarks/NOTES.md v10). Else 4
    (activations through the CTA's shared-memory ring, 128-row CTAs; NOTES v6). ``gated`` above M = 8: 4
    (variant 9's silu(gate) * up build for 16 tokens needs 200 registers: 2 CTAs per SM; NOTES v11)."""
    if dense:
        return _dense_variant
    if _variant is not None:
        return _variant
    blocks, sms = n // 64, _sm_count(device)
    return 9 if blocks >= 2 * sms and (m <= 8 or (blocks <= 3 * sms and not gated)) else 4


def split_count(m: int, n: int, k: int, device: int = 0, gated: bool = False, dense: bool = False) -> int:
    """K-splits for an [m, k] x [n, k] call under the split-K policy (``_ctas_per_sm`` = 0): none when the
    row blocks alone give every SM a CTA; else the largest power of two that keeps the grid at or under 4
    CTAs per SM and every split at >= 4 chunks of 128 k (H100 sweep, benchmarks/NOTES.md v6)."""
    row_blocks = -(-n // _ROWS_PER_CTA[variant_for(m, n, device, gated, dense)])
    sms, chunks = _sm_count(device), k // CHUNK
    if row_blocks >= sms:
        return 1
    s = 1
    while row_blocks * s * 2 <= 4 * sms and s * 2 <= chunks // 4:
        s *= 2
    return s


def grid_ctas(
    m: int, n: int, k: int, device: int = 0, splits: int = 0, gated: bool = False, dense: bool = False
) -> int:
    """The kernel's grid for an [m, k] x [n, k] call. The kernel cuts the row_blocks x chunks units into
    this many equal ranges (stream-K), so the count need not divide anything. ``splits`` > 0: classic
    split-K, row_blocks x splits. Else ``_ctas_per_sm`` CTAs per SM (default: 0 up to M = 8 and for
    variant 9, else 4; at most one CTA per 4 units, so each streams >= 4 chunks), or the split-K policy
    when it is 0."""
    variant = variant_for(m, n, device, gated, dense)
    row_blocks, chunks = -(-n // _ROWS_PER_CTA[variant]), k // CHUNK
    if splits > 0:
        return row_blocks * min(splits, chunks)
    wide = _XF_BASE.get(variant, variant) == 9
    per_sm = (0 if m <= 8 or wide else 4) if _ctas_per_sm is None else _ctas_per_sm
    if per_sm <= 0 or dense:
        return row_blocks * split_count(m, n, k, device, gated, dense)
    return max(1, min(per_sm * _sm_count(device), row_blocks * chunks // _MIN_CHUNKS))


def staged_bytes(m: int, n: int, k: int, ctas: int, rows: int) -> int:
    """Shared memory for XF's activations (csrc ``launch``): the longest segment a CTA of ``ctas`` gets,
    ceil(units / ctas) chunks but at most a row block's, times ``m`` token rows of 128 bf16/fp16."""
    chunks = k // CHUNK
    units = -(-n // rows) * chunks
    return min(chunks, -(-units // ctas)) * m * CHUNK * 2


def with_staging(variant: int, m: int, n: int, k: int, ctas: int) -> int:
    """``variant`` on ``ctas`` CTAs, moved to its XF form (4 -> 10, 9 -> 11) where the staged activations fit
    ``FP4REASON_XF`` KB, and back (10 -> 4, 11 -> 9) where a forced XF variant would not fit the SM."""
    if variant in _XF_OF and staged_bytes(m, n, k, ctas, _ROWS_PER_CTA[variant]) <= _xf_kb * 1024:
        return _XF_OF[variant]
    if variant in _XF_BASE and staged_bytes(m, n, k, ctas, _ROWS_PER_CTA[variant]) > _XF_LIMIT:
        return _XF_BASE[variant]
    return variant


def norm_staged_bytes(m: int, k: int) -> int:
    """Shared memory for a NORM variant's staging (csrc ``launch``): the m whole rows, the norm weight, the
    per-warp sums and rstd."""
    return m * k * 2 + k * 2 + (4 * 16 + 16) * 4


def norm_variant(variant: int, m: int, k: int) -> int | None:
    """The NORM form (12 / 13) of ``variant`` for an [m, k] input, or None where there is none (a forced
    variant other than 4 / 9 / 10 / 11) or its staging would not fit next to the ring."""
    if variant not in _NORM_OF or norm_staged_bytes(m, k) > _XF_LIMIT:
        return None
    return _NORM_OF[variant]


def supported(x: torch.Tensor, n: int, k: int) -> bool:
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and 1 <= x.shape[0] <= MAX_M
        and k % CHUNK == 0
        and available()
    )


TILE_BYTES = 16 * 64 + 16 * 8


# Inside each 32-bit word of 8 consecutive k (element j = CT nibble j: bits 0..2 magnitude, bit 3 sign), the
# tiled layout moves element j's magnitude to bits WORD_MAG_LO[j]..+2 and its sign to WORD_SIGN[j], so the
# kernel's decode_word finds pairs (k0,k1) .. (k6,k7) with one to four logic ops each (csrc/nvfp4_gemv.cu).
WORD_MAG_LO = (6, 22, 0, 16, 3, 19, 10, 26)
WORD_SIGN = (15, 31, 9, 25, 13, 29, 14, 30)


def _permute_word_bits(words: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Apply (or undo) the WORD_MAG_LO / WORD_SIGN bit layout to int64 tensors of 32-bit words."""
    out = torch.zeros_like(words)
    for j, (mag, sign) in enumerate(zip(WORD_MAG_LO, WORD_SIGN, strict=True)):
        src_mag, dst_mag, src_sign, dst_sign = 4 * j, mag, 4 * j + 3, sign
        if inverse:
            src_mag, dst_mag, src_sign, dst_sign = dst_mag, src_mag, dst_sign, src_sign
        out |= ((words >> src_mag) & 7) << dst_mag
        out |= ((words >> src_sign) & 1) << dst_sign
    return out


def _word_bytes(b: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """uint8 [..., 4n] -> the same bytes with every little-endian 32-bit word bit-permuted."""
    shifts = torch.arange(0, 32, 8, device=b.device)
    words = (b.reshape(*b.shape[:-1], -1, 4).long() << shifts).sum(-1)
    words = _permute_word_bits(words, inverse)
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(b.shape)


def gated_rows(n: int, device=None) -> torch.Tensor:
    """Row order of a gated tiling of a fused [gate; up] weight with N = 2I rows: each 16-row tile holds gate
    rows 8j..8j+7, then up rows 8j..8j+7 (so the kernel's lanes hold a gate row and its up row together)."""
    if n % 16:
        raise ValueError(f"a gated (gate/up) NVFP4 weight needs N % 16 == 0 (I % 8 == 0), got N={n}")
    half = torch.arange(n // 2, device=device).view(-1, 8)
    return torch.stack([half, half + n // 2], 1).reshape(-1)


def tile_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """CT NVFP4 [N, K/2] + [N, K/16] -> uint8 [ceil(N/16), K/128, 1152], the kernel's layout.

    Per 16-row tile and 128-k chunk: 1024 B of nibbles in lane order (half h, row g, quad lane t: rows
    h*8+g, bytes t*16..t*16+15 of the chunk, each 4-byte word bit-permuted as WORD_MAG_LO / WORD_SIGN
    say), then 128 B of scales in lane order (lane g*4+t holds blocks 2t, 2t+1 of row g, then of row g + 8:
    the blocks of its own nibbles, so each lane copies and reads only its own bytes).
    Rows past N are zero. ``gated``: the rows of a fused [gate; up] weight in :func:`gated_rows` order first,
    for the kernel's silu(gate) * up epilogue."""
    n, kh = packed.shape
    k = kh * 2
    if k % CHUNK:
        raise ValueError(f"tiled NVFP4 needs K % {CHUNK} == 0, got K={k}")
    if gated:
        rows = gated_rows(n, packed.device)
        packed, block_scale = packed[rows], block_scale[rows]
    tiles, chunks = -(-n // 16), k // CHUNK
    pad = tiles * 16 - n
    p = F.pad(packed, (0, 0, 0, pad)).view(tiles, 2, 8, chunks, 4, 16).permute(0, 3, 1, 2, 4, 5)
    sc = F.pad(block_scale.view(torch.uint8), (0, 0, 0, pad)).view(tiles, 2, 8, chunks, 4, 2)
    sc = sc.permute(0, 3, 2, 4, 1, 5)  # [tile, chunk, g, t, h, j]
    p = _word_bytes(p.reshape(tiles, chunks, 1024))
    return torch.cat([p, sc.reshape(tiles, chunks, 128)], dim=-1).contiguous()


def untile_nvfp4(tiled: torch.Tensor, n: int, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`tile_nvfp4`: (packed [N, K/2] uint8, block_scale [N, K/16] e4m3)."""
    tiles, chunks, _ = tiled.shape
    p = _word_bytes(tiled[..., :1024], inverse=True)
    p = p.reshape(tiles, chunks, 2, 8, 4, 16).permute(0, 2, 3, 1, 4, 5)
    sc = tiled[..., 1024:].reshape(tiles, chunks, 8, 4, 2, 2).permute(0, 4, 2, 1, 3, 5)
    packed = p.reshape(tiles * 16, chunks * 64)[:n]
    scales = sc.reshape(tiles * 16, chunks * 8)[:n]
    if gated:
        order = torch.argsort(gated_rows(n, tiled.device))
        packed, scales = packed[order], scales[order]
    return packed.contiguous(), scales.contiguous().view(torch.float8_e4m3fn)


@dataclass
class TiledNVFP4:
    """An NVFP4 weight [N, K] in the kernel's tiled layout (see :func:`tile_nvfp4`); ``gated``: a fused
    [gate; up] weight tiled for the silu(gate) * up epilogue (``nvfp4_silu_mul``)."""

    tiled: torch.Tensor  # uint8 [ceil(N/16), K/128, 1152]
    global_scale: torch.Tensor  # float32 [1], compressed-tensors divisor
    n: int
    gated: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.tiled.shape[1] * CHUNK

    @property
    def device(self) -> torch.device:
        return self.tiled.device

    def to_nvfp4(self) -> NVFP4Tensor:
        return NVFP4Tensor(*untile_nvfp4(self.tiled, self.n, self.gated), self.global_scale)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.to_nvfp4().dequantize(dtype)


def _dequantize_gpu(packed: torch.Tensor, block_scale: torch.Tensor, gscale: torch.Tensor, dtype):
    return NVFP4Tensor(packed, block_scale, gscale).dequantize(dtype)


@torch.library.custom_op("fp4reason::nvfp4_linear", mutates_args=())
def nvfp4_linear_op(
    x: torch.Tensor,
    tiled: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    grid: int,
    gated: bool,
) -> torch.Tensor:
    """``x [M, K] @ W[N, K].T (+ bias)`` with W tiled NVFP4 on ``grid`` CTAs (0: :func:`grid_ctas`'s);
    ``gated``: W (and ``bias``) in gated tile order, returns silu(gate) * up [M, N/2]."""
    m, k = x.shape
    if not supported(x, n, k):
        w = TiledNVFP4(tiled, global_scale, n, gated)
        if not gated:
            return F.linear(x, w.dequantize(x.dtype), bias)
        if bias is not None:
            bias = bias[torch.argsort(gated_rows(n, bias.device))]
        return silu_mul_reference(F.linear(x, w.dequantize(x.dtype), bias))
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    variant = variant_for(m, n, dev, gated)
    ctas, ws = _grid(x, n, grid, variant, gated, dev)
    out = torch.empty(m, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    variant = with_staging(variant, m, n, k, ctas)
    _launch("fp4r_nvfp4_gemv", [x.data_ptr()], x, tiled, global_scale, bias, out, n, ctas, ws, variant, gated)
    return out


def _grid(x: torch.Tensor, n: int, grid: int, variant: int, gated: bool, dev: int):
    """(CTAs, split-K workspace or None) for a call of ``variant``: ``grid`` (0: :func:`grid_ctas`'s), or one
    CTA per row block where that needs no workspace or none can be had."""
    m, k = x.shape
    ctas = grid if grid > 0 else grid_ctas(m, n, k, dev, gated=gated)
    whole = -(-n // _ROWS_PER_CTA[variant])
    ws = _workspace(x.device) if ctas != whole and n <= _WS_ROWS else None
    return (ctas if ws is not None else whole), ws


def _launch(entry: str, head: list, x, tiled, global_scale, bias, out, n: int, ctas: int, ws, variant, gated):
    """Call the library's ``entry``: its own leading arguments ``head``, then the ones all entries share."""
    m, k = x.shape
    work, counters = ws if ws is not None else (None, None)
    err = getattr(_lib(), entry)(
        *head,
        tiled.data_ptr(),
        global_scale.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        work.data_ptr() if work is not None else None,
        counters.data_ptr() if counters is not None else None,
        m,
        n,
        k,
        ctas,
        int(x.dtype == torch.bfloat16),
        variant,
        1 if _pdl is None else _pdl,
        int(gated),
        torch.cuda.current_stream(x.device).cuda_stream,
    )
    if err:
        raise RuntimeError(f"NVFP4 kernel {entry} failed with CUDA error {err} (M={m}, N={n}, K={k})")


@nvfp4_linear_op.register_fake
def _(x, tiled, global_scale, bias, n, grid, gated):
    return x.new_empty(x.shape[0], n // 2 if gated else n)


@torch.library.custom_op("fp4reason::nvfp4_norm_linear", mutates_args=())
def nvfp4_norm_linear_op(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    tiled: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    grid: int,
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nvfp4_linear(rms_norm(h)), h)`` with ``h = x + delta`` (``delta`` None: ``h = x``), x [M, K]:
    one kernel (a NORM variant) where it applies, else the norm, then :func:`nvfp4_linear_op`."""
    m, k = x.shape
    variant = None
    if supported(x, n, k) and norm_weight.dtype == x.dtype:
        dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
        variant = norm_variant(variant_for(m, n, dev, gated), m, k)
    if variant is None:
        h = x + delta if delta is not None else x.clone()
        xn = rms_norm_reference(h, norm_weight, eps)
        return nvfp4_linear_op(xn, tiled, global_scale, bias, n, grid, gated), h
    ctas, ws = _grid(x, n, grid, variant, gated, dev)
    out = torch.empty(m, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    h = torch.empty_like(x)
    d = delta.data_ptr() if delta is not None else None
    head = [x.data_ptr(), d, norm_weight.data_ptr(), h.data_ptr(), float(eps)]
    _launch("fp4r_nvfp4_norm_gemv", head, x, tiled, global_scale, bias, out, n, ctas, ws, variant, gated)
    return out, h


@nvfp4_norm_linear_op.register_fake
def _(x, delta, norm_weight, eps, tiled, global_scale, bias, n, grid, gated):
    return x.new_empty(x.shape[0], n // 2 if gated else n), torch.empty_like(x)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if torch.compiler.is_compiling():  # fresh and parameter tensors are 256-byte aligned
        return t
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _tiled(w: "NVFP4Tensor | TiledNVFP4", gated: bool = False) -> TiledNVFP4:
    if isinstance(w, TiledNVFP4):
        if w.gated != gated:
            raise ValueError(f"the prepared weight has gated={w.gated}; this call needs gated={gated}")
        return w
    key = "_fp4r_tiled_gated" if gated else "_fp4r_tiled"
    cached = w.__dict__.get(key)
    if cached is None:
        cached = prepare_nvfp4(w, gated=gated)
        if not torch.cuda.is_current_stream_capturing():
            w.__dict__[key] = cached
    return cached


def _weight_args(w: "NVFP4Tensor | TiledNVFP4", bias: torch.Tensor | None, x: torch.Tensor, gated: bool):
    """The kernel's (tiled weight, global scale on x's device, bias in x's dtype and tile order)."""
    t = _tiled(w, gated)
    gs = t.global_scale if t.global_scale.device == x.device else t.global_scale.to(x.device)
    if bias is not None:
        bias = bias.to(x.dtype)
        bias = (bias[gated_rows(w.shape[0], bias.device)] if gated else bias).contiguous()
    return t, gs, bias


def nvfp4_linear_cuda(
    x: torch.Tensor,
    w: "NVFP4Tensor | TiledNVFP4",
    bias: torch.Tensor | None = None,
    *,
    splits: int = 0,
    ctas: int = 0,
    gated: bool = False,
) -> torch.Tensor:
    """GPU ``x @ dequant(w).T + bias`` for x [..., K]; leading dims are flattened. ``splits`` (classic
    split-K) or ``ctas`` (any grid) override the dispatch's grid, for tests and sweeps. ``gated``: ``w`` is a
    fused [gate; up] weight [2I, K] and the result silu(gate) * up [..., I], from the kernel's epilogue."""
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = _aligned(x.reshape(-1, k))
    if k % CHUNK:  # the kernel needs whole 128-k chunks: plain dequantize + matmul
        y = F.linear(x2, w.dequantize(x.dtype), bias)
        return (silu_mul_reference(y) if gated else y).reshape(*lead, -1)
    t, gs, bias = _weight_args(w, bias, x, gated)
    if splits > 0 and not ctas:
        ctas = grid_ctas(x2.shape[0], n, k, splits=splits, gated=gated)
    y = torch.ops.fp4reason.nvfp4_linear(x2, t.tiled, gs, bias, n, ctas, gated)
    return y.reshape(*lead, -1)


def nvfp4_norm_linear_cuda(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    w: "NVFP4Tensor | TiledNVFP4",
    bias: torch.Tensor | None = None,
    *,
    ctas: int = 0,
    gated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU ``(nvfp4_linear(rms_norm(h) * norm_weight, w, bias), h)``, ``h = x + delta`` (or x), x [..., K]:
    the add and HF's RMSNorm run inside the projection's kernel (csrc NORM variants) where it applies."""
    n, k = w.shape
    x2 = _aligned(x.reshape(-1, k))
    d2 = _aligned(delta.reshape(-1, k)) if delta is not None else None
    if k % CHUNK:
        h = x2 + d2 if d2 is not None else x2
        y = nvfp4_linear_cuda(rms_norm_reference(h, norm_weight, eps), w, bias, gated=gated)
    else:
        t, gs, bias = _weight_args(w, bias, x, gated)
        nw = _aligned(norm_weight.to(x.dtype))
        op = torch.ops.fp4reason.nvfp4_norm_linear
        y, h = op(x2, d2, nw, float(eps), t.tiled, gs, bias, n, ctas, gated)
    return y.reshape(*x.shape[:-1], -1), h.reshape(x.shape)


def prepare_nvfp4(w: "NVFP4Tensor | TiledNVFP4", gated: bool = False) -> "TiledNVFP4 | NVFP4Tensor":
    """One-time preparation before CUDA-graph capture: the tiled copy of the weight (a
    :class:`TiledNVFP4`, same bytes reordered; ``gated``: a fused [gate; up] weight for ``nvfp4_silu_mul``)
    and the device's split-K workspace. Weights whose K is not a multiple of 128 stay an ``NVFP4Tensor``
    (they run through dequantize + matmul)."""
    if isinstance(w, TiledNVFP4):
        if w.gated != gated:
            raise ValueError(f"the prepared weight has gated={w.gated}; asked for gated={gated}")
        return w
    if w.shape[1] % CHUNK:
        return w
    t = TiledNVFP4(
        tile_nvfp4(w.packed, w.block_scale, gated), w.global_scale.contiguous().float(), w.shape[0], gated
    )
    if t.tiled.is_cuda and available():
        _workspace(t.tiled.device)
    return t


def tile_dense(w: torch.Tensor) -> torch.Tensor:
    """A dense weight [N, K] (bf16/fp16) -> [ceil(N/16), K/128, 2, 4, 32, 8], the dense kernel's tiled order:
    per 16-row tile and 128-k chunk, half h and k-word w, lane g*4+t's 8 elements of row h*8+g at k = t*32 +
    w*8 .. +7 (16 B), so each warp copy is 512 contiguous bytes. Rows past N are zero."""
    n, k = w.shape
    if k % CHUNK:
        raise ValueError(f"tiled dense weights need K % {CHUNK} == 0, got K={k}")
    tiles, chunks = -(-n // 16), k // CHUNK
    t = F.pad(w, (0, 0, 0, tiles * 16 - n)).view(tiles, 2, 8, chunks, 4, 4, 8)
    return t.permute(0, 3, 1, 5, 2, 4, 6).reshape(tiles, chunks, 2, 4, 32, 8).contiguous()


def untile_dense(tiled: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`tile_dense`: the row-major weight [N, K]."""
    tiles, chunks = tiled.shape[:2]
    t = tiled.view(tiles, chunks, 2, 4, 8, 4, 8).permute(0, 2, 4, 1, 5, 3, 6)
    return t.reshape(tiles * 16, chunks * CHUNK)[:n].contiguous()


@torch.library.custom_op("fp4reason::dense_linear", mutates_args=())
def dense_linear_op(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int, grid: int, gated: bool
) -> torch.Tensor:
    """``x [M, K] @ W[N, K].T (+ bias)`` with W dense (row-major [N, K], or 6-d from :func:`tile_dense`) on
    ``grid`` CTAs (0: :func:`grid_ctas`'s). ``gated`` (row-major only): W a fused [gate; up] weight, ``bias``
    in :func:`gated_rows` order; returns silu(gate) * up [M, N/2]."""
    m, k = x.shape
    tiled = w.dim() == 6
    if gated and tiled:
        raise ValueError("the gated dense kernel reads the row-major weight; pass it untiled")
    if gated and n % 16:
        raise ValueError(f"a gated dense weight needs N % 16 == 0, got N={n}")
    if not supported(x, n, k) or w.dtype != x.dtype:
        wd = (untile_dense(w, n) if tiled else w).to(x.dtype)
        if not gated:
            return F.linear(x, wd, bias)
        if bias is not None:
            bias = bias[torch.argsort(gated_rows(n, bias.device))]
        return silu_mul_reference(F.linear(x, wd, bias))
    out = torch.empty(m, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    ctas = grid if grid > 0 else grid_ctas(m, n, k, dev, gated=gated, dense=True)
    whole = -(-n // _ROWS_PER_CTA[_dense_variant])
    ws = _workspace(x.device) if ctas != whole and n <= _WS_ROWS else None
    if ws is None:
        ctas = whole
    work, counters = ws if ws is not None else (None, None)
    err = _lib().fp4r_dense_gemv(
        x.data_ptr(),
        w.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        work.data_ptr() if work is not None else None,
        counters.data_ptr() if counters is not None else None,
        m,
        n,
        k,
        ctas,
        int(x.dtype == torch.bfloat16),
        _dense_variant,
        1 if _pdl is None else _pdl,
        int(gated),
        int(tiled),
        torch.cuda.current_stream(x.device).cuda_stream,
    )
    if err:
        raise RuntimeError(f"dense kernel launch failed with CUDA error {err} (M={m}, N={n}, K={k})")
    return out


@dense_linear_op.register_fake
def _(x, w, bias, n, grid, gated):
    return x.new_empty(x.shape[0], n // 2 if gated else n)


def dense_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    n: int | None = None,
    gated: bool = False,
    ctas: int = 0,
) -> torch.Tensor:
    """``x [..., K] @ w.T + bias`` for a dense bf16/fp16 weight ``w`` [N, K], or :func:`tile_dense`'s 6-d copy
    of it (then ``n``: its row count, default all 16 rows of every tile), through the small-M kernel on CUDA
    for M <= 16 and ``F.linear`` elsewhere. ``gated``: ``w`` is a fused [gate; up] weight [2I, K]
    (row-major) and the result silu(gate) * up [..., I]. ``ctas``: override the grid (tests, sweeps).
    Measured on an H100 (benchmarks/NOTES.md v17): with :func:`tile_dense`'s copy it is 1.02-1.12x cuBLAS
    on qkv and o shapes at M <= 8, 1.01x on gate_up at M = 1 only, and 0.89x on down; row-major ~0.6x.
    The engine does not use it (cuBLAS; a tiled copy would double those weights' memory for a few %)."""
    if w.dim() not in (2, 6) or (w.dim() == 6 and tuple(w.shape[2:]) != (2, 4, 32, 8)):
        raise ValueError(f"dense weight must be [N, K] or tile_dense's 6-d layout, got {tuple(w.shape)}")
    if w.dim() == 2:
        n = w.shape[0]
    elif n is None:
        n = w.shape[0] * 16
    elif not (w.shape[0] - 1) * 16 < n <= w.shape[0] * 16:
        raise ValueError(f"n={n} does not fit a tiled weight of {w.shape[0]} 16-row tiles")
    k = w.shape[1] if w.dim() == 2 else w.shape[1] * CHUNK
    if x.shape[-1] != k:
        raise ValueError(f"input has K={x.shape[-1]} but the weight has K={k}")
    if gated and n % 2:
        raise ValueError(f"a fused gate/up weight has an even number of rows, got N={n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if not x.is_cuda or x2.shape[0] > MAX_M or k % CHUNK or (gated and n % 16):
        wd = untile_dense(w, n) if w.dim() == 6 else w
        y = F.linear(x2, wd.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return (silu_mul_reference(y) if gated else y).reshape(*lead, -1)
    x2 = _aligned(x2)
    if bias is not None:
        bias = bias.to(x.dtype)
        bias = (bias[gated_rows(n, bias.device)] if gated else bias).contiguous()
    return torch.ops.fp4reason.dense_linear(x2, _aligned(w), bias, n, ctas, gated).reshape(*lead, -1)
