"""The transformers Trainer the `train` stage runs, and its callbacks (curves, log lines)."""

from __future__ import annotations

import logging
import time

import torch

from mediagent.distributed import check_engine, fsdp_on_cpu
from mediagent.job_size import STEP_LINE


def make_trainer(**kwargs):
    """A transformers.Trainer that also counts real vs padded tokens of the batches it trains on."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthSampler(LengthGroupedSampler):
        """Batches grouped by length in an order drawn from (seed, epoch) alone.

        The stock sampler draws from the global RNG, which a resumed run restores to its
        checkpoint's state rather than the epoch's start: the resumed run would skip the
        first batches of another order and end with another adapter."""

        def __init__(self, sampler: LengthGroupedSampler, seed: int):
            super().__init__(sampler.batch_size, lengths=sampler.lengths)
            self.seed = seed
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at each epoch's start
            self.generator = torch.Generator().manual_seed(self.seed + epoch)

    class _Trainer(Trainer):
        real_tokens = 0
        batch_tokens = 0

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                return EpochSeededLengthSampler(sampler, self.args.data_seed)
            return sampler

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if fsdp_on_cpu(self.accelerator):
                self.is_fsdp_enabled = True
            check_engine(self)

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            self.real_tokens += int(mask.sum())
            self.batch_tokens += mask.numel()
            return super().training_step(model, inputs, num_items_in_batch)

    return _Trainer(**kwargs)


def trainer_callbacks(dvclive_dir: str, resume: bool, log: logging.Logger):
    """dvclive curves (train/eval loss at the trainer's global step) and a one-line eval log.

    The lines go to `log`, the stage's logger: they carry the stage's name, and are quieted
    with it on non-main processes.
    """
    from transformers import TrainerCallback
    from transformers.integrations import DVCLiveCallback

    from dvclive import Live

    class StepDVCLive(DVCLiveCallback):
        # The stock callback advances one dvclive step per log call; pinning the step to the
        # trainer's global step puts train and eval loss on one x axis and lets a resumed run
        # continue its curves.
        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if state.is_world_process_zero and self.live is not None:
                self.live.step = state.global_step
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    class EvalLine(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.is_world_process_zero and metrics:
                log.info("eval step %d: eval_loss %.4f", state.global_step, metrics["eval_loss"])

    class StepLine(TrainerCallback):
        # one line per logged step with the seconds since this run's first step began (the
        # evaluation before it left out): `mediagent preflight --measure` times steps by it
        start = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = self.start or time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                log.info(STEP_LINE, state.global_step, logs["loss"], time.perf_counter() - self.start)

    # save_dvc_exp=False: outside `dvc exp run` dvclive would otherwise create its own
    # experiment commits; dvcyaml=False: the pipeline's dvc.yaml already declares the plots.
    live = Live(dir=dvclive_dir, resume=resume, save_dvc_exp=False, dvcyaml=False, report=None)
    return [StepDVCLive(live=live, log_model=False), EvalLine(), StepLine()]
