"""segtutor on PyTorch Lightning (lesson 18): `segtutor train --engine lightning` against the default engine, a killed
run resumed, DDP on two CPU processes (gloo, 127.0.0.1 only), and the one-line errors.

Run alone with `pytest tests/test_lightning.py` (or `pytest -m lightning`). The DDP test launches this file as a
script: `python tests/test_lightning.py OUT`; Lightning (`strategy='ddp'`, `devices=2`) starts the second process
itself by running the same command line again, and each rank writes its final weights and metrics to OUT.

How the two engines are made comparable: the same command line (same synthetic slides, model, loss, one-cycle
schedule, learning rate, batch size and seed, so the same initial weights), no augmentation (`--aug none`), and the
CPU. What remains is the order of the batches: both engines shuffle with the loader's generator, seeded alike, but
draw from it a different number of times per epoch (the `Learner`'s `tqdm.auto` bar opens the loader once more than
the loop does, and a loop run to the loader's end makes `RandomSampler` draw one permutation more, which Lightning,
stopping at the counted last batch, never asks for), so the two runs see different orders. Lesson 18 shows that with
a fixed order they agree to the last bit.
"""
import contextlib, csv, io, json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.lightning
ROOT = Path(__file__).resolve().parent.parent
SEGTUTOR = str(Path(sys.executable).parent/'segtutor')
RECIPE = ['--data', 'synthetic', '--n-train', '64', '--n-valid', '64', '--img-size', '64', '--model', 'unet:8:3',
          '--epochs', '5', '--lr', '1e-2', '--batch-size', '8', '--aug', 'none', '--device', 'cpu', '--seed', '0']


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ('SEGTUTOR_DEBUG', 'IN_TEST')}
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **kw)
    return env

def run(*args, timeout=300):
    return subprocess.run([SEGTUTOR, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)

def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r

def cli(*args):
    "`segtutor ARGS` in this process (quicker than a new one for checks that fail before training): (status, stderr)."
    from segtutor.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()): rc = main(list(map(str, args)))
    return subprocess.CompletedProcess(args, rc, '', err.getvalue())

def fails(r, *needles):
    "Exit status 2, one clear line on stderr mentioning every needle, no traceback."
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    err = r.stderr.strip()
    assert 'Traceback' not in err and len(err.splitlines()) == 1, err
    for n in needles: assert str(n) in err, f"{n!r} not in {err!r}"
    return err

def rows(run_dir): return list(csv.DictReader(open(Path(run_dir)/'metrics.csv')))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "The same recipe trained by both engines."
    d = tmp_path_factory.mktemp('engines')
    for engine in ('segtutor', 'lightning'): ok(run('train', *RECIPE, '--out', d/engine, '--engine', engine))
    return d


def test_both_engines_reach_the_same_miou(runs):
    seg, lit = rows(runs/'segtutor'), rows(runs/'lightning')
    assert len(seg) == len(lit) == 5 and list(seg[0]) == list(lit[0])
    best_seg, best_lit = (max(float(r['miou']) for r in rs) for rs in (seg, lit))
    print(f"best validation mIoU: segtutor {best_seg:.4f}, lightning {best_lit:.4f}, difference {abs(best_seg - best_lit):.4f}")
    assert best_seg > 0.4 and best_lit > 0.4, (best_seg, best_lit)          # both learned
    assert abs(best_seg - best_lit) < 0.03, (best_seg, best_lit)
    assert float(lit[-1]['train_loss']) < float(lit[0]['train_loss'])
    for a, b in zip(seg, lit): assert float(a['lr']) == pytest.approx(float(b['lr']), rel=1e-9)   # the same one-cycle


def test_lightning_run_folder_is_segtutors(runs):
    d = runs/'lightning'
    assert sorted(p.name for p in d.iterdir()) == ['best.pt', 'config.json', 'last.pt', 'loss.png', 'metrics.csv', 'miou.png']
    cfg = json.loads((d/'config.json').read_text())
    assert (cfg['engine'], cfg['model'], cfg['n_classes'], cfg['world_size'], cfg['precision']) == ('lightning', 'unet:8:3', 3, 1, '32-true')
    for f in ('best.pt', 'last.pt'):
        ck = torch.load(d/f, map_location='cpu', weights_only=True)
        assert ck['format'] == 'segtutor-checkpoint' and ck['config']['model'] == 'unet:8:3' and 'lightning' in ck
    assert torch.load(d/'last.pt', weights_only=True)['epoch'] == 5


