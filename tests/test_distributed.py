"""Data parallelism: 2 CPU ranks (gloo, launched by torchrun) must equal one process.

One torchrun launch (tests/_dist_worker.py) runs every multi-process check and saves its
results; the tests here compare them with single-process runs on the same global batch.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mmlib.checkpoint import read_full
from mmlib.data import LengthBucketSampler
from mmlib.distributed import (
    DistributedBatchSampler,
    all_gather_with_grad,
    average_gradients,
    gather_for_loss,
    init_distributed,
    local_batch_size,
    shard_batch,
)
from tests._dist_worker import (
    LOSS,
    REPO,
    TEXTS,
    WORLD,
    accum_trainer_config,
    grads,
    lora_trainer_config,
    make_encoder,
    raw_inputs,
    trainer_config,
    trainer_step,
)

TIMEOUT_S = 300  # a hang (e.g. mismatched collectives) fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Single-process Trainer: 2 steps, a checkpoint after each."""
    from mmlib.train import Trainer

    out = tmp_path_factory.mktemp("single") / "run"
    trainer = Trainer(trainer_config(out))
    trainer.train()
    return out


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory, reference_run):
    """Launch the 2-rank worker once; its results lie in the returned folder."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "_dist_worker.py"),
           str(out), str(reference_run / "checkpoint-000001")]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2-rank worker hung for {TIMEOUT_S} s; output:\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}"
    print(f"2-rank worker: {time.perf_counter() - start:.1f} s\n{proc.stdout}")
    return out


def load(path):
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------ single process
def assert_slices_concatenate(glob, ranks, epoch: int) -> list[list[list[int]]]:
    """At `epoch`, the ranks' batches (same count as the global sampler's, len() exact) put side
    by side are exactly the global batches; returns each rank's batches."""
    glob.set_epoch(epoch)
    for s in ranks:
        s.set_epoch(epoch)
    expected = list(glob)
    per_rank = [list(s) for s in ranks]
    assert all(len(p) == len(expected) == len(s) for p, s in zip(per_rank, ranks, strict=True))
    for k, batch in enumerate(expected):
        assert sum((p[k] for p in per_rank), []) == batch
    return per_rank


def test_sharded_sampler_slices_concatenate_to_the_global_batch():
    lengths = [(7 * i) % 11 + 1 for i in range(39)]  # 39 = 6 x 6 + 3: a short last batch
    for world in (2, 3):
        for drop_last in (False, True):
            glob = LengthBucketSampler(lengths, 6, seed=3, drop_last=drop_last,
                                       bucket_size_multiplier=2)
            ranks = [DistributedBatchSampler(LengthBucketSampler(lengths, 6, seed=3,
                                                                 drop_last=drop_last,
                                                                 bucket_size_multiplier=2),
                                             rank=r, world_size=world) for r in range(world)]
            for epoch in (0, 1):
                per_rank = assert_slices_concatenate(glob, ranks, epoch)
                for k in range(len(per_rank[0])):
                    sizes = [len(p[k]) for p in per_rank]
                    assert max(sizes) - min(sizes) <= 1
                seen = sorted(i for p in per_rank for b in p for i in b)
                if drop_last:
                    assert len(set(seen)) == len(seen) == 36 and set(seen) <= set(range(39))
                else:
                    assert seen == list(range(39))  # every index exactly once per epoch
            glob.set_epoch(0)
            e0 = list(glob)
            glob.set_epoch(1)
            assert list(glob) != e0  # the epoch reshuffles, identically on every rank


def test_batch_split_errors():
    assert local_batch_size(64, 8) == 8
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        local_batch_size(64, 3)
    with pytest.raises(ValueError, match="cannot give each of 4 ranks"):
        shard_batch([1, 2, 3], 0, 4)
    with pytest.raises(ValueError, match="rank=2"):
        DistributedBatchSampler(LengthBucketSampler([1, 2, 3], 1), rank=2, world_size=2)


def test_single_process_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    q, t, x = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4)
    assert all_gather_with_grad(q) is q
    gq, gt = gather_for_loss(q, t, x)
    assert gq is q and torch.equal(gt, torch.cat([t, x]))
    with pytest.raises(ValueError, match="at least as many rows"):
        gather_for_loss(q, t[:2])
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    average_gradients([p])
    assert torch.equal(p.grad, torch.full((2,), 3.0))


