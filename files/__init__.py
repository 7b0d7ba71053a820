"""lowbit.files: how lowbit touches a file system it does not own. Owns the output contract
(``fsutil``: what may be replaced, atomic outputs), the journaled swap that puts an output in
place (``swap``), the per-run scratch directory (``scratch``) and the cache location (``paths``)."""
