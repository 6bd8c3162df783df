"""Loss kernels of BoxCaseg, laid out like Liger-Kernel: each op family's reference beside its fast paths.

- :mod:`~boxcaseg.kernels.maps`: the ``[N, 1, H, W]`` map check and the 8-neighbourhood, shared by all.
- MIL + smoothness family (the weak map's loss, paper Eq. 1-2):
  :mod:`~boxcaseg.kernels.mil_smooth_reference` (the definition, checks the others),
  :mod:`~boxcaseg.kernels.mil_smooth_torch`, :mod:`~boxcaseg.kernels.mil_smooth_numba`,
  :mod:`~boxcaseg.kernels.mil_smooth_triton`, their shared pieces
  :mod:`~boxcaseg.kernels.mil_smooth_common`, and the one dispatcher
  :mod:`~boxcaseg.kernels.dispatch`.

Nothing here imports :mod:`boxcaseg.losses` (the training objective, which imports these),
:mod:`boxcaseg.data`, :mod:`boxcaseg.model` or :mod:`boxcaseg.commands`.
"""
