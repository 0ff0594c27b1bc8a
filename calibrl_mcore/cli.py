"""`calibrl` command line: train | sft | eval | serve | data synth | convert | sweep | demo.

    calibrl train --config configs/tiny_cpu.yaml algo.name=grpo train.steps=5
    torchrun --nproc_per_node 4 -m calibrl_mcore.cli train --config X.yaml parallel.tensor_model_parallel_size=2

Everything after the sub-command's flags is a `key.sub=value` override. Entry points are import-safe
(Megatron's checkpoint writer starts spawn-context processes that re-import `__main__`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _config(args: argparse.Namespace):
    from calibrl_mcore.config import load_config

    return load_config(args.config, args.overrides, layout=args.layout)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (keys documented in configs/defaults.yaml)")
    p.add_argument("--layout", default=None, metavar="NAME|FILE",
                   help="cluster layout merged over --config: a file or a name in configs/layouts "
                        "(e.g. qwen2_5_vl_32b_h100x32); key=value overrides still win")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def cmd_train(args: argparse.Namespace) -> int:
    from calibrl_mcore.trainer.loop import train

    train(_config(args))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from calibrl_mcore.trainer.sft import sft

    out = sft(_config(args))
    print(f"SFT checkpoint written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    if args.suite:
        return _cmd_eval_suite(args)
    from calibrl_mcore.trainer.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(_config(args), model_path=args.model, limit=args.limit)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _cmd_eval_suite(args: argparse.Namespace) -> int:
    """`calibrl eval --suite A,B`: benchmark files from `--bench NAME=PATH` or `--suite-dir DIR/<name>`;
    greedy decoding with the config's rollout section (urls, api_key, timeout_s, max_new_tokens)."""
    from calibrl_mcore.evals.harness import benchmark_paths, run_suite

    cfg = _config(args)
    suite = [name.strip() for name in args.suite.split(",") if name.strip()]
    explicit = {}
    for pair in args.bench:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SystemExit(f"--bench expects NAME=PATH, got {pair!r}")
        explicit[name.strip()] = path.strip()
    paths = benchmark_paths(suite, suite_dir=args.suite_dir, explicit=explicit)
    reports = run_suite(suite, paths, args.model or cfg.model.hf_path, urls=list(cfg.rollout.urls) or None,
                        limit=args.limit, out_dir=args.out, max_new_tokens=cfg.rollout.max_new_tokens,
                        api_key=cfg.rollout.api_key, timeout_s=cfg.rollout.timeout_s)
    print(f"evaluated {', '.join(reports)}; summary in {args.out}/summary.md")
    print((Path(args.out) / "summary.md").read_text())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from calibrl_mcore.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Sub-commands that own their argument parsing.
    if argv[:1] == ["serve"]:
        from rollout.server import main as serve_main

        return serve_main(argv[1:])
    if argv[:2] == ["data", "synth"]:
        from calibrl_mcore.data.synth import main as synth_main

        return synth_main(argv[2:])
    if argv[:1] == ["sweep"]:
        from calibrl_mcore.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] == ["convert"]:
        from tools.convert_checkpoint import main as convert_main

        return convert_main(argv[1:])

    parser = argparse.ArgumentParser(prog="calibrl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("train", cmd_train, "RL training (GRPO / DAPO / LUFFY / RL-PLUS / CalibRL)"),
        ("sft", cmd_sft, "supervised warm start on expert solutions"),
    ):
        p = sub.add_parser(name, help=help_)
        _add_config_args(p)
        p.set_defaults(fn=fn)
    p = sub.add_parser("eval", help="greedy accuracy (acc × fmt) on data.eval_path, or on benchmarks (--suite)")
    p.add_argument("--model", default=None, help="HF checkpoint to evaluate (default: model.hf_path)")
    p.add_argument("--suite", default=None, metavar="NAME[,NAME...]",
                   help="benchmarks to run (mathvista, mathverse, mathvision, wemath, logicvista, geometry3k, "
                        "math500, amc); max_new_tokens comes from rollout.max_new_tokens")
    p.add_argument("--suite-dir", default=None, metavar="DIR", help="one folder per benchmark, named after it")
    p.add_argument("--bench", action="append", default=[], metavar="NAME=PATH",
                   help="data file or folder of one benchmark (repeatable; wins over --suite-dir)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N items of each benchmark / eval set")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="output folder of --suite runs")
    _add_config_args(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("demo", help="the CPU demo: synthetic data, tiny VL model, SFT, CalibRL vs GRPO")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a much shorter run (CI smoke)")
    p.set_defaults(fn=cmd_demo)
    sub.add_parser("serve", help="rollout server (see `calibrl serve --help`)")
    sub.add_parser("data", help="`calibrl data synth --out DIR --n N`")
    sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion")
    sub.add_parser("sweep", help="run a grid of training configs (see `calibrl sweep --help`)")
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
