"""The end of every multi-process test script: destroy the default process group before the interpreter exits,
as the ``asyncpred`` command does (``lightning_asyncpred.__main__.destroy_process_group``: why, torch issue
#190489: a Gloo worker thread freeing the last collective's tensors while the interpreter finalizes aborts the
process, rc -6 "terminate called without an active exception", about one launch in ten here)."""

from lightning_asyncpred.__main__ import destroy_process_group as finish

__all__ = ["finish"]
