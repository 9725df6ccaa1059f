"""What only a real browser can show, driven through Playwright in Debian's Chromium.

- The two widget lessons run in a real JupyterLab and their viewers react to the mouse and keyboard: the augmentation
  viewer (AUG_LESSON) and the prediction viewer (VIEWER_LESSON). Every lesson running top to bottom is proven
  elsewhere (nbdev_test under IN_TEST, `make lessons` at full settings), so no other lesson runs here.
- The book (`make book`, tests/build_book.py) is built into a temporary folder, served on 127.0.0.1 with every other
  request refused (it must read offline): the index and two lessons reached from it show all their pictures.

Run alone with `pytest -m browser tests/test_browser.py`. The test command (`make test`) installs chromium;
playwright comes with `.[dev]`; nothing is downloaded here (never `playwright install`).
JupyterLab runs on 127.0.0.1 against a temporary copy of nbs/, with IN_TEST=1 so lessons take their short path;
as under `nbdev_test`, the copy leaves out the cells flagged with settings.ini's `tst_flags` (`#| slow`: full-size
training that takes minutes; run those with `nbdev_test --flags slow`).
Screenshots of a failing run are kept in artifacts/browser/.
"""
import functools, http.server, json, os, re, shutil, signal, socket, subprocess, sys, threading, time, urllib.request
from pathlib import Path
import pytest
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_lessons import lesson_paths

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = '/usr/bin/chromium'
ARTIFACTS = ROOT/'artifacts'/'browser'
pytestmark = pytest.mark.browser

def _lesson(name):
    "The file name of the lesson called `name` after its number (`augment` -> `01_augment.ipynb`)."
    found = [p.name for p in lesson_paths(ROOT/'nbs') if p.stem.split('_', 1)[1] == name]
    assert len(found) == 1, f"expected one lesson nbs/NN_{name}.ipynb, found {found}"
    return found[0]

# The lessons whose widgets are driven here, by the name after the number (renumbering needs no change here)
AUG_LESSON = 'augment'       # nbs/01_augment.ipynb: AugViewer (segtutor.augment)
VIEWER_LESSON = 'viewers'    # nbs/22_viewers.ipynb: PredictionViewer (segtutor.viewers)

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
def browser():
    "Debian's Chromium, headless, through Playwright."
    _need_browser()
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
    les = Lesson(browser, lab, _lesson(AUG_LESSON))
    try:
        TIMES[les.name] = les.run_all()
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
    les = Lesson(browser, lab, _lesson(VIEWER_LESSON))
    try:
        TIMES[les.name] = les.run_all()
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

