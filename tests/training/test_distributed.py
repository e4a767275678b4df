"""Multi-process multi-rank training on CPU (gloo): DDP equivalence with one process, FSDP2 sharding of NSN layers."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_ddp_two_processes_match_one(tmp_path):
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ddp_equivalence.py"), "--device", "cpu", "--nproc", "2", "--steps", "3",
           "--distill-alpha", "0.3", "--out", str(out), "--work-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["max_rel_loss_diff"] < 1e-4
    assert result["ddp"]["world_size"] == 2 and result["ddp"]["find_unused_parameters"] is False
    assert result["ddp"]["final_log_vars"] == pytest.approx(result["single"]["final_log_vars"], abs=1e-5)
    assert all(v < 1e-4 for k, v in result["checkpoint_check"].items() if k.startswith("max_abs"))
    assert (Path(result["ddp"]["checkpoint"]) / "nsn_multirank_state.safetensors").is_file()


FSDP2_WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from tiny_models import tiny_llama
    from peft import get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import nsn_peft

    def build():
        config = nsn_peft.NSNConfig(target_modules=["up_proj", "gate_proj", "down_proj"], rank_granularity=8)
        return get_peft_model(tiny_llama(0), config)

    def multirank_backward(model, x):
        for r in (32, 8):
            with nsn_peft.at_rank(model, r):
                model(input_ids=x, labels=x).loss.backward()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    reference = build()
    multirank_backward(reference, x)
    model = build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    multirank_backward(model, x[rank * 2 : (rank + 1) * 2])
    ref = dict(reference.named_parameters())
    worst, kinds = 0.0, set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            kinds.add(type(p.data).__name__)
            full = p.grad.full_tensor()
            worst = max(worst, ((full - ref[name].grad).abs().max() / ref[name].grad.abs().max()).item())
    if rank == 0:
        json.dump({"worst": worst, "kinds": sorted(kinds)}, open(sys.argv[1], "w"))
    dist.destroy_process_group()
    """
)


def test_fsdp2_sharded_nsn_layers_give_single_process_gradients(tmp_path):
    script = tmp_path / "fsdp2_worker.py"
    script.write_text(FSDP2_WORKER)
    out = tmp_path / "fsdp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kinds"] == ["DTensor"]
    assert result["worst"] < 1e-5
