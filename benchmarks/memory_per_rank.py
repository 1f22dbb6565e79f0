"""Per-rank memory of FSDP training and of writing a checkpoint, for the released sizes.

    python benchmarks/memory_per_rank.py              # 8 ranks (one node of 8 GPUs)
    python benchmarks/memory_per_rank.py --ranks 16   # two nodes

Parameter counts come from the presets' real configs, built on the meta device (no memory,
no download); the rest is arithmetic, printed next to every number (docs/distributed.md).
Assumptions: AdamW; full fine-tuning keeps fp32 weights, fp32 gradients and two fp32 moments
(16 B/param) and computes in bf16; LoRA (r=16 on the language model's seven projections, the
default targets) keeps the frozen base in bf16 (2 B/param) and the adapter and projection head
in fp32; FSDP gathers in bf16 (MixedPrecisionPolicy(param_dtype=bf16)) one unit at a time plus
the prefetched next one, and the root unit (embeddings, merger, patch embedding, final norm)
from forward to backward, whose fp32 gradient exists whole until its reduce-scatter.
Activations are not counted (gradient checkpointing and GradCache keep them small).
"""

from __future__ import annotations

import argparse

import torch
from transformers import Qwen2_5_VLModel

from mmlib.presets import build_backbone_config

GB = 1e9
EMBED_DIM = 2048  # EncoderConfig.embed_dim
LORA_R = 16  # EncoderConfig.lora_r


def counts(preset: str) -> dict[str, int]:
    """Parameters of the encoder's parts: backbone, one decoder layer, one vision block, the
    root unit (what FSDP units leave over), the projection head and the LoRA adapter."""
    config = build_backbone_config(preset)
    with torch.device("meta"):
        model = Qwen2_5_VLModel(config)
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    text, h = config.text_config, config.text_config.hidden_size
    layers, blocks = model.language_model.layers, model.visual.blocks
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    i = text.intermediate_size
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    return {"backbone": size(model), "layer": size(layers[0]), "block": size(blocks[0]),
            "root": size(model) - size(layers) - size(blocks),
            "projection": h * EMBED_DIM + EMBED_DIM + EMBED_DIM * EMBED_DIM + 3 * EMBED_DIM,
            "lora": len(layers) * sum(LORA_R * (a + b) for a, b in shapes)}


def rows(preset: str, lora: bool, ranks: int) -> list[tuple[str, str, float]]:
    """(what, arithmetic, GB) per rank for one model and training mode."""
    c = counts(preset)
    unit = max(c["layer"], c["block"])
    trainable = c["lora"] + c["projection"] if lora else c["backbone"] + c["projection"]
    out = [("parameters", f"backbone {c['backbone'] / 1e9:.2f} B + head "
            f"{c['projection'] / 1e6:.1f} M" + (f", trainable {trainable / 1e6:.0f} M (LoRA "
                                                f"{c['lora'] / 1e6:.0f} M + head)" if lora else ""),
            float("nan"))]
    if lora:
        out.append(("frozen base (bf16)", f"2 B x {c['backbone'] / 1e9:.2f} B / {ranks}",
                    2 * c["backbone"] / ranks / GB))
    out.append(("trainable state", f"16 B x {trainable / 1e9:.3f} B / {ranks}",
                16 * trainable / ranks / GB))
    grad = 0 if lora else 4 * c["root"]  # a frozen root has no gradient
    out.append(("gathered (transient)", f"2 B x (root {c['root'] / 1e6:.0f} M + 2 x unit "
                f"{unit / 1e6:.0f} M)" + (" + 4 B x root (its gradient)" if grad else ""),
                (2 * (c["root"] + 2 * unit) + grad) / GB))
    total = sum(gb for _, _, gb in out[1:])
    out.append(("total before activations", "", total))
    out.append(("+ whole gradients between passes", f"4 B x {trainable / 1e9:.3f} B (one "
                "reduce-scatter per step; not with fsdp_sync_every_backward)", 4 * trainable / GB))
    out.append(("checkpoint before: rank 0 host", f"12 B x {trainable / 1e9:.3f} B (gathered)",
                12 * trainable / GB))
    out.append(("checkpoint now: every rank host", f"12 B x {trainable / 1e9:.3f} B / {ranks}",
                12 * trainable / ranks / GB))
    return out


def main() -> None:
    """Print the tables of docs/distributed.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    args = parser.parse_args()
    for preset, lora in (("7b", False), ("32b", False), ("72b", True)):
        print(f"\n{preset} {'LoRA' if lora else 'full fine-tune'}, FSDP over {args.ranks} ranks")
        for what, how, gb in rows(preset, lora, args.ranks):
            print(f"  {what:34s} {how:58s} {'' if gb != gb else f'{gb:8.2f} GB'}")


if __name__ == "__main__":
    main()
