"""Multi-process multi-rank training on CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO-3 against one process.

The process-launching tests run ``benchmarks/ddp_equivalence.py`` / ``benchmarks/fsdp_equivalence.py`` (which
launch ``torch.distributed.run`` themselves). The helpers of ``nsn_peft.training.distributed`` are tested in
one process below them.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from tiny_models import build_tiny_model, tiny_llama
from transformers import TrainingArguments

import nsn_peft
from nsn_peft.training import NSNTrainer, save_trained_adapter
from nsn_peft.training.distributed import (
    LogVarOptimizer,
    accumulate_without_sync,
    canonical_parameter_name,
    check_supported_sharding,
    deepspeed_resume_directory,
    full_trainable_state_dict,
    schedule_factor,
    use_precise_fsdp2_mixed_precision,
)

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def _env(**extra) -> dict:
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def _run_equivalence(tmp_path, script: str, *flags: str, timeout: int = 600) -> dict:
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        str(BENCH / script),
        "--device",
        "cpu",
        "--nproc",
        "2",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "runs"),
        *flags,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


# -- several processes -------------------------------------------------------------------------------
@needs_gloo
def test_ddp_two_processes_match_one(tmp_path):
    result = _run_equivalence(tmp_path, "ddp_equivalence.py", "--steps", "3", "--distill-alpha", "0.3")
    assert result["passed"] and result["max_rel_loss_diff"] < 1e-4
    assert result["ddp"]["world_size"] == 2 and result["ddp"]["find_unused_parameters"] is False
    assert result["ddp"]["final_log_vars"] == pytest.approx(result["single"]["final_log_vars"], abs=1e-5)
    assert all(v < 1e-4 for k, v in result["checkpoint_check"].items() if k.startswith("max_abs"))
    assert (Path(result["ddp"]["checkpoint"]) / "nsn_multirank_state.safetensors").is_file()


def _assert_sharded_run_matches(result: dict, sharding: str, tol: float = 1e-5) -> None:
    sharded, single = result["sharded"], result["single"]
    assert result["passed"], result["comparison"]
    assert sharded["world_size"] == 2 and sharded["sharding"] == sharding and single["sharding"] is None
    assert result["max_rel_loss_diff"] < tol
    assert any(k.startswith("logvar@") for k in result["comparison"])  # uncertainty weighting, learned
    assert result["max_abs_log_var_diff"] < tol and max(map(abs, single["final_log_vars"])) > 1e-3
    params = result["params_after_first_step"]
    # Adam's first step divides by |g|: entries with near-zero gradients amplify reduction-order noise.
    assert params["params"] > 0 and not params["missing"] and params["max_rel_diff"] < 10 * tol
    adapter = result["adapter_check"]["sharded"]
    assert adapter["adapter_files"] == ["adapter_model.safetensors"] and adapter["same_tensor_shapes_as_reference"]
    assert adapter["save_trained_adapter_matches_checkpoint"]
    assert all(v < 1e-4 for k, v in adapter.items() if k.startswith("max_abs"))


@needs_gloo
def test_fsdp2_two_processes_match_one_and_resume(tmp_path):
    """NSNTrainer through Trainer/Accelerate FSDP2: uncertainty weighting, distillation, the saved adapter, resume."""
    result = _run_equivalence(
        tmp_path,
        "fsdp_equivalence.py",
        "--strategy",
        "fsdp2",
        "--steps",
        "2",
        "--distill-alpha",
        "0.3",
        "--resume-check",
    )
    _assert_sharded_run_matches(result, "fsdp2")
    assert result["sharded"]["wrapped_model"] == "FSDPPeftModel" and result["sharded"]["nsn_param_type"] == "DTensor"
    resumed = result["resume_check"]
    assert resumed["curves"] and resumed["max_rel_loss_diff_vs_uninterrupted"] < 1e-6
    assert resumed["final_log_vars"] == pytest.approx(result["sharded"]["final_log_vars"], abs=1e-7)
    assert all(v < 1e-4 for k, v in result["adapter_check"]["resumed"].items() if k.startswith("max_abs"))


@needs_gloo
@pytest.mark.slow
def test_fsdp2_bf16_with_activation_checkpointing(tmp_path):
    """bf16 under FSDP2 (float32 gradient reduction, uncast outputs) tracks one process with autocast."""
    result = _run_equivalence(
        tmp_path, "fsdp_equivalence.py", "--strategy", "fsdp2", "--steps", "4", "--bf16", "--gc", "fsdp"
    )
    assert "reduce_dtype=torch.float32" in result["sharded"]["fsdp_mixed_precision_policy"]
    assert "output_dtype=None" in result["sharded"]["fsdp_mixed_precision_policy"]
    assert result["max_rel_loss_diff"] < 1e-4
    floor = result["adapter_check"]["bf16_noise_floor"]
    assert all(result["adapter_check"]["sharded"][k] <= floor[k] for k in floor)


@needs_gloo
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_zero3_two_processes_match_one_and_resume(tmp_path):
    result = _run_equivalence(
        tmp_path,
        "fsdp_equivalence.py",
        "--strategy",
        "zero3",
        "--steps",
        "2",
        "--distill-alpha",
        "0.3",
        "--gc",
        "hf",
        "--resume-check",
        timeout=1200,
    )
    _assert_sharded_run_matches(result, "deepspeed")
    assert result["sharded"]["wrapped_model"] == "DeepSpeedEngine"
    assert result["resume_check"]["max_rel_loss_diff_vs_uninterrupted"] < 1e-6


@needs_gloo
@pytest.mark.slow
def test_scale_benchmark_runs_every_strategy_on_cpu(tmp_path):
    out = tmp_path / "scale.json"
    cmd = [
        sys.executable,
        str(BENCH / "bench_fsdp_scale.py"),
        "--device",
        "cpu",
        "--nproc",
        "2",
        "--sizes",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--seq-len",
        "16",
        "--vocab",
        "64",
        "--granularity",
        "16",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "runs"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]["tiny"]
    assert {k: v["status"] for k, v in results.items()} == {"nsn-fsdp2": "ok", "nsn-ddp": "ok", "dense-fsdp2": "ok"}
    assert (
        results["nsn-fsdp2"]["wrapped_model"] == "FSDPPeftModel"
        and results["nsn-ddp"]["wrapped_model"] == "DistributedDataParallel"
    )
    assert (
        results["nsn-fsdp2"]["trainable_parameters"] > results["dense-fsdp2"]["trainable_parameters"]
    )  # full-rank factors


CLI_WRAPPER = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(BENCH)!r})
    from fsdp_equivalence import enable_accelerate_sharding_on_cpu
    enable_accelerate_sharding_on_cpu()
    from nsn_peft.cli import console_main
    console_main()  # what the nsn-peft console script runs
    """
)


