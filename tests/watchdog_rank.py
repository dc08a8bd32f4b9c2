"""A rank for tests/test_ddp.py's two-node test: rank 1 raises at once; rank 0 "works" for far
longer than the test waits, inside the process group and with no barrier to fail at. Only the
peer watchdog (coopt_fast.distributed._watch) can end it."""
import time

from coopt_fast import distributed
from coopt_fast.errors import CooptError

import torch

with distributed.process_group(torch.device("cpu")) as w:
    if w.rank == 1:
        raise CooptError("rank 1 gives up on purpose")
    time.sleep(600)
