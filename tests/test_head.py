"""Pooling (`EncoderConfig.pooling`): each mode against a naive per-row computation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmlib import EncoderConfig, MultimodalEncoder
from mmlib.head import PromptTokens, mean_contributions, pool, token_groups

SHORT = "a red circle"
LONG = "a very long caption about many small blue squares and green triangles on the left"
POOLINGS = ("mean", "mean_content", "last")


def noise_image(seed: int, w: int = 56, h: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make(pooling: str) -> MultimodalEncoder:
    return MultimodalEncoder(EncoderConfig(device="cpu", embed_dim=64, mrl_dims=(16, None),
                                           pooling=pooling)).eval()


@pytest.fixture
def padding_side(tiny_encoder, request):
    tok = tiny_encoder.processor.tokenizer
    old, tok.padding_side = tok.padding_side, request.param
    yield request.param
    tok.padding_side = old


def naive_pool(hidden_row, ids_row, mask_row, types_row, text, pooling, tokenizer):
    """One row, by hand: drop padding, then pick the tokens by what the processor says they are
    (image: mm_token_type_ids == 1) and by the text's own tokenization (the tokens just before
    the closing <|im_end|>)."""
    real = [t for t in range(len(mask_row)) if mask_row[t] == 1]
    h, ids = hidden_row[real], ids_row[real]
    if pooling == "mean":
        return h.mean(0)
    if pooling == "last":
        return h[-1]
    own = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    text_pos = list(range(len(real) - 1 - len(own), len(real) - 1))
    assert ids[text_pos].tolist() == own  # the text's tokens sit right before <|im_end|>
    image_pos = [i for i, t in enumerate(real) if types_row[t] == 1]
    return h[image_pos + text_pos].mean(0)


@pytest.mark.parametrize("padding_side", ["right", "left"], indirect=True)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_pool_equals_naive_per_row(tiny_encoder, padding_side, pooling):
    texts = [SHORT, None, LONG, " leading space", "\nleading newline"]
    images = [None, noise_image(0), noise_image(1, 84, 56), None, None]
    batch = tiny_encoder.tokenize(texts, images)
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # the batch is padded
    hidden = torch.randn(*mask.shape, 8, generator=torch.Generator().manual_seed(0))
    hidden = hidden.masked_fill(~mask.bool().unsqueeze(-1), float("nan"))  # padding never read
    pooled = pool(hidden, mask, pooling, batch["input_ids"], tiny_encoder.prompt_tokens)
    tok = tiny_encoder.processor.tokenizer
    for i, text in enumerate(texts):
        expected = naive_pool(hidden[i], batch["input_ids"][i], mask[i].tolist(),
                              batch["mm_token_type_ids"][i].tolist(), text, pooling, tok)
        torch.testing.assert_close(pooled[i], expected)


def test_token_groups_of_a_short_caption(tiny_encoder):
    batch = tiny_encoder.tokenize([SHORT], [noise_image(0)])
    groups = token_groups(batch["input_ids"], batch["attention_mask"], tiny_encoder.prompt_tokens)
    tokens = tiny_encoder.processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    template = [t for t, g in zip(tokens, groups["template"][0].tolist(), strict=True) if g]
    # <|im_start|> "user\n" (3 + 1 byte-level tokens here), the vision markers, <|im_end|>
    assert template[0] == "<|im_start|>" and template[-3:] == ["<|vision_start|>", "<|vision_end|>",
                                                               "<|im_end|>"]
    assert "".join(template[1:-3]) == "userĊ"
    assert int(groups["image"].sum()) == int(batch["mm_token_type_ids"].sum())
    n_text = len(tiny_encoder.processor.tokenizer(SHORT, add_special_tokens=False)["input_ids"])
    assert int(groups["text"].sum()) == n_text
    total = groups["template"].long() + groups["image"].long() + groups["text"].long()
    assert torch.equal(total, batch["attention_mask"])  # a partition of the real tokens


def test_prompt_tokens_read_off_the_template(tiny_encoder):
    p = tiny_encoder.prompt_tokens
    tok = tiny_encoder.processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(name) for name in
           ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")}
    assert p.header[0] == ids["<|im_start|>"] and p.end == ids["<|im_end|>"]
    assert p.markers == (ids["<|vision_start|>"], ids["<|vision_end|>"])
    assert p.image == ids["<|image_pad|>"]
    assert tok.decode(list(p.header)) == "<|im_start|>user\n"
    assert PromptTokens.from_tokenizer(tok) == p


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["mean_content", "last"])
def test_embedding_independent_of_batch_and_padding(pooling, side):
    enc = make(pooling)
    tok = enc.processor.tokenizer
    tok.padding_side = side  # a fresh encoder: its tokenizer is not shared
    for text, image in [(SHORT, None), (None, noise_image(1)), (SHORT, noise_image(2))]:
        alone = enc(**enc.tokenize([text], [image]))
        batch = enc.tokenize([LONG, text, LONG], [noise_image(3, 112, 84), image, None])
        assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]
        torch.testing.assert_close(enc(**batch)[1:2], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_forward_and_encode_use_the_configured_pooling(pooling):
    enc = make(pooling)
    texts, images = [SHORT, None], [None, noise_image(4)]
    batch = enc.tokenize(texts, images)
    with torch.no_grad():
        out, mask = enc._hidden_states(batch)
        hidden = out.last_hidden_state
        expected = torch.stack([
            F.normalize(enc.projection(naive_pool(
                hidden[i], batch["input_ids"][i], mask[i].tolist(),
                batch["mm_token_type_ids"][i].tolist(), texts[i], pooling, enc.processor.tokenizer)),
                dim=-1) for i in range(2)])
        torch.testing.assert_close(enc(**batch), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.encode(texts=texts, images=images), expected, atol=1e-5, rtol=0)


def test_poolings_differ_and_survive_save_load(tmp_path):
    embs = {}
    for pooling in POOLINGS:
        enc = make(pooling)  # same seed: same weights, only the pooling differs
        embs[pooling] = enc.encode_texts([SHORT, LONG])
        enc.save_pretrained(tmp_path / pooling)
        loaded = MultimodalEncoder.from_pretrained(tmp_path / pooling)
        assert loaded.config.pooling == pooling
        torch.testing.assert_close(loaded.encode_texts([SHORT, LONG]), embs[pooling], atol=0, rtol=0)
    for a, b in [("mean", "mean_content"), ("mean", "last"), ("mean_content", "last")]:
        assert not torch.allclose(embs[a], embs[b], atol=1e-3), (a, b)
    # an override at load time chooses another pooling for the same weights
    other = MultimodalEncoder.from_pretrained(tmp_path / "mean", pooling="last")
    torch.testing.assert_close(other.encode_texts([SHORT, LONG]), embs["last"], atol=0, rtol=0)


def test_training_configs_differ_only_in_pooling():
    from pathlib import Path

    from mmlib.train import TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    base = TrainConfig.load(root / "tiny_mrl.yaml").to_dict()
    for pooling in ("mean_content", "last"):
        cfg = TrainConfig.load(root / f"tiny_mrl_{pooling}.yaml")
        assert cfg.encoder.pooling == pooling and base["encoder"]["pooling"] == "mean"
        d = cfg.to_dict()
        differ = {k for k in d if d[k] != base[k]}
        assert differ == {"encoder", "output_dir"}
        assert {k for k in d["encoder"] if d["encoder"][k] != base["encoder"][k]} == {"pooling"}


# -- errors -------------------------------------------------------------------------------
def test_bad_pooling_name_is_a_config_error():
    with pytest.raises(ValueError, match="pooling"):
        EncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "cls")


def test_mean_content_errors_name_the_row(tiny_encoder):
    p = tiny_encoder.prompt_tokens
    batch = tiny_encoder.tokenize([SHORT, ""])  # "" has no content token
    hidden = torch.zeros(*batch["input_ids"].shape, 4)
    with pytest.raises(ValueError, match=r"rows \[1\].*no text or image token"):
        pool(hidden, batch["attention_mask"], "mean_content", batch["input_ids"], p)
    # token ids that are not mmlib's prompt (no chat template): refused, not guessed
    raw = tiny_encoder.processor.tokenizer([SHORT, LONG], padding=True, return_tensors="pt")
    hidden = torch.zeros(*raw["input_ids"].shape, 4)
    with pytest.raises(ValueError, match=r"rows \[0, 1\].*prompt header.*tokenize"):
        pool(hidden, raw["attention_mask"], "mean_content", raw["input_ids"], p)
    with pytest.raises(ValueError, match="needs input_ids"):
        pool(hidden, raw["attention_mask"], "mean_content")
    with pytest.raises(ValueError, match="all padding"):
        pool(hidden, torch.zeros_like(raw["attention_mask"]), "last")


def test_mean_contributions_add_up_to_the_mean(tiny_encoder):
    batch = tiny_encoder.tokenize([SHORT, LONG], [noise_image(0), None])
    mask = batch["attention_mask"]
    hidden = torch.randn(*mask.shape, 8, generator=torch.Generator().manual_seed(1))
    groups = token_groups(batch["input_ids"], mask, tiny_encoder.prompt_tokens)
    parts = mean_contributions(hidden, mask, groups)
    torch.testing.assert_close(sum(parts.values()), pool(hidden, mask, "mean"))
    # by hand: row 1 (text only) has no image term; its text term is a sum over its text tokens
    assert torch.equal(parts["image"][1], torch.zeros(8))
    n = int(mask[1].sum())
    torch.testing.assert_close(parts["text"][1], hidden[1][groups["text"][1]].sum(0) / n)


# -- the figures of the pooling lesson (mmlib.plots) -----------------------------------------
def test_plot_mrope_positions_and_pooling_shares():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from mmlib.plots import plot_mrope_positions, plot_pooling_shares

    pos = torch.tensor([[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]])
    image = torch.tensor([0, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    ax = plot_mrope_positions(pos, image)
    assert [line.get_label() for line in ax.get_lines()] == ["t", "h", "w"]
    assert ax.get_lines()[1].get_ydata().tolist() == [0, 1, 2, 2, 3, 3, 4]
    assert len(ax.patches) == 1  # the shaded image span
    with pytest.raises(ValueError, match=r"\(3, T\)"):
        plot_mrope_positions(pos[:2])
    shares = pd.DataFrame({"template": [0.7, 0.1], "text": [0.3, 0.9]}, index=["short", "long"])
    ax = plot_pooling_shares(shares)
    widths = [p.get_width() for p in ax.patches]
    assert widths == pytest.approx([0.7, 0.1, 0.3, 0.9])
    assert [p.get_x() for p in ax.patches][2:] == pytest.approx([0.7, 0.1])  # stacked
    plt.close("all")
