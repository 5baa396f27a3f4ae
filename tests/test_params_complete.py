"""Every TrainingArguments and LoraConfig field that can change the adapter has a chosen value.

The arguments are built from the repo's params.yaml by the train stage's own functions
(mediagent/training_config.py). Each field of the *installed* transformers and peft must be
set from a param of the same name, derived (DERIVED_TRAINING), fixed with a reason
(FIXED_*), or listed as unable to change the adapter or its metrics (NO_EFFECT_*). A field
a library adds or a list entry it removes fails here, so an upgrade cannot change a run
through a default nobody chose.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from mediagent import params as params_module
from mediagent import training_config as tc

WHERE = "mediagent/training_config.py"


def _plan(train) -> dict:
    """The memory plan of a run that fits as configured (the plan's own choices are DERIVED)."""
    return {
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_checkpointing": False,
    }


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def unchosen(
    library: str,
    fields: dict,
    kwargs: dict,
    from_params: set[str],
    derived: dict,
    fixed: dict,
    no_effect: dict,
    section: str,
    fixed_name: str,
    no_effect_name: str,
) -> list[str]:
    """One line per field whose value nobody chose, per list entry naming no field, per double entry."""
    problems = []
    for name, f in sorted(fields.items()):
        if name in no_effect:
            continue
        if name not in kwargs:
            problems.append(
                f"{library}.{name}: nobody chose it, so {library}'s default {_default(f)!r} decides — add a "
                f"{section}.{name} param (params.yaml and mediagent/params.py), or {name!r}: (value, why) to "
                f"{fixed_name}, or, if it cannot change the adapter or its metrics, {name!r}: why to "
                f"{no_effect_name} in {WHERE}"
            )
        elif name not in from_params | derived.keys() | fixed.keys():
            problems.append(f"{library}.{name}: set in {WHERE} but in none of its lists — name it in one, with why")
    for name in sorted((derived.keys() | fixed.keys() | no_effect.keys()) - fields.keys()):
        problems.append(
            f"{library}.{name}: listed in {WHERE} but the installed {library} has no such field "
            f"(renamed or removed?) — update the entry"
        )
    for name in sorted(fixed.keys() & (no_effect.keys() | derived.keys() | from_params)):
        problems.append(f"{library}.{name}: in {fixed_name} and also set elsewhere — keep one source")
    return problems


def test_every_trainer_setting_that_changes_a_run_is_chosen(repo_params):
    from transformers import TrainingArguments

    train = repo_params.train
    fields = _fields(TrainingArguments)
    from_params = {f.name for f in dataclasses.fields(train)} & fields.keys()
    problems = unchosen(
        "TrainingArguments",
        fields,
        tc.training_kwargs(train, torch.float32, _plan(train)),
        from_params - tc.DERIVED_TRAINING.keys(),
        tc.DERIVED_TRAINING,
        tc.FIXED_TRAINING,
        tc.NO_EFFECT_TRAINING,
        "train",
        "FIXED_TRAINING",
        "NO_EFFECT_TRAINING",
    )
    assert not problems, "\n".join(problems)


def test_every_lora_setting_that_changes_the_adapter_is_chosen(repo_params):
    from peft import LoraConfig

    fields = _fields(LoraConfig)
    from_params = {f.name for f in dataclasses.fields(repo_params.lora)}
    problems = unchosen(
        "LoraConfig",
        fields,
        tc.lora_kwargs(repo_params.lora),
        from_params,
        {},
        tc.FIXED_LORA,
        tc.NO_EFFECT_LORA,
        "lora",
        "FIXED_LORA",
        "NO_EFFECT_LORA",
    )
    assert not problems, "\n".join(problems)


def test_the_built_arguments_hold_the_params_and_the_fixed_values(repo_params):
    """What the stage hands the trainer and peft: each param and fixed value arrives unchanged."""
    train, lora = repo_params.train, repo_params.lora
    args = tc.training_arguments(train, torch.float32, _plan(train))
    named = ({f.name for f in dataclasses.fields(train)} & _fields(type(args)).keys()) - tc.DERIVED_TRAINING.keys()
    assert {"optim", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "weight_decay"} <= named
    for name in named:
        assert getattr(args, name) == getattr(train, name), f"TrainingArguments.{name}"
    for name, (value, _why) in tc.FIXED_TRAINING.items():
        assert getattr(args, name) == value, f"TrainingArguments.{name}"
    assert (args.output_dir, args.data_seed, args.use_cpu) == (train.checkpoint_dir, train.seed, True)
    config = tc.lora_config(lora)
    for name, value in {**tc.fixed_values(tc.FIXED_LORA), **dataclasses.asdict(lora)}.items():
        assert getattr(config, name) == (list(value) if name == "target_modules" else value), f"LoraConfig.{name}"


def test_every_reason_is_given():
    for entries in (tc.FIXED_TRAINING, tc.FIXED_LORA, tc.DERIVED_TRAINING, tc.NO_EFFECT_TRAINING, tc.NO_EFFECT_LORA):
        for name, entry in entries.items():
            why = entry[1] if isinstance(entry, tuple) else entry
            assert isinstance(why, str) and why.strip(), f"{name}: say why"


@pytest.mark.parametrize(
    ("alias", "library_values"),
    [
        ("Scheduler", "transformers.trainer_utils:SchedulerType"),
        ("Optimizer", "transformers.training_args:OptimizerNames"),
    ],
)
def test_choices_exist_in_the_installed_transformers(alias, library_values):
    import importlib

    module, name = library_values.split(":")
    known = {member.value for member in getattr(importlib.import_module(module), name)}
    offered = set(typing.get_args(getattr(params_module, alias)))
    assert offered <= known, f"params.{alias} offers {sorted(offered - known)}, unknown to {library_values}"


def test_evaluation_answers_ignore_the_base_s_generation_config(tiny_base, repo_params):
    """Greedy is scoring.GREEDY, whatever a base's generation_config.json says (vLLM never reads it)."""
    from mediagent.chat_format import ChatFormat, conversation
    from mediagent.loading import load_model, load_tokenizer
    from mediagent.scoring import generate_hf

    tok = load_tokenizer(tiny_base)
    fmt = ChatFormat.of(tok)
    model = load_model(tiny_base, repo_params.model, torch.float32)
    prompts = [fmt.prompt_ids(conversation(repo_params.process.system_prompt, "头痛三天了，怎么办？"))]
    greedy = generate_hf(model, fmt, prompts, max_new_tokens=16, batch_size=1, min_new_tokens=16)
    model.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1)
    ids = torch.tensor(prompts)
    # what transformers does with the base's settings when they are not overridden
    library = model.generate(
        input_ids=ids, max_new_tokens=16, min_new_tokens=16, eos_token_id=fmt.stop_ids, pad_token_id=tok.pad_token_id
    )[0, ids.shape[1] :].tolist()
    assert library != greedy[0]
    assert generate_hf(model, fmt, prompts, max_new_tokens=16, batch_size=1, min_new_tokens=16) == greedy
