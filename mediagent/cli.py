"""``mediagent``: one command over the pipeline stages and the tools around them.

Commands are imported only when run (serving and evaluation pull in torch and vLLM), so
``mediagent --help`` answers at once.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from mediagent.errors import UserError, run, run_stage

# name -> (module, one-line help). The DVC stages run `main(params)` of their module.
STAGES = {
    "process": ("mediagent.pipeline.process", "Clean cMedQA2 (and data.sources) and write the train/val/test splits."),
    "base": ("mediagent.pipeline.base_model", "Build the tiny model or fetch the base at model.revision."),
    "train": ("mediagent.pipeline.train", "LoRA (or QLoRA) fine-tuning of the base."),
    "merge": ("mediagent.pipeline.merge", "Merge the adapter into the base, with a logits parity check."),
    "evaluate": ("mediagent.pipeline.evaluate", "Base vs tuned on the test split."),
    "review": ("mediagent.pipeline.review", "Win rates and agreement from clinicians' judgments."),
}
COMMANDS = {
    "serve": ("mediagent.commands.serve", "Serve base + adapters (or the merged model) with vLLM; load/unload."),
    "chat": ("mediagent.commands.chat", "Chat with the served (or offline) tuned model."),
    "infer": ("mediagent.commands.infer", "Answer a JSONL file of questions offline."),
    "review-app": ("mediagent.commands.review_app", "Arena and blind review in the browser."),
    "data": ("mediagent.commands.data", "Download and verify the official cMedQA2 files."),
    "profile": ("mediagent.commands.profile", "Switch params.yaml to a params profile (configs/profiles/)."),
    "preflight": ("mediagent.commands.preflight", "Memory plan for a base and a budget, before anything loads."),
    "summary": ("mediagent.commands.summary", "Base vs tuned headline metrics."),
    "sweep": ("mediagent.commands.sweep", "Run the queued DVC experiments in parallel, one GPU (group) each."),
    "plots": ("mediagent.commands.plots", "Plots as PNGs and an HTML page that needs no CDN (offline)."),
}


def _stage_command(name: str, module: str, help_text: str) -> click.Command:
    @click.command(name=name, help=f"{help_text} (DVC stage `{name}`; params from params.yaml.)")
    def stage() -> None:
        run_stage(importlib.import_module(module).main)

    return stage


class Group(click.Group):
    """Lists stages and commands apart; imports a command's module only when it runs."""

    def list_commands(self, ctx):
        return [*STAGES, *COMMANDS]

    def get_command(self, ctx, name):
        if name in STAGES:
            return _stage_command(name, *STAGES[name])
        if name in COMMANDS:
            command = importlib.import_module(COMMANDS[name][0]).command
            command.name = name
            return command
        return None

    def format_commands(self, ctx, formatter):
        for title, table in (("Pipeline stages (dvc repro runs these)", STAGES), ("Commands", COMMANDS)):
            with formatter.section(title):
                formatter.write_dl([(name, help_text) for name, (_, help_text) in table.items()])


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of expected errors too (or MEDIAGENT_DEBUG=1).")
@click.version_option(package_name="mediagent-engine")
def cli(debug: bool) -> None:
    """MediAgent-Engine: LoRA fine-tuning of Qwen3 on Chinese medical Q&A, end to end.

    `dvc repro` runs the stages in order; `make demo` runs everything on the tiny default.
    """
    if debug:
        os.environ["MEDIAGENT_DEBUG"] = "1"


def main(argv: list[str] | None = None) -> None:
    def invoke():
        try:
            return cli.main(args=argv, prog_name="mediagent", standalone_mode=False)
        except click.exceptions.Abort as exc:
            raise UserError("aborted") from exc
        except click.ClickException as exc:  # a bad option or argument
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "mediagent"
            raise UserError(f"{exc.format_message().rstrip('.')} — see `{where} --help`") from exc

    code = run(invoke)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
