"""Interop with the FP4 checkpoint formats runtimes load (spec §8): export an fp4fmt checkpoint to
compressed-tensors, modelopt, gpt-oss, GGUF or ONNX, and import compressed-tensors, modelopt and gpt-oss
checkpoints into fp4fmt. One module per format; :mod:`.common` holds what they share."""