@needs_gloo
@pytest.mark.slow
def test_cli_train_fsdp_writes_a_single_process_adapter(tmp_path):
    build_tiny_model(tmp_path / "tiny")
    words = " ".join(f"w{i % 40}" for i in range(4000))
    (tmp_path / "train.txt").write_text(words, encoding="utf-8")
    (tmp_path / "cli.py").write_text(CLI_WRAPPER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "cli.py",
        "train",
        "--model",
        "tiny",
        "--max-rank",
        "32",
        "--granularity",
        "8",
        "--data",
        "train.txt",
        "--seq-len",
        "16",
        "--max-tokens",
        "512",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--fsdp",
        "--device",
        "cpu",
        "--output",
        "trained",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.index("\n}") + 2])
    assert data["sharding"] == "fsdp2" and data["processes"] == 2 and data["steps"] == 2
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"), tmp_path / "trained")
    assert nsn_peft.selectable_ranks(model) == [8, 16, 24, 32]
    assert sorted(p.name for p in (tmp_path / "trained").glob("adapter_model*")) == ["adapter_model.safetensors"]


BROADCAST_WORKER = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist
    from tiny_models import tiny_llama
    from peft import get_peft_model
    import nsn_peft
    from nsn_peft.training.distributed import broadcast_trainable_parameters

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = get_peft_model(tiny_llama(0), nsn_peft.NSNConfig(target_modules=["up_proj"], rank_granularity=8))
    a = next(p for n, p in model.named_parameters() if "nsn_A" in n)
    if rank == 1:  # an SVD that came out with the other sign in this process
        with torch.no_grad():
            a[0].neg_()
    first = broadcast_trainable_parameters(model)
    gathered = [torch.zeros_like(a) for _ in range(2)]
    dist.all_gather(gathered, a.detach())
    second = broadcast_trainable_parameters(model)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"first": first, "second": second, "equal": torch.equal(gathered[0], gathered[1])}, f)
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort interpreter finalization (see benchmarks/ddp_equivalence.exit_worker)
    """
)


@needs_gloo
def test_broadcast_trainable_parameters_makes_every_process_start_alike(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(BROADCAST_WORKER)
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["first"] is True and result["second"] is False and result["equal"] is True


# -- helpers, one process --------------------------------------------------------------------------------
def test_log_var_optimizer_steps_like_a_param_group_of_adamw():
    """The sharded runs' own optimizer = AdamW with the log-variances as a group of the Trainer's optimizer."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3))
    grouped = torch.nn.Parameter(torch.randn(4))
    alone = torch.nn.Parameter(grouped.detach().clone())
    trainer_opt = torch.optim.AdamW([{"params": [weight], "lr": 0.1}], betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)
    trainer_opt.add_param_group({"params": [grouped], "lr": 0.05, "weight_decay": 0.0})
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer_opt, lambda step: 1.0 / (1 + step))
    own = LogVarOptimizer(alone, lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for _ in range(5):
        grad = torch.randn(4)
        weight.grad, grouped.grad, alone.grad = torch.randn(3), grad.clone(), grad.clone()
        trainer_opt.step()
        own.step(schedule_factor(trainer_opt, scheduler, 0.1))
        scheduler.step()
        own.zero_grad()
        assert alone.grad is None
        torch.testing.assert_close(alone.detach(), grouped.detach(), rtol=0, atol=1e-7)


def test_log_var_optimizer_state_round_trip():
    log_vars = torch.nn.Parameter(torch.zeros(3))
    opt = LogVarOptimizer(log_vars, lr=0.1)
    assert opt.state_tensors() == {} and opt.load_state_tensors({}) is False
    log_vars.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    saved = opt.state_tensors()
    assert set(saved) == {"logvar_optimizer.step", "logvar_optimizer.exp_avg", "logvar_optimizer.exp_avg_sq"}
    restored_vars = torch.nn.Parameter(log_vars.detach().clone())
    restored = LogVarOptimizer(restored_vars, lr=0.1)
    assert restored.load_state_tensors(saved) is True
    for o, p in ((opt, log_vars), (restored, restored_vars)):
        p.grad = torch.tensor([0.3, 0.3, -1.0])
        o.step()
    torch.testing.assert_close(restored_vars.detach(), log_vars.detach())
    with pytest.raises(ValueError, match="shape"):
        LogVarOptimizer(torch.nn.Parameter(torch.zeros(2)), lr=0.1).load_state_tensors(saved)
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_tensors({"logvar_optimizer.step": torch.ones(1)})
    with pytest.raises(ValueError, match="lr"):
        LogVarOptimizer(log_vars, lr=-1.0)


def test_schedule_factor_reads_the_first_group():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    assert schedule_factor(opt, scheduler, 0.2) == pytest.approx(1.0)
    opt.step()
    scheduler.step()
    assert schedule_factor(opt, scheduler, 0.2) == pytest.approx(0.5)
    assert schedule_factor(None, None, 0.2) == 1.0
    assert schedule_factor(opt, None, 0.0) == pytest.approx(0.5)  # falls back to the group's initial_lr


def test_canonical_parameter_name_drops_wrapper_pieces():
    name = "base_model.model.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.nsn_A.default"
    assert canonical_parameter_name(name) == "base_model.model.model.layers.0.mlp.up_proj.nsn_A.default"
    assert canonical_parameter_name("_orig_mod.base_model.x") == "base_model.x"
    assert canonical_parameter_name("_fsdp_wrapped_module.a._fsdp_wrapped_module.b") == "a.b"


def _fake_trainer(fsdp_version=None, deepspeed=False, policy=None):
    plugin = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version, mixed_precision_policy=policy)
    return SimpleNamespace(
        is_fsdp_enabled=fsdp_version is not None,
        is_deepspeed_enabled=deepspeed,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
    )


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2():
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_supported_sharding(_fake_trainer(fsdp_version=1))
    check_supported_sharding(_fake_trainer(fsdp_version=2))
    check_supported_sharding(_fake_trainer(deepspeed=True))
    check_supported_sharding(_fake_trainer())


