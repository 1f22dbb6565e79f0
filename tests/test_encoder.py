import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmlib import EncoderConfig, MultimodalEncoder

SHORT = "a red circle"
LONG = ("a very long caption about many small blue squares and green triangles on the left of a "
        "noisy picture with a large yellow star at the top right corner and more words after it")


def noise_image(seed: int, w: int = 56, h: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make(**overrides) -> MultimodalEncoder:
    return MultimodalEncoder(EncoderConfig(device="cpu", embed_dim=128, mrl_dims=(16, 32, None),
                                           **overrides))


def test_forward_shape_norm_dtype(tiny_encoder):
    batch = tiny_encoder.tokenize([SHORT, LONG], [noise_image(0), None])
    emb = tiny_encoder(**batch)
    assert emb.shape == (2, tiny_encoder.embed_dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert emb.requires_grad  # forward is the training path


def test_truncated_embedding_is_renormalised_prefix(tiny_encoder):
    full = tiny_encoder.encode_texts([SHORT, LONG])
    for d in (256, 512, 1024):
        torch.testing.assert_close(tiny_encoder.encode_texts([SHORT, LONG], dim=d),
                                   F.normalize(full[:, :d], dim=-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_embedding_independent_of_batch_and_padding(tiny_encoder, side):
    tok = tiny_encoder.processor.tokenizer
    old = tok.padding_side
    tok.padding_side = side
    try:
        items = [(SHORT, None), (None, noise_image(1)), (SHORT, noise_image(2))]
        for text, image in items:
            alone = tiny_encoder(**tiny_encoder.tokenize([text], [image]))
            # Batched with much longer inputs (long text, bigger image), so it gets padded.
            batch = tiny_encoder.tokenize([LONG, text, LONG],
                                          [noise_image(3, 112, 84), image, None])
            assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]
            together = tiny_encoder(**batch)[1:2]
            torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    finally:
        tok.padding_side = old


def test_encode_restores_input_order(tiny_encoder):
    texts = [LONG, SHORT, "blue", LONG + " extra", "a green star"]
    batched = tiny_encoder.encode_texts(texts, batch_size=2)
    one_by_one = torch.cat([tiny_encoder.encode_texts([t]) for t in texts])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)


def test_images_of_different_sizes_and_mixed_modalities(tiny_encoder, tmp_path):
    path = tmp_path / "img.png"
    noise_image(5, 84, 112).save(path)
    imgs = [noise_image(4), str(path), noise_image(6, 112, 56)]
    by_path = tiny_encoder.encode_images(imgs)
    torch.testing.assert_close(by_path[1], tiny_encoder.encode_images([Image.open(path)])[0],
                               atol=1e-5, rtol=0)
    mixed = tiny_encoder.encode(texts=[SHORT, None, "x"], images=[None, imgs[0], imgs[2]])
    torch.testing.assert_close(mixed[1], by_path[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[0], tiny_encoder.encode_texts([SHORT])[0], atol=1e-5, rtol=0)


def test_forward_layers_last_equals_forward(tiny_encoder):
    batch = tiny_encoder.tokenize([SHORT, LONG])
    layers = tiny_encoder.forward_layers(batch, layers=[1, -1])
    torch.testing.assert_close(layers[-1], tiny_encoder(**batch))
    assert not torch.allclose(layers[1], layers[-1])
    with pytest.raises(ValueError, match="out of range"):
        tiny_encoder.forward_layers(batch, layers=[7])


def _grads(enc, batch):
    enc.zero_grad(set_to_none=True)
    emb = enc(**batch)
    # Not emb.sum(): the head ends in LayerNorm (zero-mean rows), so the coordinate sum of
    # each normalised embedding is 0 and its gradient only float noise.
    direction = torch.randn(emb.shape[-1], generator=torch.Generator().manual_seed(0))
    (emb @ direction).sum().backward()
    return {n: p.grad for n, p in enc.named_parameters()}


@pytest.mark.parametrize("mode", ["all", "vision"])
def test_frozen_parameters_get_no_gradient(mode):
    enc = make(freeze_backbone=mode)
    grads = _grads(enc, enc.tokenize([SHORT, LONG], [noise_image(0), None]))
    for name, g in grads.items():
        frozen = name.startswith("backbone.") and (mode == "all" or ".visual." in f".{name}")
        assert (g is None) == frozen, name
    assert grads["projection.fc1.weight"].abs().sum() > 0


def test_lora_trains_only_adapters_and_projection():
    enc = make(use_lora=True, lora_r=4)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projection.") for n in trainable)
    assert not any("visual" in n for n in trainable)  # adapters stay on the language model
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj" in n for n in trainable)
    grads = _grads(enc, enc.tokenize([SHORT, LONG], [noise_image(0), None]))
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    zero = [n for n, g in grads.items() if "lora_B" in n and not g.abs().sum() > 0]
    assert lora_b and not zero, zero
    table = enc.parameter_table()
    assert table.loc["LoRA adapters", "trainable"] == table.loc["LoRA adapters", "parameters"] > 0
    assert table.loc["vision tower", "trainable"] == 0


def test_gradient_checkpointing_gives_same_gradients():
    a, b = make(), make(gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    batch = a.tokenize([SHORT, LONG], [noise_image(0), None])
    a.train(), b.train()
    ga, gb = _grads(a, batch), _grads(b, batch)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"use_lora": True, "lora_r": 4},
                                       {"freeze_backbone": "all"}])
def test_save_load_round_trip(tmp_path, overrides):
    enc = make(**overrides)
    with torch.no_grad():  # move every trainable weight away from its deterministic init
        for p in enc.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    texts, images = [SHORT, None], [None, noise_image(7)]
    expected = enc.encode(texts=texts, images=images)
    enc.save_pretrained(tmp_path / "enc")
    loaded = MultimodalEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.config == enc.config
    torch.testing.assert_close(loaded.encode(texts=texts, images=images), expected, atol=0, rtol=0)
    # From a given state dict (what a sharded model gathers): only the `saves_weight` entries
    # are needed, and they, not the module's current weights, are written.
    state = {k: v.clone() for k, v in enc.state_dict().items() if enc.saves_weight(k)}
    assert 0 < len(state) < len(enc.state_dict()) or not overrides
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    enc.save_pretrained(tmp_path / "given", state_dict=state)
    loaded = MultimodalEncoder.from_pretrained(tmp_path / "given")
    torch.testing.assert_close(loaded.encode(texts=texts, images=images), expected, atol=0, rtol=0)


def test_bf16_autocast_forward_on_cpu():
    enc = make(mixed_precision="bf16")
    emb = enc(**enc.tokenize([SHORT]))
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


# -- errors: type and message name the input and the fix ---------------------------------
def test_unknown_model_path():
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        MultimodalEncoder(EncoderConfig(model_path="./no-such-model"))
    with pytest.raises(ValueError, match="unknown preset"):
        MultimodalEncoder(EncoderConfig(model_path="preset:13b"))


def test_bad_dims(tiny_encoder):
    for bad in (0, -3, tiny_encoder.embed_dim + 1):
        with pytest.raises(ValueError, match="dim"):
            tiny_encoder.encode_texts([SHORT], dim=bad)


def test_empty_and_wrong_inputs(tiny_encoder):
    with pytest.raises(ValueError, match="texts is empty"):
        tiny_encoder.encode_texts([])
    with pytest.raises(ValueError, match="images is empty"):
        tiny_encoder.encode_images([])
    with pytest.raises(TypeError, match="list"):
        tiny_encoder.encode_texts(SHORT)
    with pytest.raises(ValueError, match="pair up"):
        tiny_encoder.encode(texts=[SHORT], images=[noise_image(0), noise_image(1)])


def test_unreadable_images_name_the_file(tiny_encoder, tmp_path):
    from mmlib.processing import ImageLoadError

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a png")
    good = tmp_path / "good.png"
    noise_image(0, 84, 84).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:300])
    for bad in (not_image, truncated, tmp_path / "missing.png"):
        with pytest.raises(ImageLoadError, match=bad.name):
            tiny_encoder.encode_images([good, bad])


