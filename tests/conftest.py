import pytest

def pytest_configure(config):
    config.addinivalue_line('markers', 'browser: drives JupyterLab in a real Chromium (run alone with `pytest -m browser`)')
    config.addinivalue_line('markers', 'ddp: starts several processes with torch.distributed (gloo)')
    config.addinivalue_line('markers', 'lightning: segtutor on PyTorch Lightning (run alone with `pytest -m lightning`)')
