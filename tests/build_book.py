"""Render the course as a static HTML book with its stored outputs (`make book` -> _book/, git-ignored).

One page per lesson (every numbered notebook in nbs/, see tests/run_lessons.py) through nbconvert's HTML exporter,
nbdev directives handled as in the README (tests/render_readme.py: `#| hide` cells dropped, `#|` lines removed),
every picture embedded as a data URI (the book reads offline), links between lessons (`X.ipynb`, `X.ipynb#anchor`,
`nbs/X.ipynb`) rewritten to `X.html`, a previous/contents/next bar on every page, and `index.html` from
nbs/index.ipynb followed by the lesson map grouped by part. Nothing is executed: run `make lessons` first.
"""
import argparse, base64, html, logging, mimetypes, re, sys, time
from pathlib import Path
from urllib.parse import unquote
sys.path.insert(0, str(Path(__file__).resolve().parent))
from render_readme import NbdevDirectives
from run_lessons import ROOT, lesson_paths

# The parts of the book: (number of a part's first lesson, name). A lesson belongs to the last part starting at or
# before its number (see ../shared/DESIGN.md's lesson map); edit here when the map changes.
PARTS = [(0, '1 · Data'), (2, '2 · Building blocks'), (5, '3 · Architectures'), (11, '4 · Training'),
         (20, '5 · Using a model'), (25, '6 · Tools')]
OUT = ROOT/'_book'

CSS = """<style>
nav.segtutor-nav { display: flex; justify-content: space-between; gap: 1em; max-width: 1100px; margin: 0 auto;
  padding: 0.6em 1em; font: 14px/1.4 system-ui, sans-serif; border-bottom: 1px solid #ddd; }
nav.segtutor-nav.bottom { border-bottom: none; border-top: 1px solid #ddd; margin-top: 2em; }
nav.segtutor-nav a { text-decoration: none; color: #1a5fb4; }
nav.segtutor-nav span { flex: 1; }
nav.segtutor-nav .next { text-align: right; }
nav.segtutor-nav .home { text-align: center; }
.segtutor-contents h3 { margin-top: 1.2em; }
.segtutor-contents li { margin: 0.25em 0; }
</style>
"""

def part_of(name):
    "The part a lesson belongs to, from its number."
    n = int(re.match(r'\d+', name).group())
    return [p for start, p in PARTS if start <= n][-1]

def title_of(path):
    "A notebook's title and subtitle (`# Title` and `> subtitle` of its first markdown cell)."
    import nbformat
    nb = nbformat.read(path, as_version=4)
    md = next((c.source for c in nb.cells if c.cell_type == 'markdown'), '')
    t, sub = re.search(r'^#\s+(.+)$', md, re.M), re.search(r'^>\s*(.+)$', md, re.M)
    return (t.group(1).strip() if t else Path(path).stem), (sub.group(1).strip() if sub else '')

def _data_uri(fn):
    mime = mimetypes.guess_type(fn.name)[0] or 'application/octet-stream'
    return f"data:{mime};base64,{base64.b64encode(fn.read_bytes()).decode()}"

def badge(text):
    "A small SVG label (as a data URI) that stands in for a picture on the network, e.g. the Colab badge."
    w = 12 + 7 * len(text)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="20"><rect width="{w}" height="20" rx="3" '
           f'fill="#555"/><text x="{w / 2}" y="14" fill="#fff" font-family="Verdana,sans-serif" font-size="11" '
           f'text-anchor="middle">{html.escape(text)}</text></svg>')
    return 'data:image/svg+xml;base64,' + base64.b64encode(svg.encode()).decode()

def embed_images(body, dirs, warn):
    "Replace every local `<img src>` by a data URI (files looked up in `dirs` in turn), remote ones by a badge."
    def sub(m):
        src = html.unescape(m.group(2))
        if src.startswith('data:'): return m.group(0)
        if re.match(r'^([a-z][\w+.-]*:|//)', src, re.I):
            alt = re.search(r'\balt="([^"]*)"', m.group(0))
            return f'{m.group(1)}"{badge(html.unescape(alt.group(1)) if alt and alt.group(1) else "picture")}"'
        rel = unquote(src.split('#')[0].split('?')[0])
        for d in dirs:
            if (Path(d)/rel).is_file(): return f'{m.group(1)}"{_data_uri(Path(d)/rel)}"'
        warn(f"image not found: {src}"); return m.group(0)
    return re.sub(r'(<img\b[^>]*?\bsrc=)"([^"]*)"', sub, body)

def rewrite_links(body, pages):
    "Point relative links to a lesson notebook (`X.ipynb`, `nbs/X.ipynb`, with an anchor or not) at its page."
    def sub(m):
        stem, anchor = m.group(2), m.group(3) or ''
        return f'href="{stem}.html{anchor}"' if stem in pages else m.group(0)
    return re.sub(r'href="((?:\.{0,2}/)*(?:nbs/)?)([\w.-]+)\.ipynb(#[^"]*)?"', sub, body)

