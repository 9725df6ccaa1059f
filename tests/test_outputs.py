"""`make lessons` (tests/run_lessons.py) and `make check-outputs` (tests/check_outputs.py) on tiny notebooks.

A tiny repository layout in a temporary folder (settings.ini copied from this one, nbs/00_tiny.ipynb) is executed by
the real runner on real kernels; the checker must pass on the fresh result, keep passing after `nbdev_clean`, and fail
with one line per problem after a cell is edited, added or removed, after a quick (IN_TEST) run, and before any run.
"""
import json, shutil, subprocess, sys
from pathlib import Path
import nbformat
import pytest
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_lessons as rl
import check_outputs as co

ROOT = Path(__file__).resolve().parent.parent
PNG = 'image/png'

CELLS = [
    ('markdown', "# Tiny\n> a lesson of eight cells"),
    ('code', "#| hide\nimport os, sys, warnings\nIN_TEST = bool(os.environ.get('IN_TEST'))"),
    ('code', "print('quick' if IN_TEST else 'full', os.environ.get('PYTHONHASHSEED'), os.getcwd())"),
    ('code', "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='widget bar'): pass"),
    ('code', "from tqdm import tqdm as text_tqdm\nfor _ in text_tqdm(range(3), desc='text bar', file=sys.stderr): pass\n"
             "warnings.warn('The given NumPy array is not writable', UserWarning)\nprint('a kept line', file=sys.stderr)"),
    ('code', "import ipywidgets\nipywidgets.IntSlider(3, description='sample')"),
    ('code', "from PIL import Image\nImage.new('RGB', (8, 4), 'red')"),
    ('code', "#| eval: false\nraise RuntimeError('a cell flagged eval: false never runs')"),
    ('code', "from IPython.display import Markdown\nMarkdown(f'**{6 * 7}** cells')"),
    ('code', ""),
]

def tiny_repo(tmp, cells=CELLS, name='00_tiny.ipynb'):
    "A repository layout with the project's settings.ini and one notebook built from `cells`."
    (tmp/'nbs').mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT/'settings.ini', tmp/'settings.ini')
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}})
    nb.cells = [nbformat.v4.new_markdown_cell(s) if t == 'markdown' else nbformat.v4.new_code_cell(s) for t, s in cells]
    nbformat.write(nb, tmp/'nbs'/name)
    return tmp/'nbs'/name

def edit(fn, f):
    "Apply `f` to the notebook dict at `fn`, in place."
    nb = json.loads(fn.read_text()); f(nb); fn.write_text(json.dumps(nb, indent=1))

@pytest.fixture(scope='module')
def executed(tmp_path_factory):
    "The tiny notebook executed once at full settings by the runner: (path, seconds)."
    fn = tiny_repo(tmp_path_factory.mktemp('full'))
    return fn, rl.run_lesson(fn, timeout=120)

@pytest.fixture
def copy(executed, tmp_path):
    "A private copy of the executed tiny repository."
    src = executed[0].parent.parent
    shutil.copytree(src, tmp_path/'repo'); return tmp_path/'repo'/'nbs'/executed[0].name

def outputs(fn):
    nb = json.loads(fn.read_text())
    return [c.get('outputs', []) for c in nb['cells'] if c['cell_type'] == 'code']

def test_runner_stores_results_and_the_record(executed):
    fn, secs = executed
    nb = json.loads(fn.read_text())
    rec = nb['metadata'][rl.KEY]
    assert rec['run'] == 'full' and rec['seconds'] == round(secs, 1) > 0 and rec['torch'] and rec['date']
    outs = outputs(fn)
    # full settings, the fixed hash seed, cwd = nbs/
    assert ''.join(outs[1][0]['text']) == f"full 0 {fn.parent}\n"
    assert outs[2] == [], outs[2]                                        # tqdm widget: dropped
    assert [''.join(o['text']) for o in outs[3]] == ['a kept line\n'], outs[3]   # tqdm text and the warning: dropped
    assert outs[4] == [], outs[4]                                        # an ipywidget view: dropped
    assert PNG in outs[5][0]['data'] and outs[6] == [] and ''.join(outs[7][0]['data']['text/markdown']) == '**42** cells'
    assert 'widgets' not in nb['metadata'] and not any(rl.WIDGET_VIEW in json.dumps(o) for o in outs)
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    hashed = [bool(c['metadata'].get(rl.KEY, {}).get('src')) for c in code]
    assert hashed == [True] * 6 + [False, True, False]                   # not the eval: false cell, not the empty one
    assert all(c['metadata'] == {rl.KEY: c['metadata'][rl.KEY]} for c, h in zip(code, hashed) if h)
    assert not any('tags' in c['metadata'] for c in code)
    assert co.problems(fn) == []

