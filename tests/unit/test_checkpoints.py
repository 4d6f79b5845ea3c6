"""Checkpoints load weights-only: a pickle that would run code is refused; a real training state still round-trips."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from embedpipe.ml.checkpoints import Checkpoints, UnsafeCheckpoint
from embedpipe.ml.training import _rng_state


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    ckpt = Checkpoints(str(tmp_path / "ckpt"))
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"step": 3, "model": {}, "payload": _Exploit(str(marker))}, buf)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "step-00000003.pt").write_bytes(buf.getvalue())
    (tmp_path / "ckpt" / "latest.json").write_text(json.dumps({"step": 3, "file": "step-00000003.pt"}))
    with pytest.raises(UnsafeCheckpoint, match="step-00000003.pt"):
        ckpt.load_latest()
    assert not marker.exists()


def test_a_training_state_round_trips_weights_only(tmp_path):
    from transformers import get_linear_schedule_with_warmup

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, 10)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    rng = _rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "pairs_seen": 8,
        "loss_curve": [{"step": 1, "loss": 0.5}],
        "selection": [],
        "params": {"batch_size": 4, "learning_rate": 1e-3},
    }
    Checkpoints(str(tmp_path / "ckpt")).save(1, state)
    loaded = Checkpoints(str(tmp_path / "ckpt")).load_latest()
    assert loaded["step"] == 1 and loaded["pairs_seen"] == 8 and loaded["loss_curve"] == state["loss_curve"]
    assert torch.equal(loaded["model"]["weight"], model.state_dict()["weight"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    random.setstate(loaded["rng"]["python"])
    np.random.set_state(loaded["rng"]["numpy"])
    torch.set_rng_state(loaded["rng"]["torch"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected  # the RNGs resume where they were


def test_a_latest_json_pointing_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest.json").write_text(json.dumps({"step": 3, "file": "../model/weights.pt"}))
    with pytest.raises(UnsafeCheckpoint, match="weights.pt"):
        Checkpoints(str(tmp_path / "ckpt")).load_latest()
