"""MkDocs hook: the generated parts of the documentation site.

Nothing here is a hand copy. Each generated part is read from its one source at build time:

* `index.md`: the repository's README.md (the landing page), with its links into `docs/` made site links and its
  links to other repository files shown as paths;
* `reference/api.md`: one mkdocstrings block per public name of `hf_llqrsam` (its `__all__`, resolved to the defining
  module through the package's lazy-export table), so a new public name gets its page entry without an edit here;
* `<!-- hf_llqrsam:flags -->`: every `sam_*` / `fsam_*` / ... / `llqr_*` flag, from the dataclass field metadata of
  `LLQRSAMFields` (`hf_llqrsam.args.flags_markdown()`, the one renderer; `--help` and the class docstring read the
  same metadata);
* `<!-- hf_llqrsam:mode_table -->`: the SAM-family template, `hf_llqrsam.modes.mode_table()` (one row per `ModeSpec`);
* `<!-- hf_llqrsam:include PATH -->`: the committed markdown file PATH (relative to the repository root), e.g. a
  benchmark's generated result table under `recipes/benchmarks/results/`;
* the committed figures of `recipes/benchmarks/results/` and `recipes/pothole/results/`, published under
  `results/figures/` (pages link them as `figures/<name>.png`).

Registered in `mkdocs.yml` (`hooks:`). `tests/unit/test_docs.py` checks the pages this produces.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `mkdocs build` from a checkout that is not installed: import this tree's package
    sys.path.insert(0, str(ROOT))

FIGURE_DIRS = ("recipes/benchmarks/results", "recipes/pothole/results")
_MARKER = re.compile(r"<!--\s*hf_llqrsam:(?P<name>[a-z_]+)(?:\s+(?P<arg>\S+))?\s*-->")


def flags_table() -> str:
    """The flags page's list: `hf_llqrsam.args.flags_markdown()`, which reads every field's metadata."""
    from hf_llqrsam.args import flags_markdown

    return rewrite_xrefs(flags_markdown())


def rewrite_xrefs(text: str) -> str:
    """HF-style cross-references in help texts as code spans, the way `griffe_hf` reads them in the docstrings."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("griffe_hf", ROOT / "docs" / "griffe_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rewrite(text)


def api_page() -> str:
    """`reference/api.md`: an mkdocstrings block per public name, in `hf_llqrsam.__all__` order."""
    import hf_llqrsam

    exports: dict[str, str] = getattr(hf_llqrsam, "_EXPORTS", {})
    parts = [
        "# API reference",
        "",
        "Generated from the docstrings of every public name of `hf_llqrsam` (`hf_llqrsam.__all__`), each documented "
        "where it is defined. The command-line flags are on [the flags page](flags.md).",
        "",
    ]
    for name in hf_llqrsam.__all__:
        module = exports.get(name)
        if module is None:  # __version__ and other plain attributes
            continue
        parts += [f"::: hf_llqrsam.{module}.{name}", ""]
    return "\n".join(parts)


_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")


def readme_page() -> str:
    """`index.md`: README.md, whose links are relative to the repository root, re-rooted at `docs/`."""

    def relink(match: re.Match[str]) -> str:
        text, target = match.group("text"), match.group("target")
        if target.startswith(("http://", "https://", "#")):
            return match.group(0)
        if target.startswith("docs/"):
            return f"[{text}]({target.removeprefix('docs/')})"
        return text if f"`{target}`" in text or target in text else f"{text} (`{target}`)"

    return _LINK.sub(relink, (ROOT / "README.md").read_text(encoding="utf-8"))


def include(arg: str, shift: int = 2) -> str:
    """The committed file `arg`, its headings moved `shift` levels down (they sit under a section of the page)."""
    path = (ROOT / arg).resolve()
    if ROOT not in path.parents or not path.is_file():
        raise FileNotFoundError(f"hf_llqrsam:include {arg}: no such file in the repository")
    text = path.read_text(encoding="utf-8").strip()
    return re.sub(r"^(#{1,6})(?=\s)", lambda m: "#" * min(6, len(m.group(1)) + shift), text, flags=re.MULTILINE)


def render_markers(markdown: str) -> str:
    """Replace every `<!-- hf_llqrsam:NAME [ARG] -->` marker of a page by what it names."""

    def replace(match: re.Match[str]) -> str:
        name, arg = match.group("name"), match.group("arg")
        if name == "flags":
            return flags_table()
        if name == "mode_table":
            from hf_llqrsam.modes import mode_table

            return mode_table()
        if name == "include" and arg:
            return include(arg)
        raise ValueError(f"unknown documentation marker {match.group(0)!r} (flags, mode_table, include PATH)")

    return _MARKER.sub(replace, markdown)


# --- the MkDocs events -------------------------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, "index.md", content=readme_page()))
    files.append(File.generated(config, "reference/api.md", content=api_page()))
    for folder in FIGURE_DIRS:
        for png in sorted((ROOT / folder).glob("*.png")):
            prefix = "pothole_" if "pothole" in folder else ""
            files.append(File.generated(config, f"results/figures/{prefix}{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return render_markers(markdown)
