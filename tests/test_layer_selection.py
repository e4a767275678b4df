"""One layer matcher: calibration, planning, the CLI and the tuner select the same layers for the same options."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
from tiny_models import tiny_gpt2, tiny_llama

import nsn_peft
from nsn_peft.calibrate.collect import calibration_targets
from nsn_peft.cli.inputs import check_target_modules
from nsn_peft.cli.options import UsageError
from nsn_peft.layer_selection import EXCLUDED, SELECTED, UNMATCHED, LayerSelection, select_layers, unmatched_targets
from nsn_peft.naming import canonical_module_name
from nsn_peft.planning.targets import layer_shapes

LLAMA_OPTIONS = [
    {},
    {"exclude_modules": ["down_proj"]},
    {"layers_to_transform": [1]},
    {"layers_to_transform": 0, "exclude_modules": ["q_proj", "model.layers.0.mlp.up_proj"]},
    {
        "target_modules": ["up_proj", "o_proj"],
        "layers_to_transform": [1],
        "exclude_modules": r".*\.1\.self_attn\.o_proj",
    },
    {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]},
    {"target_modules": r".*\.(q|v)_proj", "exclude_modules": ["model.layers.1.self_attn.v_proj"]},
    {"layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": "all-linear", "exclude_modules": ["gate_proj"], "layers_to_transform": [0, 1]},
]
GPT2_OPTIONS = [
    {},
    {"exclude_modules": ["c_proj"]},
    {"layers_to_transform": [1]},
    {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [0], "exclude_modules": ["h.0.attn.c_attn"]},
]


def _adapted(base, options):
    model = get_peft_model(base, nsn_peft.NSNConfig(max_rank=4, **options))
    return set(nsn_peft.get_rank(model))


@pytest.mark.parametrize(
    ("factory", "options"), [(tiny_llama, o) for o in LLAMA_OPTIONS] + [(tiny_gpt2, o) for o in GPT2_OPTIONS]
)
def test_calibration_planning_and_adaptation_select_the_same_layers(factory, options):
    base = factory()
    calibrated = set(calibration_targets(base, **options))
    planned = set(layer_shapes(base, LayerSelection(**options)))
    adapted = _adapted(factory(), options)
    assert calibrated == planned == adapted
    assert calibrated  # every case selects something
    if options:
        assert calibrated != set(calibration_targets(base))  # and the options mattered


def test_collected_statistics_cover_the_adapted_layers(tmp_path):
    options = {"exclude_modules": ["down_proj"], "layers_to_transform": [1]}
    stats = nsn_peft.collect_activation_stats(
        tiny_llama(), torch.randint(0, 101, (2, 16)), show_progress=False, **options
    )
    gradients = nsn_peft.collect_gradient_stats(
        tiny_llama(), torch.randint(0, 101, (2, 16)), show_progress=False, **options
    )
    adapted = get_peft_model(tiny_llama(), nsn_peft.NSNConfig(init="whitened", stats=stats, **options))
    assert set(stats.layer_names) == set(gradients.layer_names) == set(nsn_peft.get_rank(adapted))
    assert all(".1." in n and "down_proj" not in n for n in stats.layer_names)


def test_the_names_follow_peft_rules():
    """Lists and regexes match as PEFT's own matcher does (a saved config selects what it selected before)."""
    names = [n for n, _ in tiny_llama().named_modules() if n]
    configs = [
        {"target_modules": ["q_proj", "mlp.up_proj"]},
        {"target_modules": r"model\.layers\.\d\.self_attn\.(k|v)_proj"},
        {"target_modules": ["q_proj", "up_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
        {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.1\..*"},
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["layers"]},
        {"target_modules": ["model.layers.0.mlp.down_proj", "up_proj"], "layers_to_transform": [1]},
        {"target_modules": ["lm_head"], "modules_to_save": ["lm_head"]},
    ]
    for options in configs:
        peft_config = LoraConfig(**options)
        selection = LayerSelection.of(peft_config)
        for name in names:
            theirs = check_target_module_exists(peft_config, name)
            expected = EXCLUDED if isinstance(theirs, _ExcludedModule) else SELECTED if theirs else UNMATCHED
            assert selection.match(name) == expected, (options, name)


def test_the_default_target_leaves_the_head_out_and_honours_the_block_filter():
    model = tiny_llama()
    default = select_layers(model)
    assert "lm_head" not in default and len(default) == 14
    assert set(select_layers(model, LayerSelection(layers_to_transform=[0]))) == {n for n in default if ".0." in n}
    assert list(select_layers(model, r"lm_head")) == ["lm_head"]
    with pytest.raises(TypeError, match=r"selects 'model.layers.0.mlp' \(LlamaMLP\), which NSN cannot adapt"):
        calibration_targets(model, r".*\.mlp")
    with pytest.raises(ValueError, match="No linear layer of LlamaForCausalLM matches.*layers_to_transform=\\(1,\\)"):
        calibration_targets(model, ["q_proj"], exclude_modules=["q_proj"], layers_to_transform=[1])


def test_the_cli_checks_names_with_the_same_matcher():
    model = tiny_llama()
    assert unmatched_targets(model, ["q_proj", "mlp.up_proj", "model.layers.1.mlp.down_proj", "nope", "layers.0"]) == [
        "nope",
        "layers.0",
    ]
    check_target_modules(model, ["q_proj", "self_attn.o_proj"])
    with pytest.raises(UsageError, match="--exclude-modules: nope match"):
        check_target_modules(model, ["nope"], "--exclude-modules")


def test_adapted_model_calibrates_its_own_layers():
    """On an adapted model (NSN layers wrap the base layers) the names are the plain base-model names."""
    options = {"target_modules": ["up_proj", "q_proj"], "layers_to_transform": [0]}
    model = get_peft_model(tiny_llama(), nsn_peft.NSNConfig(**options))
    assert set(calibration_targets(model, **options)) == set(nsn_peft.get_rank(model))
    second = {"target_modules": ["up_proj"], "layers_to_transform": [0]}
    model.add_adapter("second", nsn_peft.NSNConfig(max_rank=4, **second))
    layers = [n for n, m in model.named_modules() if isinstance(m, nsn_peft.NSNLinear) and "second" in m.nsn_A]
    assert [canonical_module_name(n) for n in layers] == ["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("options", LLAMA_OPTIONS[1:4])
def test_a_saved_adapter_reloads_the_same_layers(options, tmp_path):
    model = get_peft_model(tiny_llama(), nsn_peft.NSNConfig(max_rank=4, **options))
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert set(nsn_peft.get_rank(loaded)) == set(nsn_peft.get_rank(model))


def test_a_block_filter_on_a_regex_warns_that_it_does_not_apply():
    with pytest.warns(UserWarning, match="does not narrow a regex target_modules"):
        config = nsn_peft.NSNConfig(target_modules=r".*\.q_proj", layers_to_transform=[0])
    assert set(calibration_targets(tiny_llama(), LayerSelection.of(config))) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    }
