"""NSNTrainer with FLOPs budgets and the frozen dense model as the distillation teacher."""

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama
from transformers import TrainingArguments

import nsn_peft
from nsn_peft import NSNConfig, NSNTrainer

TARGETS = ["up_proj", "gate_proj", "down_proj"]


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        self.ids = torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _plans():
    names = [f"model.layers.{i}.mlp.{t}" for i in range(2) for t in TARGETS]
    return {
        0.25: {n: 4 for n in names},
        0.5: {n: 8 + 2 * (i % 2) for i, n in enumerate(names)},
        1.0: {n: 16 for n in names},
    }


def _args(tmp_path, steps=4):
    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )


def test_dense_teacher_logits_equal_the_base_model(tmp_path, input_ids):
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, NSNConfig(target_modules=TARGETS, max_rank=8))
    trainer = NSNTrainer(model, _args(tmp_path), train_dataset=Blocks(), distill_teacher="dense", distill_alpha=0.5)
    model.train()
    teacher = trainer._teacher_logits(model, {"input_ids": input_ids, "labels": input_ids})
    with torch.no_grad():
        torch.testing.assert_close(teacher, reference(input_ids).logits)
        assert not torch.allclose(model(input_ids).logits, teacher, atol=1e-3)
    assert model.training  # the teacher pass leaves the training mode as it was


def test_trainer_trains_the_budgets_with_the_dense_teacher(tmp_path):
    plans = _plans()
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=TARGETS, max_rank=16, budget_plans=plans))
    before = {k: v.detach().clone() for k, v in model.named_parameters() if "nsn_" in k}
    trainer = NSNTrainer(
        model,
        _args(tmp_path),
        train_dataset=Blocks(),
        eval_dataset=Blocks(8),
        budgets=[0.25, 0.5, 1.0],
        distill_teacher="dense",
        distill_alpha=0.5,
    )
    assert trainer.rank_grid == [1, 2, 3] and trainer.rank_sampler.sample(0) == [3, 2, 1]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert {"loss@flops=0.25", "loss@flops=0.5", "loss@flops=1", "distill@flops=1", "logvar@flops=0.5"} <= set(logs[0])
    assert trainer.rank_counts == {1: 4, 2: 4, 3: 4}
    metrics = trainer.evaluate()
    assert {"eval_loss@flops=0.25", "eval_loss@flops=0.5", "eval_loss@flops=1"} <= set(metrics)
    assert metrics["eval_loss@flops=0.25"] > metrics["eval_loss@flops=1"]
    changed = [k for k, v in model.named_parameters() if "nsn_" in k and not torch.equal(v, before[k])]
    assert changed
    # training leaves the model's ranks where they were
    assert nsn_peft.get_rank(model) == nsn_peft.get_max_rank(model)
    state, meta = trainer.multirank_state()
    assert meta["budgets"] == [0.25, 0.5, 1.0] and meta["distill_teacher"] == "dense"


def test_budget_errors(tmp_path):
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=TARGETS, max_rank=16, budget_plans=_plans()))
    with pytest.raises(
        ValueError, match="No budget plan for flops=0.3; this adapter has plans for the FLOPs budgets 0.25, 0.5, 1"
    ):
        NSNTrainer(model, _args(tmp_path), train_dataset=Blocks(), budgets=[0.3])
    with pytest.raises(ValueError, match="eval_ranks does not apply"):
        NSNTrainer(model, _args(tmp_path), train_dataset=Blocks(), budgets=[0.5], eval_ranks=[8])
    with pytest.raises(ValueError, match="distill_teacher must be one of"):
        NSNTrainer(model, _args(tmp_path), train_dataset=Blocks(), distill_teacher="teacher")


def test_recipe_and_trainer_share_the_dense_teacher_and_the_per_point_loss(tmp_path, input_ids):
    """One definition of the dense teacher and of a point's KL serves NSNTrainer and the recipe's end-to-end stage."""
    from nsn_peft.training import dense_teacher_logits, distillation_loss, teacher_distillation_loss

    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, NSNConfig(target_modules=TARGETS, max_rank=8))
    trainer = NSNTrainer(model, _args(tmp_path), train_dataset=Blocks(), distill_teacher="dense", distill_alpha=1.0)
    inputs = {"input_ids": input_ids, "labels": input_ids}
    teacher = dense_teacher_logits(model, inputs)
    torch.testing.assert_close(teacher, trainer._teacher_logits(model, inputs))
    with torch.no_grad():
        torch.testing.assert_close(teacher, reference(input_ids).logits)
        student = model(input_ids).logits
    # Without labels (the recipe) every position counts; with causal-LM labels (the trainer) position i predicts
    # label i+1, so the last position drops and masked labels do not count.
    everywhere = teacher_distillation_loss(student, teacher, temperature=2.0)
    torch.testing.assert_close(everywhere, distillation_loss(student, teacher, temperature=2.0))
    labels = input_ids.clone()
    labels[:, :3] = -100
    shifted = teacher_distillation_loss(student, teacher, temperature=2.0, labels=labels)
    expected = distillation_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:] != -100, temperature=2.0)
    torch.testing.assert_close(shifted, expected)
    torch.testing.assert_close(
        trainer._distillation(student, teacher, {"input_ids": input_ids, "labels": labels}, None), shifted
    )
