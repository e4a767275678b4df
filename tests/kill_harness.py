"""A save server for the kill -9 tests: imports once, then forks one child per save and SIGKILLs it on cue.

Run as ``python kill_harness.py`` (single-threaded torch, so forking after the imports is safe). Commands
arrive as JSON lines on stdin and each gets one JSON line on stdout:

- ``{"cmd": "save", "kind": K, "version": 1|2, "dest": DIR, "delay": SECONDS|null}``: a child process saves
  version ``version`` of artifact ``K`` (``adapter``, ``stats`` or ``compressed``) to ``DIR``; the server
  SIGKILLs it ``delay`` seconds after the fork unless it finished first (``null``: never). Reply:
  ``{"killed": bool, "exit": code, "seconds": elapsed}``.
- ``{"cmd": "quit"}``.

The server itself is the parent of every child, so a child's process id cannot be reused before the kill.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import torch
from torch import nn

WIDTH = 384  # adapter: 6 layers of 384×384 factors at full rank ≈ 7 MB per version


class MLP(nn.Module):
    def __init__(self, seed: int = 0, layers: int = 6, width: int = WIDTH) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def adapter_versions():
    """Two NSN adapters on the same base: different factors and different saved ranks."""
    from peft import get_peft_model

    import nsn_peft

    models = {}
    for version in (1, 2):
        model = get_peft_model(
            MLP(seed=0),
            nsn_peft.NSNConfig(
                target_modules=["layers.0", "layers.1", "layers.2", "layers.3", "layers.4", "layers.5"],
                rank_granularity=32,
            ),
        )
        if version == 2:
            with torch.no_grad():
                for layer in nsn_peft.tuner.nsn_layers(model).values():
                    layer.nsn_B["default"].mul_(1.5)
            model.set_rank(fraction=0.5)
        models[version] = model
    return models


def stats_versions():
    from nsn_peft import ActivationStats

    out = {}
    for version in (1, 2):
        g = torch.Generator().manual_seed(version)
        grams = {f"layers.{i}": torch.randn(640, 640, generator=g, dtype=torch.float64) for i in range(3)}
        out[version] = ActivationStats(grams, {n: 1000 * version for n in grams}, model_id=f"v{version}")
    return out


def compressed_versions():
    import transformers
    from peft import get_peft_model

    import nsn_peft

    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2000,
        max_position_embeddings=64,
    )
    out = {}
    for version in (1, 2):
        torch.manual_seed(0)
        model = get_peft_model(
            transformers.LlamaForCausalLM(config).eval(),
            nsn_peft.NSNConfig(target_modules=["gate_proj", "up_proj", "down_proj"], rank_granularity=32),
        )
        model.set_rank(128 if version == 1 else 64)
        out[version] = model
    return out


def save(kind: str, artifact, dest: str) -> None:
    if kind == "adapter":
        artifact.save_pretrained(dest)
    elif kind == "stats":
        artifact.save(dest)
    else:
        import nsn_peft

        nsn_peft.save_compressed(artifact, dest)


def main() -> None:
    torch.set_num_threads(1)
    builders = {"adapter": adapter_versions, "stats": stats_versions, "compressed": compressed_versions}
    artifacts: dict[str, dict] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        kind = request["kind"]
        if kind not in artifacts:
            artifacts[kind] = builders[kind]()
        artifact = artifacts[kind][request["version"]]
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: save, then leave without running the parent's cleanup
            code = 0
            try:
                save(kind, artifact, request["dest"])
            except BaseException:  # noqa: BLE001 - reported through the exit code
                traceback.print_exc()
                code = 1
            os._exit(code)
        delay = request.get("delay")
        killed, status = False, None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if delay is not None and time.monotonic() - start >= delay:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                killed = os.WIFSIGNALED(status)
                break
            time.sleep(0.0002)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"killed": killed, "exit": code, "seconds": time.monotonic() - start}), flush=True)


if __name__ == "__main__":
    main()
