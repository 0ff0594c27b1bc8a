"""Checkout entry point of the run plots: the code ships in the package (calibrl_mcore/plot_metrics.py), so an installed
`calibrl` has it too; `python tools/plot_metrics.py ...` and `python -m calibrl_mcore.plot_metrics ...` are the same command."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrl_mcore.plot_metrics import main, plot_arms, plot_runs  # noqa: E402,F401  (re-exports)

if __name__ == "__main__":
    raise SystemExit(main())
