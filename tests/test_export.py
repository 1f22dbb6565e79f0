"""mmlib.export: a sentence-transformers folder whose embeddings equal mmlib's encode."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmlib import EncoderConfig, MultimodalEncoder
from mmlib.export import main, text_max_seq_length, to_sentence_transformers

pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402

TOL = 1e-5
PROMPTS = {"query": "Find an image that matches: ", "document": ""}
TEXTS = ["a red circle", "a small blue square on the left next to a big green triangle",
         " ".join(["a large yellow star"] * 12)]  # past max_length=40


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in [(56, 56), (64, 90), (120, 40)]]


def _close(a: torch.Tensor, b) -> float:
    return float((a - torch.as_tensor(np.asarray(b))).abs().max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(encoder, loaded sentence-transformers model, folder) with prompts and max_length=40."""
    enc = MultimodalEncoder(EncoderConfig(device="cpu", max_length=40, prompts=PROMPTS)).eval()
    path = to_sentence_transformers(enc, tmp_path_factory.mktemp("st") / "model")
    return enc, SentenceTransformer(str(path), device="cpu"), path


def test_texts_match_including_past_max_length(exported):
    enc, st, _ = exported
    tok = enc.processor.tokenizer
    assert len(tok(TEXTS[2], add_special_tokens=False)["input_ids"]) > 40  # really truncated
    assert _close(enc.encode_texts(TEXTS), st.encode(TEXTS)) < TOL


def test_images_and_image_text_pairs_match(exported):
    enc, st, _ = exported
    images = _images()
    assert _close(enc.encode_images(images), st.encode(images)) < TOL
    pairs = [{"image": im, "text": t} for im, t in zip(images, TEXTS[:2] + ["a star"], strict=True)]
    ours = enc.encode(texts=TEXTS[:2] + ["a star"], images=images)
    assert _close(ours, st.encode(pairs)) < TOL


def test_mixed_batch_matches_one_by_one(exported):
    enc, st, _ = exported
    im = _images()
    mixed = [TEXTS[0], im[0], {"image": im[1], "text": TEXTS[1]}, TEXTS[2], im[2]]
    ours = torch.cat([enc.encode_texts([TEXTS[0]]), enc.encode_images([im[0]]),
                      enc.encode(texts=[TEXTS[1]], images=[im[1]]), enc.encode_texts([TEXTS[2]]),
                      enc.encode_images([im[2]])])
    assert _close(ours, st.encode(mixed, batch_size=3)) < TOL


def test_every_matryoshka_dim_with_normalize(exported):
    enc, st, _ = exported
    inputs = [TEXTS[0], _images()[0]]
    for d in enc.config.resolved_mrl_dims():
        ours = torch.cat([enc.encode_texts([TEXTS[0]], dim=d), enc.encode_images([inputs[1]], dim=d)])
        theirs = st.encode(inputs, truncate_dim=d, normalize_embeddings=True)
        assert theirs.shape == (2, d)
        assert _close(ours, theirs) < TOL
    # Why the card insists on normalize_embeddings=True: truncation alone leaves short vectors.
    d = enc.config.resolved_mrl_dims()[0]
    assert np.linalg.norm(st.encode([TEXTS[0]], truncate_dim=d), axis=1).max() < 0.99


def test_prompts_match_and_change_the_embedding(exported):
    enc, st, _ = exported
    images = _images()[:2]
    assert st.prompts["query"] == PROMPTS["query"] and st.default_prompt_name is None
    q = enc.encode_queries(texts=TEXTS)
    assert _close(q, st.encode(TEXTS, prompt_name="query")) < TOL
    assert _close(q, st.encode_query(TEXTS)) < TOL
    assert _close(q, enc.encode_texts(TEXTS)) > 1e-3  # the prompt is really there
    qi = enc.encode_queries(images=images)
    assert _close(qi, st.encode(images, prompt_name="query")) < TOL
    assert _close(enc.encode_documents(texts=TEXTS), st.encode(TEXTS, prompt_name="document")) < TOL
    pairs = [{"image": im, "text": "a red circle"} for im in images]
    ours = enc.encode(texts=["a red circle"] * 2, images=images, prompt_name="query")
    assert _close(ours, st.encode(pairs, prompt_name="query")) < TOL