def test_lightning_best_evaluates(runs, tmp_path):
    "`segtutor evaluate` on the Lightning run's best.pt scores the best validation mIoU (same 64 synthetic slides)."
    ok(cli('evaluate', '--ckpt', runs/'lightning'/'best.pt', '--data', 'synthetic', '--json', tmp_path/'m.json', '--device', 'cpu'))
    m = json.loads((tmp_path/'m.json').read_text())
    assert m['miou'] == pytest.approx(max(float(r['miou']) for r in rows(runs/'lightning')), abs=1e-4)
    from PIL import Image
    from segtutor.data import make_darkfield
    Image.fromarray(make_darkfield(7, 80)[0][:80, :72]).save(tmp_path/'slide.png')
    ok(cli('predict', '--ckpt', runs/'lightning'/'best.pt', '--input', tmp_path/'slide.png', '--out', tmp_path/'pred', '--device', 'cpu'))
    assert Image.open(tmp_path/'pred'/'slide.png').size == (72, 80)


def test_killed_lightning_run_resumes_exactly(runs, tmp_path):
    "SIGKILL a Lightning run after its second epoch, `--resume` it: the history equals the uninterrupted run's."
    out = tmp_path/'killed'
    p = subprocess.Popen([SEGTUTOR, 'train', *RECIPE, '--out', str(out), '--engine', 'lightning'], env=_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 240 and p.poll() is None:
        if (out/'metrics.csv').exists() and len(rows(out)) >= 2: break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL); p.wait()
    done = torch.load(out/'last.pt', weights_only=True)['epoch']
    assert 2 <= done < 5, done
    ok(run('train', *RECIPE, '--out', out, '--engine', 'lightning', '--resume'))
    drop = lambda rs: [{k: v for k, v in r.items() if k != 'time'} for r in rs]
    assert drop(rows(out)) == drop(rows(runs/'lightning'))
    a, b = (torch.load(d/'last.pt', weights_only=True)['model'] for d in (out, runs/'lightning'))
    for k in a: assert torch.equal(a[k], b[k]), k


def test_resuming_the_other_engines_run_is_one_line(runs):
    fails(cli('train', *RECIPE, '--out', runs/'segtutor', '--engine', 'lightning', '--resume'), 'last.pt', '--engine segtutor')


def test_lightning_checkpoint_where_segtutor_one_is_expected(tmp_path):
    "A `.ckpt` from Lightning's own ModelCheckpoint, given to `segtutor evaluate` and `predict`: one line each."
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from segtutor.augment import darkfield_dls
    from segtutor.models import get_model
    from segtutor.lightning import SegModule, lightning_quiet
    torch.manual_seed(0)
    dls = darkfield_dls(n_train=8, n_valid=4, size=32, bs=4)
    with lightning_quiet():
        trainer = L.Trainer(max_epochs=1, accelerator='cpu', devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=tmp_path)], num_sanity_val_steps=0)
        trainer.fit(SegModule(get_model('unet:8:2', 3), 'ce', lr=1e-2), dls.train, dls.valid)
    ckpt = next(tmp_path.glob('*.ckpt'))
    fails(run('evaluate', '--ckpt', ckpt, '--data', 'synthetic'), ckpt.name, 'a PyTorch Lightning checkpoint', 'best.pt')
    fails(cli('predict', '--ckpt', ckpt, '--input', tmp_path, '--out', tmp_path/'p'),
          ckpt.name, 'a PyTorch Lightning checkpoint')


