"""Execute the lessons top to bottom on fresh kernels and store their outputs (`make lessons`).

    python tests/run_lessons.py                      # every lesson, in numeric order, at full settings
    python tests/run_lessons.py 05_fcn 07_unet       # a subset (`make lessons ONLY="05_fcn 07_unet"`)
    python tests/run_lessons.py --timeout 600        # seconds allowed per lesson (default 900)
    python tests/run_lessons.py --quick 05_fcn       # IN_TEST=1 (shrunk); marked "quick", which check-outputs rejects

Each lesson runs through nbclient with cwd = nbs/ (relative paths work as under nbdev_test), PYTHONHASHSEED=0 and
IN_TEST unset (the lessons seed themselves). Cells flagged `#| eval: false` are not run, as under nbdev_test.
What is stored, and what `tests/check_outputs.py` verifies:
- every executed code cell gets `metadata.segtutor = {"src": <hash of its source>, "out": <hash of its outputs>}`;
- the notebook gets `metadata.segtutor = {"run": "full"|"quick", "seconds", "torch", "python", "cpus", "date",
  "cells": <hash of the ordered source hashes>}` (the `cells` hash notices deleted or reordered cells);
- outputs keep results (text, images, markdown, html, errors never: a failing cell stops the run); progress bars
  (tqdm widgets and tqdm's stderr text), Python warnings on stderr, every ipywidget view (a widget shows nothing on a
  static page: lessons show a picture next to it) and the widget state are dropped.
The file is then cleaned exactly as `nbdev_clean` would (settings.ini keeps the `segtutor` keys), so `make sync`
finds nothing to change. Run times go to data/lesson_times.json (merged with the lessons not run this time).
"""
import argparse, datetime, hashlib, json, os, platform, re, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = 'segtutor'                                      # the metadata key, kept by nbdev_clean (settings.ini)
# A lesson is a numbered notebook in nbs/: `NN_name.ipynb` (an optional letter, `NNa_name`, while lessons are renamed)
LESSON_RE = re.compile(r'^\d\d[a-z]?_[\w-]+\.ipynb$')
TIMES = 'data/lesson_times.json'
DEFAULT_TIMEOUT = 900
WIDGET_VIEW = 'application/vnd.jupyter.widget-view+json'
_DIRECTIVE = re.compile(r'^\s*#\s*\|\s*(.*?)\s*$')

def lesson_paths(nbs=ROOT/'nbs'):
    "The lessons in `nbs`, in reading (numeric) order."
    return sorted(p for p in Path(nbs).glob('*.ipynb') if LESSON_RE.match(p.name))

def _src(x): return ''.join(x) if isinstance(x, list) else (x or '')

def directives(cell):
    "The nbdev directives (`#| ...` lines) of a code cell, e.g. ['hide', 'eval: false']."
    if cell.get('cell_type') != 'code': return []
    return [m.group(1) for m in map(_DIRECTIVE.match, _src(cell.get('source')).splitlines()) if m]

def executes(cell):
    "True for a code cell that a run executes: non-empty and not flagged `#| eval: false`."
    if cell.get('cell_type') != 'code' or not _src(cell.get('source')).strip(): return False
    return not any(re.sub(r'\s', '', d).lower() == 'eval:false' for d in directives(cell))

def _h(s): return hashlib.sha256(s.encode('utf-8')).hexdigest()[:16]

def src_hash(cell):
    "Hash of a code cell's source, as executed."
    return _h(_src(cell.get('source')))

_ID = re.compile(r'(<[^<>]*?) at 0x[0-9a-fA-F]+(>)')
def out_hash(cell):
    "Hash of a cell's stored outputs (type, stream name, text and data; not metadata or execution counts)."
    def norm(v): return _ID.sub(r'\1\2', _src(v)).strip()
    canon = [[o.get('output_type'), o.get('name'), norm(o.get('text')), o.get('ename'),
              sorted((k, norm(v) if isinstance(v, (str, list)) else json.dumps(v, sort_keys=True))
                     for k, v in (o.get('data') or {}).items())] for o in cell.get('outputs', [])]
    return _h(json.dumps(canon))

def cells_hash(hashes): return _h(' '.join(hashes))

# --- what is not stored -------------------------------------------------------------------------------------------
_TQDM = re.compile(r'\d+%\|.*\||\|\s*\d+/\d+\s*\[|\d+(\.\d+)?(it/s|s/it)\]')
_TQDM_STRICT = re.compile(r'\d+%\|[^|]*\|\s*\d+/\d+\s*\[|\b\d+it \[\d+:\d+')   # a whole bar: on stdout only these go
_WARNING = re.compile(r'^\S.*:\d+: \w*Warning: |^\w*Warning: ')

