"""Publish an NSN adapter on the Hugging Face Hub, with a model card listing its ranks and FLOPs.

The adapter comes from a saved folder (``--adapter``) or is created from a base model (``--model``, default: the
embedded SmolLM2-135M-Instruct, SVD init). The script stages exactly what will be uploaded — ``save_pretrained``
output (``adapter_config.json``, ``adapter_model.safetensors``) plus a ``README.md`` model card — and then
uploads that folder. ``--dry-run`` stops after staging into ``--output``, so you can inspect the exact files.

We upload the staged folder with ``HfApi.upload_folder`` instead of ``PeftModel.push_to_hub`` because the
latter rewrites ``README.md`` from the repository's existing card, which would drop the NSN section and make
the dry run differ from the upload.

    # inspect the folder that would be uploaded (offline)
    python examples/push_to_hub.py --repo-id me/smollm2-nsn --max-rank 256 --dry-run --output ./to-upload
    # upload an adapter made by `nsn-peft adapt` (needs `hf auth login`)
    python examples/push_to_hub.py --repo-id me/smollm2-nsn --adapter ./nsn-adapter \\
        --base-model-id HuggingFaceTB/SmolLM2-135M-Instruct --private
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("push_to_hub")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo-id", required=True, help="Hub repository, e.g. me/smollm2-nsn")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", default=None, help="existing NSN adapter folder to publish")
    src.add_argument(
        "--model", default=None, help="base model to adapt (id, folder or .gguf; default: embedded SmolLM2)"
    )
    p.add_argument("--max-rank", type=int, default=None, help="max rank when adapting --model (default: full)")
    p.add_argument("--target-modules", default=None, help="comma-separated module names when adapting --model")
    p.add_argument("--granularity", type=int, default=64, help="rank grid step when adapting --model")
    p.add_argument(
        "--base-model-id",
        default=None,
        help="Hub id of the base model recorded in adapter_config.json and the card (needed for a local/GGUF base)",
    )
    p.add_argument("--dry-run", action="store_true", help="only write the folder that would be uploaded to --output")
    p.add_argument(
        "--output", default=None, help="staging folder (required with --dry-run; default: a temporary folder)"
    )
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit-message", default="Upload NSN adapter")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.dry_run and not args.output:
        p.error("--dry-run needs --output (the folder to write)")
    if args.max_rank is not None and args.max_rank < 1:
        p.error("--max-rank must be >= 1")
    return args


def load_or_adapt(args: argparse.Namespace) -> tuple[Any, str]:
    """The NSN ``PeftModel`` to publish and the base-model reference it records."""
    from peft import PeftModel, get_peft_model

    import nsn_peft
    from nsn_peft.hub import DEFAULT_MODEL, load_model_and_tokenizer

    if args.adapter:
        config = json.loads((Path(args.adapter) / "adapter_config.json").read_text(encoding="utf-8"))
        base_ref = config.get("base_model_name_or_path") or DEFAULT_MODEL
        base, _ = load_model_and_tokenizer(base_ref, device=args.device)
        model = PeftModel.from_pretrained(base, args.adapter)
    else:
        base_ref = args.model or DEFAULT_MODEL
        base, _ = load_model_and_tokenizer(args.model, device=args.device)
        targets = args.target_modules.split(",") if args.target_modules else None
        config = nsn_peft.NSNConfig(
            max_rank=args.max_rank, target_modules=targets, rank_granularity=args.granularity, task_type="CAUSAL_LM"
        )
        model = get_peft_model(base, config)
    if args.base_model_id:
        base_ref = args.base_model_id
    model.peft_config[model.active_adapter].base_model_name_or_path = base_ref
    return model.eval(), base_ref


def model_card(model: Any, repo_id: str, base_ref: str, peft_readme: str) -> str:
    """The README: PEFT's card metadata (front matter) + a short description + the NSN ranks/FLOPs section."""
    from huggingface_hub import ModelCard

    from nsn_peft.tuner.model_card import nsn_summary_markdown

    data = ModelCard(peft_readme).data
    tags = [t for t in (data.get("tags") or []) if not str(t).startswith("base_model:")]
    data.tags = list(dict.fromkeys([f"base_model:adapter:{base_ref}", *tags, "peft", "nsn", "low-rank"]))
    data.base_model = base_ref
    data.library_name = "peft"
    config = model.peft_config[model.active_adapter]
    usage = f"""
# {repo_id.split("/")[-1]}

Nested Subspace Network (NSN) adapter for `{base_ref}`: the targeted linear layers are replaced by nested
factorisations `W ≈ B A` (init `{config.init}`), so one set of weights runs at **any rank** up to the max rank,
trading quality for FLOPs at inference time without retraining.

## Usage

```python
import nsn_peft  # registers the NSN method with PEFT
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_ref}")
model = PeftModel.from_pretrained(base, "{repo_id}")
model.set_rank(model.select_rank_for_target_flops(0.5, scope="model"))  # half the matmul FLOPs
```

From a shell: `nsn-peft infer --adapter <local copy> --target-flops 0.5 --prompt "..."`.
"""
    return f"---\n{data.to_yaml()}\n---\n{usage}\n{nsn_summary_markdown(model)}"


def stage(model: Any, folder: Path, repo_id: str, base_ref: str) -> list[str]:
    """Write the exact upload: ``save_pretrained`` files + the model card, atomically."""
    from nsn_peft.io import atomic_directory, write_text

    with atomic_directory(folder) as tmp:
        model.save_pretrained(str(tmp))
        readme = tmp / "README.md"
        write_text(
            readme, model_card(model, repo_id, base_ref, readme.read_text(encoding="utf-8") if readme.exists() else "")
        )
    return sorted(p.name for p in folder.iterdir())


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model, base_ref = load_or_adapt(args)
    if args.dry_run:
        files = stage(model, Path(args.output), args.repo_id, base_ref)
        print(f"Dry run: {args.output} holds the files that would be uploaded to {args.repo_id}: {', '.join(files)}")
        return 0
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.output) if args.output else Path(tmp) / "upload"
        files = stage(model, folder, args.repo_id, base_ref)
        api = HfApi()
        repo = api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), commit_message=args.commit_message)
    print(f"Uploaded {', '.join(files)} to https://huggingface.co/{repo.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