def test_engine_lightning_without_lightning_is_one_line(tmp_path):
    "Lightning made unimportable (None in sys.modules): the command says what to install, and writes nothing."
    code = ("import sys; sys.modules['lightning'] = None\n"
            "try: import segtutor.lightning\nexcept ImportError as e: print(e)\n"
            "from segtutor.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, '-c', code, 'train', '--engine', 'lightning', '--out', str(tmp_path/'r'), '--device', 'cpu'],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    fails(r, "segtutor train: error: --engine lightning: segtutor[lightning] is needed: pip install 'segtutor[lightning]'")
    assert r.stdout.startswith("segtutor[lightning] is needed: pip install 'segtutor[lightning]'"), r.stdout   # the module itself
    assert not (tmp_path/'r').exists()


def test_bad_devices_strategy_and_nodes_are_one_line(tmp_path):
    fails(run('train', '--engine', 'lightning', '--device', 'cpu', '--devices', '999', '--out', tmp_path/'a'), '--devices 999', 'CPU core')
    fails(cli('train', '--engine', 'lightning', '--device', 'cpu', '--strategy', 'warp', '--out', tmp_path/'b'), "--strategy 'warp'")
    fails(cli('train', '--engine', 'lightning', '--device', 'cpu', '--num-nodes', '2', '--out', tmp_path/'c'), '--num-nodes 2', 'torchrun')
    assert not any((tmp_path/n).exists() for n in 'abc')


def test_cli_import_stays_light():
    "`segtutor --help` must answer at once: importing the CLI imports neither torch nor Lightning."
    r = subprocess.run([sys.executable, '-c', "import sys, segtutor.cli; print(sorted({'torch', 'lightning'} & set(sys.modules)))"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == '[]', (r.stdout, r.stderr)


# --- DDP: two CPU processes that Lightning starts itself -------------------------------------------------------------

N_TRAIN, N_VALID, SIZE, BS, EPOCHS = 16, 6, 32, 4, 3

def _worker(out):
    "One rank (Lightning runs this file again for rank 1): train, then save this rank's weights and metrics."
    from torchmetrics.classification import MulticlassJaccardIndex
    from segtutor.augment import darkfield_dls
    from segtutor.models import get_model
    from segtutor.lightning import LightningLearner
    torch.set_num_threads(1)
    dls = darkfield_dls(n_train=N_TRAIN, n_valid=N_VALID, size=SIZE, bs=BS, seed=0)   # augmentation on
    torch.manual_seed(0)
    learn = LightningLearner(get_model('unet:8:2', 3), dls, 'ce', lr=2e-2, device='cpu', devices=2, strategy='ddp',
                             out=Path(out)/'run', progress=False)
    hist = learn.fit(EPOCHS)
    t = learn.trainer
    jac, model = MulticlassJaccardIndex(num_classes=3, ignore_index=255, average='macro'), learn.raw_model.eval()
    with torch.no_grad():
        for xb, yb in t.datamodule.val_dataloader(): jac.update(model(xb).argmax(1), yb)
    tm_miou = jac.compute().item()          # torchmetrics synchronises its state over the two processes here
    rank = t.global_rank
    torch.save({k: v.clone() for k, v in learn.raw_model.state_dict().items()}, Path(out)/f'rank{rank}.pt')
    info = dict(history=hist, world=t.world_size, backend=torch.distributed.get_backend(), tm_miou=tm_miou,
                miou=learn.valid_metrics['miou'], n_train_batches=len(t.datamodule.train_dataloader()),
                n_valid_items=len(t.datamodule.val_dataloader().dataset))
    (Path(out)/f'rank{rank}.json').write_text(json.dumps(info))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.mark.ddp
def test_lightning_ddp_two_cpu_processes(tmp_path):
    env = _env(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()))
    if sys.platform.startswith('linux'): env['GLOO_SOCKET_IFNAME'] = 'lo'
    try: r = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e: pytest.fail(f"Lightning DDP did not finish in 240 s:\n{e.stdout}\n{e.stderr}")
    assert r.returncode == 0, f"Lightning DDP failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"

    infos = [json.loads((tmp_path/f'rank{i}.json').read_text()) for i in range(2)]
    assert [(i['world'], i['backend']) for i in infos] == [(2, 'gloo')]*2
    h0, h1 = (i['history'] for i in infos)
    assert len(h0) == EPOCHS and h0[-1]['train_loss'] < h0[0]['train_loss'], h0
    drop = lambda h: [{k: v for k, v in r.items() if k != 'time'} for r in h]
    assert drop(h0) == drop(h1)                                   # both ranks computed the same (reduced) metrics
    assert infos[0]['n_train_batches'] == N_TRAIN//2//BS and infos[0]['n_valid_items'] + infos[1]['n_valid_items'] == N_VALID
    for i in infos: assert i['tm_miou'] == pytest.approx(i['miou'], abs=1e-6)   # torchmetrics, synchronised, agrees

    w0, w1 = (torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in range(2))
    assert w0.keys() == w1.keys()
    for k in w0: assert torch.equal(w0[k], w1[k]), f"rank 0 and rank 1 differ in {k}"

    run_dir = tmp_path/'run'
    assert sorted(p.name for p in run_dir.iterdir()) == ['best.pt', 'config.json', 'last.pt', 'loss.png', 'metrics.csv', 'miou.png']
    from segtutor.checkpoint import load_checkpoint, load_model
    ck = load_checkpoint(run_dir/'last.pt')
    assert ck['epoch'] == EPOCHS and ck['config']['world_size'] == 2 and ck['config']['engine'] == 'lightning'
    for k, v in ck['model'].items(): assert torch.equal(v, w0[k]), k
    assert len(rows(run_dir)) == EPOCHS
    load_model(run_dir/'best.pt')


if __name__ == '__main__':
    _worker(sys.argv[1])
