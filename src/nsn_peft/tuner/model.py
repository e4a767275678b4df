"""``NSNModel``: the PEFT tuner that swaps targeted dense layers for nested factorisations."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..calibrate.stats import ActivationStats
from ..devices import resolve_device
from ..errors import UnknownModulesError
from ..linalg import decompose
from ..linalg.flops import factoring_saves, rank_for_params_fraction
from ..naming import canonical_module_name, lookup_pattern, strip_wrapper_names
from . import ranks as _ranks
from . import runtime as _runtime
from . import targeting
from .config import NSNConfig
from .layer import NSNLayer, NSNLinear, RuntimeOptions
from .loading import check_weights_present
from .peft_type import loading_checkpoint, loading_source
from .targeting import check_supported_module

logger = logging.getLogger(__name__)

_COLLECT_HINT = (
    "collect them first, e.g. `stats = nsn_peft.collect_activation_stats(model, texts, tokenizer=tok); "
    "stats.save('stats/')` (or `nsn-peft calibrate`), then pass stats_path='stats/' or stats=stats"
)


class NSNModel(BaseTuner):
    """Creates NSN layers from a base model; reached through ``get_peft_model(model, NSNConfig(...))``.

    Besides the usual PEFT API it offers ``set_rank``, ``get_rank``, ``at_rank``, ``estimate_flops`` and
    ``select_rank_for_target_flops`` (also reachable on the ``PeftModel``).
    """

    prefix: str = "nsn_"
    tuner_layer_cls = NSNLayer
    target_module_mapping: dict[str, list[str]] = {}
    #: How this model's layers run (kernels, storage layout); see :meth:`set_runtime_options`.
    runtime_options: RuntimeOptions = RuntimeOptions()

    # -- injection -----------------------------------------------------------------------------------
    _selection: Optional[targeting.Selection] = None  # the modules the injection under way adapts

    def _prepare_adapter_config(self, peft_config: NSNConfig, model_config: dict) -> NSNConfig:
        if targeting.is_all_linear(peft_config.target_modules):
            peft_config.target_modules = INCLUDE_LINEAR_LAYERS_SHORTHAND
        return peft_config

    def _check_target_module_exists(self, peft_config: NSNConfig, key: str):
        return targeting.check_target_module_exists(peft_config, key, self._selection)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # NSN factors *replace* the dense weight, so they keep its dtype: upcasting bf16 factors to fp32 (as
        # PEFT does for small LoRA deltas) would double the memory of every adapted layer.
        return

    def _create_and_replace(
        self,
        peft_config: NSNConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        check_supported_module(target, current_key)
        name = canonical_module_name(current_key)
        if isinstance(target, NSNLayer):
            m, d = target.out_features, target.in_features
        else:
            weight = target.weight
            m, d = (weight.shape[1], weight.shape[0]) if isinstance(target, Conv1D) else tuple(weight.shape)
        max_rank = self._layer_max_rank(peft_config, name, m, d)
        # Factors only: nothing is allocated here; each layer's factors appear when they are computed (init)
        # or read (checkpoint), and its dense weight is freed right then, so memory never holds both models.
        device = None if self._keep_base_weights(peft_config) else "meta"
        if isinstance(target, NSNLayer):
            target.set_runtime_options(self.runtime_options)
            if target.base_weight_dropped and not self._loading:
                raise RuntimeError(
                    f"Cannot initialise NSN adapter '{adapter_name}' on '{name}': its dense weight was dropped "
                    "(keep_base_weights=False). Create the first adapter with keep_base_weights=True to add more."
                )
            target.update_layer(adapter_name, max_rank, device=device)
            new_module = target
        else:
            new_module = NSNLinear(
                target, adapter_name, max_rank, module_name=name, device=device, runtime_options=self.runtime_options
            )
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        if device == "meta" and self._loading:
            new_module.drop_base_weight()
        self._pending_init.append((name, new_module))

    @staticmethod
    def _layer_max_rank(config: NSNConfig, name: str, m: int, d: int) -> int:
        """Max rank of one layer: its ``rank_pattern`` entry, else the parameter budget, else ``max_rank``/full."""
        key = lookup_pattern(config.rank_pattern, name) if config.rank_pattern else None
        if key is not None:
            return config.rank_pattern[key]
        if config.params_fraction is not None:
            return rank_for_params_fraction(m, d, config.params_fraction, config.rank_granularity)
        return config.max_rank or min(m, d)

    @staticmethod
    def _keep_base_weights(config: NSNConfig) -> bool:
        return config.keep_base_weights

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        self._pending_init: list[tuple[str, NSNLayer]] = []
        self._layer_index = None
        targeting.check_layers_to_transform(model, self.peft_config[adapter_name])
        # Chosen from the options as given, before PEFT rewrites "all-linear" into names (layer_selection.py).
        selection = self._selection = targeting.Selection(model, self.peft_config[adapter_name])
        config = self.peft_config[adapter_name]
        # A config read from a saved adapter (NSNConfig.from_pretrained) marks it: its weights follow, so the
        # factors are not computed here. The mark is consumed, so the same config adapts another model afresh.
        from_checkpoint = getattr(config, "_from_checkpoint", False)
        config._from_checkpoint = False
        if from_checkpoint and getattr(config, "_checkpoint_folder", None) is not None:
            check_weights_present(config._checkpoint_folder)
        self._loading = from_checkpoint or loading_checkpoint() or low_cpu_mem_usage or state_dict is not None
        if not self._keep_base_weights(self.peft_config[adapter_name]):
            # Factors only: a model that serves; nsn_B rank-major from the start (no re-layout after loading).
            self.runtime_options = dataclasses.replace(self.runtime_options, rank_major=True)
        if not selection.keys:  # before PEFT, which would raise a bare ValueError with less to go on
            available = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
            self._selection = None
            raise UnknownModulesError(
                f"NSN target_modules={self.peft_config[adapter_name].target_modules!r} (with exclude_modules and "
                f"layers_to_transform) match no module of {type(model).__name__}. Linear/Conv1D modules available "
                f"({len(available)}): {available[:12]}{' …' if len(available) > 12 else ''}"
            )
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            self._selection = None
        pending, self._pending_init = self._pending_init, []
        config.keep_base_weights = self._keep_base_weights(config)
        if not self._loading:
            self._initialize_factors(config, adapter_name, pending)
        targeting.record_adapted_modules(model, config, adapter_name, selection)
        self._layer_index = None
        if config.active_rank is not None:
            _ranks.set_rank(self, config.active_rank, adapter_name=adapter_name)

    def initialize_factors(
        self, names: list[str], adapter_name: Optional[str] = None, show_progress: bool = False
    ) -> None:
        """Compute the factors of the named layers now, with the adapter config's ``init`` (and ``stats``).

        For factors created without values (an adapter injected under a checkpoint-loading scope, as the
        sequential pipeline does to initialise a model block by block): each layer's dense weight must be at
        hand, and ``stats`` need only cover these layers.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        index = {
            canonical_module_name(n): m
            for n, m in self.model.named_modules()
            if isinstance(m, NSNLayer) and adapter_name in m.nsn_A
        }
        unknown = [n for n in names if n not in index]
        if unknown:
            raise KeyError(f"No NSN layer of adapter '{adapter_name}' is named {unknown[:3]}")
        self._initialize_factors(
            self.peft_config[adapter_name], adapter_name, [(n, index[n]) for n in names], show_progress
        )

    @torch.no_grad()
    def _initialize_factors(
        self, config: NSNConfig, adapter_name: str, pending: list[tuple[str, NSNLayer]], show_progress: bool = True
    ) -> None:
        stats = None
        if config.needs_stats:
            stats = config.stats
            if stats is None and config.stats_path is None:
                raise ValueError(f"NSNConfig(init={config.init!r}) needs activation statistics: {_COLLECT_HINT}.")
            if stats is None:
                stats = ActivationStats.load(config.stats_path, layers=[n for n, _ in pending])
            source = config.stats_path or "the ActivationStats object"
            stats.check_compatible({n: layer.in_features for n, layer in pending}, source=str(source))
        kept_dense: list[str] = []
        result = None
        for name, layer in tqdm(
            pending, desc=f"NSN init ({config.init})", unit="layer", disable=not pending or not show_progress
        ):
            weight = layer.dense_weight().detach()
            device = torch.device(resolve_device(config.init_device)) if config.init_device else weight.device
            weight = weight.to(device)
            decompose.check_finite(weight, name)
            limit = layer.nsn_max_rank[adapter_name]
            try:
                if config.init == "svd":
                    b, a = decompose.svd_factors(weight, limit)
                elif config.init == "whitened":
                    b, a = decompose.whitened_factors(weight, stats.gram(name), limit, damp=config.whitening_damp)
                else:
                    key = lookup_pattern(config.energy_pattern, name) if config.energy_pattern else None
                    e_in, e_out = (
                        config.energy_pattern[key] if key is not None else (config.energy_input, config.energy_output)
                    )
                    result = decompose.projected_factors(weight, stats.gram(name), e_in, e_out, rank=limit)
                    b, a = result.b, result.a
            except (ValueError, RuntimeError) as err:  # torch.linalg.LinAlgError is a RuntimeError
                origin = (
                    f" with statistics from {config.stats_path}" if config.needs_stats and config.stats_path else ""
                )
                raise ValueError(f"NSN init={config.init!r} failed for layer '{name}'{origin}: {err}") from err
            if config.init == "projected":
                if config.keep_dense_if_no_savings and not factoring_saves(
                    layer.out_features, layer.in_features, b.shape[1]
                ):
                    kept_dense.append(name)
                    continue
                if b.shape[1] != limit or name in config.rank_pattern:
                    # Mixed ranks: record the layer's own rank so save/load recreate the same shapes.
                    config.rank_pattern[name] = int(b.shape[1])
            layer.set_factors(adapter_name, b, a)
            if not config.keep_base_weights:
                weight = b = a = result = None  # the last references to this layer's dense weight and temporaries
                layer.drop_base_weight()
        if kept_dense:
            self._keep_dense(config, adapter_name, kept_dense)

    def _keep_dense(self, config: NSNConfig, adapter_name: str, names: list[str]) -> None:
        logger.warning(
            "Kept %d layer(s) dense because their utilized rank r gives r(m+d) >= m*d (no savings): %s",
            len(names),
            names if len(names) <= 8 else names[:8] + ["…"],
        )
        for name in names:
            parent, target, target_name = self._get_submodule_triplet(name)
            if len(target.nsn_A) > 1:
                target.delete_adapter(adapter_name)
            else:
                setattr(parent, target_name, target.get_base_layer())
            config.rank_pattern.pop(name, None)
        exclude = config.exclude_modules
        anchored = "|".join(re.escape(n) for n in names)
        if exclude is None:
            config.exclude_modules = set(names)
        elif isinstance(exclude, str):
            config.exclude_modules = f"(?:{exclude})|(?:.*\\.)?(?:{anchored})"
        else:
            config.exclude_modules = set(exclude) | set(names)
        self.targeted_module_names = [
            n for n in self.targeted_module_names if canonical_module_name(n) not in set(names)
        ]
        config.kept_dense = sorted(set(getattr(config, "kept_dense", [])) | set(names))

    def _get_submodule_triplet(self, name: str):
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        return parent, getattr(parent, child), child

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _nsn_layer_index(self) -> dict[str, NSNLayer]:
        index = getattr(self, "_layer_index", None)
        if index is None:
            index = {
                canonical_module_name(n): m
                for n, m in self.model.named_modules()
                if isinstance(m, NSNLayer) and any(a in m.nsn_A for a in self.active_adapters)
            }
            self._layer_index = index
        return index

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        if isinstance(adapter_name, (list, tuple)) and len(adapter_name) > 1:
            raise ValueError(
                f"NSN supports one active adapter at a time (factors replace the weight), got {adapter_name}"
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._layer_index = None

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._layer_index = None

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        # PeftModel drops `adapter_names` before calling the model: without this the batch would silently run the
        # active adapter for every row.
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "NSN does not support mixed-adapter batches (adapter_names=...): its factors replace the dense weight, "
                "so one forward pass runs one adapter; call set_adapter() per batch instead."
            )
        yield

    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> None:
        """Every layer accepts the merge before any changes (merging one adapter over another raises)."""
        for module in self.model.modules():
            if isinstance(module, NSNLayer):
                module.adapter_to_merge(adapter_names)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ):
        if merge:
            self._check_mergeable(adapter_names)
        self._layer_index = None
        self._prepare_dropped_weights_for_unload(merge, adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _prepare_dropped_weights_for_unload(self, merge: bool, adapter_names: Optional[list[str]]) -> None:
        """Factors only: check every layer first (all or nothing), then rebuild the weights ``unload`` returns.

        ``merge_and_unload`` merges each layer at its current rank (``merge`` builds the weight); ``unload``
        rebuilds ``B @ A`` at the max rank, which is the dense weight only for full-rank factors.
        """
        dropped = [
            m for m in self.model.modules() if isinstance(m, NSNLayer) and m.base_weight_dropped and not m.merged
        ]
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for layer in dropped:
            adapter = next((n for n in names if n in layer.nsn_A), None)
            if merge:
                if adapter is None:
                    raise RuntimeError(
                        f"Cannot merge '{layer.module_name}': its dense weight was dropped (keep_base_weights=False) "
                        f"and none of the adapters {names} has factors there."
                    )
            else:
                layer.check_base_weight_recoverable(adapter)
        if not merge:
            for layer in dropped:
                layer.rebuild_base_weight(next(n for n in names if n in layer.nsn_A))

    # -- checkpoint saving / loading -------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection of the adapter's entries, which matches keys against module names (and, since PEFT calls
        this when it saves, the moment to record the current ranks in ``config.active_rank``). Wrappers around
        decoder layers (FSDP/Accelerate activation checkpointing, torch.compile) put a piece into every module
        name that a gathered state dict (plain names) lacks; the factors are then picked by their names."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # Saving: the config records the ranks the layers run at now (derived here, never kept in step by hand).
        config.active_rank = _ranks.active_rank_for_save(model, adapter_name)
        if selected or all(strip_wrapper_names(name) == name for name, _ in model.named_modules()):
            return selected
        return {k: v for k, v in state_dict.items() if re.search(r"\.nsn_[AB]\.[^.]+$", k)}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        source = loading_source() or getattr(config, "_checkpoint_source", None)
        origin = f" ({source})" if source else ""
        expected = {
            k: tuple(v.shape)
            for k, v in model.state_dict().items()
            if (".nsn_A." in k or ".nsn_B." in k) and k.endswith(f".{adapter_name}")
        }
        for key, shape in expected.items():
            module = canonical_module_name(key.rsplit(".nsn_", 1)[0])
            factor = "nsn_A" if ".nsn_A." in key else "nsn_B"
            if key not in remapped:
                raise ValueError(
                    f"NSN checkpoint{origin} has no {factor} for module '{module}' of this base model; was it saved from another model?"
                )
            found = tuple(remapped[key].shape)
            if found != shape:
                raise ValueError(
                    f"NSN checkpoint{origin} does not match the base model: module '{module}' {factor} has shape {found} in "
                    f"the checkpoint but {shape} in the model (first mismatch)."
                )
            tensor = remapped[key]
            if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
                bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                raise ValueError(f"NSN checkpoint{origin}: the {factor} factor of module '{module}' holds {bad} values")
        unexpected = [k for k in remapped if (".nsn_A" in k or ".nsn_B" in k) and k not in expected]
        if unexpected:
            module = canonical_module_name(unexpected[0].rsplit(".nsn_", 1)[0])
            raise ValueError(
                f"NSN checkpoint{origin} holds factors for module '{module}', which this base model lacks or does not target."
            )
        return remapped

    # -- rank API -------------------------------------------------------------------------------------
    def set_rank(
        self, rank: Optional[_ranks.RankLike] = None, *, fraction: Optional[float] = None, flops: Optional[float] = None
    ) -> None:
        _ranks.set_rank(self, rank, fraction=fraction, flops=flops)

    def get_rank(self) -> dict[str, int]:
        return _ranks.get_rank(self)

    def get_max_rank(self) -> dict[str, int]:
        return _ranks.get_max_rank(self)

    def at_rank(
        self, rank: Optional[_ranks.RankLike] = None, *, fraction: Optional[float] = None, flops: Optional[float] = None
    ):
        return _ranks.at_rank(self, rank, fraction=fraction, flops=flops)

    def budget_plans(self) -> dict[float, dict[str, int]]:
        return _ranks.budget_plans(self)

    def estimate_flops(self, rank: Optional[_ranks.RankLike] = None, tokens: int = 1) -> _ranks.FlopsReport:
        return _ranks.estimate_flops(self, rank, tokens)

    def set_runtime_options(
        self,
        options: Optional[RuntimeOptions] = None,
        *,
        kernels: Optional[bool] = None,
        rank_major: Optional[bool] = None,
    ) -> RuntimeOptions:
        """Run this model's NSN layers with ``options`` (or the current ones changed where a keyword is given):
        ``kernels`` (the Triton decode path), ``rank_major`` (``nsn_B`` storage). Per model, never process-wide."""
        self.runtime_options = _runtime._resolved(self.runtime_options, options, kernels, rank_major)
        _runtime.apply_runtime_options(self.model, self.runtime_options)
        return self.runtime_options

    def select_rank_for_target_flops(self, target_fraction: float, **kwargs: Any):
        return _ranks.select_rank_for_target_flops(self, target_fraction, **kwargs)

    def selectable_ranks(self) -> list[int]:
        return _ranks.selectable_ranks(self)
