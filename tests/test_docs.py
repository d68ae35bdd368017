"""The README is a short map: at most ~150 lines, a table naming the file of every registered task / model / arch
prefix / criterion / optimizer, relative links that resolve (files and heading anchors), and no file of the repository
pointing outside it into the sibling ``shared`` folder (not even the tests, which build the fixture path
from its parts)."""

import fnmatch
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
README_MAX_LINES = 160
KINDS = ("task", "model", "arch", "criterion", "optimizer")
OUTSIDE = "shared" + "/"  # spelled so that this file does not contain it
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files():
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose(text):
    """The text without its fenced code blocks (whose brackets are code, not links)."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.M | re.S)


def registry_table(text):
    """{kind: {key: file}} from the README rows ``| kind | `key`, `key2` | [text](file) | what |``."""
    table = {kind: {} for kind in KINDS}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) < 3 or cells[0] not in KINDS:
            continue
        link = LINK.search(cells[2])
        assert link, f"README table row without a file link: {line}"
        for key in re.findall(r"`([^`]+)`", cells[1]):
            table[cells[0]][key] = link.group(1)
    return table


def github_anchor(heading):
    """GitHub's heading id: lower case, punctuation other than '-' and '_' dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    out, fence = set(), False
    for line in read(path).splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            out.add(github_anchor(line.lstrip("#")))
    return out


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = read(README).splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    head = "\n".join(lines[:10])
    assert "\nbash train.sh " in head and "\nbash tests/run.sh " in head


def test_github_anchor():
    assert github_anchor(" Compositionality and zero-shot segmentation benchmarks") == (
        "compositionality-and-zero-shot-segmentation-benchmarks"
    )
    assert github_anchor("Data specs (`unilm_vl/data/`)") == "data-specs-unilm_vldata"


def test_registry_table_parses_keys_and_files():
    row = "| arch | `clip`, `clip_*` | [models/clip.py](unilm_vl/models/clip.py) | `clip_tiny` \\| x |"
    assert registry_table(row)["arch"] == {"clip": "unilm_vl/models/clip.py", "clip_*": "unilm_vl/models/clip.py"}
    assert registry_table("| piece | `clip` | [a](b) |") == {kind: {} for kind in KINDS}


def registered():
    """[(kind, key, file of the registered class)] for everything unilm_vl registers with fairseq."""
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    from fairseq.optim import OPTIMIZER_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    import unilm_vl  # noqa: F401  (registers every task, model, arch, criterion and optimizer)

    out = []
    for kind, registry in (
        ("task", TASK_REGISTRY),
        ("model", MODEL_REGISTRY),
        ("arch", ARCH_MODEL_REGISTRY),
        ("criterion", CRITERION_REGISTRY),
        ("optimizer", OPTIMIZER_REGISTRY),
    ):
        for key, cls in registry.items():
            if cls.__module__.startswith("unilm_vl"):
                out.append((kind, key, cls.__module__.replace(".", "/") + ".py"))
    return out


def test_every_registered_key_is_in_the_readme_table_with_its_file():
    table = registry_table(read(README))
    found = registered()
    assert {kind for kind, _, _ in found} == set(KINDS)
    wrong = []
    for kind, key, path in found:
        if kind == "arch":  # archs are listed by prefix patterns; the most specific pattern names the file
            patterns = [p for p in table["arch"] if fnmatch.fnmatchcase(key, p)]
            listed = table["arch"][max(patterns, key=len)] if patterns else None
        else:
            listed = table[kind].get(key)
        if listed != path:
            wrong.append(f"{kind} {key}: README says {listed}, registered in {path}")
    assert not wrong, "README registry table out of date:\n" + "\n".join(wrong)
    keys = {(kind, key) for kind, key, _ in found}
    stale = [f"{kind} {key}" for kind in KINDS if kind != "arch" for key in table[kind] if (kind, key) not in keys]
    stale += [
        f"arch {p}" for p in table["arch"] if not any(fnmatch.fnmatchcase(k, p) for t, k, _ in found if t == "arch")
    ]
    assert not stale, "README lists keys nothing registers: " + ", ".join(stale)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(prose(read(path))):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(resolved):
            broken.append(f"{target}: no file {os.path.relpath(resolved, REPO)}")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(resolved, REPO)}")
    assert not broken, f"{os.path.relpath(path, REPO)}: " + "; ".join(broken)


def tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    for name in filter(None, names.decode().split("\0")):
        path = os.path.join(REPO, name)
        if not os.path.isfile(path):  # deleted in the work tree, not yet committed
            continue
        try:
            yield name, read(path)
        except UnicodeDecodeError:  # binary
            continue


def test_no_file_points_into_shared():
    """A grep for the sibling folder name followed by a slash, over the tracked files, finds nothing: the tests that
    use the Kosmos-2 release fixtures build that path from its parts (tests/conftest.py SHARED)."""
    offenders = []
    for name, text in tracked_text_files():
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE in line:
                offenders.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not offenders, f"cite papers and public repository paths instead of {OUTSIDE}:\n" + "\n".join(offenders)
