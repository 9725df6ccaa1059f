"""`segtutor count`, `segtutor export`, `make-data --scale` and tiled `predict`: the files they write and their bad input.

The main paths run as real subprocesses of the installed console script; the bad-input cases call `segtutor.cli.main`
in this process (the same code, without paying for a fresh `import torch` each time) and read what it printed. The
checkpoints are written directly with `segtutor.checkpoint.save_checkpoint` (a small random U-Net): what is tested
is the files, not how well it counts.
"""
import csv, importlib.util, json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from clichecks import ok, fails

SEGTUTOR = str(Path(sys.executable).parent/'segtutor')
CLASSES = ['background', 'rbc', 'spirochete']

def run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != 'SEGTUTOR_DEBUG'}
    return subprocess.run([SEGTUTOR, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)

class Result:
    "What `main` returned and printed, shaped like a `subprocess.run` result."
    def __init__(self, rc, out, err): self.returncode, self.stdout, self.stderr = rc, out, err

def cli(capsys, *args):
    "`segtutor ARGS` through `segtutor.cli.main` in this process (argparse errors exit with status 2)."
    from segtutor.cli import main
    capsys.readouterr()
    try: rc = main([str(a) for a in args])
    except SystemExit as e: rc = e.code
    out, err = capsys.readouterr()
    return Result(rc, out, err)


def checkpoint(fn, spec='unet:8:2', classes=CLASSES):
    "A segtutor checkpoint of a random `spec` model, with the config `train` would write."
    from segtutor.checkpoint import save_checkpoint
    from segtutor.models import get_model
    torch.manual_seed(0)
    m = get_model(spec, len(classes))
    cfg = dict(model=spec, model_kwargs=getattr(m, 'spec_kwargs', {}), n_classes=len(classes), classes=classes,
               norm='per_image', data='synthetic', palette=[[0, 0, 0], [230, 60, 60], [60, 200, 255]][:len(classes)])
    return save_checkpoint(fn, dict(model=m.state_dict(), config=cfg, epoch=1, epochs=1))

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    "Large generated slides (make-data --scale) and checkpoints: three classes, background only, binary."
    from segtutor.cli import main
    d = tmp_path_factory.mktemp('count')
    assert main(['make-data', str(d/'data'), '--n', '3', '--size', '160', '--scale', '64', '--seed', '5']) == 0
    checkpoint(d/'three.pt'); checkpoint(d/'bg.pt', classes=['background'])
    checkpoint(d/'binary.pt', classes=['background', 'object'])
    return d

def test_make_data_scale_tiles_large_slides_from_fields(work):
    from segtutor.predict import darkfield_mosaic
    ims = sorted((work/'data'/'images').glob('*.png'))
    assert len(ims) == 3 and json.loads((work/'data'/'classes.json').read_text()) == CLASSES
    img, mask = darkfield_mosaic(5, 160, 64)                     # slide 0 is the mosaic of seed 5
    assert np.array_equal(np.asarray(Image.open(ims[0])), img)
    assert np.array_equal(np.asarray(Image.open(work/'data'/'masks'/ims[0].name)), mask)

def test_count_writes_csv_labels_and_outlines(work):
    out = work/'counted'
    r = ok(run('count', '--ckpt', work/'three.pt', '--input', work/'data'/'images', '--out', out,
               '--tile', 96, '--overlap', 0.25, '--blend', 'constant', '--min-size', 3))
    assert 'counted 3 images' in r.stdout, r.stdout
    rows = list(csv.DictReader(open(out/'counts.csv')))
    assert list(rows[0]) == ['image', 'class', 'count', 'mean_area']
    assert [(r['image'], r['class']) for r in rows] == [(f'{i:04d}.png', c) for i in range(3) for c in CLASSES[1:]]
    for i in range(3):
        lab = Image.open(out/f'{i:04d}_labels.png')
        assert lab.mode == 'I;16' and lab.size == (160, 160)         # 16-bit instance labels of the input's size
        ids = np.unique(np.asarray(lab)); ids = ids[ids > 0]
        n = sum(int(r['count']) for r in rows if r['image'] == f'{i:04d}.png')
        assert len(ids) == n and (n == 0 or ids.max() == n), (ids, n)   # objects numbered 1..n, as the CSV counts them
        ov = Image.open(out/f'{i:04d}_outlines.png'); assert ov.mode == 'RGB' and ov.size == (160, 160)
    assert not [p for p in out.iterdir() if p.name.startswith('.')]   # no staging folder left behind

def test_count_a_binary_model(work, capsys):
    "A two-class (object vs background) model has one foreground class: it counts that."
    ok(cli(capsys, 'count', '--ckpt', work/'binary.pt', '--input', work/'data'/'images'/'0001.png', '--out', work/'bin'))
    assert [r['class'] for r in csv.DictReader(open(work/'bin'/'counts.csv'))] == ['object']

@pytest.mark.parametrize('fmt', ['onnx', 'pt2'])
def test_export_parity(work, fmt):
    "The exported file matches the checkpoint's model at a shape used neither for export nor for its own check."
    if fmt == 'onnx': pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install segtutor[export])')
    from segtutor.checkpoint import load_model
    from segtutor.export import load_exported
    out = work/'exp'/f'model.{fmt}'
    r = ok(run('export', '--ckpt', work/'three.pt', '--format', fmt, '--out', out))
    assert f'wrote {out}' in r.stdout and 'max |Δ|' in r.stdout, r.stdout
    model, _ = load_model(work/'three.pt')
    x = torch.randn(2, 3, 45, 70, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): diff = (load_exported(out)(x) - model(x)).abs().max().item()
    assert diff <= 1e-4, diff

