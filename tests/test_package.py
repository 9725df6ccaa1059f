"Checks on the installed package that no lesson can make: it imports without nbdev, and its metadata is sound."
import re, subprocess, sys, configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def test_runtime_never_imports_nbdev():
    mods = sorted(p.stem if p.parent.name == 'segtutor' else f'{p.parent.name}.{p.stem}'
                  for p in (ROOT/'segtutor').rglob('*.py') if not p.name.startswith('_'))
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module('segtutor.' + m)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('nbdev', 'execnb')]\n"
            "assert not bad, bad\nprint(len(" f"{mods!r}" "))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == len(mods) > 0

def test_runtime_requirements_are_ranges():
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    reqs = cfg['DEFAULT']['requirements'].split()
    assert any(r.startswith('torch>=') for r in reqs), reqs
    assert not [r for r in reqs if '==' in r], f"runtime requirements must be ranges: {reqs}"
    dev = cfg['DEFAULT']['dev_requirements']
    for pin in ('nbdev>=2.4.14,<3', 'execnb>=0.1.14,<0.1.17', 'fastcore>=1.8,<2'): assert pin in dev

def test_every_lesson_exports_its_module():
    nbs = sorted(p.name for p in (ROOT/'nbs').glob('[0-9]*.ipynb'))
    assert nbs[0] == '00_data.ipynb' and len(nbs) >= 2, nbs
    for nb in nbs:
        if nb.startswith('19_'): continue   # 19_experiments exports nothing (DESIGN.md)
        assert '#| default_exp ' in (ROOT/'nbs'/nb).read_text(), f"{nb} has no default_exp"
    nums = [nb[:2] for nb in nbs]
    assert len(nums) == len(set(nums)), f"one lesson per number: {nbs}"

# the CLI dispatches `segtutor bench` to lesson 26's module, inside the command (the bench is a tool, not a lesson step)
LATER_IMPORT_OK = {('25_cli', 'segtutor.bench')}

def _owners():
    "Module name -> number of the lesson that exports it (its default_exp, or `#| export MODULE` cells)."
    import json
    own = {}
    for nb in sorted((ROOT/'nbs').glob('[0-9][0-9]_*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            for m in re.finditer(r'^#\|\s*(?:default_exp|export)\s+([\w.]+)', ''.join(c['source']), re.M):
                own.setdefault('segtutor.' + m.group(1).replace('.__init__', ''), int(nb.name[:2]))
    return own

def test_lessons_import_only_earlier_lessons():
    "A lesson imports only modules of lessons before it (the numbers are the reading order)."
    own, bad = _owners(), []
    for nb in sorted((ROOT/'nbs').glob('[0-9][0-9]_*.ipynb')):
        n = int(nb.name[:2])
        for code in _code_cells(nb):
            for m in re.finditer(r'(?:from|import)\s+(segtutor(?:\.\w+)*)', code):
                mod = m.group(1)
                while mod not in own and '.' in mod: mod = mod.rsplit('.', 1)[0]
                if own.get(mod, -1) > n and (nb.stem, mod) not in LATER_IMPORT_OK: bad.append(f"{nb.name} imports {m.group(1)} (lesson {own[mod]:02d})")
    assert not bad, '\n'.join(bad)



def _extras():
    "The optional extras declared in settings.ini (`extra_NAME = ...`)."
    return [k[len('extra_'):] for k in _cfg() if k.startswith('extra_')]

def _cfg():
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini'); return cfg['DEFAULT']

def _code_cells(nb):
    import json
    return [''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']

def test_every_lesson_is_colab_ready():
    "Each lesson installs segtutor from the repository in `settings.ini` when it is missing, and exports only at home."
    user, repo = _cfg()['user'], _cfg()['repo']
    for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')):
        code = _code_cells(nb)
        setup = [c for c in code[:3] if "find_spec('segtutor') is None" in c]
        assert setup and setup[0].startswith('#| hide'), f"{nb.name}: no hidden setup cell among the first code cells"
        assert f'git+https://github.com/{user}/{repo}' in setup[0], f"{nb.name}: {setup[0]}"
        extras = re.search(r"segtutor\[([\w,]+)\] @", setup[0])
        assert extras, f"{nb.name}: the setup cell must install segtutor with this lesson's extras: {setup[0]}"
        extras = set(extras.group(1).split(','))
        assert extras <= set(_extras()), f"{nb.name}: unknown extras {extras - set(_extras())} (settings.ini has {_extras()})"
        assert 'dev' not in extras and 'jupyterlab' not in setup[0] and 'nbdev' not in setup[0], f"{nb.name}: never the dev toolchain on Colab"
        exports = [c for c in code if 'nbdev_export()' in c]
        assert exports and all("Path('../settings.ini').exists()" in c for c in exports), f"{nb.name}: unguarded export cell"

def test_readme_has_a_colab_badge_per_lesson():
    user, repo, branch = _cfg()['user'], _cfg()['repo'], _cfg()['branch']
    readme = (ROOT/'README.md').read_text()
    for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')):
        assert f'https://colab.research.google.com/github/{user}/{repo}/blob/{branch}/nbs/{nb.name}' in readme, nb.name

# ---- requirements: every import declared, floors that match the APIs used, extras that fail with a message ----
import ast, importlib.metadata

def _canon(name): return re.sub(r'[-_.]+', '-', name).lower()

def _reqs(key):
    "Parsed requirements of a settings.ini key ('requirements' or 'extra_NAME')."
    from packaging.requirements import Requirement
    return [Requirement(r) for r in _cfg().get(key, '').split()]

def _declared():
    "Canonical distribution name -> (Requirement, where: 'requirements' or the extra's name)."
    out = {}
    for key in ['requirements'] + [f'extra_{e}' for e in _extras()]:
        for r in _reqs(key): out.setdefault(_canon(r.name), (r, key.removeprefix('extra_')))
    return out

# modules reached through another package's namespace, that need a distribution of their own
SUBMODULE_DISTS = {'torch.utils.tensorboard': 'tensorboard'}
# runtime modules that exist to serve one extra: they may import it at module level (`import segtutor.NAME` needs it)
OPTIONAL_MODULES = {'segtutor.lightning': 'lightning', 'segtutor.export': 'export'}

def _runtime_imports():
    "(module name, file, line, inside a function?, the ast node) of every absolute import in the runtime package."
    for p in sorted((ROOT/'segtutor').rglob('*.py')):
        tree = ast.parse(p.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Import): names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and not n.level: names = [n.module]
            else: continue
            up, in_fn = n, False
            while up in parents:
                up = parents[up]; in_fn = in_fn or isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef))
            for name in names: yield name, p.relative_to(ROOT), n.lineno, in_fn, n, parents

def _dist_of(name, dists=importlib.metadata.packages_distributions()):
    "Canonical distribution names that provide import `name` (SUBMODULE_DISTS first)."
    for mod, dist in SUBMODULE_DISTS.items():
        if name == mod or name.startswith(mod + '.'): return {dist}
    return {_canon(d) for d in dists.get(name.split('.')[0], [])}

def _third_party(name): return name.split('.')[0] not in sys.stdlib_module_names and name.split('.')[0] != 'segtutor'

def test_every_runtime_import_is_declared():
    "Each third-party module the runtime package imports (at module level or inside a function) is a requirement or an extra."
    declared, bad = _declared(), []
    for name, f, line, _, _, _ in _runtime_imports():
        if not _third_party(name): continue
        dists = _dist_of(name)
        if not dists: bad.append(f"{f}:{line} imports {name}, which no installed distribution provides")
        elif not dists & declared.keys(): bad.append(f"{f}:{line} imports {name} ({', '.join(sorted(dists))}): not in settings.ini")
    assert not bad, '\n'.join(bad)

def _raises_install_hint(try_node):
    "Whether a try statement handles ImportError by raising an error whose message says what to `pip install`."
    for h in try_node.handlers:
        names = {getattr(t, 'id', None) for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])}
        if names & {'ImportError', 'ModuleNotFoundError'} and 'pip install' in ast.unparse(h): return True
    return False

