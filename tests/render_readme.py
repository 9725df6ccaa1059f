"""Render README.md from nbs/index.ipynb without quarto (which cannot be installed on these machines).

nbdev directives decide what shows: cells with `#| hide` are dropped, other `#|` lines are stripped from code.
Run by `make sync` (so the sync check covers README.md) and by `make readme`.
"""
import re, sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter
from nbconvert.preprocessors import Preprocessor

ROOT = Path(__file__).resolve().parent.parent
_DIRECTIVE = re.compile(r'^\s*#\s*\|\s*(.*)$')

class NbdevDirectives(Preprocessor):
    "Drop `#| hide` and `#| default_exp` cells; remove directive lines from the rest; drop execution counts."
    def preprocess(self, nb, resources):
        cells = []
        for c in nb.cells:
            lines = c.source.splitlines()
            dirs = [m.group(1).strip() for m in map(_DIRECTIVE.match, lines) if m] if c.cell_type == 'code' else []
            if any(d.startswith(('hide', 'default_exp', 'exporti')) for d in dirs): continue
            if c.cell_type == 'code':
                c.source = '\n'.join(l for l in lines if not _DIRECTIVE.match(l)).strip('\n')
                if any(d.replace(' ', '') == 'echo:false' for d in dirs): c.metadata['transient'] = {'remove_source': True}
                c.execution_count = None
                for o in c.get('outputs', []):
                    if 'execution_count' in o: o['execution_count'] = None
            cells.append(c)
        nb.cells = cells
        return nb, resources

def render(src=ROOT/'nbs'/'index.ipynb', dest=ROOT/'README.md'):
    nb = nbformat.read(src, as_version=4)
    exp = MarkdownExporter(); exp.register_preprocessor(NbdevDirectives(), enabled=True)
    body, res = exp.from_notebook_node(nb)
    if res.get('outputs'): sys.exit(f"{src}: README cells must not produce image outputs (reference committed pictures in data/ instead)")
    body = re.sub(r'\n{3,}', '\n\n', body).strip() + '\n'
    head = '<!-- generated from nbs/index.ipynb by tests/render_readme.py (make readme): edit the notebook, not this file -->\n\n'
    Path(dest).write_text(head + body)
    return dest

if __name__ == '__main__': print(f"wrote {render()}")
