import functools

import pytest
import torch

from mmlib import EncoderConfig, MultimodalEncoder
from mmlib.gradcache import gradcache_step, split_batch
from mmlib.losses import matryoshka_in_batch_negative_loss
from tests.test_encoder import noise_image

TEXTS = ["a red circle", "a blue square on the left", "green", "a small yellow star at the top",
         "a large purple ring", "cyan cross", "an orange diamond in the center", "white heart"]


@pytest.fixture(scope="module")
def encoder():
    enc = MultimodalEncoder(EncoderConfig(device="cpu", embed_dim=64, mrl_dims=(8, 16, None)))
    return enc.train()


def _grads(enc):
    return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


def test_split_batch_keeps_rows_with_their_images(encoder):
    texts = [TEXTS[i] if i % 3 else None for i in range(7)]
    images = [noise_image(i, 56 + 28 * (i % 3), 56) if i % 2 == 0 or texts[i] is None else None
              for i in range(7)]
    images[1] = noise_image(11)  # row 1 has text and image
    batch = encoder.tokenize(texts, images)
    whole = encoder(**batch)
    for size in (1, 2, 3, 7):
        parts = torch.cat([encoder(**mb) for mb in split_batch(batch, size)])
        torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("micro", [1, 3, 8])
def test_gradcache_equals_full_batch(encoder, micro):
    loss_fn = functools.partial(matryoshka_in_batch_negative_loss, dims=[8, 16, 64])
    query = encoder.tokenize(TEXTS)
    target = encoder.tokenize(images=[noise_image(i, 56 + 28 * (i % 2)) for i in range(8)])
    extra = encoder.tokenize(images=[noise_image(100 + i) for i in range(3)])

    encoder.zero_grad(set_to_none=True)
    q, t = encoder(**query), torch.cat([encoder(**target), encoder(**extra)])
    full_loss = loss_fn(q, t)
    full_loss.backward()
    expected = _grads(encoder)

    encoder.zero_grad(set_to_none=True)
    loss = gradcache_step(encoder, query, target, loss_fn, micro, extra_targets=extra)
    got = _grads(encoder)
    torch.testing.assert_close(loss, full_loss.detach(), rtol=1e-5, atol=1e-6)
    assert got.keys() == expected.keys() and len(got) > 10
    for n, g in expected.items():  # summation order differs: tolerance scales with the gradient
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=n)


def test_gradcache_replays_dropout_masks():
    """With dropout on, the re-embedding pass must see the masks of the first pass."""
    enc = MultimodalEncoder(EncoderConfig(device="cpu", embed_dim=32, mrl_dims=(None,),
                                          use_lora=True, lora_r=4, lora_dropout=0.5)).train()
    loss_fn = functools.partial(matryoshka_in_batch_negative_loss, dims=[32])
    query, target = enc.tokenize(TEXTS[:4]), enc.tokenize(TEXTS[4:])
    torch.manual_seed(1)
    loss = gradcache_step(enc, query, target, loss_fn, micro_batch_size=2)
    got = _grads(enc)
    # Reference: the same RNG stream consumed by one full forward per side.
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    q = torch.cat([enc(**mb) for mb in split_batch(query, 2)])
    t = torch.cat([enc(**mb) for mb in split_batch(target, 2)])
    ref = loss_fn(q, t)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for n, g in _grads(enc).items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=n)


def test_aligned_dummy_micro_batches_change_nothing(encoder):
    """`align` (FSDP: every rank runs as many micro-batches as the busiest) adds one-row dummy
    forwards and backwards: same loss, same gradients, same RNG stream afterwards."""
    loss_fn = functools.partial(matryoshka_in_batch_negative_loss, dims=[8, 64])
    query = encoder.tokenize(TEXTS[:5])
    target = encoder.tokenize(images=[noise_image(i) for i in range(5)])
    runs = {}
    for pad in (0, 2):
        calls = []
        hook = encoder.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        align = (lambda counts, pad=pad: [counts[0] + pad, counts[1] + pad]) if pad else None
        loss = gradcache_step(encoder, query, target, loss_fn, 2, align=align)
        hook.remove()
        runs[pad] = loss, _grads(encoder), torch.get_rng_state(), len(calls)
    (loss0, grads0, rng0, calls0), (loss2, grads2, rng2, calls2) = runs[0], runs[2]
    assert calls0 == 2 * (3 + 3) and calls2 == calls0 + 2 * (2 + 2)  # no-grad + grad passes
    assert torch.equal(loss0, loss2) and torch.equal(rng0, rng2)
    assert grads0.keys() == grads2.keys()
    for n, g in grads0.items():
        torch.testing.assert_close(grads2[n], g, rtol=0, atol=0, msg=n)
