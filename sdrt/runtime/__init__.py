"""Production runtime (no torch): engine directory -> images.

    from sdrt.runtime import Pipeline
    pipe = Pipeline("engines/sd15")                      # ONNX Runtime on the CPU by default
    result = pipe.generate("a red circle", steps=25, seed=1)
    result.images[0]                                     # [H, W, 3] uint8

Imports numpy, onnxruntime, tokenizers and pillow only; tensorrt and CUDA bindings are imported lazily by
the TensorRT backend.
"""

from sdrt.runtime.manifest import Manifest


def __getattr__(name):
    # Pipeline pulls in the schedulers, tokenizer and backends; load it on first use.
    if name in ("Pipeline", "Request", "Result", "Step"):
        from sdrt.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["Manifest", "Pipeline", "Request", "Result", "Step"]
