"""Evaluation: sample-quality metrics (`metrics`) and the feature spaces they are computed in
(`features.get_extractor`: EfficientNet-Lite0, the conditioning encoder, pytorch-fid Inception-v3).
See docs/EVALUATION.md, "Metrics and feature spaces"."""