def test_sharded_uncertainty_weighting_refuses_fp16():
    from nsn_peft.training.distributed import prepare_sharded_training

    trainer = _fake_trainer(deepspeed=True)
    trainer.rank_loss = SimpleNamespace(learnable=True, log_vars=torch.nn.Parameter(torch.zeros(2)))
    trainer.logvar_learning_rate = 0.01
    trainer.args = SimpleNamespace(fp16=True, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    with pytest.raises(ValueError, match="bf16"):
        prepare_sharded_training(trainer, torch.nn.Linear(2, 2))
    trainer.args.fp16 = False
    assert isinstance(prepare_sharded_training(trainer, torch.nn.Linear(2, 2)), LogVarOptimizer)
    trainer.rank_loss.learnable = False
    assert prepare_sharded_training(trainer, torch.nn.Linear(2, 2)) is None
    assert prepare_sharded_training(_fake_trainer(), torch.nn.Linear(2, 2)) is None


def test_fsdp2_mixed_precision_reduces_in_float32():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    default = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, output_dtype=torch.bfloat16)
    trainer = _fake_trainer(fsdp_version=2, policy=default)
    assert use_precise_fsdp2_mixed_precision(trainer) is True
    policy = trainer.accelerator.state.fsdp_plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)
    assert use_precise_fsdp2_mixed_precision(trainer) is False  # a chosen policy is left alone
    assert use_precise_fsdp2_mixed_precision(_fake_trainer(fsdp_version=2, policy=None)) is False
    assert use_precise_fsdp2_mixed_precision(_fake_trainer(deepspeed=True)) is False


