"""The lessons in a real JupyterLab, driven by Debian's Chromium through Playwright.

Run alone with `pytest -m browser tests/test_browser.py`. The test command (`make test`) installs chromium;
playwright comes with `.[dev]`; nothing is downloaded here (never `playwright install`).
JupyterLab runs on 127.0.0.1 against a temporary copy of nbs/, with IN_TEST=1 so lessons take their short path;
as under `nbdev_test`, the copy leaves out the cells flagged with settings.ini's `tst_flags` (`#| slow`: full-size
training that takes minutes; run those with `nbdev_test --flags slow`).
Screenshots of a failing run are kept in artifacts/browser/.
"""
import json, os, re, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = '/usr/bin/chromium'
ARTIFACTS = ROOT/'artifacts'/'browser'
pytestmark = pytest.mark.browser

def _need_browser():
    missing = []
    if not Path(CHROMIUM).exists(): missing.append(CHROMIUM)
    try: import playwright  # noqa: F401
    except ImportError: missing.append('playwright (pip)')
    if missing:
        if os.environ.get('CI'): pytest.fail(f"browser test cannot run in CI: missing {missing}")
        pytest.skip(f"missing {missing}: run `make browser-deps` (apt-get install chromium)")

def _tst_flags():
    "The `tst_flags` of settings.ini (cells marked `#| slow` etc.), which `nbdev_test` skips unless asked."
    import configparser
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    return set(cfg['DEFAULT'].get('tst_flags', '').split())

def _drop_flagged_cells(fn, flags=None):
    "Remove the code cells that nbdev_test would skip (`#| slow`, `#| notest`; full-size training) from a copied notebook."
    flags = _tst_flags() if flags is None else flags
    nb = json.loads(Path(fn).read_text())
    def flagged(c):
        src = ''.join(c['source']).splitlines()
        dirs = [l.split('|', 1)[1].strip() for l in src if re.match(r'^\s*#\s*\|', l)]
        return c['cell_type'] == 'code' and any(d in flags for d in dirs)
    nb['cells'] = [c for c in nb['cells'] if not flagged(c)]
    Path(fn).write_text(json.dumps(nb, indent=1))

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "A JupyterLab server on 127.0.0.1 serving a temporary copy of nbs/ (and data/), stopped by PID afterwards."
    _need_browser()
    work = tmp_path_factory.mktemp('lab')
    shutil.copytree(ROOT/'nbs', work/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_*'))
    shutil.copytree(ROOT/'data', work/'data')
    for nb in (work/'nbs').glob('*.ipynb'): _drop_flagged_cells(nb)
    settings = Path(sys.prefix)/'share'/'jupyter'/'lab'/'settings'
    settings.mkdir(parents=True, exist_ok=True)
    (settings/'overrides.json').write_text(json.dumps(
        {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}))
    port = _free_port()
    env = dict(os.environ, IN_TEST='1', OMP_NUM_THREADS='1', JUPYTER_CONFIG_DIR=str(work/'.jupyter'), MPLBACKEND='module://matplotlib_inline.backend_inline')
    log = open(work/'lab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyter', 'lab', '--allow-root', '--no-browser', f'--port={port}',
                             "--ServerApp.token=", "--ServerApp.password=", '--ServerApp.ip=127.0.0.1',
                             '--LabApp.news_url=None', '--ServerApp.disable_check_xsrf=True', f'--ServerApp.root_dir={work}'],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(url + '/api/status', timeout=2).status == 200: break
            except OSError: time.sleep(0.5)
        else: raise RuntimeError(f"JupyterLab did not start: {(work/'lab.log').read_text()[-2000:]}")
        yield url, work
    finally:
        proc.send_signal(signal.SIGTERM)
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()

@pytest.fixture(scope='module')
def browser(lab):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
            '--no-first-run', '--disable-sync', '--disable-quic'])
        yield b
        b.close()

