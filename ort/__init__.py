"""lowbit.ort: running an in-memory model in ONNX Runtime. Owns session creation (``session``),
feeds for token windows (``feeds``), the one observation run over the calibration data that every
statistics analysis registers on (``observe``), and the mobile ``.ort`` conversion (``ort_format``)."""
