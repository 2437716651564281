"""The documentation holds together: a short README with its two commands, links that resolve
inside the repository (anchors included), nothing linked outside it, and every setting documented.

Fast and offline: it reads Markdown files and ``service.config.Settings``, nothing else.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
DOCS = ROOT / "docs"

README_MAX_LINES = 200
SETUP_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -c constraints/cpu.txt -e '.[dev]' && "
    '.venv/bin/python -c "from skimage import data; from PIL import Image; '
    "Image.fromarray(data.chelsea()).resize((113, 75)).save('cat.png')\" && "
    ".venv/bin/megasr upscale cat.png -o upscaled/"
)
TEST_COMMAND = ".venv/bin/python -m pytest"

FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional "title"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
AUTOLINK = re.compile(r"<((?:https?|ftp)://[^>]+)>")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files() -> list[Path]:
    return [README, CHANGELOG, *sorted(DOCS.glob("*.md"))]


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): lines inside fenced blocks apart from the rest."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            code.append(line)
        elif fenced:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def prose_without_code(text: str) -> str:
    """The text a reader sees as prose: fenced blocks dropped, code spans blanked."""
    prose, _ = split_fences(text)
    return "\n".join(CODE_SPAN.sub("CODE", line) for line in prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return found


def links(path: Path) -> list[str]:
    return LINK.findall(prose_without_code(path.read_text(encoding="utf-8")))


def link_problems(path: Path) -> list[str]:
    """Why each relative link of ``path`` does not resolve; [] when all do."""
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # a scheme: checked by the outside-links test
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{path.name}: {target} leaves the repository")
            continue
        if not dest.exists():
            problems.append(f"{path.name}: {target} does not exist")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{path.name}: {target} has an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{path.name}: {target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def outside_problems(path: Path) -> list[str]:
    """Links (or bare URLs GitHub would turn into links) that leave the repository."""
    text = path.read_text(encoding="utf-8")
    problems = [f"{path.name}: ../shared in {line.strip()!r}" for line in text.splitlines() if "../shared" in line]
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            problems.append(f"{path.name}: link to {target}")
    prose = prose_without_code(text)
    problems += [f"{path.name}: autolink {url}" for url in AUTOLINK.findall(prose)]
    problems += [f"{path.name}: bare URL {url}" for url in re.findall(r"https?://\S+", prose)]
    return problems


def settings_env_names() -> list[str]:
    from service.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    assert prefix == "MEGASR_"
    return sorted(prefix + name.upper() for name in Settings.model_fields)


def undocumented(names: list[str], text: str) -> list[str]:
    return [name for name in names if not re.search(rf"`{name}`", text)]


# ---- the checks --------------------------------------------------------------------------------


def test_the_documentation_files_exist():
    assert README.is_file() and CHANGELOG.is_file() and (DOCS / "README.md").is_file()
    pages = {p.name for p in DOCS.glob("*.md")}
    for name in (
        "model.md",
        "extractors.md",
        "departures.md",
        "pipeline.md",
        "weights.md",
        "training.md",
        "evaluation.md",
        "api.md",
        "workers.md",
        "configuration.md",
        "security.md",
        "metrics.md",
        "deploy.md",
        "benchmarks.md",
        "testing.md",
        "mutation-survivors.md",
    ):
        assert name in pages, f"docs/{name} is missing"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


def first_fenced_block(text: str) -> list[str]:
    block, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            if inside:
                return block
            inside = True
        elif inside:
            block.append(line)
    return block


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert first_fenced_block(text) == [SETUP_COMMAND, TEST_COMMAND]
    assert text.splitlines().index(SETUP_COMMAND) < 15, "the two commands belong on the README's first screen"


def test_every_relative_link_resolves():
    problems = [p for path in doc_files() for p in link_problems(path)]
    assert not problems, "\n".join(problems)


def test_nothing_links_outside_the_repository():
    problems = [p for path in doc_files() for p in outside_problems(path)]
    assert not problems, "\n".join(problems)


def test_every_setting_is_in_the_configuration_page():
    names = settings_env_names()
    assert len(names) > 40
    missing = undocumented(names, (DOCS / "configuration.md").read_text(encoding="utf-8"))
    assert not missing, f"docs/configuration.md lacks {missing}"


# ---- the checks can fail ------------------------------------------------------------------------


def test_slugs_follow_githubs_rules():
    assert slug("Models: one deployment, several models") == "models-one-deployment-several-models"
    assert slug("GPU figures (NVIDIA H200)") == "gpu-figures-nvidia-h200"
    assert (
        slug("The pipeline (`MegaSRPipeline`) and `megasr upscale`") == "the-pipeline-megasrpipeline-and-megasr-upscale"
    )
    assert slug("3. Kubernetes with a GPU node pool") == "3-kubernetes-with-a-gpu-node-pool"
    assert slug("snake_case and-dash") == "snake_case-and-dash"


def test_the_link_checks_catch_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B\n\n## A section\n\n```\n# not a heading\n```\n")
    page = tmp_path / "docs" / "a.md"
    page.write_text(
        "# A\n\n[ok](b.md) [ok](b.md#a-section) [ok](#a) [ok](../docs/b.md)\n"
        "[gone](missing.md) [bad anchor](b.md#not-a-heading) [no such](#nowhere)\n"
        "[out](../../elsewhere.md) [shared](../../shared/x.md)\n"
        "`[in code](missing-too.md)`\n\n```\n[in a block](missing-three.md)\n```\n"
    )
    problems = link_problems(page)
    assert len(problems) == 5, problems
    assert any("missing.md does not exist" in p for p in problems)
    assert any("#not-a-heading" in p for p in problems)
    assert any("#nowhere" in p for p in problems)
    assert sum("leaves the repository" in p for p in problems) == 2


def test_the_outside_checks_catch_urls_and_shared(tmp_path):
    page = tmp_path / "a.md"
    page.write_text(
        "[web](https://example.com) <http://example.com> see https://example.org too\n"
        "[s](../shared/notes.md)\n`https://in.code/ok` and\n```\ncurl https://in.block/ok\n```\n"
    )
    problems = outside_problems(page)
    # ../shared; the link; the autolink; and as bare URLs the link's, the autolink's and the plain one
    assert len(problems) == 6, problems
    assert any("../shared" in p for p in problems)
    assert not any("in.code" in p or "in.block" in p for p in problems)


def test_the_readme_checks_catch_a_long_readme_and_changed_commands():
    text = README.read_text(encoding="utf-8")
    assert first_fenced_block(text.replace(TEST_COMMAND, TEST_COMMAND + " -x")) != [SETUP_COMMAND, TEST_COMMAND]
    assert first_fenced_block("```bash\necho hi\n```\n" + text) != [SETUP_COMMAND, TEST_COMMAND]
    assert len((text + "\n" * README_MAX_LINES).splitlines()) > README_MAX_LINES


def test_the_settings_check_catches_a_missing_row():
    names = settings_env_names()
    table = "\n".join(f"| `{name}` | default | meaning |" for name in names)
    dropped = names[len(names) // 2]
    assert undocumented(names, table) == []
    assert undocumented(names, table.replace(f"`{dropped}`", "`SOMETHING_ELSE`")) == [dropped]
    assert undocumented(names, table.replace(f"`{dropped}`", f"{dropped}")) == [dropped]  # prose, not a row


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md", "docs/README.md"])
def test_pages_start_with_a_title(name):
    assert (ROOT / name).read_text(encoding="utf-8").startswith("# ")