# ----------------------------------------------------------------------------- two ranks
def test_all_gather_with_grad_by_hand(dist_run):
    """Rank r (2 + r rows) computes sum((r+1)·C·y) on the gathered y: rank r's gradient is
    Σ_s (s+1)·C[its rows] = 3·C[its rows], the gradient of the sum of the ranks' losses."""
    c = torch.arange(15, dtype=torch.float64).reshape(5, 3)
    xs = [torch.arange(n * 3, dtype=torch.float64).reshape(n, 3) + 100 * r
          for r, n in enumerate((2, 3))]
    rows = [slice(0, 2), slice(2, 5)]
    for r in range(WORLD):
        got = load(dist_run / f"toy_rank{r}.pt")
        torch.testing.assert_close(got["y"], torch.cat(xs), rtol=0, atol=0)
        torch.testing.assert_close(got["grad"], 3 * c[rows[r]], rtol=0, atol=0)


def test_all_gather_with_grad_backward_is_one_reduce_scatter(dist_run):
    """The gather's backward sends each rank only its rows' gradient summed over ranks (one
    reduce-scatter), not the whole gathered gradient to every rank (an all-reduce: W x the
    data); the forward is one all-gather besides the small size exchange."""
    for r in range(WORLD):
        comms = load(dist_run / f"toy_rank{r}.pt")["comms"]
        assert comms["backward"] == {"c10d_functional.reduce_scatter_tensor": 1}, comms
        gathers = {k: v for k, v in comms["forward"].items() if "gather" in k}
        assert sum(comms["forward"].values()) == 2 and len(gathers) == 2, comms


def test_gather_for_loss_layout(dist_run):
    """[all queries]; [all positives in rank order, then all extra negatives in rank order]."""
    def rows(spec):
        return torch.tensor(spec, dtype=torch.float64)
    q = rows([[0, 0, 0], [1, 0, 0], [1, 0, 1]])
    t = rows([[0, 1, 0], [1, 1, 0], [1, 1, 1], [0, 2, 0], [0, 2, 1], [1, 2, 0]])
    for r in range(WORLD):
        got = load(dist_run / f"toy_rank{r}.pt")
        assert torch.equal(got["q"], q) and torch.equal(got["t"], t)


def test_gather_loss_ids_layout(dist_run):
    """Ids follow the embeddings: [all target ids], [all hard-negative ids]; owners become
    global query rows (rank 1's local query 0 is global row 1)."""
    for r in range(WORLD):
        target_ids, hard_ids, owners = load(dist_run / f"toy_rank{r}.pt")["ids"]
        assert target_ids.tolist() == [0, 10, 11]
        assert hard_ids.tolist() == [0, 1, 100] and owners.tolist() == [0, 0, 1]


@pytest.fixture(scope="module")
def single_process_step():
    """Loss and gradients of one process on the whole global batch (+ every rank's extras)."""
    enc = make_encoder()
    texts, images, extras = raw_inputs()
    q = enc(**enc.tokenize(texts))
    t = torch.cat([enc(**enc.tokenize(images=images)),
                   enc(**enc.tokenize(images=[im for ex in extras for im in ex]))])
    loss = LOSS(q, t)
    loss.backward()
    return loss.detach(), grads(enc)


