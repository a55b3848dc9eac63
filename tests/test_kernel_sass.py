"""The NVFP4 kernel's machine code (SASS), compiled here for sm_90: no GPU needed, only nvcc and nvdisasm.

Under programmatic dependent launch a kernel starts while the kernel before it still runs; only what
follows griddepcontrol.wait (SASS ``ACQBULK``) may read what that kernel writes. Weight copies (``LDGSTS``,
cp.async) may come first, since no kernel writes the weights; a register load of the activations (``LDG``)
may not. The source order alone does not guarantee it: with ``__ldg`` (ld.global.nc, "read-only for the
kernel's lifetime") ptxas hoisted the first activation loads above the wait in 56 of the 80 kernels, and
W4A4 decoding read stale activations (NaN) on the H200.
"""

import re
import subprocess

import pytest

from fp4reason.kernels.cuda import _SRC, _nvcc, nvdisasm


def _functions(sass: str) -> dict[str, list[str]]:
    """Kernel name -> its SASS instruction mnemonics (with modifiers), in address order."""
    out: dict[str, list[str]] = {}
    name = None
    for line in sass.splitlines():
        m = re.match(r"^\.text\.(\S+):", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if name and m:
            out[name].append(m.group(2))
    return out


def test_no_activation_load_before_the_pdl_wait(tmp_path):
    try:
        nvcc = _nvcc()
    except RuntimeError:
        pytest.skip("nvcc not found")
    disasm = nvdisasm()
    if disasm is None:
        pytest.skip("nvdisasm not found (pip install nvidia-cuda-nvdisasm)")
    cubin = tmp_path / "k.cubin"
    cmd = [nvcc, "-O3", "-std=c++17", "-arch=sm_90", "-cubin", "-o", str(cubin), str(_SRC)]
    subprocess.run(cmd, check=True, capture_output=True)
    sass = subprocess.run([disasm, str(cubin)], check=True, capture_output=True, text=True).stdout
    kernels = {k: v for k, v in _functions(sass).items() if "nvfp4_gemv_kernel" in k}
    # (NVFP4: 14 variants, dense: 4 variants x 2 layouts) x bf16/fp16 x 1/2 token blocks x plain/gated
    assert len(kernels) == 176
    early = []
    for name, ops in kernels.items():
        wait = ops.index("ACQBULK")  # every kernel waits (griddepcontrol.wait) before its activations
        assert "LDGSTS.E.BYPASS.128" in ops[:wait], name  # the first weight stages are requested before it
        assert any(op.startswith("LDG.") for op in ops[wait:]), name
        if any(op.startswith("LDG.") for op in ops[:wait]):
            early.append(name)
    assert not early, f"{len(early)} kernels load from global memory before griddepcontrol.wait: {early[:3]}"
