"""lowbit.bench: side-by-side measurements of lowbit and its peers (``lowbit-bench``), written to
bench/RESULTS.md. The top layer: it imports the product, the product never imports it."""
