"""README and docs/ speak only of files in the project: every path they name exists in the checkout, and none
points outside it (a user of the project has nothing beyond the repository)."""

from __future__ import annotations

import re

from tests.torchrun_utils import REPO

TOP = ("calibrl_mcore", "model_providers", "rollout", "tools", "bench", "configs", "docs", "tests")
# `dir/sub/file.ext`, `dir/*.json`, `dir/` written in backticks or code blocks
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(TOP) + r")/[\w./*{}-]*)")


def _named_paths(text: str) -> set[str]:
    """Repository paths a document names; a path cited in another project ("... in NVIDIA-NeMo/RL") is not ours."""
    found = set()
    for m in PATH.finditer(text.replace("**", "")):
        if not re.match(r" in [\w.-]+/[\w.-]+", text.replace("**", "")[m.end() : m.end() + 60]):
            found.add(m.group(1).rstrip(".,:;)"))
    return found


def test_readme_and_docs_name_only_project_files():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../" not in text.replace("../..", ""), f"{doc.name} points outside the project"
        assert "shared/" not in text.replace("/shared/runs", ""), f"{doc.name} names the developers' shared/"
        for path in _named_paths(text):
            if "{" in path or not (path.endswith("/") or "." in path.rsplit("/", 1)[-1]):
                continue  # a template (qwen2_5_vl_{3b,7b}.yaml) or a metric name (rollout/time_s)
            hits = list(REPO.glob(path)) if "*" in path else [REPO / path]
            assert any(p.exists() for p in hits), f"{doc.name} names {path}, which is not in the project"
