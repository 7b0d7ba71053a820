"""lowbit.passes."""
