"""Shared fixtures. Tests use tiny inputs and never touch the user's weight cache."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # pretrained=True must look only in a per-test cache, never in ~/.cache/medtransfer.
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path_factory.mktemp("medtransfer_home")))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
