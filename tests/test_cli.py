"""The `segtutor` command end to end, as a user runs it: make-data -> train -> evaluate -> predict, and bad input.

Each call is a real subprocess of the installed console script, in a temporary folder.
"""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

SEGTUTOR = str(Path(sys.executable).parent/'segtutor')

def run(*args, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != 'SEGTUTOR_DEBUG'}
    return subprocess.run([SEGTUTOR, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)

def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r

def fails(r, *needles):
    "Non-zero exit, one clear line on stderr mentioning every needle, no traceback."
    assert r.returncode != 0, r.stdout
    err = r.stderr.strip()
    assert 'Traceback' not in err, err
    last = err.splitlines()[-1]
    for n in needles: assert str(n) in last, f"{n!r} not in {last!r}"
    return last

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    "A generated folder dataset, a trained run, and a predict input folder with odd sizes and modes."
    d = tmp_path_factory.mktemp('cli')
    ok(run('make-data', d/'data', '--n', 80, '--size', 64, '--seed', 3))
    ok(run('train', '--data', d/'data', '--out', d/'run', '--epochs', 5, '--lr', '1e-2', '--img-size', 64,
           '--batch-size', 8, '--model', 'unet:16:3'))
    inp = d/'inputs'; inp.mkdir()
    from segtutor.data import make_darkfield
    for i, (h, w) in enumerate([(64, 64), (97, 130), (33, 47)]):
        Image.fromarray(make_darkfield(70+i, max(h, w))[0][:h, :w]).save(inp/f'img{i}.png')
    Image.fromarray(make_darkfield(80, 50)[0]).convert('L').save(inp/'grey.jpg')
    Image.fromarray(np.dstack([make_darkfield(81, 40)[0], np.full((40, 40), 200, np.uint8)])).save(inp/'rgba.png')
    return d

def test_train_writes_the_run_folder(work):
    run_dir = work/'run'
    for f in ('best.pt', 'last.pt', 'config.json', 'metrics.csv'): assert (run_dir/f).exists(), f
    cfg = json.loads((run_dir/'config.json').read_text())
    assert cfg['model'] == 'unet:16:3' and cfg['n_classes'] == 3 and cfg['classes'] == ['background', 'rbc', 'spirochete']
    ck = torch.load(run_dir/'best.pt', map_location='cpu', weights_only=True)   # loads with weights_only
    assert ck['config']['norm'] == 'per_image'
    lines = (run_dir/'metrics.csv').read_text().strip().splitlines()
    assert len(lines) == 1 + 5, lines

def test_predict_writes_index_pngs_of_the_input_sizes(work):
    ok(run('predict', '--ckpt', work/'run'/'best.pt', '--input', work/'inputs', '--out', work/'pred'))
    ins = sorted((work/'inputs').iterdir())
    assert len(ins) == 5
    for f in ins:
        m = Image.open(work/'pred'/f'{f.stem}.png')
        assert m.mode == 'P' and m.size == Image.open(f).size, (f.name, m.mode, m.size)
        assert set(np.unique(np.array(m))) <= {0, 1, 2}
        assert (work/'pred'/'overlays'/f'{f.stem}.jpg').exists()
    assert not list((work/'pred').glob('.*tmp*')), "temporary files left behind"

def _miou_from_pngs(pred_dir, mask_dir, n):
    "mIoU from predicted PNGs and true masks, counted with numpy alone (independent of segtutor.metrics)."
    cm = np.zeros((n, n), np.int64)
    for fm in sorted(Path(mask_dir).glob('*.png')):
        t, p = np.array(Image.open(fm)).astype(np.int64), np.array(Image.open(Path(pred_dir)/fm.name)).astype(np.int64)
        assert t.shape == p.shape
        k = t != 255
        cm += np.bincount(t[k]*n + p[k], minlength=n*n).reshape(n, n)
    tp = np.diag(cm); union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp/np.maximum(union, 1), np.nan)
    return np.nanmean(iou), iou

def test_evaluate_json_matches_predicted_pngs(work):
    ok(run('evaluate', '--ckpt', work/'run'/'best.pt', '--data', work/'data', '--json', work/'eval.json'))
    js = json.loads((work/'eval.json').read_text())
    assert {'pixel_accuracy', 'miou', 'per_class_iou', 'dice'} <= set(js)
    ok(run('predict', '--ckpt', work/'run'/'best.pt', '--input', work/'data'/'images', '--out', work/'pred_all', '--no-overlays'))
    miou, iou = _miou_from_pngs(work/'pred_all', work/'data'/'masks', 3)
    assert abs(js['miou'] - miou) < 1e-6, (js['miou'], miou)
    np.testing.assert_allclose([v if v is not None else np.nan for v in js['per_class_iou']], iou, atol=1e-6)
    assert js['miou'] > 0.4, js   # five epochs on 64 tiny images learned something

