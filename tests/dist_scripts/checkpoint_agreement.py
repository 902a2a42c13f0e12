"""Two Gloo ranks at different steps agree ModelCheckpoint's decisions (tests/test_checkpoint_agreement.py).

Each rank holds two real ``ModelCheckpoint``s with the state an unequal pool leaves: callback 0 saved at step 5 on
both ranks (rank 0 is still at step 5, rank 1 trained on to 7); callback 1 saved at each rank's current step. The
trainer is a namespace with the attributes ``ModelCheckpoint``'s decisions read (``state.fn``, ``sanity_checking``,
``fast_dev_run``, ``global_step``, ``callback_metrics``, ``current_epoch``) and the strategy's root device."""

import argparse
import json
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn, TrainerState

from lightning_asyncpred.strategies.checkpoint_agreement import CheckpointAgreement


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = TrainerState()
    state.fn = TrainerFn.FITTING
    step = (5, 7)[rank]
    cbs = [ModelCheckpoint(dirpath=args.out), ModelCheckpoint(dirpath=args.out)]
    trainer = SimpleNamespace(state=state, sanity_checking=False, fast_dev_run=False, global_step=step,
                              callback_metrics={}, current_epoch=0, checkpoint_callbacks=cbs, callbacks=[],
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    cbs[0]._last_global_step_saved, cbs[1]._last_global_step_saved = 5, step

    def reduce(t):
        dist.all_reduce(t)
        return t

    agreement = CheckpointAgreement(world, reduce)
    agreement.install(trainer)
    before = {"skip": [cb._should_skip_saving_checkpoint(trainer) for cb in cbs],
              "name": cbs[0].format_checkpoint_name(cbs[0]._monitor_candidates(trainer))}
    agreement.agree(trainer)
    after = {"skip": [cb._should_skip_saving_checkpoint(trainer) for cb in cbs], "step": agreement.step,
             "name": cbs[0].format_checkpoint_name(cbs[0]._monitor_candidates(trainer))}
    agreement.uninstall()
    restored = cbs[0].format_checkpoint_name(cbs[0]._monitor_candidates(trainer))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"before": before, "after": after, "restored": restored, "callbacks_left": len(trainer.callbacks)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
