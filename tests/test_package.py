"Checks on the installed package that no lesson can make: it imports without nbdev, and its metadata is sound."
import subprocess, sys, configparser
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
    for nb in nbs: assert '#| default_exp ' in (ROOT/'nbs'/nb).read_text(), f"{nb} has no default_exp" 
