"""`make book` (tests/build_book.py) on a tiny layout: pages, nav, contents by part, links, embedded pictures, directives.

No kernel runs: the book renders the outputs stored in the notebooks. The real book, in a real browser, is checked by
tests/test_browser.py (every picture loads, links work).
"""
import base64, re, sys
from pathlib import Path
import nbformat
from nbformat.v4 import new_notebook, new_markdown_cell, new_code_cell, new_output
sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_book as bb

# a 1x1 red PNG
PNG = base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC')

def _nb(path, cells):
    nb = new_notebook(cells=cells, metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    nbformat.write(nb, path)

def tiny_book(tmp):
    "A repository layout with an index, three lessons in two parts and a picture in data/."
    nbs = tmp/'nbs'; nbs.mkdir(); (tmp/'data').mkdir()
    (tmp/'data'/'grid.png').write_bytes(PNG); (nbs/'local.png').write_bytes(PNG)
    pic = new_output('display_data', data={'image/png': base64.b64encode(PNG).decode(), 'text/plain': '<Figure>'})
    _nb(nbs/'index.ipynb', [
        new_markdown_cell("# tinybook\n> a course in three lessons\n\n![the grid](data/grid.png)"),
        new_code_cell("#| hide\nimport os"),
        new_markdown_cell("Start with [the data](nbs/00_first.ipynb) or [the model](nbs/05_third.ipynb#Model); "
                          "[on Colab](https://colab.research.google.com/github/u/r/blob/main/nbs/00_first.ipynb) "
                          "![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)")])
    _nb(nbs/'00_first.ipynb', [
        new_markdown_cell("# First steps\n> the data"),
        new_code_cell("#| default_exp first"),
        new_code_cell("#| hide\nSECRET_SETUP = 1"),
        new_code_cell("#| export\ndef f(x): return x", outputs=[]),
        new_code_cell("plot()", outputs=[pic]),
        new_markdown_cell("Next: [the second lesson](01_second.ipynb), [its summary](01_second.ipynb#Summary), "
                          "![a local picture](local.png) and [a file](../data/grid.png).")])
    _nb(nbs/'01_second.ipynb', [new_markdown_cell("# Second\n> more"), new_markdown_cell("## Summary\nDone.")])
    _nb(nbs/'05_third.ipynb', [new_markdown_cell("# Third\n> models"), new_markdown_cell("## Model\n![grid](../data/grid.png)")])
    (nbs/'_scratch.ipynb').write_text((nbs/'01_second.ipynb').read_text())   # not a lesson
    return nbs

def test_book(tmp_path):
    nbs = tiny_book(tmp_path)
    index = bb.build(tmp_path/'_book', nbs, quiet=True)
    out = index.parent
    assert sorted(p.name for p in out.glob('*.html')) == ['00_first.html', '01_second.html', '05_third.html', 'index.html']
    pages = {p.stem: p.read_text() for p in out.glob('*.html')}
    # every picture is embedded (the book reads offline); the remote badge becomes a local label
    for name, page in pages.items():
        srcs = re.findall(r'<img\b[^>]*?\bsrc="([^"]*)"', page)
        assert all(s.startswith('data:image/') for s in srcs), (name, [s[:40] for s in srcs])
    assert [pages[n].count('<img ') for n in ['00_first', '01_second', '05_third']] == [2, 0, 1]
    first = pages['00_first']
    assert 'data:image/png;base64,' in first and 'data:image/svg+xml;base64,' in pages['index']
    # links between lessons point at their pages (anchors kept); other links are left alone
    assert 'href="01_second.html"' in first and 'href="01_second.html#Summary"' in first and 'href="../data/grid.png"' in first
    assert 'href="00_first.html"' in pages['index'] and 'href="05_third.html#Model"' in pages['index']
    assert 'href="https://colab.research.google.com/github/u/r/blob/main/nbs/00_first.ipynb"' in pages['index']
    assert not re.search(r'href="(?!https?:)[^"]*\.ipynb', ''.join(pages.values()))
    # nbdev directives: hidden cells gone, directive lines removed, exported code shown
    assert 'SECRET_SETUP' not in first and 'default_exp' not in first and '#| export' not in first and 'f</span>' in first
    # the nav: previous / contents / next, in reading order
    nav = lambda p: dict(re.findall(r'rel="(prev|next)" href="([^"]+)"', p.split('</nav>')[0]))
    assert nav(first) == {'prev': 'index.html', 'next': '01_second.html'}
    assert nav(pages['01_second']) == {'prev': '00_first.html', 'next': '05_third.html'}
    assert nav(pages['05_third']) == {'prev': '01_second.html'} and nav(pages['index']) == {'next': '00_first.html'}
    assert '<title>00_first · First steps</title>' in first
    # the index: its own content, then the lesson map grouped by part
    idx = pages['index']
    assert idx.index('a course in three lessons') < idx.index('id="contents"')
    parts = re.findall(r'<h3>Part ([^<]+)</h3>', idx)
    assert parts == ['1 · Data', '3 · Architectures'], parts
    contents = idx[idx.index('id="contents"'):idx.index('<nav class="segtutor-nav bottom')]
    assert [h for h in re.findall(r'href="([^"]+)"', contents)] == ['00_first.html', '01_second.html', '05_third.html']

def test_parts_follow_the_numbers():
    assert [bb.part_of(n) for n in ['00_data', '01_augment', '04_softmax', '05_fcn', '10_zoo', '11_losses',
                                    '19_experiments', '22_viewers', '26_bench']] == \
        ['1 · Data'] * 2 + ['2 · Building blocks', '3 · Architectures', '3 · Architectures', '4 · Training',
                            '4 · Training', '5 · Using a model', '6 · Tools']
