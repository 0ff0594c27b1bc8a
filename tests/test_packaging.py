"""The built wheel carries everything a `calibrl` subcommand needs: conversion, the tiny-model maker, plotting,
the demo config and the cluster layouts. Installed into a clean target and run from an empty folder, with the
checkout out of reach (`calibrl demo --quick` from the wheel runs in tests/test_demo.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile


def test_wheel_ships_what_the_subcommands_import(installed_wheel):
    site, _, wheel = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("calibrl_mcore/convert_checkpoint.py", "calibrl_mcore/convert/commands.py",
                   "calibrl_mcore/make_tiny_model.py", "calibrl_mcore/tiny_model/processor.py",
                   "calibrl_mcore/plot_metrics.py", "calibrl_mcore/configs/tiny_cpu.yaml",
                   "calibrl_mcore/configs/defaults.yaml", "calibrl_mcore/configs/layouts/qwen2_5_vl_7b_h100x8.yaml"):
        assert needed in names, f"{needed} is not in {wheel.name}"
    assert not [n for n in names if n.startswith(("tools/", "tests/", "configs/"))]
    # no shipped module reaches back into the checkout's top-level folders
    back = re.compile(r"^\s*(from|import)\s+(tools|tests|bench)\b", re.M)
    offenders = [p for p in site.rglob("*.py") if back.search(p.read_text())]
    assert not offenders, offenders


def test_installed_calibrl_runs_outside_the_checkout(installed_wheel, tmp_path):
    site, env, _ = installed_wheel
    calibrl = site / "bin" / "calibrl"

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    where = run(sys.executable, "-c", "import calibrl_mcore, rollout; print(calibrl_mcore.__file__, rollout.__file__)")
    assert where.returncode == 0 and where.stdout.count(str(site)) == 2, where.stdout + where.stderr
    proc = run(str(calibrl), "convert", "--help")
    assert proc.returncode == 0 and "hf-to-mcore" in proc.stdout, proc.stdout + proc.stderr
    # shipped configs and layouts by name, from the wheel
    proc = run(sys.executable, "-c", "from calibrl_mcore.config import load_config; "
               "c = load_config('tiny_cpu', layout='qwen2_5_vl_7b_h100x8'); print(c.parallel.tensor_model_parallel_size)")
    assert proc.returncode == 0 and proc.stdout.strip().isdigit(), proc.stdout + proc.stderr
    proc = run(sys.executable, "-m", "calibrl_mcore.make_tiny_model", "--arch", "qwen2_5_vl", "--out", "tiny")
    assert proc.returncode == 0 and (tmp_path / "tiny" / "config.json").is_file(), proc.stdout + proc.stderr