def test_all_padding_row_is_an_error(tiny_encoder):
    batch = tiny_encoder.tokenize([SHORT, LONG])
    batch["attention_mask"][0] = 0
    with pytest.raises(ValueError, match="all padding"):
        tiny_encoder(**batch)


def test_flash_attention_missing_is_a_clear_error():
    with pytest.raises(ImportError, match="requirements-gpu.txt"):
        make(attn_implementation="flash_attention_2")


def test_multilevel_loss_over_encoder_layers(tiny_encoder):
    """2D Matryoshka: per-layer embeddings from one forward feed MultiLevelContrastiveLoss,
    which equals the sum of the per-layer MRL losses; layer 1's level reaches only layer 1."""
    from mmlib.losses import MultiLevelContrastiveLoss, matryoshka_in_batch_negative_loss

    texts = tiny_encoder.tokenize([SHORT, LONG, "blue"])
    images = tiny_encoder.tokenize(images=[noise_image(i) for i in range(3)])
    q = tiny_encoder.forward_layers(texts, layers=[1, -1])
    t = tiny_encoder.forward_layers(images, layers=[1, -1])
    loss_fn = MultiLevelContrastiveLoss(dims=(16, None))
    loss, details = loss_fn({k: (q[k], t[k]) for k in q}, return_details=True)
    assert set(details) == {(1, 16), (1, 2048), (-1, 16), (-1, 2048)}
    expected = sum(matryoshka_in_batch_negative_loss(q[k], t[k], dims=(16, None)) for k in q)
    torch.testing.assert_close(loss, expected)
    tiny_encoder.zero_grad(set_to_none=True)
    loss_fn({1: (q[1], t[1])}).backward()
    blocks = tiny_encoder.qwen.language_model.layers
    assert blocks[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert blocks[1].mlp.down_proj.weight.grad is None  # above the level: untouched
    tiny_encoder.zero_grad(set_to_none=True)


def test_fresh_weights_come_from_config_seed():
    """Head and LoRA init depend on `config.seed` only, and leave the global RNG alone."""
    def trainable(enc):
        return {n: p.detach().clone() for n, p in enc.named_parameters() if p.requires_grad
                and (n.startswith("projection.") or "lora_" in n)}

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = trainable(make(use_lora=True, lora_r=4))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # a different global stream must not matter
    b = trainable(make(use_lora=True, lora_r=4))
    c = trainable(make(use_lora=True, lora_r=4, seed=1))
    assert any("lora_A" in n for n in a) and a.keys() == b.keys() == c.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    differs = [n for n in a if not torch.equal(a[n], c[n])]
    assert "projection.fc1.weight" in differs and any("lora_A" in n for n in differs)


# -- saving over an existing folder; loading only the saved parts -------------------------
def _nudged(**overrides) -> MultimodalEncoder:
    enc = make(**overrides)
    with torch.no_grad():  # move the trainable weights off their deterministic init
        for p in enc.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return enc


@pytest.mark.parametrize("first,second", [({}, {"use_lora": True, "lora_r": 4}),
                                          ({"use_lora": True, "lora_r": 4}, {}),
                                          ({}, {"freeze_backbone": "all"})])
def test_saving_over_another_model_reloads_exactly_the_new_one(tmp_path, first, second):
    torch.manual_seed(0)
    old, new = _nudged(**first), _nudged(**second)
    texts, images = [SHORT, None], [None, noise_image(7)]
    expected = new.encode(texts=texts, images=images)
    old.save_pretrained(tmp_path / "enc")
    new.save_pretrained(tmp_path / "enc")
    loaded = MultimodalEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.config == new.config
    torch.testing.assert_close(loaded.encode(texts=texts, images=images), expected,
                               atol=1e-5, rtol=0)
    # Only the new model's parts are left, and the config says which they are.
    saved = json.loads((tmp_path / "enc" / "mmlib_config.json").read_text())
    has_backbone = not new.config.use_lora and new.config.freeze_backbone != "all"
    assert saved["parts"] == {"backbone": has_backbone, "adapter": new.config.use_lora}
    assert (tmp_path / "enc" / "backbone").is_dir() == has_backbone
    assert (tmp_path / "enc" / "adapter").is_dir() == new.config.use_lora
    assert [p.name for p in tmp_path.iterdir()] == ["enc"]  # no staging folder left behind


def test_folder_without_parts_record_loads_as_before(tmp_path):
    """Folders written before `parts` existed: a stale part (the backbone beside a LoRA
    save) is told apart by use_lora, the rest loads unchanged."""
    import shutil

    full, lora = _nudged(), _nudged(use_lora=True, lora_r=4)
    full.save_pretrained(tmp_path / "full")
    lora.save_pretrained(tmp_path / "lora")
    shutil.copytree(tmp_path / "full" / "backbone", tmp_path / "lora" / "backbone")
    for name in ("full", "lora"):
        cfg_path = tmp_path / name / "mmlib_config.json"
        cfg_path.write_text(json.dumps({k: v for k, v in json.loads(cfg_path.read_text()).items()
                                        if k != "parts"}))
    for name, enc in (("full", full), ("lora", lora)):
        torch.testing.assert_close(MultimodalEncoder.from_pretrained(tmp_path / name)
                                   .encode_texts([SHORT]), enc.encode_texts([SHORT]),
                                   atol=1e-5, rtol=0)


def test_saving_into_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="mmlib_config.json"):
        make().save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_saved_config_file_still_loads_as_an_encoder_config(tmp_path):
    enc = make()
    enc.save_pretrained(tmp_path / "enc")
    assert EncoderConfig.load(tmp_path / "enc" / "mmlib_config.json") == enc.config


def test_from_pretrained_overrides_that_agree_or_apply(tmp_path):
    lora = _nudged(use_lora=True, lora_r=4)
    lora.save_pretrained(tmp_path / "lora")
    expected = lora.encode_texts([SHORT])
    # Agreeing with the saved config, or changing what does not touch the weights: accepted.
    again = MultimodalEncoder.from_pretrained(tmp_path / "lora", use_lora=True, lora_r=4,
                                              batch_size=3, temperature=0.1)
    assert again.config.use_lora and again.config.batch_size == 3
    torch.testing.assert_close(again.encode_texts([SHORT]), expected, atol=1e-6, rtol=0)
    for bad, match in (({"use_lora": False}, "use_lora"), ({"embed_dim": 64}, "embed_dim"),
                       ({"lora_r": 8}, "lora_r")):
        with pytest.raises(ValueError, match=match):
            MultimodalEncoder.from_pretrained(tmp_path / "lora", **bad)
    full = _nudged()
    full.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="model_path"):
        MultimodalEncoder.from_pretrained(tmp_path / "full", model_path="preset:tiny")
