"""The end of every multi-process test script: destroy the default process group before the interpreter exits.

Why (torch issue #190489; seen here as the rc -6 "terminate called without an active exception" at exit, about one
launch in ten, gdb on the core): a Gloo worker thread (``ProcessGroupGloo::runLoop``) frees a finished collective's
``AsyncWork`` after the Python side has its result; the work's tensors still own their Python objects, so the
last decref takes the GIL, and during ``Py_FinalizeEx`` ``take_gil`` exits the thread, whose forced unwind through
a ``noexcept`` frame calls ``std::terminate``. ``destroy_process_group()`` drains the workers while the interpreter
is alive."""

import torch.distributed as dist


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
