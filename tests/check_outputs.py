"""Check that every lesson's stored outputs are fresh and come from a full-settings run (`make check-outputs`).

One line per problem, then exit status 1:
- a lesson (every numbered notebook in nbs/) with no stored outputs;
- outputs from a quick (IN_TEST) run, or no full-run record (`metadata.segtutor`, written by tests/run_lessons.py);
- a code cell whose source changed after its outputs were produced (its recorded hash differs), a non-empty code
  cell with no recorded hash (added after the run; `#| eval: false` cells are exempt), outputs that differ from the
  ones the run stored (the cell was re-run or edited elsewhere), cells removed or reordered since the run.
The fix for each is `make lessons ONLY="..."` (printed at the end). Reads JSON only: it takes well under a second.
"""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_lessons import ROOT, KEY, lesson_paths, executes, src_hash, out_hash, cells_hash, _cell_desc

def problems(path):
    "The problems of one notebook, one line each (empty: its outputs are fresh)."
    name = f"{Path(path).parent.name}/{Path(path).name}"
    try: nb = json.loads(Path(path).read_text(encoding='utf-8'))
    except (OSError, ValueError) as e: return [f"{name}: cannot be read as a notebook: {e}"]
    code = [(i, c) for i, c in enumerate(nb.get('cells', [])) if c.get('cell_type') == 'code']
    if not any(c.get('outputs') for _, c in code): return [f"{name}: no stored outputs (the lesson was never executed)"]
    rec = nb.get('metadata', {}).get(KEY)
    if not isinstance(rec, dict) or 'run' not in rec:
        return [f"{name}: no full-run record (metadata.{KEY}): its outputs were not produced by `make lessons`"]
    res = []
    if rec['run'] != 'full':
        res.append(f"{name}: outputs come from a {rec['run']} (IN_TEST) run, not from a full-settings run")
    hashes = []
    for i, c in code:
        meta = c.get('metadata', {}).get(KEY) or {}
        if not executes(c):
            if c.get('outputs'): res.append(f"{name}: {_cell_desc(nb, i)} is not executed (`#| eval: false`) but has outputs")
            continue
        if 'src' not in meta:
            res.append(f"{name}: {_cell_desc(nb, i)} has no recorded source hash (added or un-flagged after the run)")
            continue
        hashes.append(meta['src'])
        if meta['src'] != src_hash(c):
            res.append(f"{name}: {_cell_desc(nb, i)} was edited after its outputs were produced")
        elif meta.get('out') != out_hash(c):
            res.append(f"{name}: {_cell_desc(nb, i)} has outputs that differ from the run's (re-run or edited elsewhere)")
    if not res and rec.get('cells') != cells_hash(hashes):
        res.append(f"{name}: code cells were removed or reordered after the run")
    return res

def check(paths=None):
    "All problems of `paths` (default: every lesson)."
    paths = lesson_paths() if paths is None else paths
    return [p for path in paths for p in problems(path)]

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in argv] or lesson_paths()
    if not paths: sys.exit(f"check-outputs: no lessons found in {ROOT/'nbs'}")
    found = check(paths)
    for line in found: print(line)
    if found:
        stale = sorted({line.split(':')[0].split('/')[-1].removesuffix('.ipynb') for line in found})
        sys.exit(f"check-outputs: {len(found)} problem{'s' * (len(found) != 1)} in {len(stale)} of {len(paths)} lessons; "
                 f"re-run them at full settings: make lessons ONLY=\"{' '.join(stale)}\"")
    print(f"check-outputs: the stored outputs of all {len(paths)} lessons are fresh and come from full-settings runs")

if __name__ == '__main__': main()