def test_count_refuses_a_model_with_nothing_to_count(work):
    fails(run('count', '--ckpt', work/'bg.pt', '--input', work/'data'/'images', '--out', work/'c_bg'),
          'bg.pt', 'nothing to count', 'no foreground class')
    assert not (work/'c_bg').exists()

def test_count_unknown_method(work, capsys):
    fails(cli(capsys, 'count', '--ckpt', work/'three.pt', '--input', work/'data'/'images', '--out', work/'c_m', '--method', 'blob'),
          '--method', "invalid choice: 'blob'")
    assert not (work/'c_m').exists()

def test_tile_smaller_than_the_models_multiple(work, capsys):
    fails(cli(capsys, 'predict', '--ckpt', work/'three.pt', '--input', work/'data'/'images', '--out', work/'p_small', '--tile', 2,
              '--overlap', 0), '--tile 2', "smaller than the model's multiple 4")
    assert not (work/'p_small').exists()

def test_overlap_not_smaller_than_the_tile(work, capsys):
    fails(cli(capsys, 'count', '--ckpt', work/'three.pt', '--input', work/'data'/'images', '--out', work/'c_ov', '--tile', 64,
              '--overlap', 64), '--tile 64', 'larger than the 64-pixel overlap')
    assert not (work/'c_ov').exists()

def test_export_format_it_cannot_do(work, capsys):
    fails(cli(capsys, 'export', '--ckpt', work/'three.pt', '--format', 'tflite', '--out', work/'e1'/'m.tflite'),
          '--format tflite', 'onnx or pt2')
    assert not (work/'e1').exists()

def test_export_of_a_file_that_is_not_a_checkpoint(work, capsys):
    (work/'junk.pt').write_bytes(b'not a checkpoint')
    fails(cli(capsys, 'export', '--ckpt', work/'junk.pt', '--out', work/'e2'/'m.pt2'), 'junk.pt')
    assert not (work/'e2').exists()

def test_export_without_onnxruntime(work, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda n, *a: None if n == 'onnxruntime' else real(n, *a))
    fails(cli(capsys, 'export', '--ckpt', work/'three.pt', '--out', work/'e3'/'m.onnx'), 'onnxruntime', "pip install 'segtutor[export]'")
    assert not (work/'e3').exists()

def test_export_with_a_torch_too_old(work, capsys, monkeypatch):
    monkeypatch.setattr(torch, '__version__', '2.5.1')
    fails(cli(capsys, 'export', '--ckpt', work/'three.pt', '--out', work/'e4'/'m.pt2'), 'needs torch 2.8 or newer', 'this is torch 2.5.1')
    assert not (work/'e4').exists()

def test_demo_report_gets_predicted_and_true_counts(tmp_path):
    "The demo's counts section, on its prediction slides, with the generator's true objects."
    from segtutor.checkpoint import load_model
    from segtutor.cli import _counts_section
    from segtutor.data import make_darkfield
    from segtutor.instances import count_instances
    inp = tmp_path/'inputs'; inp.mkdir()
    sizes = [(128, 128), (97, 130)]
    for i, (h, w) in enumerate(sizes): Image.fromarray(make_darkfield(900_000+i, max(h, w))[0][:h, :w]).save(inp/f'slide{i}.png')
    (tmp_path/'report.md').write_text('# report\n'); (tmp_path/'report.html').write_text('<html><body></body></html>')
    model, cfg = load_model(checkpoint(tmp_path/'m.pt'))
    table = _counts_section(model, cfg['norm'], cfg['classes'], inp, tmp_path)
    true = {c: 0 for c in CLASSES[1:]}
    for i, (h, w) in enumerate(sizes):
        _, m, inst = make_darkfield(900_000+i, max(h, w), instances=True)
        for c, n in count_instances(inst[:h, :w], m[:h, :w], CLASSES).items(): true[c] += n
    js = json.loads((tmp_path/'counts.json').read_text())
    assert {c: v['true'] for c, v in js.items()} == true and all(v > 0 for v in true.values()), js
    rows = list(csv.DictReader(open(tmp_path/'counts'/'counts.csv')))
    assert {c: v['predicted'] for c, v in js.items()} == {c: sum(int(r['count']) for r in rows if r['class'] == c) for c in true}
    assert '| rbc |' in table and '| rbc |' in (tmp_path/'report.md').read_text()
    assert '<h2>Object counts</h2>' in (tmp_path/'report.html').read_text()
