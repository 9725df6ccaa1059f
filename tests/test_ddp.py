"""The training loop under torchrun: two CPU processes (gloo, 127.0.0.1 only) train a tiny model with DDP.

The test launches this file with `python -m torch.distributed.run --nproc_per_node=2 tests/test_ddp.py OUT`; each rank
runs `_worker`, trains, and writes its final weights and history to OUT. The test then checks that training ran (the
loss fell), that both ranks ended with identical weights, and that only rank 0 wrote logs and checkpoints.
"""
import json, os, socket, subprocess, sys
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


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MASTER_ADDR': '127.0.0.1', 'PYTHONUNBUFFERED': '1'}
    env.pop('IN_TEST', None)
    if sys.platform.startswith('linux'): env['GLOO_SOCKET_IFNAME'] = 'lo'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2', '--rdzv-backend=static',
           '--master-addr=127.0.0.1', f'--master-port={_free_port()}', '--max-restarts=0', __file__, str(tmp_path)]
    try: r = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=Path(__file__).parent.parent)
    except subprocess.TimeoutExpired as e: pytest.fail(f"torchrun did not finish in 150 s:\n{(e.stdout or b'')[-3000:]}\n{(e.stderr or b'')[-3000:]}")
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"

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


if __name__ == '__main__':
    _worker(sys.argv[1])