def assert_grad_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """rtol 1e-5, atol 2e-6 x the tensor's largest entry: gradients here reach ~17, and summing
    the batch in another order (two ranks, other padding) moves an entry by fp32 rounding of
    that scale (~1e-6). A wrong row layout or a missing / extra factor W is off by O(1)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * scale,
                               msg=lambda m: f"{what}: {m}")


def test_encoder_step_equals_single_process(dist_run, single_process_step):
    """Rank r embeds rows 4r..4r+3 (+ its own extra negatives), gathers, computes the global
    loss; after averaging, every rank's gradient is the single process's (plain and GradCache)."""
    loss, expected = single_process_step
    ranks = [load(dist_run / f"encoder_rank{r}.pt") for r in range(WORLD)]
    assert len(expected) > 10
    for r, got in enumerate(ranks):
        for prefix in ("", "gradcache_"):
            torch.testing.assert_close(got[f"{prefix}loss"], loss, rtol=1e-5, atol=1e-6)
            assert got[f"{prefix}grads"].keys() == expected.keys()
            for n, g in expected.items():
                assert_grad_close(got[f"{prefix}grads"][n], g, f"rank {r} {prefix}{n}")
    # Before averaging, each rank holds W x its share: their sum is W x the full gradient.
    for n, g in expected.items():
        assert_grad_close(sum(got["raw_grads"][n] for got in ranks), WORLD * g, f"raw {n}")


def _assert_weights_close(got: dict, expected: dict, what: str, atol: float = 2e-5) -> None:
    """atol 2e-5 = 1% of one learning-rate step (2e-3): AdamW's g / (|g| + eps) turns fp32
    noise on near-zero gradients into update noise (a handful of the 351k weights move ~5e-6;
    with duplicate-free batches one weight of the merger moved 1.06e-5).
    Scale errors that AdamW and clipping hide are caught by the logged grad_norm instead."""
    assert got.keys() == expected.keys() and len(expected) > 10
    for n, w in expected.items():
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=atol,
                                   msg=lambda m, n=n: f"{what}: {n}: {m}")


def _metrics(run) -> list[tuple[float, float]]:
    return [(r["loss"], r["grad_norm"])
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def test_trainer_two_ranks_equal_single_process(dist_run, reference_run):
    """2 optimizer steps (hard negatives on, a different number per rank) on 2 ranks == 1 process:
    same logged loss and gradient norm (before clipping), same weights, ranks in lockstep."""
    expected = read_full(reference_run / "checkpoint-000002")
    written = read_full(dist_run / "scratch" / "checkpoint-000002")
    _assert_weights_close(written, expected, "rank 0's checkpoint")
    ranks = [load(dist_run / f"scratch_weights_rank{r}.pt") for r in range(WORLD)]
    _assert_weights_close(ranks[0], expected, "rank 0")
    for n, w in ranks[0].items():
        assert all(torch.equal(other[n], w) for other in ranks[1:]), f"ranks drifted apart: {n}"
    assert sorted(p.name for p in (dist_run / "scratch").iterdir()) == [
        "checkpoint-000001", "checkpoint-000002", "final", "metrics.jsonl", "train_config.yaml"]
    single, two = _metrics(reference_run), _metrics(dist_run / "scratch")
    assert len(single) == len(two) == 2  # rank 0 alone logs
    for (loss1, norm1), (loss2, norm2) in zip(single, two, strict=True):
        assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-5)


def test_after_an_error_rank_0_writes_the_checkpoint_alone(dist_run):
    """Without FSDP every rank holds every weight and moment: after an exception (when the
    other ranks may be stuck in a collective) rank 0 writes the same checkpoint by itself."""
    from mmlib.checkpoint import rng_file

    alone, together = (dist_run / d / "checkpoint-000002" for d in ("alone", "scratch"))
    for part in ("model", "optim"):
        got, want = read_full(alone, part), read_full(together, part)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((alone / "state.json").read_text())["rng_files"] == [rng_file(0)]
    assert not (alone / rng_file(1)).exists() and (together / rng_file(1)).exists()


def test_checkpoint_resumes_on_another_world_size(dist_run, reference_run, tmp_path):
    """Step 1 by one process, step 2 by two ranks (GradCache on) resumed from its checkpoint,
    and step 1 by two ranks, step 2 by one process == 2 single-process steps. Each rank of a
    checkpoint keeps its own RNG state: rank 0 restores it, rank 1 of 2 resuming a one-process
    checkpoint is seeded from (seed, step, rank)."""
    from mmlib.checkpoint import fallback_seed, rng_file
    from mmlib.train import Trainer

    expected = read_full(reference_run / "checkpoint-000002")
    for r in range(WORLD):
        _assert_weights_close(load(dist_run / f"resumed_weights_rank{r}.pt"), expected,
                              f"resumed rank {r}")
    (loss1, norm1), = _metrics(reference_run)[1:]
    (loss2, norm2), = _metrics(dist_run / "resumed")
    assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-5)
    saved = load_file(str(reference_run / "checkpoint-000001" / rng_file(0)))
    assert torch.equal(load(dist_run / "resumed_rng_rank0.pt"), saved["cpu"])
    seeded = torch.Generator().manual_seed(fallback_seed(0, 1, 1)).get_state()
    assert torch.equal(load(dist_run / "resumed_rng_rank1.pt"), seeded)

    two_ranks = dist_run / "scratch" / "checkpoint-000001"
    assert json.loads((two_ranks / "state.json").read_text())["world_size"] == WORLD
    one = Trainer(trainer_config(tmp_path / "one", resume=str(two_ranks)))
    assert torch.equal(torch.get_rng_state(), load_file(str(two_ranks / rng_file(0)))["cpu"])
    one.train()
    _assert_weights_close({n: p.detach() for n, p in one.encoder.named_parameters()
                           if p.requires_grad}, expected, "one process resumed from 2 ranks")
    (loss3, norm3), = _metrics(tmp_path / "one")
    assert loss3 == pytest.approx(loss1, rel=1e-5) and norm3 == pytest.approx(norm1, rel=1e-5)


def test_data_parallel_evaluation_equals_single_process(dist_run, tmp_path):
    """Two data-parallel ranks each embed half the eval set: the metrics rank 0 computes from
    the gathered embeddings are one process's for the same final model."""
    import pandas as pd

    from mmlib import MultimodalEncoder
    from mmlib.data import ImageTextDataset
    from mmlib.evaluation import evaluate_dataset

    cfg = trainer_config(tmp_path)
    loaded = MultimodalEncoder.from_pretrained(dist_run / "resumed" / "final")
    expected = evaluate_dataset(loaded, ImageTextDataset(cfg.manifest, split="validation"),
                                dims=cfg.encoder.mrl_dims)
    got = pd.read_csv(dist_run / "resumed" / "eval.csv", index_col=0)
    assert list(got.index) == list(expected.index)
    for col in expected.columns:
        assert got[col].to_numpy() == pytest.approx(expected[col].to_numpy(), abs=1e-6), col


