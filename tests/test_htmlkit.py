"""One HTML kit (dragons.htmlkit) for every page: text escaped unless the kit made it.

The pages themselves are tested where they are written (test_report.py,
test_run_report.py, test_compare.py); here: the kit's rule, and that no page
module builds HTML around it.
"""

from __future__ import annotations

import re
from pathlib import Path

from dragons import htmlkit
from dragons.htmlkit import Markup, esc, tag

REPO = Path(__file__).resolve().parents[1]
PAGES = ["dragons/report.py", "dragons/score/runreport.py", "dragons/loop/comparereport.py"]
EVIL = '<script>alert("x")</script> & co'


def test_text_is_escaped_and_kit_markup_is_kept() -> None:
    assert esc(EVIL) == "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co"
    cell = tag("b", EVIL)
    assert isinstance(cell, Markup) and cell.startswith("<b>&lt;script")
    assert esc(cell) == cell  # not escaped twice
    # A plain str that looks like HTML is text: only the kit makes Markup.
    assert esc("<b>x</b>") == "&lt;b&gt;x&lt;/b&gt;"
    assert tag("div", "x", class_="a b", title=EVIL).startswith('<div class="a b" title="&lt;script&gt;')
    assert htmlkit.join(["<i>", tag("i", "y")]) == "&lt;i&gt;<i>y</i>"


def test_table_escapes_every_cell_and_page_every_part() -> None:
    t = htmlkit.table(["class", "p"], [[EVIL, 0.5], [tag("code", "a<b"), 1.25]], fmt=lambda v: f"{v}!")
    assert "<script>" not in t and "&lt;script&gt;" in t
    assert "<td><code>a&lt;b</code></td>" in t and "<td>0.5!</td>" in t
    page = htmlkit.page(EVIL, [tag("h2", "x"), EVIL, t], css="td{}")
    assert page.count("<script>") == 0 and "<title>&lt;script&gt;" in page
    assert "<h2>x</h2>" in page and "<style>td{}</style>" in page
    assert htmlkit.img("thumbs/a b.jpg", EVIL).startswith('<img src="thumbs/a%20b.jpg" alt="&lt;script')


def test_no_page_module_escapes_or_writes_a_document_by_hand() -> None:
    for rel in PAGES:
        src = (REPO / rel).read_text()
        assert "html.escape" not in src and "import html\n" not in src, rel
        assert "<!DOCTYPE" not in src and "<table" not in src, f"{rel}: build pages with dragons.htmlkit"
    kit = (REPO / "dragons/htmlkit.py").read_text()
    assert re.search(r"^import html$", kit, re.M)
