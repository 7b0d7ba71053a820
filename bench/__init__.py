"""lowbit.bench."""
