"""lowbit.formats."""
