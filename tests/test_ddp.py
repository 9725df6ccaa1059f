"""The training loop under torchrun: two CPU processes (gloo, 127.0.0.1 only) train a tiny model with DDP.

The test launches this file with `python -m torch.distributed.run --nproc_per_node=2 tests/test_ddp.py OUT`; each rank
runs `_worker`, trains, and writes its final weights and history to OUT. The test then checks that training ran (the
loss fell), that both ranks ended with identical weights, and that only rank 0 wrote logs and checkpoints.
"""
import json, os, signal, socket, subprocess, sys
from pathlib import Path

import pytest
import torch

N_TRAIN, N_VALID, SIZE, BS, EPOCHS = 16, 6, 32, 4, 3


def _tfms(img, mask):
    "uint8 image -> per-image standardised float; mask -> plain int64 tensor (with a random flip so augmentation runs)."
    x = img.as_subclass(torch.Tensor).float()/255
    m = mask.as_subclass(torch.Tensor)
    if torch.rand(1).item() < 0.5: x, m = x.flip(-1), m.flip(-1)
    return (x - x.mean())/(x.std() + 1e-6), m


def _tiny_net():
    "A few-thousand-parameter fully convolutional net with batch norm (so buffers must be kept in sync too)."
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))


def _worker(out):
    "One rank: same data and model on every rank; the Learner sees WORLD_SIZE and sets up DDP itself."
    import torch.distributed as dist
    from segtutor.data import DarkfieldDataset, get_dls
    from segtutor.learner import Learner
    torch.set_num_threads(1)
    dls = get_dls(DarkfieldDataset(N_TRAIN, SIZE, seed=0, tfms=_tfms), DarkfieldDataset(N_VALID, SIZE, seed=500, tfms=_tfms),
                  bs=BS, seed=0)
    torch.manual_seed(0)
    learn = Learner(_tiny_net(), dls, 'ce', lr=2e-2, sched='onecycle', device='cpu', out=Path(out)/'run', progress=False)
    assert dist.is_initialized() and dist.get_backend() == 'gloo' and learn.world == 2
    hist = learn.fit(EPOCHS)
    rank = dist.get_rank()
    torch.save({k: v.clone() for k, v in learn.raw_model.state_dict().items()}, Path(out)/f'rank{rank}.pt')
    info = dict(history=hist, n_train_batches=len(learn.train_dl), n_valid_items=len(learn.valid_dl.dataset))
    (Path(out)/f'rank{rank}.json').write_text(json.dumps(info))
    dist.destroy_process_group()


def _dropout_net():
    "The tiny net with dropout: each rank draws its own masks from its own generator, so per-rank states matter."
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))


def _dls():
    from segtutor.data import DarkfieldDataset, get_dls
    return get_dls(DarkfieldDataset(N_TRAIN, SIZE, seed=0, tfms=_tfms), DarkfieldDataset(N_VALID, SIZE, seed=500, tfms=_tfms),
                   bs=BS, seed=0)


def _worker_resume(out):
    "Uninterrupted 3 epochs; the same run killed in epoch 3 (on both ranks, as a kill would) and resumed by fresh Learners."
    import torch.distributed as dist
    from segtutor.learner import Learner
    from segtutor.losses import get_loss
    torch.set_num_threads(1)
    def learner(run, loss='ce'):
        torch.manual_seed(0)
        return Learner(_dropout_net(), _dls(), loss, lr=2e-2, device='cpu', out=Path(out)/run, progress=False)
    full = learner('full'); full.fit(EPOCHS)
    class Killed(Exception): pass
    calls, ce = [0], get_loss('ce', 3)
    def dies(o, t):
        calls[0] += torch.is_grad_enabled()
        if calls[0] > (EPOCHS - 1)*N_TRAIN//2//BS: raise Killed()
        return ce(o, t)
    try: learner('killed', dies).fit(EPOCHS); killed = False
    except Killed: killed = True
    resumed = learner('killed'); resumed.resume(Path(out)/'killed'/'last.pt')
    rank = dist.get_rank()
    same = all(torch.equal(a, b) for a, b in zip(full.raw_model.state_dict().values(), resumed.raw_model.state_dict().values()))
    (Path(out)/f'resume{rank}.json').write_text(json.dumps(dict(killed=killed, same=same, full=full.history, resumed=resumed.history)))
    dist.destroy_process_group()


