"""Tests for mmlib.losses: fused Matryoshka InfoNCE, hard negatives, multi-level, temperature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmlib.losses import (
    ContrastiveLossWithHardNegatives,
    LearnableTemperature,
    MultiLevelContrastiveLoss,
    matryoshka_in_batch_negative_loss,
    naive_matryoshka_loss,
    resolve_dims,
    resolve_dims_and_weights,
)

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to load on the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- references
def naive_dim_loss(q, t, d, tau, symmetric):
    """Loss at one dim from the package's readable reference (itself checked by hand below)."""
    return naive_matryoshka_loss(q, t, dims=(d,), temperature=tau, symmetric=symmetric)


def naive_mrl(q, t, dim_weights, tau=0.07, symmetric=True):
    """sum_d w_d L_d over explicit (dim, weight) pairs, one matmul per dim."""
    dims, weights = zip(*dim_weights, strict=True)
    return naive_matryoshka_loss(q, t, dims, list(weights), temperature=tau, symmetric=symmetric)


def python_dim_loss(q, t, d, tau, symmetric):
    """L_d in plain Python floats (math only): an independent check of the torch reference."""
    B = len(q)

    def unit(row):
        norm = math.sqrt(sum(x * x for x in row[:d]))
        return [x / max(norm, 1e-12) for x in row[:d]]

    qs, ts = [unit(r) for r in q], [unit(r) for r in t]
    sim = [[sum(a * b for a, b in zip(qi, tj, strict=True)) / tau for tj in ts] for qi in qs]

    def ce(rows):  # mean over rows of -log softmax(row)[i]
        return sum(math.log(sum(math.exp(x) for x in row)) - row[i]
                   for i, row in enumerate(rows)) / len(rows)

    loss = ce(sim)
    if symmetric:
        loss = (loss + ce([[sim[i][j] for i in range(B)] for j in range(B)])) / 2
    return loss


def make(B, N, E, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, E, generator=gen).to(dtype).requires_grad_()
    t = torch.randn(N, E, generator=gen).to(dtype).requires_grad_()
    return q, t


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------- fused MRL loss vs naive
# (dims given, weights given, the (dim, weight) pairs they must resolve to for E = 48)
DIM_CASES = [
    ((8, 16, 32, None), None, [(8, 1.0), (16, 1.0), (32, 1.0), (48, 1.0)]),
    ((32, None, 8, 32, 48), (2.0, 0.5, 1.5, 2.0, 0.5), [(8, 1.5), (32, 2.0), (48, 0.5)]),
    ((None,), None, [(48, 1.0)]),
    ((20,), (3.0,), [(20, 3.0)]),  # largest dim < E: trailing columns get zero gradient
    ((5, 48, 13), {5: 0.25, 13: 1.0, None: 2.0}, [(5, 0.25), (13, 1.0), (48, 2.0)]),
    # dims sharing a factor >= 16 take the chunked prefix-norm path (with and without E)
    ((16, None, 32), None, [(16, 1.0), (32, 1.0), (48, 1.0)]),
    ((32, 16), (1.0, 2.0), [(16, 2.0), (32, 1.0)]),
]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("extra", [0, 3])
def test_naive_reference_matches_a_hand_computation(symmetric, extra):
    """The readable reference against the definition in plain Python floats."""
    q, t = make(4, 4 + extra, 6, seed=20 + extra)
    q, t = q.detach(), t.detach()
    tau, dims, weights = 0.1, (2, 6), (0.5, 2.0)
    loss, details = naive_matryoshka_loss(
        q, t, dims=dims, weights=weights, temperature=tau, symmetric=symmetric, return_details=True
    )
    for d in dims:
        want = python_dim_loss(q.tolist(), t.tolist(), d, tau, symmetric)
        assert abs(float(details[d]) - want) < 1e-5 * max(1.0, want)
    assert abs(float(loss) - sum(w * float(details[d]) for d, w in zip(dims, weights, strict=True))) < 1e-5


def test_naive_reference_validates_like_the_fused_loss():
    q, t = torch.randn(4, 8), torch.randn(4, 8)
    for fn in (naive_matryoshka_loss, matryoshka_in_batch_negative_loss):
        with pytest.raises(ValueError, match="dim"):
            fn(q, t, dims=(16,))
        with pytest.raises(ValueError, match="weights"):
            fn(q, t, dims=(4, 8), weights=(1.0,))
        with pytest.raises(ValueError):
            fn(q, t[:2])