def strip_stdout(text):
    "stdout text without tqdm bars (a bar printed to stdout, e.g. by a command run in a subprocess)."
    if not _TQDM_STRICT.search(text): return text
    keep = []
    for line in re.split(r'(?<=\n)', text):
        segs = [s for s in line.rstrip('\n').split('\r') if s.strip() and not _TQDM_STRICT.search(s)]
        if segs: keep.append(segs[-1] + ('\n' if line.endswith('\n') else ''))
    return ''.join(keep)

def strip_stderr(text):
    "stderr text without tqdm bars and Python warnings (a warning line and the indented source line under it)."
    keep, in_warning = [], False
    for line in re.split(r'(?<=\n)', text):
        segs = [s for s in line.rstrip('\n').split('\r') if s.strip() and not _TQDM.search(s)]
        if _WARNING.match(line): in_warning = True; continue
        if in_warning and line[:1] in (' ', '\t'): continue
        in_warning = False
        if segs: keep.append(segs[-1] + ('\n' if line.endswith('\n') else ''))
    return ''.join(keep)

def clean_outputs(outputs):
    "Outputs worth storing: drop widget views (tqdm and ipywidgets), tqdm text, and warnings on stderr."
    res = []
    for o in outputs:
        if WIDGET_VIEW in o.get('data', {}): continue
        if o.get('output_type') == 'stream':
            o['text'] = (strip_stderr if o.get('name') == 'stderr' else strip_stdout)(_src(o.get('text')))
            if not o['text'].strip(): continue
        res.append(o)
    return res

# --- running ------------------------------------------------------------------------------------------------------
class LessonFailed(Exception): pass

_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')

def _cell_desc(nb, i):
    c = nb['cells'][i]
    first = next((l for l in _src(c.get('source')).splitlines() if l.strip() and not _DIRECTIVE.match(l)), '')
    return f"cell {i}" + (f" (id {c['id']})" if c.get('id') else '') + (f": `{first.strip()[:60]}`" if first else '')

def _nbdev_clean(nb, root):
    "Clean a notebook dict as `nbdev_clean` does with `root`'s settings.ini."
    from nbdev.config import get_config
    from nbdev.clean import clean_nb
    cfg = get_config(path=root)
    clean_nb(nb, cfg.clear_all, cfg.get('allowed_metadata_keys', '').split(),
             cfg.get('allowed_cell_metadata_keys', '').split(), cfg.clean_ids)
    return nb

def kernel_env(quick=False):
    "The environment of a lesson's kernel: fixed hash seed; IN_TEST only for a quick run."
    env = {k: v for k, v in os.environ.items() if k != 'IN_TEST'}
    env['PYTHONHASHSEED'] = '0'
    if quick: env['IN_TEST'] = '1'
    return env

def _client_class():
    "nbclient's `NotebookClient`, mended: with `store_widget_state=False` an `Output` widget's output raised KeyError."
    import collections
    from nbclient import NotebookClient
    class Client(NotebookClient):
        def reset_execution_trackers(self):
            super().reset_execution_trackers()
            self.widget_state = collections.defaultdict(dict)   # the output hook writes here; nothing of it is stored
        def set_widgets_metadata(self): pass                     # widget state is noise in a stored lesson
    return Client

def run_lesson(path, quick=False, timeout=DEFAULT_TIMEOUT, root=None):
    "Execute the notebook at `path` top to bottom on a fresh kernel and store its outputs in place; returns seconds."
    import nbformat
    _Client = _client_class()
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from execnb.nbio import write_nb
    path = Path(path).resolve(); root = Path(root or path.parent.parent)
    nb = nbformat.read(path, as_version=4)
    skip = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code' and not executes(c)]
    for i in skip: nb.cells[i].metadata.setdefault('tags', []).append('skip-execution')
    t0 = time.time(); deadline = t0 + timeout; current = {}
    client = _Client(nb, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}},
                            timeout_func=lambda cell: max(1, int(deadline - time.time())),
                            store_widget_state=False, record_timing=False, skip_cells_with_tag='skip-execution',
                            on_cell_execute=lambda cell, cell_index: current.update(i=cell_index))
    log = tempfile.TemporaryFile('w+')                # the kernel's own stderr (its start-up chatter; why it died)
    try: client.execute(env=kernel_env(quick), stderr=log)
    except CellExecutionError as e:
        raise LessonFailed(f"{path.name}: {_cell_desc(nb, current.get('i', 0))} failed: "
                           f"{e.ename}: {' '.join(str(e.evalue).split())[:300]}\n{_ANSI.sub('', str(e))}") from None
    except (CellTimeoutError, TimeoutError):
        raise LessonFailed(f"{path.name}: still running after {timeout} s (the per-lesson timeout), "
                           f"at {_cell_desc(nb, current.get('i', 0))}") from None
    except DeadKernelError as e:
        log.seek(0)
        raise LessonFailed(f"{path.name}: the kernel died at {_cell_desc(nb, current.get('i', 0))}: {e}\n"
                           f"{log.read()[-3000:]}") from None
    finally: log.close()
    secs = time.time() - t0
    for i in skip:
        tags = [t for t in nb.cells[i].metadata.get('tags', []) if t != 'skip-execution']
        if tags: nb.cells[i].metadata['tags'] = tags
        else: nb.cells[i].metadata.pop('tags', None)
    nb.metadata.pop('widgets', None)
    for c in nb.cells:
        c.metadata.pop(KEY, None)
        if c.cell_type == 'code': c.outputs = clean_outputs(c.outputs) if executes(c) else []
    d = _nbdev_clean(json.loads(nbformat.writes(nb)), root)
    hashes = []
    for c in d['cells']:
        if not executes(c): continue
        c['metadata'][KEY] = {'src': src_hash(c), 'out': out_hash(c)}
        hashes.append(c['metadata'][KEY]['src'])
    d['metadata'][KEY] = {'run': 'quick' if quick else 'full', 'seconds': round(secs, 1), 'torch': _version('torch'),
                          'python': platform.python_version(), 'cpus': os.cpu_count(),
                          'date': datetime.date.today().isoformat(), 'cells': cells_hash(hashes)}
    tmp = path.with_name(f'.{path.name}.tmp')
    write_nb(d, tmp); os.replace(tmp, path)
    return secs

