"""`calibrl` command line: train | sft | eval | serve | data synth | convert | sweep | demo | env.

    calibrl train --config configs/tiny_cpu.yaml algo.name=grpo train.steps=5
    torchrun --nproc_per_node 4 -m calibrl_mcore.cli train --config X.yaml parallel.tensor_model_parallel_size=2

Everything after the sub-command's flags is a `key.sub=value` override. Output is quiet by default (see
calibrl_mcore/terminal.py); `--verbose` anywhere on the line (or `train.log_level=verbose`) shows everything.
A missing input is one line on stderr and exit code 2. Entry points are import-safe (Megatron's checkpoint
writer starts spawn-context processes that re-import `__main__`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calibrl_mcore.terminal import configure_logging, process_rank


def _config(args: argparse.Namespace, command: str | None = None, model: str | None = None):
    """The run config; its log level applied; `command`'s input files checked (before the heavy imports)."""
    from calibrl_mcore.config import load_config
    from calibrl_mcore.inputs import check_command_inputs

    cfg = load_config(args.config, args.overrides, layout=args.layout)
    level = cfg.train.log_level
    configure_logging("verbose" if args.verbose and level != "debug" else level)
    if command is not None:
        check_command_inputs(command, cfg, model=model)
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (keys documented in configs/defaults.yaml)")
    p.add_argument("--layout", default=None, metavar="NAME|FILE",
                   help="cluster layout merged over --config: a file or a name in configs/layouts "
                        "(e.g. qwen2_5_vl_32b_h100x32); key=value overrides still win")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args, "train")
    from calibrl_mcore.trainer.loop import train

    train(cfg)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    cfg = _config(args, "sft")
    from calibrl_mcore.trainer.sft import sft

    sft(cfg)  # its summary block names the checkpoint written
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.suite:
        return _cmd_eval_suite(args)
    cfg = _config(args, "eval", model=args.model)
    from calibrl_mcore.trainer.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(cfg, model_path=args.model, limit=args.limit)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _cmd_eval_suite(args: argparse.Namespace) -> int:
    """`calibrl eval --suite A,B`: benchmark files from `--bench NAME=PATH` or `--suite-dir DIR/<name>`;
    greedy decoding with the config's rollout section (urls, api_key, timeout_s, max_new_tokens)."""
    from calibrl_mcore.evals.harness import benchmark_paths, run_suite
    from calibrl_mcore.inputs import InputError, require_benchmark_paths, require_hf_checkpoint

    cfg = _config(args)
    suite = [name.strip() for name in args.suite.split(",") if name.strip()]
    explicit = {}
    for pair in args.bench:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"--bench expects NAME=PATH, got {pair!r}")
        explicit[name.strip()] = path.strip()
    try:
        paths = benchmark_paths(suite, suite_dir=args.suite_dir, explicit=explicit)
    except (ValueError, FileNotFoundError) as exc:  # an unknown benchmark, a missing folder or --bench
        raise InputError(str(exc)) from exc
    require_benchmark_paths(paths)
    require_hf_checkpoint(args.model or cfg.model.hf_path, "--model" if args.model else "model.hf_path")
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


def cmd_env(args: argparse.Namespace) -> int:
    from calibrl_mcore.env import collect_env, render_env

    cfg = _config(args)
    report = collect_env(list(cfg.rollout.urls), spec=cfg.model.spec, api_key=cfg.rollout.api_key)
    print(json.dumps(report, indent=2) if args.json else render_env(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 done, 2 bad input (one line on stderr, from rank 0 only), else the failure's traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    configure_logging("verbose" if verbose else "info")  # again once a config names train.log_level
    from calibrl_mcore.config import ConfigError
    from calibrl_mcore.inputs import InputError

    try:
        return _dispatch(argv, verbose)
    except (ConfigError, InputError) as exc:
        if process_rank() == 0:
            command = " ".join(a for a in argv[:2] if not a.startswith("-") and "=" not in a)
            print(f"calibrl {command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str], verbose: bool) -> int:
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
    p = sub.add_parser("env", help="versions, GPUs, backends `auto` picks here, rollout servers: paste into a bug")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    _add_config_args(p)
    p.set_defaults(fn=cmd_env)
    p = sub.add_parser("demo", help="the CPU demo: synthetic data, tiny VL model, SFT, CalibRL vs GRPO")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a much shorter run (CI smoke)")
    p.set_defaults(fn=cmd_demo)
    sub.add_parser("serve", help="rollout server (see `calibrl serve --help`)")
    sub.add_parser("data", help="`calibrl data synth --out DIR --n N`")
    sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion")
    sub.add_parser("sweep", help="run a grid of training configs (see `calibrl sweep --help`)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything the libraries log (also after the sub-command)")
    args = parser.parse_args(argv)
    args.verbose = verbose
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