def test_flagged_cells_are_dropped_from_the_copy(tmp_path):
    "The copy that the browser runs has no `#| slow` cell, like nbdev_test's run; everything else is kept."
    assert 'slow' in _tst_flags()
    cell = lambda src, t='code': {'cell_type': t, 'metadata': {}, 'source': src, **({'outputs': [], 'execution_count': None} if t == 'code' else {})}
    cells = [cell('# Title', 'markdown'), cell('x = 1'), cell('#| slow\ntrain_for_minutes()'), cell('#|slow\nmore()'),
             cell('#| export\ny = 2'), cell('#| slow is only words here', 'markdown')]
    fn = tmp_path/'00_x.ipynb'
    fn.write_text(json.dumps({'cells': cells, 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    _drop_flagged_cells(fn)
    after = json.loads(fn.read_text())['cells']
    assert [c['source'] for c in after] == ['# Title', 'x = 1', '#| export\ny = 2', '#| slow is only words here']

@pytest.fixture(scope='module')
def book(tmp_path_factory):
    "The book as `make book` builds it (tests/build_book.py), in a temporary folder served on 127.0.0.1: (url, folder)."
    _need_browser()
    import build_book
    out = tmp_path_factory.mktemp('book')
    t0 = time.time(); build_book.build(out, quiet=True); TIMES['book: build'] = time.time() - t0
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(out)))
    th = threading.Thread(target=srv.serve_forever, daemon=True); th.start()
    try: yield f'http://127.0.0.1:{srv.server_address[1]}', out
    finally: srv.shutdown(); srv.server_close(); th.join(10)

def _pictures(page, name):
    "Every picture on the page as (source, natural width); screenshot and fail when one did not load."
    page.wait_for_load_state('load')
    imgs = page.evaluate("[...document.images].map(i => [i.getAttribute('src').slice(0, 80), i.naturalWidth])")
    broken = [src for src, w in imgs if not w]
    if broken:
        ARTIFACTS.mkdir(parents=True, exist_ok=True); page.screenshot(path=str(ARTIFACTS/f'book-{name}-broken.png'))
    assert not broken, f"{name}: {len(broken)} of {len(imgs)} pictures did not load: {broken[:5]}"
    return imgs

def _links_resolve(page, out, name):
    "Every relative link on the page leads to a page of the book."
    hrefs = page.evaluate("[...document.links].map(a => a.getAttribute('href'))")
    local = {h.split('#')[0] for h in hrefs if h and not re.match(r'^([a-z][\w+.-]*:|//|#)', h, re.I)}
    missing = sorted(h for h in local if not (out/h).is_file())
    assert not missing, f"{name}: links to pages the book does not have: {missing}"
    return local

def _lesson_page(page, out):
    "Check the lesson page shown: a title, at least one picture and all of them loaded, links that resolve, the nav."
    name = page.url.rsplit('/', 1)[1]
    assert page.locator('h1').first.inner_text().strip(), f"{name}: no title"
    assert len(_pictures(page, name)) >= 1, f"{name}: no picture on the page"
    _links_resolve(page, out, name)
    assert page.locator('nav.segtutor-nav a[href="index.html#contents"]').count() == 2, f"{name}: no way back to the contents"
    return name

def test_book_pictures_and_links(browser, book):
    "The index and two lessons reached from it by its links show every picture, offline; the links between pages work."
    url, out = book
    refused = []
    page = browser.new_page(viewport={'width': 1200, 'height': 900})
    page.set_default_timeout(30_000)
    def offline(route):   # the book reads offline: anything not served by the book's server is refused
        if route.request.url.startswith(url): route.continue_()
        else: refused.append(route.request.url); route.abort()
    page.route('**/*', offline)
    t0 = time.time()
    try:
        page.goto(f'{url}/index.html')
        assert page.locator('#contents').count() == 1, "the index has no lesson map"
        _pictures(page, 'index')
        lessons = sorted(_links_resolve(page, out, 'index') - {'index.html'})
        assert len(lessons) >= 2 and all(re.fullmatch(r'\d\d[a-z]?_[\w-]+\.html', h) for h in lessons), lessons
        first = page.locator('#contents a').first
        href = first.get_attribute('href')
        with page.expect_navigation(): first.click()
        assert page.url == f'{url}/{href}', (page.url, href)
        seen = [_lesson_page(page, out)]
        with page.expect_navigation(): page.locator('nav.segtutor-nav.top a[rel=next]').click()
        seen.append(_lesson_page(page, out))
        assert seen == lessons[:2], (seen, lessons[:2])
        assert not [u for u in refused if re.search(r'\.(png|jpe?g|gif|svg|webp)\b', u)], refused
        TIMES['book: index, ' + ', '.join(seen)] = time.time() - t0
    finally:
        page.close()

def test_report_browser_times():
    "Writes the browser run times measured above to artifacts/browser/times.json (each lesson alone, one torch thread)."
    if not TIMES: pytest.skip('nothing ran in the browser')
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS/'times.json').write_text(json.dumps({k: round(v, 1) for k, v in sorted(TIMES.items())}, indent=1))
    assert all(v > 0 for v in TIMES.values())
