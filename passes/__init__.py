"""lowbit.passes: function-preserving rewrites and the analyses that steer quantization.

Owns canonicalization (``canonicalize``, ``norm_fusion``), the statistics analyses fed by the one
observation run (``calibrate``: SLAC ranges; ``capture``: XᵀX and row samples), equivalent scale
folding (``smooth``), RPTQ clustering and reordering (``reorder``), and FGMP's sensitivities and
block assignment (``fisher``, ``precision``). Nothing here quantizes the graph; ``lowbit.emit``
does, from what these passes decided."""