def _version(pkg):
    from importlib.metadata import version, PackageNotFoundError
    try: return version(pkg)
    except PackageNotFoundError: return None

def select(names, nbs=ROOT/'nbs'):
    "The lessons named in `names` (stems, file names or paths; `index` is allowed too), or all lessons."
    if not names: return lesson_paths(nbs)
    avail = {p.stem: p for p in lesson_paths(nbs)}
    if (Path(nbs)/'index.ipynb').exists(): avail['index'] = Path(nbs)/'index.ipynb'
    res = []
    for n in names:
        stem = Path(n).stem
        if stem not in avail: sys.exit(f"run_lessons: no lesson {n!r} in {nbs} (lessons: {' '.join(avail)})")
        res.append(avail[stem])
    return sorted(set(res), key=lambda p: (p.stem == 'index', p.name))

def save_times(times, fn, quick=False):
    "Merge this run's times into `fn` (a JSON record of every lesson's last full-settings run)."
    fn = Path(fn)
    old = json.loads(fn.read_text()) if fn.exists() else {}
    lessons = {**old.get('lessons', {}), **{k: round(v, 1) for k, v in times.items()}}
    rec = {'note': 'seconds per lesson at full settings (make lessons), each on a fresh kernel, one after another',
           'lessons': dict(sorted(lessons.items())), 'total': round(sum(lessons.values()), 1),
           'torch': _version('torch'), 'python': platform.python_version(), 'cpus': os.cpu_count(),
           'machine': platform.machine(), 'date': datetime.date.today().isoformat()}
    fn.parent.mkdir(parents=True, exist_ok=True)
    fn.write_text(json.dumps(rec, indent=1) + '\n')
    return rec

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('lessons', nargs='*', help='lesson names (default: every nbs/NN_*.ipynb)')
    p.add_argument('--timeout', type=int, default=DEFAULT_TIMEOUT, help='seconds allowed per lesson')
    p.add_argument('--quick', action='store_true', help='run with IN_TEST=1 (marked "quick": check-outputs rejects it)')
    p.add_argument('--nbs', default=str(ROOT/'nbs'), help='the notebooks folder')
    p.add_argument('--times', default=None, help=f'where to write the run times (default {TIMES}; not for --quick)')
    a = p.parse_args(argv)
    quick = a.quick or bool(os.environ.get('IN_TEST'))
    if quick and not a.quick: print("run_lessons: IN_TEST is set: this is a quick run and is marked so")
    paths, times, t0 = select(a.lessons, a.nbs), {}, time.time()
    print(f"run_lessons: {len(paths)} notebooks, {'quick (IN_TEST=1)' if quick else 'full settings'}, "
          f"timeout {a.timeout} s each", flush=True)
    for path in paths:
        print(f"  {path.stem:<24}", end=' ', flush=True)
        try: times[path.stem] = run_lesson(path, quick=quick, timeout=a.timeout, root=Path(a.nbs).resolve().parent)
        except LessonFailed as e:
            print('FAILED', flush=True)
            if times and not quick: save_times(times, a.times or Path(a.nbs).resolve().parent/TIMES)
            sys.exit(f"\nrun_lessons: {e}\nrun_lessons: FAILED: {str(e).splitlines()[0]}\n"
                     f"run_lessons: the outputs of {path.name} were not stored "
                     f"(lessons done before it were)")
        print(f"{times[path.stem]:7.1f} s", flush=True)
    print(f"  {'total':<24} {sum(times.values()):7.1f} s ({time.time() - t0:.0f} s wall)")
    if not quick and times:
        fn = a.times or Path(a.nbs).resolve().parent/TIMES
        rec = save_times({k: v for k, v in times.items() if k != 'index'}, fn)
        print(f"run_lessons: wrote {fn} (all recorded lessons: {rec['total']:.0f} s)")

if __name__ == '__main__': main()
