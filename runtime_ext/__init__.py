"""lowbit.runtime_ext."""