def test_killed_run_resumes(work):
    "Kill a training run after its first epoch, resume it: every planned epoch appears once and the checkpoint loads."
    import signal, time
    args = ['train', '--data', work/'data', '--out', work/'run_kill', '--epochs', 4, '--lr', '1e-2', '--img-size', 64, '--batch-size', 8]
    p = subprocess.Popen([SEGTUTOR, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv, t0 = work/'run_kill'/'metrics.csv', time.time()
    while time.time() - t0 < 300 and p.poll() is None:
        if csv.exists() and len(csv.read_text().strip().splitlines()) >= 2: break
        time.sleep(0.2)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL); p.wait()
    done = len(csv.read_text().strip().splitlines()) - 1
    assert 1 <= done < 4
    ok(run(*args, '--resume'))
    rows = csv.read_text().strip().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['1', '2', '3', '4'], rows
    ck = torch.load(work/'run_kill'/'last.pt', map_location='cpu', weights_only=True)
    assert ck['epoch'] == 4

# ---- bad input: one line, the file and the problem, non-zero exit, nothing that looks complete ----

def test_missing_checkpoint(work):
    fails(run('evaluate', '--ckpt', work/'nope.pt', '--data', work/'data'), 'nope.pt')

def test_corrupt_checkpoint(work):
    (work/'corrupt.pt').write_bytes(os.urandom(2000))
    fails(run('predict', '--ckpt', work/'corrupt.pt', '--input', work/'inputs', '--out', work/'p_corrupt'), 'corrupt.pt')
    assert not (work/'p_corrupt').exists()

def test_checkpoint_that_is_not_segtutors(work):
    torch.save({'state_dict': {'w': torch.zeros(2)}}, work/'foreign.pt')
    fails(run('evaluate', '--ckpt', work/'foreign.pt', '--data', work/'data'), 'foreign.pt', 'segtutor')

def test_corrupt_image_in_predict_input(work):
    bad = work/'bad_inputs'; bad.mkdir()
    Image.open(work/'inputs'/'img0.png').save(bad/'good.png'); (bad/'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    fails(run('predict', '--ckpt', work/'run'/'best.pt', '--input', bad, '--out', work/'p_bad'), 'broken.png')
    assert not (work/'p_bad'/'good.png').exists(), "a partial prediction was left behind"

def test_corrupt_image_in_training_data(work):
    import shutil
    shutil.copytree(work/'data', work/'data_bad')
    (work/'data_bad'/'images'/'0005.png').write_bytes(b'not an image')
    fails(run('train', '--data', work/'data_bad', '--out', work/'run_bad', '--epochs', 1, '--lr', '1e-2', '--img-size', 64), '0005.png')

def test_unknown_model_spec(work):
    fails(run('train', '--data', work/'data', '--out', work/'run_spec', '--model', 'smp:NoSuchArch:resnet18', '--lr', '1e-3'), 'NoSuchArch')
    assert not (work/'run_spec'/'best.pt').exists()

def test_wrong_num_classes(work):
    fails(run('train', '--data', work/'data', '--out', work/'run_nc', '--num-classes', 2, '--lr', '1e-3'), 'outside the 2 declared classes')
    assert not (work/'run_nc').exists()

def test_unwritable_output_folder(work):
    (work/'a_file').write_text('x')
    fails(run('predict', '--ckpt', work/'run'/'best.pt', '--input', work/'inputs', '--out', work/'a_file'/'out'), 'a_file')
    fails(run('train', '--data', work/'data', '--out', work/'a_file', '--lr', '1e-3'), 'a_file')

def test_missing_data_folder(work):
    fails(run('train', '--data', work/'nowhere', '--out', work/'r_nowhere'), 'nowhere')

def test_every_subcommand_has_help():
    for cmd in ('demo', 'make-data', 'train', 'lr-find', 'evaluate', 'predict', 'bench'):
        r = ok(run(cmd, '--help'))
        assert 'usage: segtutor ' + cmd in r.stdout

def test_quick_demo_writes_report_and_metrics(tmp_path):
    r = ok(run('demo', '--out', tmp_path/'demo', '--epochs', 1, '--n-train', 48, '--img-size', 64, '--num-it', 20))
    out = tmp_path/'demo'
    js = json.loads((out/'metrics.json').read_text())
    assert {'pixel_accuracy', 'miou', 'per_class_iou', 'dice'} <= set(js) and 0 <= js['miou'] <= 1
    html = (out/'report.html').read_text()
    assert html.count('<img src="data:image/png;base64,') == 4 and f"{js['miou']:.4f}" in html
    assert len(list((out/'predictions').glob('*.png'))) == 6