def test_nbdev_clean_keeps_outputs_and_the_record(copy):
    "settings.ini's allowed_(cell_)metadata_keys keep the record; the runner already wrote what nbdev_clean writes."
    before = copy.read_text()
    r = subprocess.run([str(Path(sys.executable).parent/'nbdev_clean'), '--fname', str(copy)],
                       cwd=copy.parent.parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert copy.read_text() == before
    nb = json.loads(before)
    assert nb['metadata'][rl.KEY]['run'] == 'full' and any(PNG in json.dumps(o) for o in outputs(copy))
    assert co.problems(copy) == []

def test_fails_on_an_edited_cell(copy):
    edit(copy, lambda nb: nb['cells'][6]['source'].append("\nImage.new('RGB', (4, 4), 'blue')"))
    probs = co.problems(copy)
    assert len(probs) == 1 and 'cell 6' in probs[0] and 'edited after its outputs were produced' in probs[0], probs

def test_fails_on_a_new_cell_a_removed_cell_and_changed_outputs(copy):
    edit(copy, lambda nb: nb['cells'].insert(3, nbformat.v4.new_code_cell("x = 1")))
    probs = co.problems(copy)
    assert len(probs) == 1 and 'cell 3' in probs[0] and 'no recorded source hash' in probs[0], probs
    edit(copy, lambda nb: nb['cells'].pop(3))
    assert co.problems(copy) == []
    edit(copy, lambda nb: nb['cells'].pop(8))
    assert co.problems(copy) == [f"nbs/{copy.name}: code cells were removed or reordered after the run"]

def test_fails_on_outputs_from_elsewhere(copy):
    edit(copy, lambda nb: nb['cells'][2]['outputs'][0].update(text=['quick 0 /elsewhere\n']))
    probs = co.problems(copy)
    assert len(probs) == 1 and 'cell 2' in probs[0] and 'differ' in probs[0], probs

def test_fails_on_a_quick_run(tmp_path):
    fn = tiny_repo(tmp_path)
    rl.run_lesson(fn, quick=True, timeout=120)
    assert json.loads(fn.read_text())['metadata'][rl.KEY]['run'] == 'quick'
    assert ''.join(outputs(fn)[1][0]['text']).startswith('quick 0')
    probs = co.problems(fn)
    assert len(probs) == 1 and 'quick (IN_TEST) run' in probs[0], probs

def test_fails_without_outputs_or_record(tmp_path, executed):
    fn = tiny_repo(tmp_path)
    assert co.problems(fn) == [f"nbs/{fn.name}: no stored outputs (the lesson was never executed)"]
    shutil.copy(executed[0], fn)
    edit(fn, lambda nb: nb['metadata'].pop(rl.KEY))
    probs = co.problems(fn)
    assert len(probs) == 1 and 'no full-run record' in probs[0], probs

def test_check_outputs_command(copy):
    "The command prints one line per problem and the `make lessons` line to fix them; exit status 1."
    ok = subprocess.run([sys.executable, str(ROOT/'tests'/'check_outputs.py'), str(copy)], capture_output=True, text=True)
    assert ok.returncode == 0 and 'fresh' in ok.stdout, ok
    edit(copy, lambda nb: nb['cells'][2]['source'].append(" # edited"))
    bad = subprocess.run([sys.executable, str(ROOT/'tests'/'check_outputs.py'), str(copy)], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout.count('\n') == 1 and 'cell 2' in bad.stdout, bad
    assert 'make lessons ONLY="00_tiny"' in bad.stderr, bad.stderr

def test_a_failing_cell_names_the_lesson_and_the_cell(tmp_path):
    fn = tiny_repo(tmp_path, [('code', "x = 1"), ('code', "#| hide\nraise ValueError('broken on purpose')")], '03_broken.ipynb')
    before = fn.read_text()
    with pytest.raises(rl.LessonFailed) as e: rl.run_lesson(fn, timeout=60)
    first = str(e.value).splitlines()[0]
    assert first.startswith('03_broken.ipynb: cell 1') and "raise ValueError('broken on purpose')" in first, first
    assert 'ValueError: broken on purpose' in first and fn.read_text() == before

def test_the_per_lesson_timeout(tmp_path):
    fn = tiny_repo(tmp_path, [('code', "import time"), ('code', "time.sleep(60)")], '04_slow.ipynb')
    with pytest.raises(rl.LessonFailed) as e: rl.run_lesson(fn, timeout=4)
    assert 'still running after 4 s' in str(e.value) and 'cell 1' in str(e.value), e.value

def test_strip_stderr():
    s = ("/x/data.py:225: UserWarning: The given NumPy array is not writable\n  t = torch.as_tensor(a)\n"
         "text bar:   0%|          | 0/3 [00:00<?, ?it/s]\rtext bar: 100%|##########| 3/3 [00:00<00:00, 9.1it/s]\n"
         "Warning: something\nreal error text\n")
    assert rl.strip_stderr(s) == "real error text\n"
    table = "| class | IoU |\n|---|---|\n| rbc | 90% |\n"
    assert rl.strip_stdout(table) == table and rl.strip_stderr(table) == table
    bars = "epoch 1:  50%|#####     | 1/2 [00:01<00:01, 1.0it/s]\repoch 1: 100%|##########| 2/2 [00:02<00:00, 1.0it/s]\ndone\n"
    assert rl.strip_stdout(bars) == "done\n" and rl.strip_stdout("7it [00:01, 5.1it/s]\nok\n") == "ok\n"

def test_lessons_are_found_in_numeric_order(tmp_path):
    for n in ['10_b.ipynb', '02_a.ipynb', 'index.ipynb', '_private.ipynb', '05a_old.ipynb', 'notes.ipynb']:
        (tmp_path/n).write_text('{}')
    assert [p.name for p in rl.lesson_paths(tmp_path)] == ['02_a.ipynb', '05a_old.ipynb', '10_b.ipynb']
    assert [p.name for p in rl.select(['10_b', 'index', 'nbs/02_a.ipynb'], tmp_path)] == ['02_a.ipynb', '10_b.ipynb', 'index.ipynb']
    with pytest.raises(SystemExit): rl.select(['99_missing'], tmp_path)