# --------------------------------------------------------------------------- FSDP (sharded)
def test_fsdp_encoder_step_equals_single_process(dist_run, single_process_step):
    """A sharded encoder's gradients (gathered whole) are the single process's, plain and with
    GradCache where the ranks run different numbers of micro-batches (dummies fill in)."""
    loss, expected = single_process_step
    for r in range(WORLD):
        got = load(dist_run / f"fsdp_encoder_rank{r}.pt")
        for prefix in ("", "gradcache_"):
            torch.testing.assert_close(got[f"{prefix}loss"], loss, rtol=1e-5, atol=1e-6)
            assert got[f"{prefix}grads"].keys() == expected.keys()
            for n, g in expected.items():
                assert_grad_close(got[f"{prefix}grads"][n], g, f"fsdp rank {r} {prefix}{n}")


# FSDP reduce-scatters the gradients in another summation order than one process; AdamW's
# normalised update g / (|g| + eps) turns that fp32 rounding on near-zero gradients into
# weight differences of ~2e-5 on a few entries (1 of 8192 in one run): 2.5% of one lr step.
FSDP_WEIGHT_ATOL = 5e-5


def test_fsdp_trainer_equals_single_process(dist_run, reference_run):
    """FSDP2 with GradCache (micro-batches of 3 of 4 rows, hard-negative counts that differ by
    rank): each rank holds half the weights, and 2 steps equal 2 single-process steps."""
    expected = read_full(reference_run / "checkpoint-000002")
    for r in range(WORLD):
        _assert_weights_close(load(dist_run / f"fsdp_weights_rank{r}.pt"), expected,
                              f"fsdp rank {r}", FSDP_WEIGHT_ATOL)
        info = load(dist_run / f"fsdp_rank{r}.pt")
        assert info["held"] <= info["total"] // WORLD + 1000, info  # + shard padding at most
    written = read_full(dist_run / "fsdp" / "checkpoint-000002")
    _assert_weights_close(written, expected, "fsdp checkpoint", FSDP_WEIGHT_ATOL)
    for (loss1, norm1), (loss2, norm2) in zip(_metrics(reference_run), _metrics(dist_run / "fsdp"),
                                              strict=True):
        assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-5)
    for r in range(WORLD):
        _assert_weights_close(load(dist_run / f"fsdp_resumed_weights_rank{r}.pt"), expected,
                              f"fsdp resumed from a single-process checkpoint, rank {r}",
                              FSDP_WEIGHT_ATOL)