class Lesson:
    "One notebook open in JupyterLab: run all cells, wait for the kernel, read the saved outputs."
    def __init__(self, browser, lab, name):
        self.url, self.work = lab
        self.name, self.page = name, browser.new_page(viewport={'width': 1400, 'height': 1000})
        self.page.set_default_timeout(60_000)
        # a workspace of its own, reset: no tabs (and kernels) restored from the lessons opened before
        ws = ''.join(ch for ch in Path(name).stem if ch.isalnum())
        self.page.goto(f'{self.url}/lab/workspaces/w{ws}/tree/nbs/{name}?reset')
        self.page.wait_for_selector('.jp-Notebook .jp-Cell')
        self.page.wait_for_timeout(1500)
        self.dismiss_dialogs()
        self.page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)

    def dismiss_dialogs(self):
        "Accept a dialog such as 'Select Kernel' (the default choice: the notebook's Python kernel); True if there was one."
        seen = False
        for _ in range(3):
            d = self.page.locator('.jp-Dialog')
            if not d.count(): return seen
            self.shot('dialog'); seen = True
            self.page.locator('.jp-Dialog .jp-mod-accept').first.click()
            self.page.wait_for_timeout(500)
        return seen

    def shot(self, tag):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        fn = ARTIFACTS/f'{Path(self.name).stem}-{tag}.png'
        self.page.screenshot(path=str(fn), full_page=False); return fn

    def start(self):
        "Run All Cells from the menu (returns at once; `finished` tells when it is done)."
        self.t0, self.quiet_since = time.time(), None
        if not hasattr(self, 'n'): self.n = self.n_code()
        self.page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        self.page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")

    def n_code(self):
        "Number of non-empty code cells in the notebook, as served."
        nb = json.loads((self.work/'nbs'/self.name).read_text())
        return sum(1 for c in nb['cells'] if c['cell_type'] == 'code' and ''.join(c['source']).strip())

    def finished(self):
        "True when the kernel is idle and every code cell has run, or when nothing has run for 10 s (a cell failed, Run All stopped)."
        if self.dismiss_dialogs() and time.time() - self.t0 < 60: self.start(); return False   # a late 'Select Kernel' ate the click
        prompts = self.page.eval_on_selector_all('.jp-CodeCell .jp-InputPrompt', "els => els.map(e => e.textContent)")
        busy = self.page.get_attribute('.jp-Notebook-ExecutionIndicator', 'data-status') != 'idle' or any('*' in t for t in prompts)
        if busy or time.time() - self.t0 < 2: self.quiet_since = None; return False
        if sum(bool(re.search(r'\[\d+\]', t)) for t in prompts) >= self.n: return True
        self.quiet_since = self.quiet_since or time.time()
        return time.time() - self.quiet_since > 10

    def run_all(self, timeout_s=300):
        "Run All Cells and wait until every code cell has run. Returns seconds."
        self.start()
        while time.time() - self.t0 < timeout_s:
            if self.finished(): return time.time() - self.t0
            time.sleep(0.5)
        self.shot('timeout'); raise AssertionError(f"{self.name}: still running after {timeout_s} s")

    def errors(self):
        "Save the notebook from the browser and return the error outputs in the saved file."
        fn = self.work/'nbs'/self.name
        before = fn.stat().st_mtime_ns
        self.page.locator('.jp-Notebook').first.click(position={'x': 5, 'y': 5})
        self.page.keyboard.press('Control+s')
        t0 = time.time()
        while fn.stat().st_mtime_ns == before and time.time() - t0 < 30: time.sleep(0.25)
        assert fn.stat().st_mtime_ns != before, f"{self.name}: the browser did not save the notebook"
        nb = json.loads(fn.read_text())
        errs = [f"{o.get('ename')}: {o.get('evalue')}" for c in nb['cells'] if c['cell_type'] == 'code'
                for o in c.get('outputs', []) if o.get('output_type') == 'error']
        unrun = sum(1 for c in nb['cells'] if c['cell_type'] == 'code' and c['source'] and c.get('execution_count') is None)
        return errs + ([f"{unrun} code cells never ran"] if unrun else [])

    def close(self):
        "Close the page and shut down this notebook's kernel."
        self.page.close()
        api = lambda path, method='GET': urllib.request.urlopen(urllib.request.Request(self.url + path, method=method), timeout=30)
        for s in json.loads(api('/api/sessions').read()):
            if s.get('path', '').endswith(self.name): api(f"/api/sessions/{s['id']}", 'DELETE')

def _wait_change(page, selector, before, attr=None, timeout_s=30):
    "Wait until the element's attribute (or text) differs from `before`; return the new value."
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        now = page.get_attribute(selector, attr) if attr else page.inner_text(selector)
        if now != before: return now
        time.sleep(0.25)
    return None

def _slider_right(page, box_sel, label, presses=1):
    "Focus the handle of the ipywidgets slider described `label` inside `box_sel` and press ArrowRight."
    sl = page.locator(f"{box_sel} .widget-slider:has(.widget-label:text-is('{label}'))").first
    handle = sl.locator('.noUi-handle').first
    handle.focus()
    for _ in range(presses): handle.press('ArrowRight')
    return sl.locator('.widget-readout').first.inner_text()

TIMES = {}

def test_augmentation_viewer_reacts(browser, lab):
    les = Lesson(browser, lab, '01_augment.ipynb')
    try:
        TIMES['01_augment.ipynb'] = les.run_all()
        assert not les.errors(), les.errors()
        img, cap = '.segtutor-aug-image', '.segtutor-aug-caption'
        les.page.locator(img).first.scroll_into_view_if_needed()
        les.page.wait_for_selector(img + '[src]')
        src0, cap0 = les.page.get_attribute(img, 'src'), les.page.inner_text(cap)
        box = f"div.lm-Widget:has(> {img})"
        _slider_right(les.page, '.jp-OutputArea-output', 'sample')
        src1 = _wait_change(les.page, img, src0, 'src')
        cap1 = _wait_change(les.page, cap, cap0)
        if src1 is None or cap1 is None: les.shot('aug-slider-no-change')
        assert src1 is not None, "augmentation image did not change after moving the sample slider"
        assert cap1 is not None, "augmentation caption did not change after moving the sample slider"
        # toggling an augmentation off changes the picture too
        cb = les.page.locator(".jp-OutputArea-output .widget-checkbox input[type=checkbox]").first
        cb.click()
        src2 = _wait_change(les.page, img, src1, 'src')
        if src2 is None: les.shot('aug-toggle-no-change')
        assert src2 is not None, "augmentation image did not change after toggling an augmentation"
    finally:
        les.shot('final'); les.close()

