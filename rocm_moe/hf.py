"""Moved to ``rocm_moe.integrations.hf``; this name stays an alias of that module, so
``from rocm_moe import hf`` and ``import rocm_moe.hf`` keep working."""

import sys

from rocm_moe.integrations import hf as _hf

sys.modules[__name__] = _hf
