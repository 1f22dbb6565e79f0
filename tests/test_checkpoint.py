"""Sharded checkpoints in one process: per-rank RNG state, the converter, the metadata reader.

Resuming across world sizes (1 -> 2, 2 -> 1, with and without FSDP) and the memory a rank
needs while saving are checked with two ranks in tests/test_distributed.py.
"""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file

from mmlib import MultimodalEncoder
from mmlib.checkpoint import (
    SHARDED_DIR,
    export,
    fallback_seed,
    load,
    load_rng,
    main,
    read_metadata,
    rng_state,
    save,
    verify,
    write_rng,
)
from mmlib.run_dir import CheckpointError
from mmlib.train import Trainer
from tests.test_train import small_config


class FakeGpus:
    """torch.cuda's per-device RNG calls on a machine with `count` GPUs (none is needed):
    device i's state is a small tensor; asking for a GPU that is not there fails like CUDA."""

    def __init__(self, count: int):
        self.count = count
        self.states = {i: torch.full((8,), 10 + i, dtype=torch.uint8) for i in range(count)}
        self.read: list[int] = []

    def _index(self, device: torch.device) -> int:
        if not 0 <= device.index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {device.index}")
        return device.index

    def get_rng_state(self, device: torch.device) -> torch.Tensor:
        self.read.append(self._index(device))
        return self.states[device.index].clone()

    def set_rng_state(self, state: torch.Tensor, device: torch.device) -> None:
        self.states[self._index(device)] = state.clone()

    def manual_seed_all(self, seed: int) -> None:  # what torch.manual_seed calls for the GPUs
        for i in self.states:
            self.states[i] = self.seeded(seed)

    @staticmethod
    def seeded(seed: int) -> torch.Tensor:
        return torch.full((8,), seed % 251, dtype=torch.uint8)

    def install(self, monkeypatch) -> FakeGpus:
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "manual_seed_all", self.manual_seed_all)
        return self


def cuda(i: int) -> torch.device:
    return torch.device("cuda", i)


def test_rng_state_per_rank_resumes_on_fewer_or_more_ranks_and_gpus(tmp_path, monkeypatch,
                                                                   caplog):
    """A checkpoint of 4 ranks on an 8-GPU node (rank r on cuda:r) stores each rank's CPU
    state and its own GPU's, never the node's other GPUs; it resumes on a 2-GPU machine (each
    rank restores its own state on the GPU it now has) and on 6 ranks (ranks 4 and 5 have no
    state: seeded from (seed, step, rank), logged, the same every time)."""
    node = FakeGpus(8).install(monkeypatch)
    saved = {}
    for r in range(4):
        torch.manual_seed(100 + r)
        saved[r] = rng_state([cuda(r)])
        write_rng(tmp_path, r, saved[r])
    assert node.read == [0, 1, 2, 3]  # one GPU per rank, not all 8 visible ones
    assert all(set(s) == {"cpu", "cuda.0"} for s in saved.values())

    small = FakeGpus(2).install(monkeypatch)  # resume: 2 ranks on a machine with 2 GPUs
    for r in range(2):
        load_rng(tmp_path, r, [cuda(r)], seed=fallback_seed(0, 7, r))
        assert torch.equal(torch.get_rng_state(), saved[r]["cpu"])
        assert torch.equal(small.states[r], saved[r]["cuda.0"])  # rank r's, from node's cuda:r
    assert "seeded" not in caplog.text

    eight = FakeGpus(8).install(monkeypatch)  # resume: 6 ranks
    states = []
    for _ in range(2):
        for r in (4, 5):
            with caplog.at_level(logging.WARNING, logger="mmlib"):
                load_rng(tmp_path, r, [cuda(r)], seed=fallback_seed(0, 7, r))
            expected = torch.Generator().manual_seed(fallback_seed(0, 7, r)).get_state()
            assert torch.equal(torch.get_rng_state(), expected)
            assert torch.equal(eight.states[r], FakeGpus.seeded(fallback_seed(0, 7, r)))  # its GPU too
            states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[2]) and not torch.equal(states[0], states[1])
    assert "rank 5" in caplog.text and "cpu and cuda.0" in caplog.text
    assert "4 rank(s)" in caplog.text


