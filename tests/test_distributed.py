"""Training beyond one process, run for real as CPU processes through `accelerate launch`.

Each multi-process run uses the repository's own configs/accelerate/*.yaml with only the
process count (and, for DDP/FSDP, ACCELERATE_USE_CPU) overridden, and is compared with a
one-process run on the same data order and effective batch: 2 processes x 2 sequences
against 1 process x (2 sequences x 2 accumulation steps). The LoRA weights must agree
within float32 tolerance.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mediagent.errors import UserError
from mediagent.params import Params, with_overrides
from tests.adapter_kit import write_processed
from tests.conftest import ROOT, copy_repo
from tests.test_pipeline import git_env, run_ok, shrink
from tests.test_train import ADAPTER_FILES, _adapter_weights, read_json, small, stage_env, write_params

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
TRAIN = ["-m", "mediagent.pipeline.train"]


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory, tiny_base, sample_data) -> Path:
    """A repository-shaped folder (params paths are relative) shared by this module's runs."""
    work = tmp_path_factory.mktemp("dist")
    (work / "models" / "base").mkdir(parents=True)
    (work / "models" / "base" / "tiny").symlink_to(tiny_base, target_is_directory=True)
    write_processed(sample_data, work / "data" / "processed", n_train=96, n_val=32, n_test=1, negatives=4)
    shutil.copytree(ROOT / "configs", work / "configs")
    return work


def params_for(repo_params: Params, name: str, processes: int, steps: int = 3, **train) -> Params:
    """Effective batch 4 per optimizer step whatever the process count."""
    per_process = (
        dict(per_device_train_batch_size=2)
        if processes == 2
        else dict(per_device_train_batch_size=4, micro_batch_size=2)
    )
    return small(
        repo_params,
        max_steps=steps,
        max_eval_examples=8,
        learning_rate=0.01,
        output_dir=f"models/{name}",
        checkpoint_dir=f"models/ckpt-{name}",
        metrics_file=f"metrics/{name}.json",
        dvclive_dir=f"dvclive/{name}",
        **per_process,
        **train,
    )


def run(cmd: list[str], cwd: Path, params: Params | None = None, env: dict | None = None, timeout: int = 400) -> str:
    if params is not None:
        write_params(params, cwd / "params.yaml")
    proc = subprocess.run(
        cmd, cwd=cwd, env={**stage_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def max_diff(a: dict, b: dict) -> tuple[float, float]:
    """(max |a - b| over the LoRA weights, largest |weight|)."""
    assert a.keys() == b.keys()
    return (max(float((a[k] - b[k]).abs().max()) for k in a), max(float(w.abs().max()) for w in a.values()))


def assert_same_adapter(dist_dir: Path, name: str, reference: str, label: str) -> None:
    got, ref = _adapter_weights(dist_dir / "models" / name), _adapter_weights(dist_dir / "models" / reference)
    assert any(float(w.abs().max()) > 0 for k, w in ref.items() if "lora_B" in k)  # it trained
    diff, scale = max_diff(got, ref)
    print(f"{label} vs one process: max |LoRA weight diff| {diff:.3g} (weights up to {scale:.3f})")
    # float32 sums in another order (all-reduce, reduce-scatter) and AdamW's early steps
    # that scale a gradient by its own size: ~1e-5 at most; other data or a lost gradient
    # share shows as ~1e-2 here
    assert diff <= 2e-4 * scale, (label, diff, scale)
    assert read_json(dist_dir / "models" / name / "adapter_config.json") == read_json(
        dist_dir / "models" / reference / "adapter_config.json"
    )


@pytest.fixture(scope="module")
def one_process(dist_dir, repo_params) -> str:
    """The reference adapter: one process, 2 x 2 accumulation, 3 steps."""
    run([sys.executable, *TRAIN], dist_dir, params_for(repo_params, "one", 1))
    return "one"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(dist_dir, repo_params, one_process, tiny_base):
    out = run(
        [*LAUNCH, "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2", *TRAIN],
        dist_dir,
        params_for(repo_params, "ddp", 2),
        env={"ACCELERATE_USE_CPU": "true"},
    )
    assert "parallelism: MULTI_CPU, 2 processes" in out
    assert out.count("adapter written to") == 1  # only the main process publishes
    assert_same_adapter(dist_dir, "ddp", one_process, "DDP 2 processes")
    assert read_json(dist_dir / "models/ddp/lineage.json")["world_size"] == 2

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mediagent.loading import load_tokenizer

    assert sorted(p.name for p in (dist_dir / "models/ddp").iterdir()) == ADAPTER_FILES
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, dist_dir / "models/ddp").eval()
    ids = load_tokenizer(dist_dir / "models/ddp")("头疼怎么办？", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], base.config.vocab_size) and torch.isfinite(logits).all()