def test_accumulate_without_sync_keeps_deepspeed_from_stepping():
    from accelerate.utils import DistributedType

    state = SimpleNamespace(sync_gradients=True)
    state._set_sync_gradients = lambda value: setattr(state, "sync_gradients", value)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, gradient_state=state)
    with accumulate_without_sync(accelerator, None):
        assert state.sync_gradients is False
    assert state.sync_gradients is True
    calls = []

    class Other:
        distributed_type = DistributedType.MULTI_GPU

        def no_sync(self, model):
            calls.append(model)
            return torch.enable_grad()

    with accumulate_without_sync(Other(), "model"):
        pass
    assert calls == ["model"]


def test_deepspeed_resume_directory(tmp_path):
    trainer = SimpleNamespace(is_deepspeed_enabled=True, args=SimpleNamespace(output_dir=str(tmp_path)))
    assert deepspeed_resume_directory(trainer, None) is None
    assert deepspeed_resume_directory(trainer, "ckpt") == "ckpt"
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert deepspeed_resume_directory(trainer, True) == str(tmp_path / "checkpoint-3")
    assert deepspeed_resume_directory(SimpleNamespace(is_deepspeed_enabled=False), "ckpt") is None


def test_save_trained_adapter_in_one_process(tmp_path):
    model = get_peft_model(
        tiny_llama(0), nsn_peft.NSNConfig(target_modules=["up_proj", "down_proj"], rank_granularity=8)
    )
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1)
    trainer = NSNTrainer(model, args)
    assert trainer._logvar_optimizer is None  # unsharded: the log-variances join Trainer's optimizer
    state = full_trainable_state_dict(model)
    assert state and all(not t.requires_grad for t in state.values())
    save_trained_adapter(trainer, tmp_path / "adapter")
    assert not list(tmp_path.glob(".adapter.*"))  # written atomically
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter")
    for name, param in loaded.named_parameters():
        if "nsn_" in name:
            torch.testing.assert_close(param, state[name])


def test_a_model_laid_out_for_serving_trains_contiguous_factors(tmp_path):
    """compile_for_ranks and factors-only loading store nsn_B rank-major; FSDP2/ZeRO-3 shard only contiguous
    parameters, so the trainer restores the training layout, without changing what the model computes."""
    model = get_peft_model(
        tiny_llama(0), nsn_peft.NSNConfig(target_modules=["up_proj", "down_proj"], rank_granularity=8)
    )
    layers = [m for m in model.modules() if isinstance(m, nsn_peft.NSNLinear)]
    assert all(layer.make_rank_major() for layer in layers)
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1)
    NSNTrainer(model, args)
    assert all(layer.nsn_B["default"].is_contiguous() and not layer.rank_major_storage for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
