"""Build, check and time the small-M NVFP4 kernel against its peers on one GPU.

For the Qwen3-8B and Llama-3.1-8B linears (fused qkv, o, fused gate_up, down) at M in {1, 2, 4, 8, 16}:
ours (``fp4reason.kernels`` as dispatched, and forced without / with programmatic dependent launch),
cuBLAS BF16 ``F.linear``, dequantize-then-matmul in torch, torch's int4 tinygemm
(``_weight_int4pack_mm``, g128), humming NVFP4 (``humming-kernels``, if importable), and the 4.5-bit
byte floor at the measured device-copy bandwidth. Each kernel runs over enough distinct weight copies
that L2 (50 MB) never holds the weight; the calls are captured in one CUDA graph and the median replay
time over the copies is reported. Prints a per-linear table and per-layer sums with ratios.

``--xf 16,64`` adds columns with the activation staging (XF, variants 10 / 11) allowed up to 16 and 64 KB
per CTA, with their own rel err, in the same run as the dispatched kernel (``ours``: ``FP4REASON_XF``'s).
``--norm`` adds, for the projections after a norm (qkv, gate_up with its silu(gate) * up epilogue), the
engine's compiled add + RMSNorm followed by the kernel (``sep_norm``) and the add + norm inside the kernel
(``fused_norm``, ``nvfp4_norm_linear``), both per call of the pair.

With ``--dense`` it times the dense BF16 kernel (``dense_linear``, each variant, row-major and tiled
weights, the gated epilogue on gate_up) against cuBLAS ``F.linear`` (+ silu(gate) * up) and the 16-bit
byte floor instead.

    python benchmarks/kernel_bench.py --out benchmarks/results [--sweep | --dense]
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e_bench import copy_bandwidth  # noqa: E402
from fp4reason.formats import NVFP4Tensor, quantize_nvfp4
from fp4reason.kernels import cuda as fk
from fp4reason.kernels import (
    dense_linear,
    nvfp4_linear,
    nvfp4_norm_linear,
    nvfp4_silu_mul,
    prepare_nvfp4,
    tile_dense,
)
from fp4reason.kernels.reference import silu_mul_reference

MODELS = {
    "Llama-3.1-8B": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "Qwen3-8B": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
}
SET_BYTES = 400e6  # each kernel's weight copies together: 8x the L2


def time_calls(fns, reps: int = 15) -> float:
    """Median µs per call of ``fns`` (one call each) replayed as one CUDA graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        run = graph.replay
    except Exception:  # not capturable: eager launches (includes launch overhead)
        graph = None

        def run():
            for f in fns:
                f()

    # warm up for >= 25 ms of replays, so every column is timed at settled clocks (the first-timed column
    # used to read up to ~10 % slow, benchmarks/NOTES.md v6b and v7)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.025:
        run()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    del graph
    return statistics.median(times)


