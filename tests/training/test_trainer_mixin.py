"""NSNTrainerMixin in front of a Trainer people derive from: TRL's SFTTrainer (completion-only loss, its own
dataset preparation and evaluation), trained at several ranks per step."""

import math

import pytest
import torch
from peft import PeftModel
from tiny_models import char_tokenizer, tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, NSNTrainerMixin
from nsn_peft.training import MULTIRANK_STATE_JSON, FixedRankSampler, SandwichRankSampler

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TARGETS = ["up_proj", "gate_proj", "down_proj"]
GRID = [8, 16, 24, 32]


class NSNSFTTrainer(NSNTrainerMixin, trl.SFTTrainer):
    pass


def _data(n=8):
    return datasets.Dataset.from_dict(
        {"prompt": ["Q: where is the fox? A:"] * n, "completion": [" over the lazy dog."] * n}
    )


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_length=48,
    )
    kwargs.update(overrides)
    return trl.SFTConfig(**kwargs)


def _trainer(tmp_path, **options):
    args = _args(tmp_path, **options.pop("args", {}))
    return NSNSFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=_data(),
        eval_dataset=_data(4),
        processing_class=char_tokenizer(),
        peft_config=NSNConfig(target_modules=TARGETS, rank_granularity=8),
        **options,
    )


def test_sft_trainer_trains_every_rank_and_evaluates_each(tmp_path):
    trainer = _trainer(tmp_path, rank_sampler=SandwichRankSampler(1))
    assert isinstance(trainer.model, PeftModel)  # SFTTrainer wrapped the model in the NSN adapter (peft_config)
    assert trainer.rank_grid == GRID and trainer.args.gradient_checkpointing  # TRL's default: checkpointing on
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for rank in (8, 32):  # sandwich: the smallest and the top rank at every step
        series = [h[f"loss@r={rank}"] for h in logs]
        assert series[-1] < series[0] - 0.1, (rank, series)
    assert "mean_token_accuracy" in logs[-1]  # SFTTrainer's own metrics still come through
    assert trainer.rank_counts[8] == trainer.rank_counts[32] == 8
    metrics = trainer.evaluate()
    assert {f"eval_loss@r={r}" for r in GRID} <= set(metrics)
    assert metrics["eval_loss"] == pytest.approx(sum(metrics[f"eval_loss@r={r}"] for r in GRID) / 4)
    # a dataset handed to evaluate is prepared by SFTTrainer (tokenized, completion mask) before each rank runs
    named = trainer.evaluate(eval_dataset={"held": _data(4)}, eval_ranks=[16])
    assert named["eval_held_loss@r=16"] == pytest.approx(metrics["eval_loss@r=16"], rel=1e-5)


def test_each_rank_trains_on_sft_loss_of_the_completion(tmp_path):
    """The log-variance gradient is 1 - e^{-s} L_r with L_r SFTTrainer's completion-only loss at rank r."""
    trainer = _trainer(tmp_path, rank_sampler=FixedRankSampler([8, 32]), init_logvar=0.3)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # the prompt is masked
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch)
    expected = torch.zeros(4)
    model.eval()
    with torch.no_grad():
        for r in (8, 32):
            with nsn_peft.at_rank(model, r):
                loss = trl.SFTTrainer.compute_loss(trainer, model, dict(batch))
            expected[GRID.index(r)] = 1 - math.exp(-0.3) * loss.item()
    torch.testing.assert_close(trainer.rank_loss.log_vars.grad, expected, atol=1e-5, rtol=1e-5)
    trained = [p.grad for n, p in model.named_parameters() if "nsn_" in n]
    assert trained and all(g is not None and torch.isfinite(g).all() for g in trained)


def test_checkpoints_carry_the_multirank_state(tmp_path):
    trainer = _trainer(tmp_path, args={"max_steps": 2, "save_strategy": "steps", "save_steps": 2})
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / MULTIRANK_STATE_JSON).is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    resumed = _trainer(tmp_path, args={"max_steps": 2})
    resumed.load_multirank_state(checkpoint)
    torch.testing.assert_close(resumed.rank_loss.log_vars, trainer.rank_loss.log_vars)


def test_distillation_needs_logits_with_gradients(tmp_path):
    """TRL computes its loss through a fused LM head: distillation says so instead of training on no gradient."""
    trainer = _trainer(tmp_path, distill_alpha=0.5, rank_sampler=FixedRankSampler([8, 32]))
    with pytest.raises(ValueError, match="SFTTrainer.compute_loss returns logits without gradients"):
        trainer.train()
