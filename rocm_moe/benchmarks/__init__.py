"""Benchmarks runnable as `rocm-moe bench NAME` (scripts in bench/ call the same code)."""


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


NO_PLOT = "matplotlib is not installed: no plot (pip install 'rocm_moe[bench]')"
