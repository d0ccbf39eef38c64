"""Every citation of the design documents in docs/ resolves.

A citation is the name of one of the documents (bare or with the `docs/` prefix, with or without backticks), followed
by a chain of section numbers and ids, e.g. `§8.5`, `§8.1–8.4`, `§2.1, §5.1–5.2`, `§8.2/§8.4`, `Q11`, `T-POT`,
`I10-I12`. The cited document must exist under docs/, each cited section number (both ends of a range) must be a
markdown heading of that document whose text starts with the number (`### 8.5 …`, `## 8. …`), and each cited id must
occur in it. Scanned: `*.py` under hf_llqrsam/, recipes/ and tests/, every `*.md` outside docs/, `*.yaml` under
recipes/.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
KNOWN_DOCS = ("algorithm", "integration", "infosam")
_SKIP_PARTS = {"docs", "build", "runs", "trainer_output", "node_modules", "__pycache__"}

_NUM = r"\d+(?:\.\d+)*"
_DASH = r"[–—-]"
_SECTION = rf"§\s*(?P<a>{_NUM})(?:\s*{_DASH}\s*§?\s*(?P<b>{_NUM}))?"
_ID = rf"(?P<id>[A-Z]+(?:\d+|-[A-Z]+))(?:{_DASH}(?P<id_end>[A-Z]*\d+))?"
_ITEM = re.compile(rf"(?:{_SECTION}|{_ID})(?![\w.]*\w)")
_SEP = re.compile(r"\s*(?:,|/|\band\b)\s*")
# the document name; docs/<anything>.md must exist as well, the three known names may appear without the prefix
_DOC = re.compile(rf"(?:\bdocs/(?P<any>[\w-]+)|\b(?P<known>{'|'.join(KNOWN_DOCS)}))\.md\b")
# what may sit between the name and the first item: a closing backtick, a markdown link target, blanks
_GAP = re.compile(r"`?(?:\]\([^)\s]*\))?[ \t]*(?:\n[ \t]*(?:#[ \t]*)?)?")
_HEADING = re.compile(rf"^#{{1,6}}[ \t]+(?P<num>{_NUM})\.?(?=\s|$)", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Citation:
    source: str  # "path:line"
    doc: str  # the document's stem, e.g. "algorithm"
    sections: tuple[str, ...]
    ids: tuple[str, ...]


def _range_end(start: str, end: str) -> str:
    # §8.1–4 means §8.1–8.4: an end with fewer components borrows the start's leading ones
    a, b = start.split("."), end.split(".")
    return ".".join(a[: len(a) - len(b)] + b) if len(b) < len(a) else end


def _expand_ids(first: str, last: str | None) -> list[str]:
    if last is None:
        return [first]
    m1, m2 = re.fullmatch(r"([A-Z]+)(\d+)", first), re.fullmatch(r"([A-Z]*)(\d+)", last)
    if m1 is None or m2 is None or m2.group(1) not in ("", m1.group(1)):
        return [first, last]
    lo, hi = int(m1.group(2)), int(m2.group(2))
    if not lo <= hi <= lo + 50:
        return [first, m1.group(1) + m2.group(2)]
    return [f"{m1.group(1)}{k}" for k in range(lo, hi + 1)]


def find_citations(text: str, source: str = "<text>") -> list[Citation]:
    """All citations in `text`, each with the sections and ids chained after the document name."""
    out = []
    for match in _DOC.finditer(text):
        doc = match.group("any") or match.group("known")
        pos = _GAP.match(text, match.end()).end()
        sections: list[str] = []
        ids: list[str] = []
        while item := _ITEM.match(text, pos):
            if item.group("a"):
                sections.append(item.group("a"))
                if item.group("b"):
                    sections.append(_range_end(item.group("a"), item.group("b")))
            else:
                ids.extend(_expand_ids(item.group("id"), item.group("id_end")))
            sep = _SEP.match(text, item.end())
            if sep is None or not _ITEM.match(text, sep.end()):
                break
            pos = sep.end()
        line = text.count("\n", 0, match.start()) + 1
        out.append(Citation(f"{source}:{line}", doc, tuple(sections), tuple(ids)))
    return out


def _doc_index(doc: str, cache: dict[str, tuple[set[str], str] | None]) -> tuple[set[str], str] | None:
    if doc not in cache:
        path = DOCS / f"{doc}.md"
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            headings = {m.group("num") for m in _HEADING.finditer(_FENCE.sub("", text))}
            cache[doc] = (headings, text)
        else:
            cache[doc] = None
    return cache[doc]


def unresolved(citations: list[Citation]) -> list[str]:
    """One message per citation part that does not resolve against docs/."""
    cache: dict[str, tuple[set[str], str] | None] = {}
    problems = []
    for c in citations:
        index = _doc_index(c.doc, cache)
        if index is None:
            problems.append(f"{c.source}: docs/{c.doc}.md does not exist")
            continue
        headings, text = index
        problems += [f"{c.source}: no heading §{s} in docs/{c.doc}.md" for s in c.sections if s not in headings]
        problems += [
            f"{c.source}: id {i} not found in docs/{c.doc}.md"
            for i in c.ids
            if not re.search(rf"(?<![\w-]){re.escape(i)}(?![\w-])", text)
        ]
    return problems


def _pruned(parent: Path, name: str) -> bool:
    if name.startswith(".") or name in _SKIP_PARTS or name.endswith(".egg-info"):
        return True
    return (parent == ROOT and name.startswith("out")) or (parent / name / "pyvenv.cfg").exists()


def _walk(top: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `top` ending in `suffixes`, pruning hidden, build, output and virtual-environment folders."""
    out = []
    for folder, dirs, files in os.walk(top):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not _pruned(here, d)]
        out += [here / f for f in files if f.endswith(suffixes)]
    return out


