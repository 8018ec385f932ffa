"""sdrt: a deployment engine for Stable Diffusion.

Three stages, each usable on its own:

* ``sdrt.export``  (build time, needs torch): diffusers checkpoint -> ONNX engine directory.
* ``sdrt.engines`` (build time, GPU): ONNX -> TensorRT plans.
* ``sdrt.runtime`` (production, no torch): engine directory -> images.
"""

__version__ = "0.1.0"
