"""Quantization schemes and their compressed-tensors ``quantization_config`` (what vLLM reads)."""

from dataclasses import dataclass

from fp4reason.formats import BLOCK_SIZE, MX_BLOCK_SIZE


@dataclass(frozen=True)
class Scheme:
    """A PTQ recipe: FP4 weights, optionally FP4 activations (A4) and a 4-bit E1M2 KV cache (KV4)."""

    name: str
    weight_format: str  # "nvfp4" | "mxfp4"
    act_quant: bool
    kv_quant: bool

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE if self.weight_format == "nvfp4" else MX_BLOCK_SIZE

    @property
    def ct_format(self) -> str:
        """compressed-tensors checkpoint format name."""
        return f"{self.weight_format}-pack-quantized"


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("nvfp4-w4a16", "nvfp4", act_quant=False, kv_quant=False),
        Scheme("nvfp4-w4a4", "nvfp4", act_quant=True, kv_quant=False),
        Scheme("nvfp4-w4a4kv4", "nvfp4", act_quant=True, kv_quant=True),
        Scheme("mxfp4-w4a16", "mxfp4", act_quant=False, kv_quant=False),
        Scheme("mxfp4-w4a4", "mxfp4", act_quant=True, kv_quant=False),
    )
}


def get_scheme(scheme: "str | Scheme") -> Scheme:
    """Resolve a scheme name (or pass a Scheme through); unknown names raise ValueError."""
    if isinstance(scheme, Scheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def _args(scheme: Scheme, *, activation: bool) -> dict:
    """compressed-tensors ``QuantizationArgs`` of the weight (or input activation) quantizer."""
    nv = scheme.weight_format == "nvfp4"
    args = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": scheme.block_size,
        "strategy": "tensor_group" if nv else "group",
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn" if nv else "torch.uint8",
    }
    if activation:
        args["dynamic"] = "local" if nv else True  # nvfp4: static tensor scale, dynamic block scales
        if nv:
            args["observer"] = "static_minmax"
    return args


def quantization_config(scheme: Scheme, ignore: list[str] | None = None) -> dict:
    """The ``quantization_config`` entry of config.json for ``scheme`` (compressed-tensors form).

    KV4 has no compressed-tensors equivalent (it is dynamic E1M2); it is recorded only in the extra key
    ``fp4reason_scheme``, which compressed-tensors and vLLM ignore.
    """
    return {
        "quant_method": "compressed-tensors",
        "format": scheme.ct_format,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore if ignore is not None else ["lm_head"]),
        "kv_cache_scheme": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": scheme.ct_format,
                "weights": _args(scheme, activation=False),
                "input_activations": _args(scheme, activation=True) if scheme.act_quant else None,
                "output_activations": None,
            }
        },
        "fp4reason_scheme": scheme.name,
    }


def scheme_from_config(qc: dict) -> Scheme:
    """Infer our Scheme from a compressed-tensors ``quantization_config`` (ours or another producer's)."""
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(
            f"quantization_config.quant_method is {qc.get('quant_method')!r}, not 'compressed-tensors'"
        )
    if qc.get("fp4reason_scheme") in SCHEMES:
        return SCHEMES[qc["fp4reason_scheme"]]
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(
            f"expected exactly one quantization config group, found {len(groups)}: {sorted(groups)}"
        )
    group = next(iter(groups.values()))
    fmt = group.get("format") or qc.get("format")
    w = group.get("weights") or {}
    if w.get("num_bits") != 4 or w.get("type") != "float":
        raise ValueError(f"unsupported weight quantization {w} (need 4-bit float)")
    if fmt == "nvfp4-pack-quantized" and w.get("group_size") == BLOCK_SIZE:
        wf = "nvfp4"
    elif fmt == "mxfp4-pack-quantized" and w.get("group_size") == MX_BLOCK_SIZE:
        wf = "mxfp4"
    else:
        raise ValueError(
            f"unsupported compressed-tensors format {fmt!r} with group_size {w.get('group_size')} "
            "(need nvfp4-pack-quantized/16 or mxfp4-pack-quantized/32)"
        )
    if qc.get("kv_cache_scheme"):
        raise ValueError(f"kv_cache_scheme {qc['kv_cache_scheme']} is not supported")
    a4 = group.get("input_activations") is not None
    return SCHEMES[f"{wf}-w4a4" if a4 else f"{wf}-w4a16"]
