"""The docs stay true and findable: every config key they name exists, every page is reachable from the README, every
relative link resolves, and the README stays a front door (<= 250 lines, the two set-up commands verbatim).

Config keys are looked for where a reader would copy them from: fenced code blocks (not ``python`` ones) and inline
code spans of ``README.md`` and ``docs/*.md`` (``docs/results/**`` is generated and left out). A key is

* every ``key.sub=value`` override (``relevance.cache=true``, ``guidance.prior.schedule.fraction=0.5``);
* in a command line (``python train.py``, ``siftguide.study``, ...), also every top-level ``key=value``
  (``seed=1``, ``ckpt_path=last``);
* a bare dotted name whose first part is a config root (``relevance.kind``, ``knn.*``); write Python paths in full
  (``siftguide.guidance...``) so they are not taken for keys;
* a group selection (``data=image_folder``, ``'guidance=[attention,token_drop]'``): the option must exist.

Each key must exist in ``configs/train.yaml`` composed with the group selections of its own snippet (a full command
line brings its own ``data=``, ``objective=``, ``experiment=``, ...). Where the snippet does not select the key's
group, an option of any group that provides it will do (``data.labels`` comes with ``data=image_folder``,
``guidance.prior.beta`` with ``guidance=prior``).
"""
from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SCANNED = [README, *(d for d in DOCS if d.name != "changes.md")]  # changes.md lists the old keys on purpose
# every page whose links are checked (the results index too)
LINKED = [*SCANNED, ROOT / "docs" / "results" / "README.md"]
# pages linked from the README before they are written (none now)
PENDING: set = set()  # pages linked before they are written
MAX_README_LINES = 250
SETUP_COMMANDS = ["bash scripts/setup.sh && .venv/bin/python train.py", "bash scripts/test.sh"]

GROUPS = {p.name for p in CONFIGS.iterdir() if p.is_dir()}
# top-level keys of the config when these docs were written: a doc naming one that has moved is caught
ROOTS_WRITTEN = {"task_name", "seed", "num_classes", "ckpt_path", "resume", "compile", "scheduler", "align_batches",
                 "align_layers", "knn", "attention_monitor", "test", "optimized_metric"}
COMMANDS = ("train.py", "siftguide.study", "siftguide-train", "siftguide-study")
FILE_SUFFIXES = (".py", ".yaml", ".yml", ".md", ".csv", ".png", ".jpg", ".json", ".ckpt", ".safetensors", ".gz",
                 ".log", ".txt", ".sh", ".lock", ".pt")
KEY = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*")
DOTTED = re.compile(r"[a-z_][a-z0-9_]*(?:\.(?:[a-z0-9_]+|\*))+")


@functools.lru_cache(maxsize=None)
def composed(selections: tuple[str, ...] = ()) -> dict:
    """``configs/train.yaml`` composed with these group selections, Hydra's own node included, unresolved."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("train.yaml", overrides=list(selections), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=False)


def has_key(cfg: dict, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if part == "*":
            return isinstance(node, dict)
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def roots() -> set[str]:
    return set(composed()) | GROUPS | ROOTS_WRITTEN


def snippets(text: str):
    """``(line number, text)`` of every fenced block line (continuations joined; shell comments dropped) and every
    inline code span outside the fences, and every dotted ``key=value`` in the plain text, in a markdown text."""
    lines = text.split("\n")
    prose = []  # the text outside fences, line numbers kept
    fence, lang, pending, start = None, "", "", 0
    for no, line in enumerate(lines, 1):
        m = re.match(r"\s*(```+|~~~+)(\w*)", line)
        if fence is None and m:
            fence, lang = m.group(1), m.group(2)
            prose.append("")
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            elif lang not in ("python", "text"):  # text: pseudo-code, no command
                code = re.sub(r"(^|\s)#.*$", "", line)
                if not pending:
                    start = no
                if code.rstrip().endswith("\\"):
                    pending += code.rstrip()[:-1] + " "
                    continue
                yield start, pending + code
                pending = ""
            prose.append("")
            continue
        prose.append(line)
    body = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", body):
        yield body.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")
    # dotted overrides in plain text too (table cells, group labels): `a.b=c` is never prose
    plain = re.sub(r"`[^`]+`", lambda m: re.sub(r"[^\n]", " ", m.group(0)), body)
    for m in re.finditer(r"(?<![\w./-])[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+=[^\s,;|)]*", plain):
        yield plain.count("\n", 0, m.start()) + 1, m.group(0)


def tokens(snippet: str) -> list[str]:
    try:
        parts = shlex.split(snippet)
    except ValueError:  # an apostrophe in a comment or prose
        parts = snippet.split()
    return [t for p in parts for t in p.split()]


def selection(token: str) -> str | None:
    """``group=option`` for Hydra's compose, or None; a multirun sweep (``a,b``) selects its first option."""
    key, _, value = token.partition("=")
    if key not in GROUPS or not value or "<" in value or value == "null":
        return None
    if not value.startswith("[") and "," in value:
        value = value.split(",")[0]
    if any(n not in options(key) for n in value.strip("[]").split(",")):
        return None  # reported as a missing option, not composed
    return f"{key}={value}"


