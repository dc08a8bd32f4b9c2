"""Run under torchrun by tests/test_ddp.py: `train` or `pretrain` as the CLI runs it, plus every
rank's parameters at each save in OUT.rank<R>.pt (the library writes on rank 0 only), so that the
test can check what DDP must guarantee: every rank holds the same weights, BYOL's EMA target too.

    torchrun --nproc_per_node=2 tests/ddp_every_rank.py pretrain '{"dataset": ..., "out": ...}'
    ... train '{...}' --hide-state-from-rank-1    (rank 1 finds no resume state: a node that
                                                   does not share OUT's folder)
"""
import json
import sys

import torch

from coopt_fast import ssl, student
from coopt_fast.distributed import world


def main() -> None:
    what, kwargs = sys.argv[1], json.loads(sys.argv[2])
    module = ssl if what == "pretrain" else student
    save = module._save

    def save_every_rank(job, loop):
        save(job, loop)
        params = {name: p.detach().clone() for name, p in job.model.named_parameters()}
        torch.save(params, f"{kwargs['out']}.rank{job.world.rank}.pt")

    module._save = save_every_rank
    if "--hide-state-from-rank-1" in sys.argv[3:]:
        load = module.resume
        module.resume = lambda path, *args: None if world().rank == 1 else load(path, *args)
    getattr(module, what)(**kwargs)


if __name__ == "__main__":
    main()
