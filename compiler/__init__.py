"""lowbit.compiler: the top of the product. Owns the recipe -> pass pipeline assembly and its
instrumentation (``pipeline``), the Python API (``api``: resolve the input, calibration data,
compile, save), the compile report (``report``, ``report_html``, ``report_plots``) and the
``lowbit`` command line (``cli`` and ``cli_*``). Imports every layer below; imported by none."""
