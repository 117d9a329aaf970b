"""The fuzz tests feed parsers nesting close to the interpreter's recursion limit. Garbage that
earlier tests left behind (an unclosed socket, say) is finalized whenever the collector runs:
if that is deep inside such a parse, its ResourceWarning cannot even be reported (the hook
itself runs out of stack) and pytest blames the fuzz test. Collect it first, at a shallow stack.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_leftovers_first() -> Iterator[None]:
    gc.collect()
    yield