def test_rng_state_of_a_process_on_several_gpus(tmp_path, monkeypatch, caplog):
    """One process over 2 GPUs (device_map): both states are kept; resumed on one GPU the
    first is restored and the second ignored; on 3 GPUs the third is seeded (logged)."""
    gpus = FakeGpus(2).install(monkeypatch)
    state = rng_state([cuda(0), cuda(1)])
    write_rng(tmp_path, 0, state)
    one = FakeGpus(1).install(monkeypatch)
    load_rng(tmp_path, 0, [cuda(0)], seed=1)
    assert torch.equal(one.states[0], gpus.states[0]) and "seeded" not in caplog.text
    three = FakeGpus(3).install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mmlib"):
        load_rng(tmp_path, 0, [cuda(0), cuda(1), cuda(2)], seed=1)
    assert [torch.equal(three.states[i], gpus.states[i]) for i in range(2)] == [True, True]
    assert "this rank's cuda.2" in caplog.text


@pytest.fixture(scope="module")
def learnable_run(tmp_path_factory):
    """2 steps with a learnable temperature, a checkpoint after each: the folder and Trainer."""
    out = tmp_path_factory.mktemp("learnable")
    trainer = Trainer(small_config(out, max_steps=2, save_every=1, learnable_temperature=True))
    trainer.train()
    return out / "run", trainer


def test_the_learnable_temperature_resumes(learnable_run, tmp_path):
    """Step 2 resumed from the checkpoint of step 1 equals the unbroken run bit for bit,
    the temperature (a loss parameter, saved as loss.*) and its AdamW moments included."""
    run, straight = learnable_run
    resumed = Trainer(small_config(tmp_path, max_steps=2, learnable_temperature=True,
                                   resume=str(run / "checkpoint-000001")))
    resumed.train()
    tau = dict(resumed.loss_fn.named_parameters())
    assert len(tau) == 1
    for a, b in ((straight.encoder, resumed.encoder), (straight.loss_fn, resumed.loss_fn)):
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), n
            if p.requires_grad:
                for k, v in straight.optimizer.state[p].items():
                    assert torch.equal(v, resumed.optimizer.state[q][k]), f"{n}::{k}"


def test_convert_gives_the_live_weights_and_moments(learnable_run, tmp_path, capsys):
    run, trainer = learnable_run
    out = tmp_path / "one"
    main(["convert", str(run / "checkpoint-000002"), str(out)])  # python -m mmlib.checkpoint
    assert f"wrote {out}" in capsys.readouterr().out
    params = {n: p for n, p in trainer.encoder.named_parameters() if p.requires_grad}
    params |= {f"loss.{n}": p for n, p in trainer.loss_fn.named_parameters()}
    weights, moments = load_file(out / "trainable.safetensors"), load_file(
        out / "optimizer.safetensors")
    assert weights.keys() == params.keys() and len(weights) > 10
    assert all(torch.equal(weights[n], p.detach()) for n, p in params.items())
    expected = {f"{n}::{k}": v for n, p in params.items()
                for k, v in trainer.optimizer.state[p].items()}
    assert moments.keys() == expected.keys() and {k.split("::")[1] for k in moments} == {
        "exp_avg", "exp_avg_sq", "step"}
    assert all(torch.equal(moments[k], v) for k, v in expected.items())
    assert (out / "state.json").is_file()


def test_export_loads_with_from_pretrained(learnable_run, tmp_path):
    run, trainer = learnable_run
    out = export(run / "checkpoint-000002", tmp_path / "encoder")
    loaded = MultimodalEncoder.from_pretrained(out)
    texts = ["a red circle", "a small blue square on the left"]
    trainer.encoder.eval()
    assert torch.equal(loaded.encode_texts(texts), trainer.encoder.encode_texts(texts))


class RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('ran').touch()",))


