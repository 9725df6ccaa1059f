"""The `segtutor` command end to end, as a user runs it: make-data -> train -> evaluate -> predict, and bad input.

Each call is a real subprocess of the installed console script, in a temporary folder.
"""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from clichecks import ok, fails

SEGTUTOR = str(Path(sys.executable).parent/'segtutor')

def run(*args, cwd=None, timeout=600, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != 'SEGTUTOR_DEBUG'}, **(env or {})}
    return subprocess.run([SEGTUTOR, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    "A generated folder dataset, a trained run, and a predict input folder with odd sizes and modes."
    d = tmp_path_factory.mktemp('cli')
    ok(run('make-data', d/'data', '--n', 60, '--size', 64, '--seed', 3))
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
    assert js['miou'] > 0.4, js   # five epochs on 48 tiny images learned something

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
    before = json.loads((work/'run_kill'/'config.json').read_text())
    ok(run('train', '--out', work/'run_kill', '--resume'))   # nothing but the run folder: the rest comes from last.pt
    rows = csv.read_text().strip().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['1', '2', '3', '4'], rows
    ck = torch.load(work/'run_kill'/'last.pt', map_location='cpu', weights_only=True)
    assert ck['epoch'] == 4
    after = json.loads((work/'run_kill'/'config.json').read_text())
    assert {k: after[k] for k in ('data', 'img_size', 'model', 'seed')} == {k: before[k] for k in ('data', 'img_size', 'model', 'seed')}

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

@pytest.mark.parametrize('workers', [0, 2])
def test_corrupt_image_in_training_data(work, workers):
    "The one line names the file and the problem whether the image is read in this process or in a DataLoader worker."
    import shutil
    data = work/f'data_bad_{workers}'
    shutil.copytree(work/'data', data)
    bad = data/'images'/'0005.png'
    bad.write_bytes(bad.read_bytes()[:300])   # truncated: the header reads, the pixels do not
    last = fails(run('train', '--data', data, '--out', work/f'run_bad_{workers}', '--epochs', 1, '--lr', '1e-2',
                     '--img-size', 64, '--workers', workers), '0005.png', 'cannot read image')
    assert 'Caught' not in last and 'worker' not in last, last

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

# ---- flags that do what they say, resume from the saved run, colours for every class ----

def tiny(out, *extra, data='synthetic'):
    "Arguments of a seconds-long training run: a small U-Net, 32-pixel slides, one epoch."
    return ('train', '--data', data, '--out', out, '--n-train', 16, '--n-valid', 4, '--img-size', 32, '--batch-size', 8,
            '--model', 'unet:8:2', '--epochs', 1, '--lr', '1e-2', *extra)

def _folder(d, n, size, n_classes, odd=()):
    "A folder dataset of random images with masks holding every class; images in `odd` are 40x24 instead."
    from segtutor.data import save_mask
    rng = np.random.default_rng(0)
    (d/'images').mkdir(parents=True); (d/'masks').mkdir()
    for i in range(n):
        h, w = (24, 40) if i in odd else (size, size)
        m = (np.arange(w)[None, :]*n_classes//w).repeat(h, 0).astype(np.uint8)   # vertical stripes of every class
        img = (rng.integers(0, 40, (h, w, 3)) + m[..., None]*40).astype(np.uint8)
        Image.fromarray(img).save(d/'images'/f'{i:03d}.png'); save_mask(m, d/'masks'/f'{i:03d}.png')
    return d

@pytest.fixture(scope='module')
def five(tmp_path_factory):
    "One short run on a 5-class folder whose 10th and last validation image has another size, with the new flags."
    from segtutor.data import split_idx
    t = tmp_path_factory.mktemp('five')
    d = _folder(t/'data', 20, 32, 5, odd={split_idx(20, 0.5, 0)[1][-1]})
    r = ok(run(*tiny(t/'run', '--valid-pct', 0.5, '--no-amp', '--grad-clip', 0.5, '--tensorboard', data=d)))
    return d, t/'run', r.stdout

def test_train_help_matches_what_train_does(five):
    "--tensorboard writes where its help says; --no-amp and --grad-clip exist and reach the learner."
    h = ok(run('train', '--help')).stdout
    assert 'RUN_DIR/tensorboard' in h and '--no-amp' in h and '--grad-clip' in h, h
    _, run_dir, _ = five
    cfg = json.loads((run_dir/'config.json').read_text())
    assert cfg['amp'] is False and cfg['grad_clip'] == 0.5, cfg
    assert list((run_dir/'tensorboard').glob('events.out.tfevents.*'))

def test_validation_sizes_checked_on_every_image(five):
    "The first 8 validation images agree, the 10th does not: validation resizes instead of failing to stack them."
    assert 'validation images differ in size (40x24 and 32x32)' in five[2], five[2]

def test_every_class_has_its_own_colour(five):
    "Five classes: the checkpoint stores five distinct colours and predicted palette PNGs use them (none black but 0)."
    d, run_dir, _ = five
    pal = json.loads((run_dir/'config.json').read_text())['palette']
    assert len(pal) == 5 and len({tuple(c) for c in pal}) == 5 and all(max(c) > 100 for c in pal[1:]), pal
    ok(run('predict', '--ckpt', run_dir/'best.pt', '--input', d/'images'/'000.png', '--out', run_dir.parent/'pred'))
    png = np.array(Image.open(run_dir.parent/'pred'/'000.png').getpalette()[:15]).reshape(5, 3)
    assert png.tolist() == pal, (png.tolist(), pal)

def test_tensorboard_missing_is_one_line(tmp_path):
    "Without the optional tensorboard package, --tensorboard says what to install before any work starts."
    argv = [str(x) for x in tiny(tmp_path/'r', '--tensorboard')]
    code = f"import sys; sys.modules['tensorboard'] = None; from segtutor.cli import main; sys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=tmp_path)  # not the repo root on sys.path
    fails(r, '--tensorboard', "segtutor[tensorboard]")
    assert not (tmp_path/'r').exists()

def test_divergence_advice_names_the_flags(tmp_path):
    last = fails(run(*tiny(tmp_path/'r', '--lr', '1e3', '--scheduler', 'constant')), 'training diverged', '--grad-clip 1.0', '--lr ')
    assert 'grad_clip=' not in last and 'SEGTUTOR_DEBUG' not in last, last

def test_tile_not_larger_than_the_overlap(work):
    fails(run('predict', '--ckpt', work/'run'/'best.pt', '--input', work/'inputs', '--out', work/'p_tile', '--tile', 32),
          '--tile 32', 'overlap')
    assert not (work/'p_tile').exists()

def test_resume_refuses_flags_that_contradict_the_run(work):
    "A different --seed or --valid-pct would silently change the validation split of the run being resumed."
    rows = (work/'run'/'metrics.csv').read_text()
    fails(run('train', '--data', work/'data', '--out', work/'run', '--resume', '--seed', 1, '--valid-pct', 0.5),
          'last.pt', '--seed 1, --valid-pct 0.5', '(--seed 0, --valid-pct 0.2)')
    r = ok(run('train', '--out', work/'run', '--resume', '--data', work/'data', '--workers', 0))   # same data, another worker count
    assert 'nothing to resume' in r.stdout and (work/'run'/'metrics.csv').read_text() == rows, r.stdout

def test_resume_after_early_stop_does_not_train_on(tmp_path):
    "A run stopped by --patience is over: resuming it trains nothing (lr 0 and a frozen body give equal mIoUs)."
    args = tiny(tmp_path/'r', '--epochs', 4, '--patience', 1, '--lr', 0, '--scheduler', 'constant',
                '--freeze-encoder', '--freeze-decoder')
    ok(run(*args))
    csv = tmp_path/'r'/'metrics.csv'
    assert len(csv.read_text().strip().splitlines()) == 1 + 2   # epoch 2 was no better: stopped
    r = ok(run('train', '--out', tmp_path/'r', '--resume'))
    assert 'stopped early' in r.stdout and len(csv.read_text().strip().splitlines()) == 1 + 2, r.stdout

def test_pretrained_segnet_gets_imagenet_normalisation(tmp_path):
    "SegNet with --weights imagenet normalises as its ImageNet encoder expects, as get_model says (one rule)."
    from torchvision.models import VGG16_BN_Weights, vgg
    feats = vgg.make_layers(vgg.cfgs['D'], batch_norm=True)      # the encoder layers of vgg16_bn, random: offline
    ck = Path(tmp_path/'torch'/'hub'/'checkpoints'); ck.mkdir(parents=True)
    torch.save({f'features.{k}': v for k, v in feats.state_dict().items()}, ck/Path(VGG16_BN_Weights.IMAGENET1K_V1.url).name)
    env = {'TORCH_HOME': str(tmp_path/'torch')}
    ok(run(*tiny(tmp_path/'r', '--model', 'segnet', '--weights', 'imagenet', '--batch-size', 4), env=env))
    assert json.loads((tmp_path/'r'/'config.json').read_text())['norm'] == 'imagenet'

def test_every_subcommand_has_help():
    for cmd in ('demo', 'make-data', 'train', 'lr-find', 'evaluate', 'predict', 'bench'):
        r = ok(run(cmd, '--help'))
        assert 'usage: segtutor ' + cmd in r.stdout

def test_quick_demo_writes_report_and_metrics(tmp_path):
    r = ok(run('demo', '--out', tmp_path/'demo', '--epochs', 1, '--n-train', 32, '--n-valid', 8, '--img-size', 48, '--num-it', 12))
    out = tmp_path/'demo'
    js = json.loads((out/'metrics.json').read_text())
    assert {'pixel_accuracy', 'miou', 'per_class_iou', 'dice'} <= set(js) and 0 <= js['miou'] <= 1
    assert js['n_images'] == 8   # --n-valid
    html = (out/'report.html').read_text()
    assert html.count('<img src="data:image/png;base64,') == 4 and f"{js['miou']:.4f}" in html
    assert '**' not in html and '<td><b>mean</b></td>' in html   # markdown bold in the table becomes HTML bold
    assert len(list((out/'predictions').glob('*.png'))) == 6
    dj = json.loads((out/'demo.json').read_text())   # what the README's demo paragraph is rendered from
    assert dj['miou'] == js['miou'] and dj['seconds'] > 0 and dj['epochs'] == 1 and set(dj['per_class_iou']) == {'background', 'rbc', 'spirochete'}, dj

def test_evaluate_a_checkpoint_the_library_trained(tmp_path):
    "A Learner records img_size as the first batch's [H, W]; evaluate on synthetic data reads it (it once crashed on a list)."
    from segtutor.models import get_model
    from segtutor.checkpoint import save_checkpoint
    m = get_model('unet:8:2', 3)
    cfg = dict(model='unet:8:2', model_kwargs=m.spec_kwargs, n_classes=3, classes=['background', 'rbc', 'spirochete'],
               norm='per_image', img_size=[32, 32])
    save_checkpoint(tmp_path/'lib.pt', dict(model=m.state_dict(), config=cfg))
    ok(run('evaluate', '--ckpt', tmp_path/'lib.pt', '--data', 'synthetic', '--json', tmp_path/'m.json'))
    assert json.loads((tmp_path/'m.json').read_text())['n_images'] == 64