def nav(prev, nxt, where):
    "The bar of links to the previous page, the contents and the next page."
    a = lambda p, cls, arrow: (f'<span class="{cls}"><a rel="{cls}" href="{p[0]}.html">{arrow}{html.escape(p[1])}'
                               f'{"" if arrow else " →"}</a></span>' if p else f'<span class="{cls}"></span>')
    return (f'<nav class="segtutor-nav {where}">{a(prev, "prev", "← ")}'
            f'<span class="home"><a href="index.html#contents">Contents</a></span>{a(nxt, "next", "")}</nav>')

def contents(lessons):
    "The lesson map, grouped by part, as HTML."
    out, part = ['<div class="jp-Cell jp-MarkdownCell"><div class="jp-RenderedHTMLCommon jp-RenderedMarkdown '
                 'jp-MarkdownOutput segtutor-contents" id="contents"><h2>Contents</h2>'], None
    for stem, title, sub in lessons:
        if part_of(stem) != part:
            out.append(('</ul>' if part else '') + f'<h3>Part {html.escape(part_of(stem))}</h3><ul>'); part = part_of(stem)
        out.append(f'<li><a href="{stem}.html"><code>{stem[:3].rstrip("_")}</code> {html.escape(title)}</a>'
                   + (f': {html.escape(sub)}' if sub else '') + '</li>')
    out.append(('</ul>' if part else '') + '</div></div>')
    return ''.join(out)

def _n_outputs(path):
    import json
    return sum(len(c.get('outputs', [])) for c in json.loads(Path(path).read_text(encoding='utf-8'))['cells'])

def _exporter():
    from nbconvert import HTMLExporter
    exp = HTMLExporter(template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True)
    exp.register_preprocessor(NbdevDirectives(), enabled=True)
    exp.log.setLevel(logging.ERROR)     # not one 'Alternative text is missing' line per lesson: plots have no alt text
    return exp

def render_page(exp, path, title, top='', bottom='', extra=''):
    "One notebook as a full HTML page, with `top`/`bottom` inside <body> and `extra` at the end of the content."
    import nbformat
    nb = nbformat.read(path, as_version=4)
    body, _ = exp.from_notebook_node(nb, resources={'metadata': {'name': title, 'path': str(path.parent)}})
    body = re.sub(r'<script src="[^"]*require\.js[^"]*"></script>\s*', '', body)  # only widgets use it; none are stored
    body = body.replace('</head>', CSS + '</head>', 1)
    body = re.sub(r'(<body\b[^>]*>)', lambda m: m.group(1) + top, body, count=1)
    end = '</main>' if '</main>' in body else '</body>'
    i = body.rfind(end)
    return body[:i] + extra + (end + bottom if end == '</main>' else bottom + end) + body[i + len(end):]

def build(out=OUT, nbs=ROOT/'nbs', quiet=False):
    "Render every lesson and the index into `out`; returns the path of index.html."
    t0, out, nbs, root = time.time(), Path(out), Path(nbs), Path(nbs).resolve().parent
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob('*.html'): old.unlink()
    paths = lesson_paths(nbs)
    lessons = [(p.stem, *title_of(p)) for p in paths]
    pages = {p.stem for p in paths} | {'index'}
    exp = _exporter()
    for i, (path, (stem, title, sub)) in enumerate(zip(paths, lessons)):
        t1, problems = time.time(), []
        prev = lessons[i - 1] if i else ('index', 'segtutor')
        nxt = lessons[i + 1] if i + 1 < len(lessons) else None
        page = render_page(exp, path, f'{stem} · {title}', nav(prev, nxt, 'top'), nav(prev, nxt, 'bottom'))
        page = rewrite_links(embed_images(page, [path.parent, root], problems.append), pages)
        (out/f'{stem}.html').write_text(page, encoding='utf-8')
        n_img, n_out = page.count('<img '), _n_outputs(path)
        say(f"  {stem:<24} {time.time() - t1:5.1f} s  {n_out:3d} outputs {n_img:3d} pictures"
            + ''.join(f'  ({p})' for p in problems) + ('  (no stored outputs: run `make lessons`)' if not n_out else ''))
    index = nbs/'index.ipynb'
    first = lessons[0] if lessons else None
    if index.exists():
        title = title_of(index)[0]
        page = render_page(exp, index, title, nav(None, first, 'top'), nav(None, first, 'bottom'), contents(lessons))
        page = rewrite_links(embed_images(page, [nbs, root], lambda p: say(f"  index: {p}")), pages)
    else:
        page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Contents</title>{CSS}</head><body>'
                f'{nav(None, first, "top")}<main>{contents(lessons)}</main></body></html>')
    (out/'index.html').write_text(page, encoding='utf-8')
    say(f"book: {len(lessons)} lessons and the index in {out}/ ({time.time() - t0:.1f} s); open {out/'index.html'}")
    return out/'index.html'

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=str(OUT)); p.add_argument('--nbs', default=str(ROOT/'nbs'))
    a = p.parse_args()
    build(a.out, a.nbs)