def test_fsdp_outputs_load_in_one_process(dist_run, reference_run, tmp_path):
    """The sharded run's final model, encodings, evaluation and checkpoint are the ordinary
    single-process ones: from_pretrained reproduces its embeddings and eval.csv, and one
    process resumes its step-1 checkpoint to the reference step 2."""
    import pandas as pd

    from mmlib import MultimodalEncoder
    from mmlib.data import ImageTextDataset
    from mmlib.evaluation import evaluate_dataset
    from mmlib.train import Trainer

    loaded = MultimodalEncoder.from_pretrained(dist_run / "fsdp" / "final")
    info = load(dist_run / "fsdp_rank0.pt")
    torch.testing.assert_close(loaded.encode_texts(info["texts"]), info["embeddings"],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(load(dist_run / "fsdp_rank1.pt")["embeddings"], info["embeddings"],
                               atol=0, rtol=0)
    cfg = trainer_config(tmp_path)
    valid = ImageTextDataset(cfg.manifest, split="validation")
    expected = evaluate_dataset(loaded, valid, dims=cfg.encoder.mrl_dims)
    got = pd.read_csv(dist_run / "fsdp" / "eval.csv", index_col=0)
    assert list(got.index) == list(expected.index)
    for col in expected.columns:
        assert got[col].to_numpy() == pytest.approx(expected[col].to_numpy(), abs=1e-6), col

    trainer = Trainer(trainer_config(tmp_path / "resumed",
                                     resume=str(dist_run / "fsdp" / "checkpoint-000001")))
    trainer.train()
    resumed = {n: p.detach() for n, p in trainer.encoder.named_parameters() if p.requires_grad}
    expected = read_full(reference_run / "checkpoint-000002")
    _assert_weights_close(resumed, expected, "one process resumed from an FSDP checkpoint",
                          FSDP_WEIGHT_ATOL)


def test_fsdp_checkpoint_converts_to_the_live_model(dist_run, tmp_path):
    """The converter joins the ranks' shards into the whole weights and AdamW moments the
    sharded run held, bit for bit; its encoder export loads with from_pretrained and embeds as
    the run's final model does."""
    from mmlib import MultimodalEncoder
    from mmlib.checkpoint import convert, export

    ckpt = dist_run / "fsdp" / "checkpoint-000002"
    out = convert(ckpt, tmp_path / "one")
    for name, expected in (("trainable", load(dist_run / "fsdp_weights_rank0.pt")),
                           ("optimizer", load(dist_run / "fsdp_moments_rank0.pt"))):
        got = load_file(out / f"{name}.safetensors")
        assert got.keys() == expected.keys() and len(got) > 10, name
        for k, v in expected.items():
            assert torch.equal(got[k], v), f"{name}: {k}"
    texts = TEXTS[:3]
    final = MultimodalEncoder.from_pretrained(dist_run / "fsdp" / "final")
    exported = MultimodalEncoder.from_pretrained(export(ckpt, tmp_path / "encoder"))
    assert torch.equal(exported.encode_texts(texts), final.encode_texts(texts))


def test_fsdp_evaluation_is_sharded(dist_run):
    """Under FSDP each rank embeds half the eval set (361 captions and 89 images, each
    share padded to 181 + 45 rows) in the same number of forwards (each a collective); rank
    0 alone returns metrics, the ones in the run's eval.csv. (That they equal one process's
    is test_fsdp_outputs_load_in_one_process's check.)"""
    import pandas as pd

    rows = [load(dist_run / f"fsdp_rank{r}.pt")["eval_rows"] for r in range(WORLD)]
    assert [sum(r) for r in rows] == [181 + 45] * WORLD, rows
    assert len(rows[0]) == len(rows[1]) and max(rows[0]) <= 8  # encoder.batch_size rows
    assert not (dist_run / "fsdp_eval_rank1.csv").exists()
    again = pd.read_csv(dist_run / "fsdp_eval_rank0.csv", index_col=0)
    pd.testing.assert_frame_equal(again, pd.read_csv(dist_run / "fsdp" / "eval.csv", index_col=0))


def test_fsdp_lora_with_checkpointing_equals_single_process(dist_run, tmp_path):
    """LoRA adapters and activation checkpointing under FSDP: the same 2 steps as one process,
    and the saved adapter holds those weights."""
    from mmlib import MultimodalEncoder
    from mmlib.train import Trainer

    single = Trainer(lora_trainer_config(tmp_path / "single", micro_batch_size=3))
    single.train()
    expected = {n: p.detach() for n, p in single.encoder.named_parameters() if p.requires_grad}
    assert sum("lora_" in n for n in expected) >= 8
    for r in range(WORLD):
        _assert_weights_close(load(dist_run / f"fsdp_lora_weights_rank{r}.pt"), expected,
                              f"fsdp lora rank {r}", FSDP_WEIGHT_ATOL)
    loaded = MultimodalEncoder.from_pretrained(dist_run / "fsdp_lora" / "final")
    got = {n: p.detach() for n, p in loaded.named_parameters() if p.requires_grad}
    _assert_weights_close(got, load(dist_run / "fsdp_lora_weights_rank0.pt"), "saved adapter",
                          atol=0)


def test_checkpoint_memory_is_one_shard_not_the_whole_state(dist_run):
    """Writing a checkpoint under FSDP costs each rank at most ~1.3x its own shard (weights +
    AdamW moments) of extra resident memory: nothing is gathered onto rank 0 (which would cost
    W x the shard, ~400 GB for a 32B full fine-tune)."""
    for r in range(WORLD):
        got = load(dist_run / f"memory_rank{r}.pt")
        mb = {k: round(v / 2**20, 1) for k, v in got.items()}
        print(f"rank {r}: extra {mb['extra']} MB while saving, shard {mb['shard']} MB, "
              f"ratio {got['extra'] / got['shard']:.2f}")
        assert got["shard"] > 80 * 2**20, mb  # big enough that allocator noise is small
        assert got["extra"] <= 1.3 * got["shard"], mb


def test_fsdp_reduce_scatters_once_per_step(dist_run, tmp_path):
    """One step of 2 accumulated batches, plain (2 backward passes) and with GradCache (one
    per micro-batch): each FSDP unit's gradients are reduce-scattered once, after the last
    backward pass; loss, gradient norm and clipped gradients equal one process's. With
    fsdp_sync_every_backward each pass reduce-scatters (64 here, for 6 units), to the same
    result."""
    # Gradients, not weights: AdamW's first step moves every weight by ~lr whatever its
    # gradient's size (see FSDP_WEIGHT_ATOL); clipped, they carry the scale too.
    expected = trainer_step(accum_trainer_config(tmp_path))
    for r in range(WORLD):
        for name, got in load(dist_run / f"fsdp_grad_sync_rank{r}.pt").items():
            # 6 units (2 vision blocks, 2 decoder layers, head, root): one reduce-scatter each
            # per step; 64 when every GradCache micro-batch pass syncs (the old behaviour).
            expected_count = {"plain": 6, "gradcache": 6, "gradcache_every": 64}[name]
            assert (got["units"], got["reduce_scatters"]) == (6, expected_count), name
            assert got["stats"] == pytest.approx(expected["stats"], rel=1e-5), name
            assert got["grads"].keys() == expected["grads"].keys()
            for n, g in expected["grads"].items():
                assert_grad_close(got["grads"][n], g, f"{name} rank {r} {n}")


def test_fsdp_bf16_gathers_bf16_and_keeps_fp32_shards(dist_run):
    """bf16 mixed precision under FSDP: the backbone's units compute with (so all-gather)
    bf16 parameters, the projection head fp32; the shards the optimizer updates and their
    gradients (reduce-scattered in fp32) stay fp32. Loss and gradients agree with one
    process under bf16 autocast within bf16 noise: FSDP also rounds what autocast keeps in
    fp32 (embeddings, norm weights, the residual stream). Measured: loss 3e-4 relative,
    whole gradient 0.9%, worst tensor 3.2% (a k_proj bias); one process's bf16 vs fp32
    gradients differ by up to 1.5%. Bounds: 2e-3, 3%, 10%; wrong rows or a factor W are
    O(1)."""
    enc = make_encoder(mixed_precision="bf16")
    texts, images, _ = raw_inputs()
    loss = LOSS(enc(**enc.tokenize(texts)), enc(**enc.tokenize(images=images)))
    loss.backward()
    expected = grads(enc)
    bf16, fp32 = ["torch.bfloat16"], ["torch.float32"]
    for r in range(WORLD):
        got = load(dist_run / f"fsdp_bf16_rank{r}.pt")
        assert got["inside_forward"] == {"decoder layer": bf16, "vision block": bf16,
                                         "token embedding (root)": bf16, "projection": fp32}
        assert got["shards"] == fp32 and got["all_sharded"] and got["embeddings"] == fp32[0]
        assert got["grads"].keys() == expected.keys()
        assert {g.dtype for g in got["grads"].values()} == {torch.float32}
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=2e-3, atol=0)
        diff = {n: (got["grads"][n] - g).norm() / g.norm() for n, g in expected.items()}
        whole = torch.stack([(got["grads"][n] - g).norm() for n, g in expected.items()]).norm()
        assert whole / torch.stack([g.norm() for g in expected.values()]).norm() < 0.03
        assert max(diff.values()) < 0.10, max(diff.items(), key=lambda kv: kv[1])