def _worker_diverge(out):
    "Rank 1's loss turns NaN at its second batch; every rank must stop there with TrainingDiverged."
    import torch.distributed as dist
    from segtutor.learner import Learner, TrainingDiverged
    from segtutor.losses import get_loss
    torch.set_num_threads(1)
    rank, calls, ce = int(os.environ['RANK']), [0], get_loss('ce', 3)
    def nan_on_rank1(o, t):
        calls[0] += 1; l = ce(o, t)
        return l*float('nan') if rank == 1 and calls[0] == 2 else l
    torch.manual_seed(0)
    learn = Learner(_tiny_net(), _dls(), nan_on_rank1, lr=2e-2, device='cpu', progress=False)
    try: learn.fit(EPOCHS); err = None
    except TrainingDiverged as e: err = str(e)
    (Path(out)/f'diverge{rank}.json').write_text(json.dumps(dict(err=err, batches=len(learn.recorder['loss']))))
    dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _torchrun(tmp_path, mode='train', timeout=150):
    "Run this file on two CPU processes in `mode`; fail the test with torchrun's output if it fails or hangs."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MASTER_ADDR': '127.0.0.1', 'PYTHONUNBUFFERED': '1'}
    env.pop('IN_TEST', None)
    if sys.platform.startswith('linux'): env['GLOO_SOCKET_IFNAME'] = 'lo'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2', '--rdzv-backend=static',
           '--master-addr=127.0.0.1', f'--master-port={_free_port()}', '--max-restarts=0', __file__, str(tmp_path), mode]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parent.parent)
    try: out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:          # torchrun starts each rank in its own session: kill the ranks by pid
        for f in Path(tmp_path).glob('pid*'):
            try: os.kill(int(f.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError): pass
        p.kill(); out, err = p.communicate()
        pytest.fail(f"torchrun ({mode}) did not finish in {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert p.returncode == 0, f"torchrun ({mode}) failed ({p.returncode}):\n{out[-4000:]}\n{err[-4000:]}"


def test_ddp_two_cpu_processes(tmp_path):
    _torchrun(tmp_path)

    infos = [json.loads((tmp_path/f'rank{i}.json').read_text()) for i in range(2)]
    hist = infos[0]['history']
    assert len(hist) == EPOCHS and hist[-1]['train_loss'] < hist[0]['train_loss'], hist
    assert infos[0]['history'] == [dict(h, time=infos[0]['history'][i]['time']) for i, h in enumerate(infos[1]['history'])]
    # each rank saw half the training batches and half of the validation items
    assert infos[0]['n_train_batches'] == N_TRAIN//2//BS
    assert infos[0]['n_valid_items'] + infos[1]['n_valid_items'] == N_VALID

    w0, w1 = (torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in range(2))
    assert w0.keys() == w1.keys()
    for k in w0: assert torch.equal(w0[k], w1[k]), f"rank 0 and rank 1 differ in {k}"

    run = tmp_path/'run'
    assert sorted(p.name for p in run.iterdir()) == ['best.pt', 'config.json', 'last.pt', 'loss.png', 'metrics.csv', 'miou.png']
    from segtutor.checkpoint import load_checkpoint
    ck = load_checkpoint(run/'last.pt')
    assert ck['epoch'] == EPOCHS and ck['config']['world_size'] == 2
    for k, v in ck['model'].items(): assert torch.equal(v, w0[k]), k
    assert len((run/'metrics.csv').read_text().strip().splitlines()) == EPOCHS + 1


def test_ddp_resume_restores_every_rank(tmp_path):
    _torchrun(tmp_path, 'resume')
    infos = [json.loads((tmp_path/f'resume{i}.json').read_text()) for i in range(2)]
    assert all(i['killed'] for i in infos)
    for i in infos: assert i['same'], "the resumed run's weights differ from the uninterrupted run's"
    strip = lambda h: [{k: v for k, v in r.items() if k != 'time'} for r in h]
    assert strip(infos[0]['full']) == strip(infos[0]['resumed'])


def test_ddp_divergence_stops_every_rank(tmp_path):
    _torchrun(tmp_path, 'diverge', timeout=90)
    infos = [json.loads((tmp_path/f'diverge{i}.json').read_text()) for i in range(2)]
    for i in infos: assert i['err'] and 'loss is inf' in i['err'] and 'epoch 1, batch 2' in i['err'], i
    assert infos[0]['batches'] == infos[1]['batches'] == 1


if __name__ == '__main__':
    (Path(sys.argv[1])/f"pid{os.environ.get('RANK', 0)}").write_text(str(os.getpid()))   # so that a hung rank can be killed
    {'train': _worker, 'resume': _worker_resume, 'diverge': _worker_diverge}[sys.argv[2] if len(sys.argv) > 2 else 'train'](sys.argv[1])