def test_fsdp_two_processes_match_one_process(dist_dir, repo_params, one_process, tiny_base):
    out = run(
        [*LAUNCH, "--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", "2", *TRAIN],
        dist_dir,
        params_for(repo_params, "fsdp", 2),
        env={"ACCELERATE_USE_CPU": "true"},
    )
    line = next(x for x in out.splitlines() if "parallelism:" in x)
    sharded, total = (int(n) for n in line.split("FSDP2, ")[1].split(" parameter")[0].split(" of "))
    assert sharded == total > 0 and line.endswith("sharded over 2 processes"), line
    assert_same_adapter(dist_dir, "fsdp", one_process, "FSDP2 2 processes")
    assert sorted(p.name for p in (dist_dir / "models/fsdp").iterdir()) == ADAPTER_FILES
    lineage, reference = (read_json(dist_dir / f"models/{n}/lineage.json") for n in ("fsdp", one_process))
    assert lineage.keys() == reference.keys() and lineage["world_size"] == 2 and reference["world_size"] == 1

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, dist_dir / "models/fsdp")
    b = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert float(b.abs().max()) > 0  # the gathered weights, not an empty shard


def test_fsdp_resumes_after_a_kill(dist_dir, repo_params):
    """Killed after its first checkpoint, the rerun resumes from it and ends where an
    uninterrupted run (here: one process, same batches) ends."""
    steps = dict(steps=6, save_steps=2, eval_steps=6)
    run([sys.executable, *TRAIN], dist_dir, params_for(repo_params, "one6", 1, **steps))
    write_params(params_for(repo_params, "fsdp6", 2, **steps), dist_dir / "params.yaml")
    cmd = [*LAUNCH, "--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", "2", *TRAIN]
    env = {**stage_env(), "ACCELERATE_USE_CPU": "true"}
    ckpt = dist_dir / "models/ckpt-fsdp6"
    with open(dist_dir / "fsdp6-first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=dist_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list(ckpt.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, (dist_dir / "fsdp6-first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        # the launcher and both ranks at once, as a lost machine (torch's launcher gives each
        # rank a session of its own, so they are collected before anything is killed)
        import psutil

        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.kill()
        proc.wait()
        psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)
    saved = sorted(int(p.parent.name.split("-")[1]) for p in ckpt.glob("checkpoint-*/trainer_state.json"))
    assert saved and saved[-1] < 6 and not (dist_dir / "models/fsdp6").exists()
    # adapter-only FSDP checkpoints: no decoder weights of the base saved every save_steps
    # (torch keeps a tied head, as the tiny base's is, among the "trainable" ones)
    import torch

    state = torch.load(ckpt / f"checkpoint-{saved[-1]}" / "pytorch_model_fsdp.bin", weights_only=True)
    assert {k for k in state if ".lora_" not in k} <= {"base_model.model.lm_head.weight"}, sorted(state)[:5]
    assert sum(".lora_B." in k for k in state) == 14  # 7 target modules x 2 layers

    out = run(cmd, dist_dir, env={"ACCELERATE_USE_CPU": "true"})
    assert f"resuming from checkpoint-{saved[-1]} " in out, out[-3000:]
    assert read_json(dist_dir / "metrics/fsdp6.json")["steps"] == 6
    assert_same_adapter(dist_dir, "fsdp6", "one6", "FSDP2 killed and resumed")
    assert not ckpt.exists()


