"""C++ kernels for the XLA CPU backend (XLA FFI custom calls), compiled on first use.

``flash``: :func:`attnjax.cpu.flash.cpu_flash_attention`, the ``'cpu_flash'``
implementation of :func:`attnjax.attention`; ``build``: compilation, caching and
registration (:func:`attnjax.cpu.build.unavailable_reason`).
"""