@pytest.mark.parametrize("B,extra", [(1, 0), (1, 4), (3, 0), (3, 5), (17, 0), (17, 9)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("case", range(len(DIM_CASES)))
def test_matches_naive_loss_and_gradients(B, extra, symmetric, case):
    dims, weights, resolved = DIM_CASES[case]
    q, t = make(B, B + extra, 48, seed=B * 31 + extra + case)
    loss, details = matryoshka_in_batch_negative_loss(
        q, t, dims=dims, weights=weights, symmetric=symmetric, return_details=True
    )
    ref, ref_details = naive_matryoshka_loss(
        q, t, dims=dims, weights=weights, symmetric=symmetric, return_details=True
    )
    torch.testing.assert_close(ref, naive_mrl(q, t, resolved, symmetric=symmetric))
    assert list(ref_details) == [d for d, _ in resolved]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    assert list(details) == [d for d, _ in resolved]
    for d, _ in resolved:
        torch.testing.assert_close(
            details[d], ref_details[d], rtol=RTOL, atol=ATOL
        )
    for got, want in zip(grads(loss, q, t), grads(ref, q, t), strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("tau", [0.5, 0.07, 0.0155, 0.01, 0.005])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_naive_across_temperatures(tau, symmetric):
    # 0.0155 (1/tau = 64.5): single-exp path near its limit; <= 0.01: max-subtracted path
    q, t = make(9, 13, 40, seed=7)
    pairs = [(10, 1.0), (20, 0.5), (40, 1.0)]
    loss = matryoshka_in_batch_negative_loss(
        q, t, dims=(10, 20, 40), weights=(1.0, 0.5, 1.0), temperature=tau, symmetric=symmetric
    )
    ref = naive_mrl(q, t, pairs, tau=tau, symmetric=symmetric)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    for got, want in zip(grads(loss, q, t), grads(ref, q, t), strict=True):
        scale = want.abs().max()  # gradients grow like 1/tau
        torch.testing.assert_close(got / scale, want / scale, rtol=RTOL, atol=ATOL)


def test_cold_temperature_with_far_negative_rows_stays_exact():
    # every cosine in row 0 is negative: at tau=0.005 a plain exp(S) underflows to 0 on that row
    q, t = make(6, 6, 16, seed=3)
    with torch.no_grad():
        t.abs_()
        q[0] = -t.mean(0) - 0.1
    loss = matryoshka_in_batch_negative_loss(q, t, dims=(8, 16), temperature=0.005)
    ref = naive_mrl(q, t, [(8, 1.0), (16, 1.0)], tau=0.005)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=1e-4)


def test_only_one_input_requires_grad_and_retain_graph():
    q, t = make(5, 7, 24, seed=11)
    t_const = t.detach()
    loss = matryoshka_in_batch_negative_loss(q, t_const, dims=(8, None))
    (g1,) = torch.autograd.grad(loss, q, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, q)  # second backward through the same graph
    (want,) = grads(naive_mrl(q, t_const, [(8, 1.0), (24, 1.0)]), q)
    torch.testing.assert_close(g1, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g2, want, rtol=RTOL, atol=ATOL)
    loss_t = matryoshka_in_batch_negative_loss(q.detach(), t, dims=(8, None))
    (gt,) = grads(loss_t, t)
    (want_t,) = grads(naive_mrl(q.detach(), t, [(8, 1.0), (24, 1.0)]), t)
    torch.testing.assert_close(gt, want_t, rtol=RTOL, atol=ATOL)


def test_upstream_gradient_scales_input_gradients():
    q, t = make(4, 6, 16, seed=5)
    loss = matryoshka_in_batch_negative_loss(q, t, dims=(4, None))
    (g,) = torch.autograd.grad(3.5 * loss, q)
    (want,) = grads(3.5 * naive_mrl(q, t, [(4, 1.0), (16, 1.0)]), q)
    torch.testing.assert_close(g, want, rtol=RTOL, atol=ATOL)


def test_zero_prefix_row_behaves_like_f_normalize():
    q, t = make(4, 4, 16, seed=2)
    with torch.no_grad():
        q[1, :8] = 0.0  # zero prefix at dim 8: cosines 0 there, as with F.normalize
    loss = matryoshka_in_batch_negative_loss(q, t, dims=(8, 16))
    ref = naive_mrl(q, t, [(8, 1.0), (16, 1.0)])
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    for got, want in zip(grads(loss, q, t), grads(ref, q, t), strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- properties
def test_invariant_to_permuting_pairs():
    q, t = make(11, 15, 32, seed=4)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    t_perm = torch.cat([t[perm], t[11:]])
    dims = (8, 16, None)
    base, d0 = matryoshka_in_batch_negative_loss(q, t, dims=dims, return_details=True)
    permuted, d1 = matryoshka_in_batch_negative_loss(
        q[perm], t_perm, dims=dims, return_details=True
    )
    torch.testing.assert_close(permuted, base, rtol=RTOL, atol=ATOL)
    for d in d0:
        torch.testing.assert_close(d1[d], d0[d], rtol=RTOL, atol=ATOL)
    # permuting only the queries breaks the pairing and changes the loss
    broken = matryoshka_in_batch_negative_loss(q[perm], t, dims=dims)
    assert not torch.allclose(broken, base, rtol=1e-3)


def test_near_zero_for_perfectly_separated_pairs():
    # q_i = t_i = e_i: every prefix >= 4 keeps the pairs orthogonal to each other
    eye = torch.eye(4, 16)
    loss = matryoshka_in_batch_negative_loss(eye, eye.clone(), dims=(4, 8, None), temperature=0.01)
    assert 0.0 <= float(loss) < 1e-6
    warm = matryoshka_in_batch_negative_loss(eye, eye.clone(), dims=(4, 8, None), temperature=1.0)
    assert float(warm) > 0.5  # same pairs, warm temperature: clearly not ~0


def test_bf16_inputs_give_float32_loss_close_to_fp32():
    q32, t32 = make(16, 16, 64, seed=9)
    q16, t16 = q32.detach().bfloat16().requires_grad_(), t32.detach().bfloat16().requires_grad_()
    loss16 = matryoshka_in_batch_negative_loss(q16, t16, dims=(16, 32, None))
    loss32 = matryoshka_in_batch_negative_loss(q32, t32, dims=(16, 32, None))
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)
    # and exactly the fp32 computation on the bf16-rounded values
    exact = naive_mrl(q16.detach().float(), t16.detach().float(), [(16, 1.0), (32, 1.0), (64, 1.0)])
    torch.testing.assert_close(loss16, exact, rtol=RTOL, atol=ATOL)
    gq, gt = grads(loss16, q16, t16)
    assert gq.dtype == torch.bfloat16 and gt.dtype == torch.bfloat16


def test_autocast_is_disabled_inside_the_loss():
    q, t = make(8, 8, 32, seed=12)
    plain = matryoshka_in_batch_negative_loss(q, t, dims=(8, None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = matryoshka_in_batch_negative_loss(q, t, dims=(8, None))
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=RTOL, atol=ATOL)


def test_details_are_detached_and_sum_to_loss():
    q, t = make(6, 6, 32, seed=13)
    loss, details = matryoshka_in_batch_negative_loss(
        q, t, dims=(16, None), weights={16: 0.3, 32: 2.0}, return_details=True
    )
    assert loss.requires_grad
    assert all(v.dim() == 0 and not v.requires_grad for v in details.values())
    torch.testing.assert_close(loss.detach(), 0.3 * details[16] + 2.0 * details[32])


# ---------------------------------------------------------------- temperature
def test_tensor_temperature_gets_naive_gradient():
    q, t = make(7, 10, 32, seed=14)
    tau = torch.tensor(0.05, requires_grad=True)
    loss = matryoshka_in_batch_negative_loss(q, t, dims=(8, 16, None), temperature=tau)
    got = grads(loss, q, t, tau)
    tau_ref = torch.tensor(0.05, requires_grad=True)
    ref = naive_mrl(q, t, [(8, 1.0), (16, 1.0), (32, 1.0)], tau=tau_ref)
    want = grads(ref, q, t, tau_ref)
    assert float(want[2].abs()) > 1.0  # a real gradient, not zero
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("symmetric", [True, False])
def test_learnable_temperature_gradient_matches_naive(symmetric):
    q, t = make(5, 8, 24, seed=15)
    temp, temp_ref = LearnableTemperature(0.07), LearnableTemperature(0.07)
    assert abs(temp.temperature - 0.07) < 1e-6
    matryoshka_in_batch_negative_loss(
        q, t, dims=(6, None), temperature=temp(), symmetric=symmetric
    ).backward()
    naive_mrl(
        q.detach(), t.detach(), [(6, 1.0), (24, 1.0)], tau=temp_ref(), symmetric=symmetric
    ).backward()
    assert temp.log_scale.grad is not None and float(temp.log_scale.grad.abs()) > 1e-3
    torch.testing.assert_close(temp.log_scale.grad, temp_ref.log_scale.grad, rtol=RTOL, atol=ATOL)
    # a module can also be passed directly
    temp.zero_grad()
    matryoshka_in_batch_negative_loss(
        q, t, dims=(6, None), temperature=temp, symmetric=symmetric
    ).backward()
    torch.testing.assert_close(temp.log_scale.grad, temp_ref.log_scale.grad, rtol=RTOL, atol=ATOL)


def test_learnable_temperature_is_clamped_at_max_scale():
    temp = LearnableTemperature(0.07, max_scale=100.0)
    with torch.no_grad():
        temp.log_scale.fill_(10.0)  # scale e^10 > 100
    tau = temp()
    torch.testing.assert_close(tau, torch.tensor(0.01))
    tau.backward()
    assert float(temp.log_scale.grad) == 0.0  # like CLIP: no gradient beyond the clamp
    with pytest.raises(ValueError, match="max_scale"):
        LearnableTemperature(0.001, max_scale=100.0)
    with pytest.raises(ValueError, match="init"):
        LearnableTemperature(-0.1)


# ---------------------------------------------------------------- argument resolution / errors
def test_resolve_dims_and_weights():
    assert resolve_dims((2048, None, 256, 512, 256), 2048) == (256, 512, 2048)
    assert resolve_dims(16, 32) == (16,)
    assert resolve_dims_and_weights((None, 8, 32), (1.0, 2.0, 1.0), 32) == ((8, 32), (2.0, 1.0))
    assert resolve_dims_and_weights((8, 16), {16: 3, 8: 0}, 32) == ((8, 16), (0.0, 3.0))


def _q(B=4, E=16):
    return torch.randn(B, E)


ERROR_CASES = [
    # (kwargs overriding defaults, exception, message pattern)
    (dict(query=torch.randn(4)), ValueError, "query must be 2-D"),
    (dict(target=torch.randn(2, 4, 16)), ValueError, "target must be 2-D"),
    (dict(query=[[1.0]]), TypeError, "query must be a torch.Tensor"),
    (dict(query=torch.ones(4, 16, dtype=torch.long)), TypeError, "query must be a floating"),
    (dict(target=torch.randn(4, 12)), ValueError, "same embedding width"),
    (dict(query=torch.randn(0, 16), target=torch.randn(0, 16)), ValueError, "B = 0"),
    (dict(target=torch.randn(3, 16)), ValueError, "N >= B"),
    (dict(dims=(0, 16)), ValueError, "dims entries must be positive"),
    (dict(dims=(-4,)), ValueError, "dims entries must be positive"),
    (dict(dims=(8, 32)), ValueError, "larger than the embedding width E=16"),
    (dict(dims=(8.0,)), TypeError, "dims entries must be positive ints"),
    (dict(dims=("8",)), TypeError, "dims entries must be positive ints"),
    (dict(dims=(True,)), TypeError, "dims entries must be positive ints"),
    (dict(dims=()), ValueError, "dims is empty"),
    (dict(dims=None), TypeError, r"dims=\(None,\)"),
    (dict(dims=(8, 16), weights=(1.0,)), ValueError, "weights has 1 entries but dims has 2"),
    (dict(dims=(8, 16), weights=(1.0, -1.0)), ValueError, "finite and >= 0"),
    (dict(dims=(8, 16), weights=(1.0, float("nan"))), ValueError, "finite and >= 0"),
    (dict(dims=(8, 16), weights=(1.0, "a")), TypeError, "must be a real number"),
    (dict(dims=(16, None), weights=(1.0, 2.0)), ValueError, "given twice"),
    (dict(dims=(8, 16), weights={8: 1.0}), ValueError, r"no entry for dims \[16\]"),
    (dict(dims=(8, 16), weights={8: 1.0, 16: 1.0, 4: 1.0}), ValueError, "not in dims"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=-0.07), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=torch.tensor([0.1, 0.2])), ValueError, "one-element tensor"),
    (dict(temperature="0.07"), TypeError, "temperature must be a real number"),
]


@pytest.mark.parametrize("overrides,exc,pattern", ERROR_CASES)
def test_errors_are_clear(overrides, exc, pattern):
    kwargs = dict(query=_q(), target=_q(), dims=(8, None))
    kwargs.update(overrides)
    with pytest.raises(exc, match=pattern):
        matryoshka_in_batch_negative_loss(**kwargs)


def test_nonfinite_loss_names_the_dim():
    q, t = make(4, 4, 32, seed=16)
    q = q.detach().clone()
    q[2, 12] = float("nan")  # inside dims 16 and 32, outside dim 8
    with pytest.raises(FloatingPointError, match="dim 16"):
        matryoshka_in_batch_negative_loss(q, t, dims=(8, 16, None))
    loss, details = matryoshka_in_batch_negative_loss(
        q, t, dims=(8, 16, None), check_finite=False, return_details=True
    )
    assert math.isfinite(float(details[8])) and math.isnan(float(details[16]))
    assert math.isnan(float(loss.detach()))


# ---------------------------------------------------------------- hard negatives
def naive_hard_negative_loss(q, p, h, d, tau, symmetric, keep_row=None, keep_col=None):
    """One dim, from the definition: per-query candidate lists, optional keep masks."""
    B = q.shape[0]
    qn, pn = F.normalize(q[:, :d], dim=1), F.normalize(p[:, :d], dim=1)
    rows = []
    for i in range(B):
        cand = [qn[i] @ pn[j] for j in range(B) if keep_row is None or keep_row[i][j]]
        if h is not None:
            hn = F.normalize(h[i, :, :d], dim=1)
            cand += [qn[i] @ hn[k] for k in range(h.shape[1])]
        pos = qn[i] @ pn[i]
        rows.append(torch.logsumexp(torch.stack(cand) / tau, 0) - pos / tau)
    loss = torch.stack(rows).mean()
    if symmetric:
        cols = []
        for j in range(B):
            cand = [qn[i] @ pn[j] for i in range(B) if keep_col is None or keep_col[i][j]]
            cols.append(torch.logsumexp(torch.stack(cand) / tau, 0) - (qn[j] @ pn[j]) / tau)
        loss = (loss + torch.stack(cols).mean()) / 2
    return loss


@pytest.mark.parametrize("symmetric", [True, False])
def test_hard_negative_loss_without_extras_equals_mrl_function(symmetric):
    q, p = make(9, 9, 32, seed=17)
    loss_fn = ContrastiveLossWithHardNegatives(
        dims=(8, None, 16), weights=(1.0, 0.5, 2.0), symmetric=symmetric
    )
    loss, details = loss_fn(q, p, return_details=True)
    ref, ref_details = matryoshka_in_batch_negative_loss(
        q,
        p,
        dims=(8, None, 16),
        weights=(1.0, 0.5, 2.0),
        symmetric=symmetric,
        return_details=True,
    )
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    assert details.keys() == ref_details.keys()
    for got, want in zip(grads(loss, q, p), grads(ref, q, p), strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("symmetric", [True, False])
def test_hard_negatives_match_naive(symmetric):
    q, p = make(5, 5, 24, seed=18)
    h = torch.randn(5, 3, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = ContrastiveLossWithHardNegatives(dims=(8, None), temperature=0.05, symmetric=symmetric)(
        q, p, h
    )
    ref = sum(naive_hard_negative_loss(q, p, h, d, 0.05, symmetric) for d in (8, 24))
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    for got, want in zip(grads(loss, q, p, h), grads(ref, q, p, h), strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_hard_negatives_raise_the_loss():
    q, p = make(6, 6, 16, seed=19)
    easy = ContrastiveLossWithHardNegatives(dims=(None,))(q, p)
    hard = ContrastiveLossWithHardNegatives(dims=(None,))(q, p, (p + 0.3 * q)[:, None, :])
    assert float(hard.detach()) > float(easy.detach()) + 0.1


def test_guard_masks_a_hard_negative_identical_to_its_positive():
    gen = torch.Generator().manual_seed(20)
    p = torch.randn(6, 32, generator=gen)
    q = (p + 0.05 * torch.randn(6, 32, generator=gen)).requires_grad_()
    p.requires_grad_()
    # hard negative 0 of every query is a copy of its positive; negative 1 is random
    h = torch.stack([p.detach(), torch.randn(6, 32, generator=gen)], 1).requires_grad_()
    guarded = ContrastiveLossWithHardNegatives(dims=(16, None), margin=0.1)
    loss = guarded(q, p, h)
    without = guarded(q, p, h[:, 1:])  # the same loss with that negative removed
    torch.testing.assert_close(loss, without, rtol=RTOL, atol=ATOL)
    (gh,) = grads(loss, h)
    assert float(gh[:, 0].abs().max()) == 0.0 and float(gh[:, 1].abs().max()) > 0
    # without the guard the copy counts as a negative and raises the loss by about log 2 per dim
    unguarded = ContrastiveLossWithHardNegatives(dims=(16, None))(q, p, h)
    assert float(unguarded.detach()) > float(without.detach()) + 0.5


def test_guard_never_masks_the_positive_and_masks_in_batch_false_negatives():
    q, p = make(4, 4, 8, seed=21)
    with torch.no_grad():
        p[3] = p[1]  # target 3 is a duplicate of target 1: a false negative for query 1
    fn = ContrastiveLossWithHardNegatives(dims=(None,), margin=0.0, symmetric=False)
    loss = fn(q, p)
    qn, pn = F.normalize(q.detach(), dim=1), F.normalize(p.detach(), dim=1)
    cos = qn @ pn.T
    keep = cos <= cos.diagonal()[:, None]  # margin 0: drop negatives above the positive
    keep.fill_diagonal_(True)
    ref = naive_hard_negative_loss(q, p, None, 8, 0.07, False, keep_row=keep.tolist())
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    assert not bool(keep.all())  # the duplicate really was masked for one of queries 1 / 3


def test_hand_checked_small_case():
    # B = 2, E = 2, one-way, tau = 1: cosines [[1, 0], [0, 1]], hard cosines [[0.6], [-1]]
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([[[0.6, 0.8]], [[0.0, -1.0]]])
    fn = ContrastiveLossWithHardNegatives(dims=(None,), temperature=1.0, symmetric=False)
    e = math.e
    row0 = -math.log(e / (e + 1 + math.exp(0.6)))
    row1 = -math.log(e / (1 + e + math.exp(-1)))
    assert abs(float(fn(q, p, h)) - (row0 + row1) / 2) < 1e-6
    # symmetric: reverse direction over the in-batch block only: each column -log(e / (e + 1))
    fn_sym = ContrastiveLossWithHardNegatives(dims=(None,), temperature=1.0)
    col = -math.log(e / (e + 1))
    assert abs(float(fn_sym(q, p, h)) - ((row0 + row1) / 2 + col) / 2) < 1e-6


@pytest.mark.parametrize("symmetric", [True, False])
def test_mining_keeps_the_k_hardest_in_batch_negatives(symmetric):
    q, p = make(7, 7, 16, seed=22)
    h = torch.randn(7, 2, 16, generator=torch.Generator().manual_seed(2))
    k = 2
    loss = ContrastiveLossWithHardNegatives(dims=(None,), mine_hardest=k, symmetric=symmetric)(
        q, p, h
    )
    cos = F.normalize(q.detach(), dim=1) @ F.normalize(p.detach(), dim=1).T
    off = cos - 10 * torch.eye(7)
    top_rows = off.topk(k, dim=1).indices
    top_cols = off.topk(k, dim=0).indices
    keep_row = [[i == j or j in top_rows[i].tolist() for j in range(7)] for i in range(7)]
    keep_col = [[i == j or i in top_cols[:, j].tolist() for j in range(7)] for i in range(7)]
    ref = naive_hard_negative_loss(q, p, h, 16, 0.07, symmetric, keep_row, keep_col)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    full = ContrastiveLossWithHardNegatives(dims=(None,), symmetric=symmetric)(q, p, h)
    assert float(loss.detach()) < float(full.detach())  # fewer negatives, lower loss


def test_hard_negative_errors():
    fn = ContrastiveLossWithHardNegatives(dims=(None,))
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"hard_negatives must have shape \(B, K, E\)"):
        fn(q, p, torch.randn(4, 3))  # 2-D (M, E) is shared; this width is wrong
    with pytest.raises(ValueError, match="one row per query row"):
        fn(q, torch.randn(5, 8))
    with pytest.raises(ValueError, match="mine_hardest must be >= 0"):
        ContrastiveLossWithHardNegatives(mine_hardest=-1)
    with pytest.raises(ValueError, match="margin must be finite"):
        ContrastiveLossWithHardNegatives(margin=float("nan"))
    with pytest.raises(FloatingPointError, match="dim 8"):
        fn(torch.full((4, 8), float("nan")), p)


# ---------------------------------------------------------------- multi-level
def test_multilevel_equals_weighted_naive_sum():
    levels = {}
    for layer in (4, 8, 12):
        levels[layer] = make(6, 9, 32, seed=layer)
    lw = {4: 0.25, 8: 0.0, 12: 1.0}
    loss_fn = MultiLevelContrastiveLoss(dims=(8, None), weights=(2.0, 1.0), level_weights=lw)
    loss, details = loss_fn(levels, return_details=True)
    ref = sum(lw[k] * naive_mrl(q, t, [(8, 2.0), (32, 1.0)]) for k, (q, t) in levels.items())
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    assert set(details) == {(k, d) for k in (4, 8, 12) for d in (8, 32)}
    torch.testing.assert_close(
        details[(8, 8)], naive_dim_loss(*levels[8], 8, 0.07, True).detach(), rtol=RTOL, atol=ATOL
    )
    inputs = [x for pair in levels.values() for x in pair]
    for got, want in zip(grads(loss, *inputs), grads(ref, *inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_multilevel_sequences_and_stacked_tensors():
    qs = [make(4, 4, 16, seed=s)[0] for s in range(3)]
    ts = [make(4, 4, 16, seed=s + 10)[1] for s in range(3)]
    loss_fn = MultiLevelContrastiveLoss(dims=(4, None), level_weights=[1.0, 2.0, 0.5])
    seq = loss_fn(qs, ts)
    ref = sum(
        w * naive_mrl(q, t, [(4, 1.0), (16, 1.0)])
        for w, q, t in zip([1.0, 2.0, 0.5], qs, ts, strict=True)
    )
    torch.testing.assert_close(seq, ref, rtol=RTOL, atol=ATOL)
    stacked = loss_fn(torch.stack(qs), torch.stack(ts))
    torch.testing.assert_close(stacked, ref, rtol=RTOL, atol=ATOL)


def test_multilevel_errors():
    q, t = torch.randn(4, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="missing"):
        MultiLevelContrastiveLoss(dims=(None,), level_weights={1: 1.0})({0: (q, t), 1: (q, t)})
    with pytest.raises(ValueError, match="queries has 2 levels but targets has 1"):
        MultiLevelContrastiveLoss(dims=(None,))([q, q], [t])
    with pytest.raises(ValueError, match="level 1: .*same embedding width"):
        MultiLevelContrastiveLoss(dims=(None,))({0: (q, t), 1: (q, torch.randn(4, 8))})
    bad = q.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"\(level, dim\) \(1, 16\)"):
        MultiLevelContrastiveLoss(dims=(None,))({0: (q, t), 1: (bad, t)})


# ---------------------------------------------------------------- default dims follow the width
@pytest.mark.parametrize(
    "width,expected",
    [(4096, (256, 512, 1024, 2048, 4096)), (2048, (256, 512, 1024, 2048)),
     (1024, (256, 512, 1024)), (600, (256, 512, 600)), (256, (256,)), (64, (64,))],
)
def test_default_dims_keep_the_ladder_entries_that_fit(width, expected):
    from mmlib.losses import DEFAULT_DIMS

    assert resolve_dims(DEFAULT_DIMS, width) == expected
    q, t = make(4, 4, width, seed=3)
    loss, details = matryoshka_in_batch_negative_loss(q, t, return_details=True)
    assert tuple(details) == expected
    ref = naive_mrl(q, t, [(d, 1.0) for d in expected])
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)


def test_issue_line_default_dims_below_2048():
    loss = matryoshka_in_batch_negative_loss(torch.randn(4, 1024), torch.randn(4, 1024))
    assert math.isfinite(float(loss))
    assert ContrastiveLossWithHardNegatives()(torch.randn(4, 64), torch.randn(4, 64)).isfinite()
    # an explicit dim larger than the width is still an error
    with pytest.raises(ValueError, match="larger than the embedding width"):
        resolve_dims((256, 2048), 1024)


# ---------------------------------------------------------------- identities, shared / per-query hard negatives
def naive_candidate_loss(q, p, h, d, tau, symmetric, row_cols, row_hard, col_rows):
    """One dim from explicit candidate lists: query i sees targets row_cols[i] and hard
    negatives row_hard[i]; in the reverse direction target j sees queries col_rows[j]."""
    qn, pn = F.normalize(q[:, :d], dim=1), F.normalize(p[:, :d], dim=1)
    hn = F.normalize(h[:, :d], dim=1) if h is not None else None
    rows = []
    for i in range(q.shape[0]):
        cand = [qn[i] @ pn[j] for j in row_cols[i]] + [qn[i] @ hn[m] for m in row_hard[i]]
        rows.append(torch.logsumexp(torch.stack(cand) / tau, 0) - (qn[i] @ pn[i]) / tau)
    loss = torch.stack(rows).mean()
    if symmetric:
        cols = [torch.logsumexp(torch.stack([qn[i] @ pn[j] for i in col_rows[j]]) / tau, 0)
                - (qn[j] @ pn[j]) / tau for j in range(q.shape[0])]
        loss = (loss + torch.stack(cols).mean()) / 2
    return loss


def _batch_with_collisions():
    """5 pairs, row 4 shares row 1's image; 4 shared hard negatives: #0 is row 2's image, #3
    repeats #1. Only hard negatives 1 and 2 are true negatives of every query."""
    gen = torch.Generator().manual_seed(40)
    q = torch.randn(5, 16, generator=gen)
    p = torch.randn(5, 16, generator=gen)
    p[4] = p[1]
    h = torch.randn(4, 16, generator=gen)
    h[0], h[3] = p[2], h[1]
    ids = torch.tensor([10, 11, 12, 13, 11]), torch.tensor([12, 100, 101, 100])
    return q.requires_grad_(), p.requires_grad_(), h.requires_grad_(), ids


@pytest.mark.parametrize("symmetric", [True, False])
def test_hard_negative_that_is_a_positive_is_masked_for_every_query(symmetric):
    q, p, h, (pid, hid) = _batch_with_collisions()
    fn = ContrastiveLossWithHardNegatives(dims=(8, None), symmetric=symmetric)
    loss, details = fn(q, p, h, return_details=True, positive_ids=pid, hard_negative_ids=hid)
    same = {(1, 4), (4, 1)}  # rows sharing an image are not each other's negatives
    cols = [[j for j in range(5) if (i, j) not in same] for i in range(5)]
    ref = {d: naive_candidate_loss(q, p, h, d, 0.07, symmetric, cols, [[1, 2]] * 5, cols)
           for d in (8, 16)}
    torch.testing.assert_close(loss, ref[8] + ref[16], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(details[8], ref[8].detach(), rtol=RTOL, atol=ATOL)
    for got, want in zip(grads(loss, q, p, h), grads(ref[8] + ref[16], q, p, h), strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # without identities row 2's own image is counted as a negative of row 2 and loss rises
    blind = fn(q, p, h)
    assert float(blind.detach()) > float(loss.detach()) + 0.1


def test_per_query_hard_negatives_with_identities():
    q, p, h, (pid, hid) = _batch_with_collisions()
    owner = torch.tensor([2, 0, 0, 0])  # #0 (row 2's image) offered to row 2 itself
    fn = ContrastiveLossWithHardNegatives(dims=(None,), temperature=0.05)
    loss = fn(q, p, h, positive_ids=pid, hard_negative_ids=hid, hard_negative_owner=owner)
    same = {(1, 4), (4, 1)}
    cols = [[j for j in range(5) if (i, j) not in same] for i in range(5)]
    hard = [[1, 2], [], [], [], []]  # #0 is a positive, #3 repeats #1 for the same owner
    ref = naive_candidate_loss(q, p, h, 16, 0.05, True, cols, hard, cols)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    # (B, K, E) per-query input equals 2-D input with owners
    h3 = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(41))
    owners = torch.arange(5).repeat_interleave(2)
    torch.testing.assert_close(fn(q, p, h3), fn(q, p, h3.reshape(10, 16),
                                                hard_negative_owner=owners), rtol=RTOL, atol=ATOL)


def _fixed_embedding_model(key):
    """A stand-in sentence-transformers model returning the embeddings stored under `key`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    class Fixed(torch.nn.Module):
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
        max_seq_length = 8

        def forward(self, features):
            return {"sentence_embedding": features[key]}

    return Fixed()


@pytest.mark.parametrize("symmetric", [False, True])
def test_shared_hard_negatives_equal_sentence_transformers_mnrl(symmetric):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    gen = torch.Generator().manual_seed(42)
    a, p, n = (torch.randn(6, 32, generator=gen, requires_grad=True) for _ in range(3))
    tau = 0.05
    ours = ContrastiveLossWithHardNegatives(dims=(None,), temperature=tau, symmetric=symmetric)
    directions = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
    st = MultipleNegativesRankingLoss(None, scale=1 / tau, directions=directions,
                                      partition_mode="per_direction")
    got, want = ours(a, p, n), st.compute_loss_from_embeddings([a, p, n], None)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    for g, w in zip(grads(got, a, p, n), grads(want, a, p, n), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # per-query hard negatives are a different loss (each query sees one, not six)
    per_query = ours(a, p, n[:, None, :])
    assert abs(float(per_query.detach()) - float(want.detach())) > 1e-2


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_guided_guard_equals_sentence_transformers_gistembed(margin):
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

    gen = torch.Generator().manual_seed(43)
    a, p, n = (torch.randn(6, 24, generator=gen, requires_grad=True) for _ in range(3))
    # guide: a different, correlated model, so that it masks some negatives but not all
    ga, gp, gn = (x.detach()[:, :12] + 0.5 * torch.randn(6, 12, generator=gen) for x in (a, p, n))
    gp[3], gn[1] = ga[0], ga[2]  # two clear false negatives by the guide's judgement
    st = GISTEmbedLoss(_fixed_embedding_model("emb"), _fixed_embedding_model("guide"),
                       temperature=0.05, margin=margin, contrast_anchors=False,
                       contrast_positives=False)
    feats = [{"emb": a, "guide": ga}, {"emb": p, "guide": gp}, {"emb": n, "guide": gn}]
    want = st(feats, None)
    ours = ContrastiveLossWithHardNegatives(dims=(None,), temperature=0.05, symmetric=False,
                                            margin=margin)
    got = ours(a, p, n, guide_query=ga, guide_positive=gp, guide_hard_negatives=gn)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    for g, w in zip(grads(got, a, p, n), grads(want, a, p, n), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # the guide really decided: unguarded and self-guided losses differ
    unguarded = ContrastiveLossWithHardNegatives(dims=(None,), temperature=0.05, symmetric=False)
    assert float(unguarded(a, p, n).detach()) > float(got.detach()) + 1e-3
    assert abs(float(ours(a, p, n).detach()) - float(got.detach())) > 1e-3


def test_identity_and_guide_errors():
    fn = ContrastiveLossWithHardNegatives(dims=(None,))
    q, p, h = torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match="positive_ids must be an integer tensor"):
        fn(q, p, h, positive_ids=torch.zeros(4))
    with pytest.raises(ValueError, match=r"hard_negative_ids must have shape \(3,\)"):
        fn(q, p, h, hard_negative_ids=torch.arange(4))
    with pytest.raises(ValueError, match="hard_negative_owner must index the 4 queries"):
        fn(q, p, h, hard_negative_owner=torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="set margin"):
        fn(q, p, guide_query=q, guide_positive=p)
    with pytest.raises(ValueError, match="without hard_negatives"):
        fn(q, p, hard_negative_ids=torch.arange(3))


def test_multilevel_applies_identities_at_every_level():
    q, p, h, (pid, hid) = _batch_with_collisions()
    levels = {-1: (q, torch.cat([p, h])), -2: (q * 0.5 + 0.1, torch.cat([p, h]).flip(1))}
    fn = MultiLevelContrastiveLoss(dims=(8, None), level_weights={-1: 1.0, -2: 0.25})
    loss, details = fn(levels, return_details=True, positive_ids=pid, hard_negative_ids=hid)
    same = {(1, 4), (4, 1)}
    cols = [[j for j in range(5) if (i, j) not in same] for i in range(5)]
    ref = 0
    for key, lw in ((-1, 1.0), (-2, 0.25)):
        lq, lt = levels[key]
        for d in (8, 16):
            one = naive_candidate_loss(lq, lt[:5], lt[5:], d, 0.07, True, cols, [[1, 2]] * 5, cols)
            torch.testing.assert_close(details[(key, d)], one.detach(), rtol=RTOL, atol=ATOL)
            ref = ref + lw * one
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)


def test_masked_loss_gives_a_learnable_temperature_the_naive_gradient():
    q, p, h, (pid, hid) = _batch_with_collisions()
    temp = LearnableTemperature(0.07)
    fn = ContrastiveLossWithHardNegatives(dims=(None,), temperature=temp, margin=0.0)
    loss = fn(q, p, h, positive_ids=pid, hard_negative_ids=hid)
    (got,) = torch.autograd.grad(loss, temp.log_scale)
    tau = torch.tensor(0.07, requires_grad=True)
    qn, pn, hn = (F.normalize(x.detach(), dim=1) for x in (q, p, h))
    cos, pos = qn @ pn.T, (qn * pn).sum(1)
    same = {(1, 4), (4, 1)}
    cols = [[j for j in range(5) if j == i or ((i, j) not in same and cos[i, j] <= pos[i])]
            for i in range(5)]
    hard = [[m for m in (1, 2) if qn[i] @ hn[m] <= pos[i]] for i in range(5)]
    rows = [[i for i in range(5) if i == j or ((i, j) not in same and cos[i, j] <= pos[j])]
            for j in range(5)]
    ref = naive_candidate_loss(q.detach(), p.detach(), h.detach(), 16, tau, True, cols, hard, rows)
    (d_tau,) = torch.autograd.grad(ref, tau)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    # d/d log_scale = d/d tau * d tau / d log_scale = d/d tau * (-tau)
    torch.testing.assert_close(got, -0.07 * d_tau, rtol=1e-4, atol=1e-6)
    assert any(len(c) < 4 for c in cols)  # something was masked
