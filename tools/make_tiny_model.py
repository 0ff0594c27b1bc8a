"""Checkout entry point of the tiny random checkpoints of tests and the demo: the code ships in the package (calibrl_mcore/make_tiny_model.py), so an installed
`calibrl` has it too; `python tools/make_tiny_model.py ...` and `python -m calibrl_mcore.make_tiny_model ...` are the same command."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrl_mcore.make_tiny_model import *  # noqa: E402,F403  (re-exports the public names)
from calibrl_mcore.make_tiny_model import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