def test_a_metadata_file_that_would_run_code_is_refused(learnable_run, tmp_path, monkeypatch):
    """DCP's index is a pickle: it is read with DCP's own classes only, so a planted one cannot
    run code when resume=auto scans the folder."""
    import shutil

    run, _ = learnable_run
    bad = tmp_path / "checkpoint-000002"
    shutil.copytree(run / "checkpoint-000002", bad)
    read_metadata(bad)  # the real one reads
    (bad / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt .*refusing builtins\.exec"):
        verify(bad)
    assert not (tmp_path / "ran").exists()


def test_weights_frozen_on_resume_still_load(learnable_run, tmp_path):
    """Resuming a full fine-tune with the vision tower frozen keeps its trained weights (they
    are in the checkpoint), as the trainable ones; the frozen ones get no optimizer state."""
    run, trained = learnable_run
    resumed = Trainer(small_config(tmp_path, max_steps=3, learnable_temperature=True,
                                   encoder={"freeze_backbone": "vision"},
                                   resume=str(run / "checkpoint-000002")))
    vision = [n for n, p in resumed.encoder.named_parameters() if not p.requires_grad]
    assert vision and all(".visual." in n for n in vision)
    for (n, p), q in zip(trained.encoder.named_parameters(), resumed.encoder.parameters(),
                         strict=True):
        assert torch.equal(p, q), n
    assert all(not q.requires_grad or q in resumed.optimizer.state
               for q in resumed.encoder.parameters())
    resumed.close()


def test_a_checkpoint_of_the_earlier_layout_is_named(tmp_path):
    old = tmp_path / "checkpoint-000004"
    old.mkdir()
    (old / "state.json").write_text('{"step": 4}')
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        (old / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"dcp/\.metadata is missing.*pre-DCP layout"):
        verify(old)


def toy(out: int = 3, extra: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(4, out)})
    if extra:
        model["loss"] = torch.nn.Linear(1, 1)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def toy_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model["encoder"](torch.ones(2, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def toy_save(path, model, optimizer) -> None:
    save(path, model, optimizer, {"step": 0}, rng_state(), rank=0, device=torch.device("cpu"),
         collective=False)


def test_a_checkpoint_before_the_first_step_has_no_moments_and_resumes_exactly(tmp_path):
    """Saved before any update, a checkpoint holds the weights only (saving must not create
    moments: a resumed AdamW would then take its first step as its second)."""
    model, optimizer = toy()
    toy_save(tmp_path / "c0", model, optimizer)
    assert not optimizer.state
    assert all(k.startswith("model.") for k in read_metadata(tmp_path / "c0").state_dict_metadata)
    toy_step(model, optimizer)
    other, other_optimizer = toy()
    with torch.no_grad():
        other["encoder"].weight.add_(1.0)  # loading must replace it
    load(tmp_path / "c0", other, other_optimizer)
    assert not other_optimizer.state
    toy_step(other, other_optimizer)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_of_other_shapes_is_refused_by_name(tmp_path):
    model, optimizer = toy()
    toy_step(model, optimizer)
    toy_save(tmp_path / "c1", model, optimizer)
    wider, wider_optimizer = toy(out=5)
    with pytest.raises(ValueError, match=r"does not fit this model: \['encoder\.weight \(3, 4\) "
                                         r"\(this model: \(5, 4\)\)'.*model_path='a'"):
        load(tmp_path / "c1", wider, wider_optimizer, hint="it was written for model_path='a'")
    more, more_optimizer = toy(extra=True)
    with pytest.raises(ValueError, match=r"lacks trainable parameters \['loss\.bias', "
                                         r"'loss\.weight'\].*freezing / LoRA"):
        load(tmp_path / "c1", more, more_optimizer)


def test_a_checkpoint_missing_a_ranks_files_is_not_published(tmp_path, monkeypatch):
    """Rank 0 verifies the temporary folder before renaming it: a rank whose files went
    elsewhere (an output_dir that is not shared between nodes) makes the save fail by name
    instead of publishing a checkpoint that cannot resume."""
    import mmlib.checkpoint as checkpoint

    model, optimizer = toy()
    toy_step(model, optimizer)
    monkeypatch.setattr(checkpoint, "write_rng", lambda *a, **k: None)  # the file lands elsewhere
    with pytest.raises(CheckpointError, match=r"rng-rank0\.safetensors is missing"):
        toy_save(tmp_path / "c1", model, optimizer)
    assert not (tmp_path / "c1").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("entry", ["model.encoder.weight", "optim.state.encoder.weight.exp_avg"])
def test_an_index_that_declares_a_weight_as_bytes_is_refused(tmp_path, monkeypatch, entry):
    """DCP unpickles entries its index declares as bytes (torch.load without weights_only): an
    index built from DCP's own classes that turns a weight or moment into bytes is refused by
    name before DCP reads anything, so the planted pickle next to it never runs."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    model, optimizer = toy()
    toy_step(model, optimizer)
    toy_save(tmp_path / "c1", model, optimizer)
    index = tmp_path / "c1" / SHARDED_DIR / ".metadata"
    metadata = read_metadata(tmp_path / "c1")
    assert entry in metadata.state_dict_metadata
    metadata.state_dict_metadata[entry] = BytesStorageMetadata()
    index.write_bytes(pickle.dumps(metadata))
    verify(tmp_path / "c1")  # every class in it is DCP's: the index itself reads
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("DCP unpickled an entry"))
    other, other_optimizer = toy()
    with pytest.raises(ValueError, match=r"(non-tensor|does not fit)"):
        load(tmp_path / "c1", other, other_optimizer)