def test_deepspeed_zero2_two_processes_match_one_process(dist_dir, repo_params, one_process):
    pytest.importorskip("deepspeed", reason="make install installs requirements-deepspeed.txt")
    config = ["--config_file", "configs/accelerate/deepspeed_zero2.yaml", "--num_processes", "2"]
    out = run([*LAUNCH, *config, *TRAIN], dist_dir, params_for(repo_params, "zero2", 2))
    assert "parallelism: DeepSpeed ZeRO-2, 2 processes" in out
    assert_same_adapter(dist_dir, "zero2", one_process, "DeepSpeed ZeRO-2 2 processes")

    # Under ACCELERATE_USE_CPU accelerate quietly drops DeepSpeed for plain DDP: the stage stops.
    proc = subprocess.run(
        [*LAUNCH, *config, *TRAIN],
        cwd=dist_dir,
        env={**stage_env(), "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode != 0
    assert "error: the accelerate config asks for DeepSpeed, but accelerate set up MULTI_CPU" in proc.stderr


def test_two_machines_on_loopback_match_one_machine(dist_dir, repo_params, one_process):
    """Machine rank 0 and 1, one process each, meeting at 127.0.0.1 as two nodes would."""
    write_params(params_for(repo_params, "nodes", 2), dist_dir / "params.yaml")
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        cmd = [
            *LAUNCH,
            "--config_file",
            "configs/accelerate/ddp.yaml",
            "--num_processes",
            "2",
            "--num_machines",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            *TRAIN,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=dist_dir,
                env={**stage_env(), "ACCELERATE_USE_CPU": "true"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "adapter written to" in outs[0] and "adapter written to" not in outs[1]  # machine 0 publishes
    assert read_json(dist_dir / "models/nodes/lineage.json")["world_size"] == 2
    assert_same_adapter(dist_dir, "nodes", one_process, "2 machines x 1 process")


def test_launch_param_trains_through_accelerate(dist_dir, repo_params, one_process, monkeypatch):
    """`launch.config` makes the unchanged stage command (what dvc.yaml runs) launch itself."""
    from mediagent.pipeline.train import params_hash

    params = with_overrides(
        params_for(repo_params, "launched", 2), launch={"config": "configs/accelerate/ddp.yaml", "processes": 2}
    )
    out = run([sys.executable, *TRAIN], dist_dir, params)
    assert "launching 2 processes:" in out and "parallelism: MULTI_CPU, 2 processes" in out
    assert_same_adapter(dist_dir, "launched", one_process, "launch.config=ddp.yaml")
    lineage = read_json(dist_dir / "models/launched/lineage.json")
    assert lineage["world_size"] == 2 and "launch" not in lineage
    # the adapter's name does not depend on how it was launched
    assert lineage["name"].endswith(params_hash(with_overrides(params, launch={"config": ""}))[:8])

    from mediagent.pipeline.train import main

    monkeypatch.chdir(dist_dir)
    with pytest.raises(UserError, match="launch.processes: auto starts one process per GPU"):
        main(with_overrides(params, launch={"processes": "auto"}))


def test_accelerate_configs_are_accepted_by_accelerate():
    """Every shipped config parses with accelerate's own loader (unknown keys are refused)
    and says what its comments promise."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))}
    assert set(configs) == {"ddp", "fsdp", "deepspeed_zero2"}
    assert str(configs["ddp"].distributed_type).endswith("MULTI_GPU")
    fsdp = configs["fsdp"]
    assert str(fsdp.distributed_type).endswith("FSDP")
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen3DecoderLayer"
    zero2 = configs["deepspeed_zero2"]
    assert str(zero2.distributed_type).endswith("DEEPSPEED") and zero2.deepspeed_config["zero_stage"] == 2
    for config in configs.values():
        assert config.mixed_precision == "no"  # bf16 comes from model.dtype, set by the stage


# ---------------------------------------------------------------- sweeps over devices


def test_sweep_runs_queued_experiments_at_once_one_device_each(tmp_path):
    """`mediagent sweep --gpus 0,1`: two DVC queue workers, each with its own
    CUDA_VISIBLE_DEVICES, run two queued experiments at the same time."""
    repo = copy_repo(tmp_path / "repo")
    shrink(repo)
    env = {**git_env(), "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
        dvc + ["repro"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "baseline"],
    ):
        run_ok(cmd, repo, env)
    for r in (8, 32):
        run_ok(dvc + ["exp", "run", "--queue", "-S", f"lora.r={r}", "--name", f"r{r}"], repo, env)

    sweep = subprocess.Popen(
        [sys.executable, "-m", "mediagent.cli", "sweep", "--gpus", "0,1"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = 0  # most experiment workspaces alive at once (DVC runs each in .dvc/tmp/exps/<tmp>)
    deadline = time.monotonic() + 900
    while sweep.poll() is None:
        assert time.monotonic() < deadline, "sweep still running after 900 s"
        exps = repo / ".dvc" / "tmp" / "exps"
        alive = [p for p in exps.glob("tmp*") if (p / "dvc.yaml").is_file()] if exps.is_dir() else []
        running = max(running, len(alive))
        time.sleep(0.2)
    out = sweep.stdout.read()
    assert sweep.returncode == 0, out[-4000:]
    assert "2 queued experiments, 2 workers: CUDA_VISIBLE_DEVICES=0, CUDA_VISIBLE_DEVICES=1" in out
    assert running == 2, f"at most {running} experiment(s) ran at once"

    shown = json.loads(run_ok(dvc + ["exp", "show", "--json"], repo, env))
    devices = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                metrics = ((data.get("metrics") or {}).get("metrics/train.json") or {}).get("data") or {}
                if rev.get("name") in ("r8", "r32"):
                    devices[rev["name"]] = metrics.get("devices")
    assert set(devices) == {"r8", "r32"}, shown
    assert sorted(devices.values()) == ["0", "1"], devices
