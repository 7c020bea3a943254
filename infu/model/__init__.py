"""InfU model layer: InfuseNet, identity projection, the InfU FLUX pipeline and its factory.

Modules (imported on demand, so that reading a config does not import torch/diffusers):
``config`` (settings), ``projection`` (Perceiver Resampler), ``infusenet`` (InfuseNet and its wiring into
the base transformer), ``infu`` (the trainable pair in the released checkpoint layout), ``mixing``
(identity mixing), ``conditioning`` (embeddings and control images from photos), ``pipeline``
(:class:`InfUFluxPipeline`), ``tiny`` (tiny random FLUX parts), ``factory`` (:func:`build_pipeline`),
``cli`` (``infu generate``).
"""