def key_problems(snippet: str) -> list[str]:
    if "hydra.searchpath=" in snippet:  # configs of the user's own search path (docs/extending.md): not ours
        return []
    toks = tokens(snippet)
    command = any(c in snippet for c in COMMANDS)
    chosen = tuple(sorted(s for s in map(selection, toks) if s))
    chosen_groups = {s.split("=")[0] for s in chosen}
    problems = []
    for tok in toks:
        if "=" in tok:
            key, _, value = tok.partition("=")
            if key.startswith(("+", "~")) or not KEY.fullmatch(key):
                continue  # a new key (+), a deletion (~), a flag, an environment variable, a placeholder
            if key in GROUPS:
                if "<" in value or value in ("", "null"):
                    continue
                names = value.strip("[]").split(",")
                problems += [f"{key}={n} (no configs/{key}/{n}.yaml)" for n in names if n not in options(key)]
                continue
            if "." not in key and not command:
                continue  # a keyword argument in a code span, not an override
        else:
            tok = tok.strip(".,;:)").lstrip("(")
            if not DOTTED.fullmatch(tok) or tok.endswith(FILE_SUFFIXES) or tok.split(".")[0] not in roots():
                continue
            key = tok
        if not config_has(key, chosen, chosen_groups):
            problems.append(key if not chosen else f"{key} (with {' '.join(chosen)})")
    return problems


def config_has(key: str, chosen: tuple[str, ...], chosen_groups: set[str]) -> bool:
    if has_key(composed(chosen), key):
        return True
    if key.split(".")[0] in chosen_groups:
        return False  # the snippet picked the key's group: the key must come with that pick
    return any(has_key(composed((f"{g}={o}",)), key)
               for g in sorted(GROUPS - {"hydra", "paths"}) for o in options(g))


def test_scanner_finds_keys_and_knows_stale_ones():
    doc = "\n".join([
        "x `relevance.kind` and | guidance.cache=true, a | b",
        "```bash",
        "python train.py data=image_folder \\",
        "  data.labels=false guidance.target.kind=sift  # a comment, guidance.foo=1",
        "```",
        "`siftguide.guidance.base` `model.safetensors` `TokenDrop(model, keep=0.5)`",
        "```python",
        "x = dict(guidance.bar=1)",
        "```",
    ])
    found = [(no, k) for no, s in snippets(doc) for k in key_problems(s)]
    assert found == [(3, "guidance.target.kind (with data=image_folder)"), (1, "guidance.cache")]
    assert key_problems("python train.py guidance=prior guidance.prior.beta=2") == []
    assert key_problems("python train.py guidance=attention guidance.prior.beta=2") == [
        "guidance.prior.beta (with guidance=attention)"]
    assert key_problems("guidance.schedule.kind=cosine") == ["guidance.schedule.kind"]
    assert key_problems("python train.py 'guidance=[attention,nope]' seed=1 nokey=2") == [
        "guidance=nope (no configs/guidance/nope.yaml)", "nokey"]


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_keys_in_docs_exist(path):
    problems = [f"{path.relative_to(ROOT)}:{no}: {p}"
                for no, s in snippets(path.read_text()) for p in key_problems(s)]
    assert not problems, "config keys that configs/train.yaml does not have:\n" + "\n".join(problems)


def test_readme_is_a_front_door():
    lines = README.read_text().split("\n")
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail into docs/"
    for cmd in SETUP_COMMANDS:
        assert cmd in (line.strip() for line in lines), f"README.md lost the set-up command `{cmd}`"


def test_every_docs_page_is_linked_from_the_readme():
    readme = README.read_text()
    pages = [*DOCS, ROOT / "docs" / "results" / "README.md"]
    missing = [str(p.relative_to(ROOT)) for p in pages if f"]({p.relative_to(ROOT)}" not in readme]
    assert not missing, f"docs pages the README does not link: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", path.read_text()):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if dest in PENDING:
            continue
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


def test_every_promise_names_a_test_that_exists():
    """docs/operations.md's promises table: each row names the test that checks it, and that test exists."""
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("## Promises, each with the test that checks it", 1)[1].split("\n\n", 2)[1]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith(("| promise", "|---"))]
    assert len(rows) >= 10
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", row.rsplit("|", 2)[-2])
        assert refs, row
        for path, name in refs:
            assert (ROOT / path).is_file(), path
            assert not name or re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M), (path, name)