def graph_copy_bandwidth() -> float:
    """The old floor's rate: 512 MB uint8 copies replayed in a CUDA graph (read plus written); it reads
    ~2.8 TB/s on an H200 where e2e_bench's 1 GiB int16 copy reads ~4.2 (kept for comparison only)."""
    src = torch.empty(2**29, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = time_calls([lambda: dst.copy_(src)] * 4, reps=10)
    return 2 * src.numel() / (us * 1e-6)


def nv_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * k // 16


def copies(nbytes: int, lo: int = 3, hi: int = 48) -> int:
    return max(lo, min(hi, math.ceil(SET_BYTES / nbytes)))


def humming_layers(w: NVFP4Tensor, r: int):
    from humming.layer import HummingLayer

    n, k = w.shape
    cfg = dict(
        quant_method="compressed-tensors",
        format="nvfp4-pack-quantized",
        type="float",
        num_bits=4,
        strategy="tensor_group",
        group_size=16,
    )
    layers = []
    for _ in range(r):
        layer = HummingLayer(shape_n=n, shape_k=k, weight_config=dict(cfg), torch_dtype=torch.bfloat16)
        layer.load_from_tensors(
            {
                "weight_packed": w.packed.cpu(),
                "weight_scale": w.block_scale.cpu(),
                "weight_global_scale": w.global_scale.cpu(),
            }
        )
        layer = layer.cuda()
        layer.transform()
        layers.append(layer)
    return layers


def rel_err(y: torch.Tensor, x: torch.Tensor, w: NVFP4Tensor) -> float:
    ref = x.double() @ w.dequantize(torch.float32).double().T
    return ((y.double() - ref).norm() / ref.norm()).item()


def time_norm(ws: list, x: torch.Tensor, gated: bool) -> dict:
    """µs per (add + RMSNorm, projection) pair over the weight copies ``ws``: the engine's compiled add + norm
    then the kernel (``sep_norm``), and the add + norm inside the kernel (``fused_norm``)."""
    from fp4reason.engine.model import _add_rms_norm, _compiled

    add_norm, fused = _compiled(_add_rms_norm), nvfp4_norm_linear
    proj = nvfp4_silu_mul if gated else nvfp4_linear
    d, nw = torch.randn_like(x), (1 + 0.1 * torch.randn(x.shape[-1], device="cuda")).to(x.dtype)
    return {
        "sep_norm": time_calls([lambda c=c: proj(add_norm(x, d, nw, 1e-6)[1], c) for c in ws]),
        "fused_norm": time_calls([lambda c=c: fused(x, nw, 1e-6, c, delta=d, gated=gated) for c in ws]),
    }


def bench_shape(
    n: int,
    k: int,
    ms: list[int],
    sweep: bool,
    log,
    only_ours: bool = False,
    variants=(0, 4, 5),
    grids=(),
    gated: bool = False,
    xfs=(),
    norm: bool = False,
) -> dict:
    torch.manual_seed(0)
    w = quantize_nvfp4(torch.randn(n, k, device="cuda") * 0.02)
    wb = w.dequantize(torch.bfloat16)
    r_nv = copies(w.nbytes)
    cts = [NVFP4Tensor(w.packed.clone(), w.block_scale.clone(), w.global_scale) for _ in range(2)]
    nvs = [prepare_nvfp4(w)] + [prepare_nvfp4(cts[0]) for _ in range(r_nv - 1)]  # distinct tiled copies
    bfs = [] if only_ours else [wb.clone() for _ in range(copies(wb.numel() * 2))]
    res = {"N": n, "K": k, "bytes": nv_bytes(n, k), "copies": r_nv, "M": {}}
    i4 = hum = sz = None
    if not only_ours:
        try:
            codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            i4 = [torch._convert_weight_to_int4pack(codes.clone(), 8) for _ in range(r_nv)]
            sz = torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
        except Exception as e:  # noqa: BLE001
            i4, res["int4_error"] = None, repr(e)
        try:
            hum = humming_layers(w, min(r_nv, 16))
        except Exception as e:  # noqa: BLE001
            hum, res["humming_error"] = None, repr(e)[:300]
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row = {"rel_err": rel_err(nvfp4_linear(x, nvs[0]), x, w), "ctas": fk.grid_ctas(m, n, k)}
        row["ours"] = time_calls([lambda c=c, x=x: nvfp4_linear(x, c) for c in nvs])
        pdl = fk._pdl
        for flag in (0, 1):
            fk._pdl = flag
            row[f"ours_pdl{flag}"] = time_calls([lambda c=c, x=x: nvfp4_linear(x, c) for c in nvs])
        fk._pdl = pdl
        if gated:  # gate_up with the silu(gate) * up epilogue: what the engine's MLP runs
            gts = [prepare_nvfp4(c, gated=True) for c in [w] + [cts[0]] * (r_nv - 1)]
            row["ours_gated"] = time_calls([lambda c=c, x=x: nvfp4_silu_mul(x, c) for c in gts])
            del gts
        per_sm = fk._ctas_per_sm
        for g in grids:  # grid policies: CTAs per SM (stream-K), 0 = split-K
            fk._ctas_per_sm = g
            row[f"cps{g}"] = time_calls([lambda c=c, x=x: nvfp4_linear(x, c) for c in nvs])
        fk._ctas_per_sm = per_sm
        xf_kb = fk._xf_kb
        for kb in xfs:  # activation staging (XF) up to kb KB per CTA, 0 = off
            fk._xf_kb = kb
            row[f"xf{kb}_rel_err"] = rel_err(nvfp4_linear(x, nvs[0]), x, w)
            row[f"xf{kb}"] = time_calls([lambda c=c, x=x: nvfp4_linear(x, c) for c in nvs])
            if gated:
                gts = [prepare_nvfp4(c, gated=True) for c in [w] + [cts[0]] * (r_nv - 1)]
                row[f"xf{kb}_gated"] = time_calls([lambda c=c, x=x: nvfp4_silu_mul(x, c) for c in gts])
                del gts
        fk._xf_kb = xf_kb
        if norm:  # the residual add + RMSNorm before the projection: a separate kernel, or inside it
            ws = [prepare_nvfp4(c, gated=gated) for c in [w] + [cts[0]] * (r_nv - 1)]
            row.update(time_norm(ws, x, gated))
            del ws
        if sweep:  # kernel variants x fixed split counts
            default = fk._variant
            for v in variants:
                fk._variant = v
                for sp in (1, 2, 4, 8, 16):
                    if sp <= k // 128:
                        fns = [lambda c=c, s=sp, x=x: fk.nvfp4_linear_cuda(x, c, splits=s) for c in nvs]
                        row[f"v{v}_s{sp}"] = time_calls(fns)
            fk._variant = default
            best = min((key for key in row if key.startswith("v")), key=row.get)
            row["best"], row["best_us"] = best, row[best]
        if not only_ours:
            row["cublas_bf16"] = time_calls([lambda c=c, x=x: F.linear(x, c) for c in bfs])
        if not only_ours:
            row["dequant_matmul"] = time_calls(
                [lambda c=c, x=x: F.linear(x, c.dequantize(torch.bfloat16)) for c in cts], 5
            )
        if i4 is not None:
            mm4 = torch._weight_int4pack_mm
            row["torch_int4"] = time_calls([lambda c=c, x=x, mm4=mm4: mm4(x, c, 128, sz) for c in i4])
        if hum is not None:
            try:
                yh = hum[0](x)
                row["humming_rel_err"] = rel_err(yh, x, w)
                row["humming"] = time_calls([lambda h=h, x=x: h(x) for h in hum])
            except Exception as e:  # noqa: BLE001
                res["humming_error"] = repr(e)[:300]
        res["M"][m] = row
        log(
            f"  N={n} K={k} M={m}: "
            + " ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in row.items())
        )
    return res


def bench_dense(n: int, k: int, ms: list[int], log, gated: bool) -> dict:
    """Dense BF16 ``x @ W.T``: ours per variant, row-major and tiled (and gated on gate_up), vs cuBLAS."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    ws = [w] + [w.clone() for _ in range(copies(n * k * 2) - 1)]
    ts = [tile_dense(c) for c in ws]
    res = {"N": n, "K": k, "bytes": n * k * 2, "copies": len(ws), "M": {}}
    default = fk._dense_variant
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ w.double().T
        row = {"cublas": time_calls([lambda c=c, x=x: F.linear(x, c) for c in ws])}
        if gated:
            row["cublas_silu"] = time_calls([lambda c=c, x=x: silu_mul_reference(F.linear(x, c)) for c in ws])
        for v in fk.DENSE_VARIANTS:
            fk._dense_variant = v
            y = dense_linear(x, w)
            row[f"v{v}_err"] = ((y.double() - ref).norm() / ref.norm()).item()
            row[f"v{v}"] = time_calls([lambda c=c, x=x: dense_linear(x, c) for c in ws])
            row[f"v{v}_tiled"] = time_calls([lambda c=c, x=x: dense_linear(x, c, n=n) for c in ts])
            if gated:
                row[f"v{v}_gated"] = time_calls([lambda c=c, x=x: dense_linear(x, c, gated=True) for c in ws])
        fk._dense_variant = default
        row["ours"] = min(row[f"v{v}"] for v in fk.DENSE_VARIANTS)
        res["M"][m] = row
        log(f"  dense N={n} K={k} M={m}: " + " ".join(f"{a}={b:.4g}" for a, b in row.items()))
    return res


def dense_main(args, ms: list[int], out: Path, bw: float, log) -> int:
    props = torch.cuda.get_device_properties(0)
    shapes = sorted({s for lin in MODELS.values() for s in lin.values()})
    gate_ups = {lin["gate_up"] for lin in MODELS.values()}
    results = {f"{n}x{k}": bench_dense(n, k, ms, log, (n, k) in gate_ups) for n, k in shapes}
    vs = fk.DENSE_VARIANTS
    cols = ["cublas", "cublas_silu"] + [f"v{v}{t}" for v in vs for t in ("", "_tiled", "_gated")]
    lines = [f"# Dense BF16 small-M kernel bench ({props.name}, copy BW {bw / 1e12:.2f} TB/s)", ""]
    lines += ["| model | linear | N×K | M | " + " | ".join(cols) + " | floor | best ours ×cuBLAS |"]
    lines += ["|" + "---|" * (len(cols) + 6)]
    layer: dict = {}
    for model, lins in MODELS.items():
        for name, (n, k) in lins.items():
            r = results[f"{n}x{k}"]
            for m in ms:
                row, floor = r["M"][m], r["bytes"] / bw * 1e6
                vals = " | ".join(f"{row[c]:.1f}" if c in row else "—" for c in cols)
                ratio = row["cublas"] / row["ours"]
                lines.append(f"| {model} | {name} | {n}×{k} | {m} | {vals} | {floor:.1f} | {ratio:.2f} |")
                a = layer.setdefault((model, m), {"floor": 0.0})
                a["floor"] += floor
                # what a decode step runs: gate_up gated where timed (cuBLAS: linear + silu kernel)
                a["cublas"] = a.get("cublas", 0.0) + row.get("cublas_silu", row["cublas"])
                for v in vs:
                    a[f"v{v}"] = a.get(f"v{v}", 0.0) + row.get(f"v{v}_gated", row[f"v{v}"])
    lines += ["", "## Per layer (µs; gate_up with silu(gate) * up)", ""]
    heads = " | ".join(f"v{v}" for v in vs)
    lines += [f"| model | M | cuBLAS | {heads} | floor | best ×cuBLAS | best ×floor |"]
    lines += ["|" + "---|" * (len(vs) + 6)]
    for (model, m), a in layer.items():
        best = min(a[f"v{v}"] for v in vs)
        lines.append(
            f"| {model} | {m} | {a['cublas']:.1f} | "
            + " | ".join(f"{a[f'v{v}']:.1f}" for v in vs)
            + f" | {a['floor']:.1f} | {a['cublas'] / best:.2f} | {best / a['floor']:.2f} |"
        )
    table = "\n".join(lines)
    meta = {"device": props.name, "copy_bw_Bps": bw, "results": results}
    (out / "kernel_bench_dense.json").write_text(json.dumps(meta, indent=1, default=str))
    (out / "kernel_bench_dense.md").write_text(table + "\n")
    print(table)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--m", default="1,2,4,8,16")
    ap.add_argument("--sweep", action="store_true", help="also time fixed split-K counts")
    ap.add_argument("--only-ours", action="store_true", help="skip the baselines (tuning runs)")
    ap.add_argument("--variants", default="0,4,5", help="kernel variants in the --sweep")
    ap.add_argument("--grids", default="", help="also time these CTAs-per-SM grid policies (0 = split-K)")
    ap.add_argument("--dense", action="store_true", help="time the dense BF16 kernel vs cuBLAS instead")
    ap.add_argument("--xf", default="", help="also time activation staging up to these KB per CTA (0 = off)")
    ap.add_argument("--norm", action="store_true", help="also time the add + RMSNorm, separate vs in-kernel")
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log_lines = []

    def log(s: str) -> None:
        print(s, flush=True)
        log_lines.append(s)

    props = torch.cuda.get_device_properties(0)
    lib = fk.build_library()
    log(
        f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; "
        f"kernel {lib.name}"
    )
    bw = copy_bandwidth(torch.device("cuda"))  # the same floor as e2e_bench and attn_bench
    log(
        f"device copy bandwidth {bw / 1e12:.3f} TB/s (read+write, 1 GiB best of 10; "
        f"uint8 graph copy {graph_copy_bandwidth() / 1e12:.3f})"
    )
    if args.dense:
        return dense_main(args, ms, out, bw, log)
    shapes = sorted({s for lin in MODELS.values() for s in lin.values()})
    variants = [int(v) for v in args.variants.split(",")]
    grids = [int(v) for v in args.grids.split(",") if v]
    xfs = [int(v) for v in args.xf.split(",") if v]
    gate_ups = {lin["gate_up"] for lin in MODELS.values()}
    normed = {lin[p] for lin in MODELS.values() for p in ("qkv", "gate_up")} if args.norm else set()
    results = {
        f"{n}x{k}": bench_shape(
            n,
            k,
            ms,
            args.sweep,
            log,
            args.only_ours,
            variants,
            grids,
            gated=(n, k) in gate_ups,
            xfs=xfs,
            norm=(n, k) in normed,
        )  # fmt: skip
        for n, k in shapes
    }
    gcols = [f"cps{g}" for g in grids] + [f"xf{kb}" for kb in xfs]
    cols = ["ours", "ours_pdl0", "ours_pdl1", "ours_gated", "humming", "cublas_bf16", "torch_int4"]
    cols += ["dequant_matmul"]
    cols += gcols + [f"xf{kb}_gated" for kb in xfs] + (["sep_norm", "fused_norm"] if args.norm else [])

    lines = [f"# NVFP4 small-M kernel bench ({props.name}, copy BW {bw / 1e12:.2f} TB/s)", ""]
    lines += ["## Per linear (µs; eff = 4.5-bit bytes / ours)", ""]
    lines += ["| model | linear | N×K | M | " + " | ".join(cols) + " | floor | eff TB/s | rel err |"]
    lines += ["|" + "---|" * (len(cols) + 8)]
    layer = {}
    for model, lins in MODELS.items():
        for name, (n, k) in lins.items():
            r = results[f"{n}x{k}"]
            for m in ms:
                row = r["M"][m]
                floor = r["bytes"] / bw * 1e6
                vals = " | ".join(f"{row[c]:.1f}" if c in row else "—" for c in cols)
                eff = r["bytes"] / (row["ours"] * 1e-6) / 1e12
                lines.append(
                    f"| {model} | {name} | {n}×{k} | {m} | {vals} | {floor:.1f} | {eff:.2f} "
                    f"| {row['rel_err']:.1e} |"
                )
                acc = layer.setdefault((model, m), {"floor": 0.0, "bytes": 0})
                acc["floor"] += floor
                acc["bytes"] += r["bytes"]
                for c in cols:
                    if c in row:
                        acc[c] = acc.get(c, 0.0) + row[c]
    lines += ["", "## Per layer (sum of the four linears, µs)", ""]
    lines += [
        "| model | M | ours | humming | cuBLAS BF16 | torch int4 | floor | eff TB/s | ×humming | ×cuBLAS |"
        + "".join(f" {c} |" for c in gcols)
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(gcols)]
    for (model, m), a in layer.items():
        hum = a.get("humming", float("nan"))
        lines.append(
            f"| {model} | {m} | {a['ours']:.1f} | {hum:.1f} | {a.get('cublas_bf16', float('nan')):.1f} "
            f"| {a.get('torch_int4', float('nan')):.1f} | {a['floor']:.1f} "
            f"| {a['bytes'] / a['ours'] / 1e6:.2f} "
            f"| {hum / a['ours']:.2f} | {a.get('cublas_bf16', float('nan')) / a['ours']:.2f} |"
            + "".join(f" {a.get(c, float('nan')):.1f} |" for c in gcols)
        )
    table = "\n".join(lines)
    meta = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "copy_bw_Bps": bw,
        "seconds": time.time() - t0,
        "results": results,
    }
    tag = "kernel_bench"
    (out / f"{tag}.json").write_text(json.dumps(meta, indent=1, default=str))
    (out / f"{tag}.md").write_text(table + "\n")
    print(table)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
