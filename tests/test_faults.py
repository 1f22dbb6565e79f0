"""Faults during training: kills, signals, exceptions, corrupt or foreign run folders.

The kill and SIGTERM cases drive real `python -m mmlib.train` processes; the test-only hook
MMLIB_TEST_PAUSE_CHECKPOINT="<step>:<marker>" makes the checkpoint writer create <marker>
half-way through writing step <step> and wait until the marker is removed, so a kill or a
signal lands inside the write deterministically. Every run is compared with one uninterrupted
reference run of the same config (losses per step and final weights).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmlib.checkpoint import SHARDED_DIR, read_full, rng_file
from mmlib.processing import ImageLoadError
from mmlib.train import Trainer
from tests.test_train import read_log, small_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def config(out: Path, encoder: dict | None = None, **overrides):
    """4 steps of batch 4, a checkpoint every 2 steps: the run every test here compares with."""
    return small_config(out.parent, encoder={"batch_size": 4, **(encoder or {})},
                        **{"max_steps": 4, "save_every": 2, "output_dir": str(out), **overrides})


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.encoder.named_parameters()
            if p.requires_grad}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its folder, losses by step and final trainable weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer = Trainer(config(out))
    trainer.train()
    losses = {r["step"]: r["loss"] for r in read_log(out)}
    assert sorted(losses) == [1, 2, 3, 4]
    return out, losses, trainable(trainer)


def assert_matches_reference(out: Path, trainer: Trainer, reference) -> None:
    """One record per step, the reference's losses, and the reference's final weights."""
    _, losses, weights = reference
    steps = [r["step"] for r in read_log(out) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4], f"metrics.jsonl steps {steps}: duplicates or gaps"
    assert {r["step"]: r["loss"] for r in read_log(out)} == losses
    for name, value in trainable(trainer).items():
        assert torch.equal(value, weights[name]), name


def launch(tmp_path: Path, out: Path, pause_step: int) -> tuple[subprocess.Popen, Path]:
    """`python -m mmlib.train` on the reference config, pausing inside checkpoint `pause_step`."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config(out).to_dict()))
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "MMLIB_TEST_PAUSE_CHECKPOINT": f"{pause_step}:{marker}"}
    proc = subprocess.Popen([sys.executable, "-m", "mmlib.train", "--config", str(cfg_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) without pausing in checkpoint "
                        f"{pause_step}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no pause in checkpoint {pause_step} after {TIMEOUT_S} s")
        time.sleep(0.05)
    return proc, marker


def test_kill_inside_a_checkpoint_write_resumes_from_the_last_complete_one(
        tmp_path, reference, caplog):
    out = tmp_path / "run"
    proc, _ = launch(tmp_path, out, pause_step=4)
    try:
        # While it runs, a second run into the same folder is refused at once, naming it.
        with pytest.raises(RuntimeError, match=rf"pid {proc.pid} on {socket.gethostname()}"):
            Trainer(config(out, resume="auto"))
    finally:
        proc.kill()
        proc.wait(TIMEOUT_S)
    assert not (out / "checkpoint-000004").exists()  # a half-written checkpoint is invisible
    with caplog.at_level(logging.WARNING, logger="mmlib"):
        resumed = Trainer(config(out, resume="auto"))
    assert resumed.step == 2
    assert "stale" in caplog.text and str(proc.pid) in caplog.text  # the dead run's lock
    assert ".tmp-checkpoint-000004" in caplog.text  # the incomplete write, named
    resumed.train()
    assert_matches_reference(out, resumed, reference)


def test_sigterm_saves_the_last_completed_step_exits_143_and_resumes_exactly(
        tmp_path, reference):
    out = tmp_path / "run"
    proc, marker = launch(tmp_path, out, pause_step=2)
    proc.send_signal(signal.SIGTERM)  # lands inside the write of checkpoint 2
    time.sleep(0.2)
    marker.unlink()  # let the write finish
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 143, output[-4000:]
    assert json.loads((out / "checkpoint-000002" / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002"]
    assert not (out / "final").exists()
    resumed = Trainer(config(out, resume="auto"))
    assert resumed.step == 2
    resumed.train()
    assert_matches_reference(out, resumed, reference)


def test_a_signal_during_the_update_is_acted_on_after_the_step(tmp_path, reference, monkeypatch,
                                                               request):
    """Ctrl-C between the optimizer update and the step counter: the checkpoint must hold
    the completed step 3 (not step 3's weights labelled step 2), handlers are restored."""
    # Python's own Ctrl-C handler, whatever an earlier test or the runner installed (an ignored
    # SIGINT stays ignored by design, and then nothing would interrupt).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    out = tmp_path / "run"
    trainer = Trainer(config(out))
    real_update = trainer.scaler.update

    def update_then_interrupt(*args, **kwargs):
        real_update(*args, **kwargs)
        if trainer.step == 2:  # weights of step 3 are in place, the counter still says 2
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer.scaler, "update", update_then_interrupt)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert {s: signal.getsignal(s) for s in before} == before
    assert json.loads((out / "checkpoint-000003" / "state.json").read_text())["step"] == 3
    resumed = Trainer(config(out, resume="auto"))
    assert resumed.step == 3
    resumed.train()
    assert_matches_reference(out, resumed, reference)


def test_an_exception_inside_a_step_saves_the_last_completed_step(tmp_path, reference,
                                                                  monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(config(out, save_every=0))
    real_load = trainer.train_set.load_row_image

    def unreadable_in_step_3(row):
        if trainer.step == 2:
            raise ImageLoadError(f"cannot decode image '{row.image}'")
        return real_load(row)

    monkeypatch.setattr(trainer.train_set, "load_row_image", unreadable_in_step_3)
    with pytest.raises(ImageLoadError):
        trainer.train()
    saved, expected = out / "checkpoint-000002", reference[0] / "checkpoint-000002"
    assert json.loads((saved / "state.json").read_text())["batch_in_epoch"] == 2
    for part in ("model", "optim"):  # weights, AdamW moments, and the RNG state
        got, want = read_full(saved, part), read_full(expected, part)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), part
    got, want = load_file(saved / rng_file(0)), load_file(expected / rng_file(0))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_resume_auto_picks_the_newest_complete_checkpoint_by_recorded_step(
        tmp_path, reference, caplog):
    ref = reference[0]
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(ref / "checkpoint-000002", out / "checkpoint-000002_v2")  # "22" by digits
    shutil.copytree(ref / "checkpoint-000004", out / "checkpoint-000004")
    (out / "checkpoint-000010").mkdir()  # a write killed by the old, non-atomic writer
    shutil.copytree(ref / "checkpoint-000004" / SHARDED_DIR, out / "checkpoint-000010" / SHARDED_DIR)
    (out / "checkpoint-best").symlink_to("checkpoint-000004")
    with caplog.at_level(logging.WARNING, logger="mmlib"):
        resumed = Trainer(config(out, resume="auto"))
    assert resumed.step == 4
    assert "checkpoint-000010" in caplog.text
    expected = read_full(ref / "checkpoint-000004")
    assert all(torch.equal(trainable(resumed)[n], t) for n, t in expected.items())


@pytest.mark.parametrize("damage", ["truncated shard", "missing shard", "truncated rng file",
                                    "bad json"])
def test_a_corrupt_checkpoint_names_the_file_and_the_last_good_one(tmp_path, reference, damage):
    ref = reference[0]
    out = tmp_path / "run"
    for name in ("checkpoint-000002", "checkpoint-000004"):
        shutil.copytree(ref / name, out / name)
    broken = out / "checkpoint-000004"
    bad = {"bad json": broken / "state.json", "truncated rng file": broken / rng_file(0)}.get(
        damage, broken / SHARDED_DIR / "__0_0.distcp")
    if damage == "bad json":
        bad.write_text(bad.read_text()[:-20])
    elif damage == "missing shard":
        bad.unlink()
    else:
        bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{bad}.*last good checkpoint.*checkpoint-000002"):
        Trainer(config(out, resume="auto"))


def test_a_fresh_run_refuses_a_used_folder_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-000003").mkdir(parents=True)
    (out / "final").mkdir()
    for name in ("metrics.jsonl", "eval.csv", "notes.txt"):
        (out / name).write_text("old run\n")
    with pytest.raises(FileExistsError, match=r"checkpoint-000003.*overwrite"):
        Trainer(config(out))
    assert (out / "checkpoint-000003").is_dir() and (out / "metrics.jsonl").is_file()
    with pytest.raises(ValueError, match="overwrite"):
        Trainer(config(out, overwrite=True, resume="auto"))
    Trainer(config(out, overwrite=True)).close()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only the old run's files go


def test_one_trainer_per_folder_in_one_process(tmp_path):
    out = tmp_path / "run"
    first = Trainer(config(out))
    with pytest.raises(RuntimeError, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
        Trainer(config(out))
    first.close()
    assert not (out / "run.lock").exists()


def test_batch_size_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"encoder\.batch_size.*at least 2"):
        Trainer(config(tmp_path / "run", encoder={"batch_size": 1}))


def test_resume_with_another_embed_dim_names_the_field(tmp_path, reference):
    cfg = config(tmp_path / "run", resume=str(reference[0] / "checkpoint-000002"),
                 encoder={"embed_dim": 16, "mrl_dims": (8, None)})
    with pytest.raises(ValueError, match=r"embed_dim.*32.*16"):
        Trainer(cfg)


def test_resume_auto_without_a_checkpoint_starts_at_step_0(tmp_path):
    """The same command line serves the first launch and every requeue after preemption; a
    run killed before its first checkpoint leaves log lines that the new start must drop."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 9.0}\n')
    trainer = Trainer(config(out, resume="auto"))
    assert trainer.step == 0
    assert (out / "metrics.jsonl").read_text() == ""
    trainer.close()
