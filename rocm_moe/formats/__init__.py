"""Weight formats of a layer's routed experts: one axis of one layer (``formats/base.py``).

    dense       float tensors (``formats/dense.py``)
    block_fp8   FP8 with 128x128 float32 block scales (``formats/block_fp8.py``)
    mxfp4       4-bit E2M1 with one E8M0 scale per 32 values (``formats/mxfp4.py``)

Formats load by name on first use (``format_class``), so importing this package imports none
of their kernels.
"""

from rocm_moe.formats.base import FORMATS, CheckpointReader, WeightFormat, format_class

__all__ = ["FORMATS", "CheckpointReader", "WeightFormat", "format_class"]