def test_optional_imports_say_what_to_install():
    "A package that only an extra brings is imported where it is needed, inside try/except that names the pip install."
    declared, bad = _declared(), []
    for name, f, line, in_fn, node, parents in _runtime_imports():
        if not _third_party(name): continue
        extras = {declared[d][1] for d in _dist_of(name) & declared.keys()}
        if not extras or 'requirements' in extras: continue
        mod = 'segtutor.' + '.'.join(f.with_suffix('').parts[1:])
        if OPTIONAL_MODULES.get(mod) in extras: continue
        up = node
        while up in parents and not isinstance(up, ast.Try): up = parents[up]
        if not in_fn: bad.append(f"{f}:{line}: module-level import of {name} (extra {'/'.join(sorted(extras))})")
        elif not (isinstance(up, ast.Try) and _raises_install_hint(up)):
            bad.append(f"{f}:{line}: import of {name} without an ImportError message naming the pip install")
    assert not bad, '\n'.join(bad)

def test_installed_versions_meet_the_requirements():
    "The environment the tests run in lies inside every declared range (so no bound is above what is tested)."
    bad = []
    for dist, (req, where) in _declared().items():
        try: v = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError: continue   # an extra this environment does not have
        if not req.specifier.contains(v, prereleases=True): bad.append(f"{req} ({where}): installed {v}")
    assert not bad, bad

# The lower bounds are the oldest releases with the APIs the code calls (only the newest releases can be installed
# and tested here, and a floor at the tested torch would make pip replace the torch that Colab ships).
API_FLOORS = [  # (regex over the runtime sources, distribution, oldest release that has it, what needs it)
    (r'def transform\(self, inpt', 'torchvision', '0.21', 'v2.Transform subclasses implement the public transform()'),
    (r'def make_params\(self', 'torchvision', '0.21', 'v2.Transform subclasses implement the public make_params()'),
    (r'torch\.amp\.GradScaler', 'torch', '2.3', 'the device-generic torch.amp.GradScaler'),
    (r'(Focal|Tversky)Loss\([^)]*class_weights=', 'segmentation-models-pytorch', '0.6', 'class_weights in smp focal/Tversky losses'),
    (r'torch\.utils\.tensorboard', 'tensorboard', '1.15', 'torch.utils.tensorboard refuses older TensorBoard'),
]

def _floor(dist):
    "The declared lower bound (>=) of a distribution as a Version (0 when it has none or is not declared)."
    from packaging.version import Version
    req = _declared().get(_canon(dist), (None,))[0]
    return max([Version(s.version) for s in (req.specifier if req else []) if s.operator in ('>=', '==', '~=')], default=Version('0'))

def test_lower_bounds_cover_the_apis_used():
    from packaging.version import Version
    src = '\n'.join(p.read_text() for p in (ROOT/'segtutor').rglob('*.py'))
    bad = [f"{dist}>={v} needed ({why}); settings.ini allows {dist}>={_floor(dist)}"
           for rx, dist, v, why in API_FLOORS if re.search(rx, src) and _floor(dist) < Version(v)]
    assert not bad, '\n'.join(bad)
    # torchvision 0.X is built for torch 2.(X-15) alone: the two floors must be a pair that installs together
    tv, th = _floor('torchvision'), _floor('torch')
    assert (th.major, th.minor) >= (2, tv.minor - 15), f"torchvision>={tv} needs torch>=2.{tv.minor - 15}, not torch>={th}"
