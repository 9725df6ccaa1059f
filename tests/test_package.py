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