def scanned_files() -> list[Path]:
    files = [p for d in ("hf_llqrsam", "recipes", "tests") for p in _walk(ROOT / d, (".py",))]
    files += _walk(ROOT, (".md",))
    files += _walk(ROOT / "recipes", (".yaml", ".yml"))
    return sorted(set(files))


def tree_citations() -> list[Citation]:
    out = []
    for path in scanned_files():
        out += find_citations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return out


def test_every_citation_resolves():
    citations = tree_citations()
    assert len(citations) >= 20, f"only {len(citations)} citations found: is the scanner broken?"
    assert sum(len(c.sections) + len(c.ids) for c in citations) >= 20
    problems = unresolved(citations)
    assert not problems, "unresolved citations:\n" + "\n".join(problems)


def test_parser_reads_ranges_lists_ids_and_both_forms():
    # built by concatenation so that this file holds no citation of its own
    alg, integ = "algorithm" + ".md", "integration" + ".md"
    (c,) = find_citations(f"see (`{alg}` §2.1, §5.1–5.2) here")
    assert (c.doc, c.sections, c.ids) == ("algorithm", ("2.1", "5.1", "5.2"), ())
    (c,) = find_citations(f"docs/{alg} §8.2/§8.4 and the rest")
    assert c.sections == ("8.2", "8.4")
    (c,) = find_citations(f"`docs/{alg}` §3–4, §13, T-POT.")
    assert (c.sections, c.ids) == (("3", "4", "13"), ("T-POT",))
    (c,) = find_citations(f"({integ} I10-I12)")
    assert (c.doc, c.ids) == ("integration", ("I10", "I11", "I12"))
    (c,) = find_citations(f"[`{alg}`](docs/{alg}) §8.1–4")[:1]
    assert c.sections == ("8.1", "8.4")
    (c,) = find_citations(f"`{integ}` §13, fix B; §7")
    assert c.sections == ("13",)
    assert find_citations(f"`{alg}` Q11); then Q14")[0].ids == ("Q11",)


def test_unresolved_citations_are_reported():
    alg = "algorithm" + ".md"
    assert unresolved(find_citations(f"`{alg}` §8.5, Q11")) == []
    bad = unresolved(find_citations(f"`{alg}` §99.9 and docs/{alg} §8.1–8.99, Q99", "fake.py"))
    assert any("§99.9" in p for p in bad) and any("§8.99" in p for p in bad) and any("Q99" in p for p in bad)
    assert unresolved(find_citations("docs/" + "no_such_doc.md §1"))
