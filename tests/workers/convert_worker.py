"""torchrun worker: run `calibrl_mcore.convert_checkpoint` inside a world someone else launched (the multi-node
way: `torchrun ... -m calibrl_mcore.convert_checkpoint hf-to-mcore ...`), instead of letting it start torchrun.

Run: torchrun ... convert_worker.py --out DIR <convert sub-command and flags>. Writes rank{RANK}.json with
the command's exit code; exits with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True)
    args, command = parser.parse_known_args()
    from calibrl_mcore.convert_checkpoint import main

    rc = main(command)
    (args.out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"rc": rc}))
    sys.exit(rc)
