"""FP4 linear kernels. On a machine without a CUDA GPU every call runs the reference path
(dequantize + matmul), so callers work everywhere."""

from fp4reason.kernels.reference import mxfp4_linear_reference, nvfp4_linear_reference

nvfp4_linear = nvfp4_linear_reference
mxfp4_linear = mxfp4_linear_reference

__all__ = ["mxfp4_linear", "mxfp4_linear_reference", "nvfp4_linear", "nvfp4_linear_reference"]
