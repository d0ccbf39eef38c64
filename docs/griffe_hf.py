"""Griffe extension: read the package's Hugging Face-style docstrings as the Google style mkdocstrings renders.

Two HF conventions have no Google-style equivalent, and are rewritten in the docstring text before it is parsed
(the source files are not touched):

* cross-references written `` [`~module.Name`] `` or `` [`module.Name`] `` (HF's doc-builder syntax) become code
  spans (`` `Name` `` with `~`, the full path without), so they read as names, not as stray brackets;
* argument entries `` name (`type`, *optional*, defaults to `x`): `` become `` name (type): ``: the type column shows
  the type, and the default, which mkdocstrings takes from the signature, is not repeated inside it.

Registered in `mkdocs.yml` (the python handler's `extensions:`).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_XREF = re.compile(r"\[`(?P<tilde>~?)(?P<path>[\w.]+)`\](?![\[(])")
_ARG = re.compile(r"^(?P<lead>[ \t]+)(?P<names>\w+(?:, \w+)*) \(`(?P<type>[^`]+)`[^\n]*?\):", re.MULTILINE)


def rewrite(text: str) -> str:
    """The docstring `text` with HF cross-references and argument headers in Google style."""
    text = _XREF.sub(
        lambda m: f"`{m.group('path').rsplit('.', 1)[-1] if m.group('tilde') else m.group('path')}`", text
    )
    return _ARG.sub(lambda m: f"{m.group('lead')}{m.group('names')} ({m.group('type')}):", text)


class HFDocstrings(Extension):
    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