def test_fsdp_multilevel_equals_single_process(dist_run, tmp_path):
    """loss=multilevel under FSDP: forward_layers runs through the sharded root's forward
    (whose pre-forward gathers the embeddings and final norm); one step's loss, per-layer
    losses, gradient norm and clipped gradients equal one process's."""
    expected = trainer_step(trainer_config(tmp_path, loss="multilevel", max_steps=1,
                                           save_every=0))
    assert any(k.startswith("loss@L-2@") for k in expected["stats"])
    for r in range(WORLD):
        got = load(dist_run / f"fsdp_multilevel_rank{r}.pt")
        assert got["stats"] == pytest.approx(expected["stats"], rel=1e-5)
        assert got["grads"].keys() == expected["grads"].keys()
        for n, g in expected["grads"].items():
            assert_grad_close(got["grads"][n], g, f"multilevel rank {r} {n}")


def test_fsdp_needs_torchrun(monkeypatch, tmp_path):
    from mmlib.fsdp import shard_encoder
    from mmlib.train import Trainer

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="fsdp=true .* torchrun"):
        Trainer(trainer_config(tmp_path, fsdp=True))
    with pytest.raises(RuntimeError, match="process group"):
        shard_encoder(make_encoder())
    with pytest.raises(ValueError, match="fsdp_sync_every_backward is an option of fsdp=true"):
        trainer_config(tmp_path, fsdp_sync_every_backward=True)


def test_deferred_gradients_that_cannot_fit_the_gpu_are_refused(monkeypatch):
    """One reduce-scatter per step holds the whole fp32 gradient on every rank: on a GPU where
    that passes half its memory (a 32B full fine-tune: 131 GB) the run is refused up front,
    naming the option that shards the gradients again; on CPU there is no budget to check."""
    from types import SimpleNamespace

    from mmlib.fsdp import check_deferred_gradients_fit

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=80 * 10**9))
    gpu = torch.device("cuda", 0)
    check_deferred_gradients_fit(4 * 232_000_000, gpu)  # 72B LoRA: 0.93 GB, fine
    check_deferred_gradients_fit(40 * 10**9, gpu)  # exactly half: fine
    with pytest.raises(ValueError, match=r"130\.8 GB.*80 GB: set fsdp_sync_every_backward=true"):
        check_deferred_gradients_fit(4 * 32_690_000_000, gpu)
    check_deferred_gradients_fit(4 * 32_690_000_000, torch.device("cpu"))