def test_prediction_viewer_reacts(browser, lab):
    les = Lesson(browser, lab, '09a_viewers.ipynb')
    try:
        TIMES['09a_viewers.ipynb'] = les.run_all()
        assert not les.errors(), les.errors()
        img, cap = '.segtutor-pred-image', '.segtutor-pred-caption'
        les.page.locator(img).first.scroll_into_view_if_needed()
        src0, cap0 = les.page.get_attribute(img, 'src'), les.page.locator(cap).first.inner_text()
        _slider_right(les.page, '.jp-OutputArea-output', 'sample')
        src1 = _wait_change(les.page, img, src0, 'src')
        cap1 = _wait_change(les.page, cap, cap0)
        if src1 is None or cap1 is None: les.shot('pred-slider-no-change')
        assert src1 is not None and cap1 is not None, "prediction viewer did not update after moving the sample slider"
        n0, n1 = (int(re.search(r'sample (\d+)', c).group(1)) for c in (cap0, cap1))
        assert n1 == n0 + 1, (cap0, cap1)
        les.page.locator(".jp-OutputArea-output .widget-checkbox input[type=checkbox]").first.click()
        src2 = _wait_change(les.page, img, src1, 'src')
        if src2 is None: les.shot('pred-toggle-no-change')
        assert src2 is not None, "prediction viewer did not update after toggling a class"
    finally:
        les.shot('final'); les.close()

LESSONS = sorted(p.name for p in (ROOT/'nbs').glob('[0-9]*.ipynb') if p.name not in ('01_augment.ipynb', '09a_viewers.ipynb'))

PARALLEL = 2   # lessons at a time; the kernels use one torch thread each (OMP_NUM_THREADS=1), as nbdev_test's two workers

@pytest.fixture(scope='module')
def lesson_runs(browser, lab):
    "Run every lesson, PARALLEL at a time, each in its own page and kernel: name -> (seconds or None, errors)."
    todo, running, res = list(LESSONS), [], {}
    while todo or running:
        while todo and len(running) < PARALLEL:
            name, les = todo.pop(0), None
            try: les = Lesson(browser, lab, name); les.start(); running.append(les)
            except Exception as e:
                res[name] = (None, [f"could not open and start: {type(e).__name__}: {e}"])
                if les is not None: _close_quietly(les)
        time.sleep(0.5)
        for les in list(running):
            try:
                if les.finished(): res[les.name] = (time.time() - les.t0, les.errors())
                elif time.time() - les.t0 > 300: les.shot('timeout'); res[les.name] = (None, ["still running after 300 s"])
                else: continue
                if res[les.name][1]: les.shot('error')
            except Exception as e: res[les.name] = (None, [f"{type(e).__name__}: {e}"])
            _close_quietly(les); running.remove(les)
    return res

def _close_quietly(les):
    "Close a lesson's page and kernel; a failure here must not hide the other lessons' results."
    try: les.close()
    except Exception as e: print(f"{les.name}: could not close: {type(e).__name__}: {e}")

@pytest.mark.parametrize('name', LESSONS)
def test_lesson_runs_in_browser(lesson_runs, name):
    "Every lesson runs top to bottom in JupyterLab (Run All Cells on a fresh kernel) with no error output."
    secs, errs = lesson_runs[name]
    if secs is not None: TIMES[name] = secs
    assert not errs, errs

def test_flagged_cells_are_dropped_from_the_copy(tmp_path):
    "The copy that the browser runs has no `#| slow` cell, like nbdev_test's run; everything else is kept."
    src = ROOT/'nbs'/'08_lr_finder.ipynb'
    n_slow = sum('#| slow' in ''.join(c['source']) for c in json.loads(src.read_text())['cells'])
    assert n_slow >= 1 and 'slow' in _tst_flags()
    shutil.copy(src, tmp_path/src.name); _drop_flagged_cells(tmp_path/src.name)
    before, after = (json.loads(f.read_text())['cells'] for f in (src, tmp_path/src.name))
    assert len(after) == len(before) - n_slow and not any('#| slow' in ''.join(c['source']) for c in after)

def test_report_browser_times():
    "Writes the per-lesson browser run times measured above (artifacts/browser/times.json; two lessons at a time, one thread each)."
    if not TIMES: pytest.skip('no lesson ran in the browser')
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS/'times.json').write_text(json.dumps({k: round(v, 1) for k, v in sorted(TIMES.items())}, indent=1))
    assert all(v > 0 for v in TIMES.values())
