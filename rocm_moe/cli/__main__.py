"""``python -m rocm_moe.cli`` (what torchrun runs: ``torchrun ... -m rocm_moe.cli run``)."""

import sys

from rocm_moe.cli import main

sys.exit(main())