def test_folder_holds_stock_modules_card_and_template(exported):
    enc, _, path = exported
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == [
        "Transformer", "Pooling", "Dense", "Dense", "LayerNorm", "Normalize"]
    card = (path / "README.md").read_text()
    assert "truncate_dim" in card and "normalize_embeddings=True" in card
    assert ", ".join(map(str, enc.config.resolved_mrl_dims())) in card
    rendered = (path / "tokenizer_config.json").read_text() + "".join(
        p.read_text() for p in path.glob("*.jinja"))
    assert "You are a helpful assistant" not in rendered
    # The template's tokens around a text: a rendered input minus the text's own tokens.
    tok = enc.processor.tokenizer
    overhead = enc.tokenize(["a red circle"])["input_ids"].shape[1] - len(
        tok("a red circle", add_special_tokens=False)["input_ids"])
    assert text_max_seq_length(enc) == 40 + overhead


def test_lora_trained_encoder_exports_merged_without_changing_it(tmp_path):
    from mmlib.losses import matryoshka_in_batch_negative_loss

    enc = MultimodalEncoder(EncoderConfig(device="cpu", use_lora=True, lora_r=4, lora_dropout=0.0,
                                          mrl_dims=(32, None), embed_dim=64))
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=5e-3)
    images = _images()
    for _ in range(3):
        loss = matryoshka_in_batch_negative_loss(enc(**enc.tokenize(texts=TEXTS)),
                                                 enc(**enc.tokenize(images=images)), dims=(32, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lora_b = [p for n, p in enc.named_parameters() if "lora_B" in n]
    assert max(float(p.detach().abs().max()) for p in lora_b) > 0  # the adapter really moved
    enc.eval()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    st = SentenceTransformer(str(to_sentence_transformers(enc, tmp_path / "st")), device="cpu")
    after = enc.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hasattr(enc.backbone, "peft_config")  # still a LoRA model
    inputs = [TEXTS[1], images[0]]
    ours = torch.cat([enc.encode_texts([TEXTS[1]]), enc.encode_images([images[0]])])
    assert _close(ours, st.encode(inputs)) < TOL
    assert _close(torch.cat([enc.encode_texts([TEXTS[1]], dim=32), enc.encode_images([images[0]], dim=32)]),
                  st.encode(inputs, truncate_dim=32, normalize_embeddings=True)) < TOL


def test_cli_exports_a_frozen_backbone_folder(tmp_path):
    enc = MultimodalEncoder(EncoderConfig(device="cpu", freeze_backbone="all", embed_dim=64,
                                          mrl_dims=(32, None))).eval()
    enc.save_pretrained(tmp_path / "run" / "final")
    assert not (tmp_path / "run" / "final" / "backbone").exists()  # only referenced by model_path
    assert main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the base is copied in
    assert _close(enc.encode_texts(TEXTS[:2]), st.encode(TEXTS[:2])) < TOL


def test_refusals(tmp_path, monkeypatch, tiny_encoder):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        to_sentence_transformers(tiny_encoder, tmp_path / "full")
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    cfg = tiny_encoder.config.replace()
    object.__setattr__(cfg, "pooling", "mean_content")  # a pooling ST's Pooling cannot express
    monkeypatch.setattr(tiny_encoder, "config", cfg)
    with pytest.raises(ValueError, match="pooling='mean_content'"):
        to_sentence_transformers(tiny_encoder, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(FileNotFoundError, match="neither a saved encoder"):
        main([str(tmp_path / "full"), str(tmp_path / "out")])


def test_prompt_goes_after_the_image_and_counts_towards_max_length(tiny_encoder):
    from mmlib.processing import apply_prompt

    assert apply_prompt(["cat", None], ["a.png", "b.png"], "Q: ") == ["Q: cat", "Q: "]
    assert apply_prompt(None, ["a.png"], "Q: ") == ["Q: "]
    assert apply_prompt(["cat"], None, "") == ["cat"]
    tok = tiny_encoder.processor.tokenizer
    image = _images()[0]
    batch = tiny_encoder.tokenize(apply_prompt(["a red circle"], [image], "Q: "), [image])
    text = tok.decode(batch["input_ids"][0])
    assert text.endswith("<|vision_end|>Q: a red circle<|im_end|>")
    enc = tiny_encoder
    with pytest.raises(ValueError, match="prompt_name='query' is not a configured prompt"):
        enc.encode_texts(["cat"], prompt_name="query")
    # Without configured prompts, encode_queries / encode_documents are plain encode.
    assert torch.equal(enc.encode_queries(texts=["cat"]), enc.encode_texts(["cat"]))
    assert torch.equal(enc.encode_documents(images=[image]), enc.encode_images([image]))


def test_config_prompts_round_trip_and_validate(tmp_path):
    cfg = EncoderConfig(prompts=PROMPTS)
    assert EncoderConfig.load(cfg.save(tmp_path / "c.yaml")).prompts == PROMPTS
    with pytest.raises(ValueError, match="prompts"):
        EncoderConfig(prompts={"query": 3})
    with pytest.raises(ValueError, match="prompt names must be non-empty"):
        EncoderConfig(prompts={" ": "x"})


def test_training_prompts_per_direction_and_final_card(tmp_path):
    from mmlib.data import ImageTextCollator
    from mmlib.train import TrainConfig, Trainer

    prompts = {"query": "Find: ", "document": "Shown: "}
    enc_cfg = EncoderConfig(device="cpu", embed_dim=32, mrl_dims=(8, None), batch_size=8,
                            prompts=prompts)
    trainer = Trainer(TrainConfig(encoder=enc_cfg, manifest="data_samples/synthetic/manifest.jsonl",
                                  eval_split="validation", max_steps=1, warmup_steps=1,
                                  output_dir=str(tmp_path / "run"), progress=False))
    items = [trainer.train_set[i] for i in range(4)]
    enc = trainer.encoder.eval()
    batch = trainer.collate(items)
    texts, images = [it["text"] for it in items], [it["image"] for it in items]
    with torch.no_grad():
        assert _close(enc(**batch["query"]), enc.encode_queries(texts=texts)) < TOL
        assert _close(enc(**batch["target"]), enc.encode_documents(images=images)) < TOL
    assert _close(enc.encode_queries(texts=texts), enc.encode_texts(texts)) > 1e-3
    flipped = ImageTextCollator(enc.processor, max_length=40, direction="image2text",
                                prompts=prompts)(items)
    assert torch.equal(flipped["query"]["input_ids"],
                       enc.tokenize(["Find: "] * 4, images)["input_ids"])
    assert torch.equal(flipped["target"]["input_ids"],
                       enc.tokenize(["Shown: " + t for t in texts])["input_ids"])

    result = trainer.train()
    final = tmp_path / "run" / "final"
    card = (final / "README.md").read_text()
    assert f"{result['eval'].loc[8, 'q2t_top1'].round(4):g}" in card and "| 32 |" in card
    assert '"max_steps": 1' in card and "Matryoshka dims: 8, 32" in card
    loaded = MultimodalEncoder.from_pretrained(final)  # README.md is not read
    assert loaded.config.prompts == prompts


def test_save_pretrained_card_is_replaced_with_the_folder(tmp_path, tiny_encoder):
    import pandas as pd

    df = pd.DataFrame({"q2t_top1": [0.125, 0.5], "t2q_top1": [0.25, 0.75]},
                      index=pd.Index([256, 2048], name="dim"))
    tiny_encoder.save_pretrained(tmp_path / "m", evaluation=df)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "| 256 | 0.125 | 0.25 |" in card and "| 2048 | 0.5 | 0.75 |" in card
    assert "Base model: `tiny`" in card and "python -m mmlib.export" in card
    tiny_encoder.save_pretrained(tmp_path / "m")  # a re-save replaces the card too
    assert "## Evaluation" not in (tmp_path / "m" / "README.md").read_text()
    assert MultimodalEncoder.from_pretrained(tmp_path / "m").config == tiny_encoder.config


def test_evaluate_dataset_embeds_captions_as_queries_and_images_as_documents():
    from mmlib.evaluation import evaluate_dataset, evaluate_image_caption

    images = _images()

    class Tiny:
        texts = ["a red circle", "a red disc", "a blue square", "a green star"]
        image_ids = ["a", "a", "b", "c"]

        def image_for(self, i):
            return images[[0, 0, 1, 2][i]]

    enc = MultimodalEncoder(EncoderConfig(device="cpu", embed_dim=32, mrl_dims=(8, None),
                                          prompts={"query": "Find: ", "document": "Shown: "}))
    got = evaluate_dataset(enc, Tiny())
    want = evaluate_image_caption(enc.encode_queries(texts=Tiny.texts),
                                  enc.encode_documents(images=images), [0, 0, 1, 2], dims=[8, 32])
    unprompted = evaluate_image_caption(enc.encode_texts(Tiny.texts), enc.encode_images(images),
                                        [0, 0, 1, 2], dims=[8, 32])
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(got, want)
    assert not got.equals(unprompted)  # the prompts change the ranking on this set
