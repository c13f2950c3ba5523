"""The public subpackages: each ``__all__`` matches the snapshot below and every name resolves.

An accidental API change (a name added, dropped or renamed) fails here; an intended one updates
the listed set in the same commit. The top-level ``kdistill.__all__`` has its own snapshot
(``test_public_api.py``).
"""

import importlib
import inspect

import pytest

# module -> (its __all__, the optional third-party package it needs, or None)
PUBLIC_MODULES: dict[str, tuple[set[str], str | None]] = {
    "kdistill.balancers": (
        {
            "DistillationLossBalancer",
            "DynamicLossBalancer",
            "STUDENT_LOSS_KEY",
            "ScheduledLossBalancer",
            "StaticLossBalancer",
            "get_balancer",
            "get_balancer_recipe",
            "list_balancers",
            "register_balancer",
            "register_balancer_recipe",
            "sum_losses",
        },
        None,
    ),
    "kdistill.cache": (
        {"CachedTeacher", "TeacherCache", "sample_input_hashes", "teacher_fingerprint"},
        None,
    ),
    "kdistill.distributed": ({"full_state_dict", "save", "unwrap", "wrap_ddp"}, None),
    "kdistill.hf": (
        {
            "IGNORE_INDEX",
            "KDTrainer",
            "OnPolicyKDTrainer",
            "chunked_criterion",
            "default_criterion",
            "default_multi_teacher_criterion",
            "next_token_mask",
        },
        "transformers",
    ),
    "kdistill.lightning": ({"KDModule", "distill"}, "lightning"),
    "kdistill.llm": (
        {
            "compute_causal_lm_loss",
            "convert_causal_lm",
            "export_causal_lm",
            "is_causal_lm_recipe",
            "restore_causal_lm",
        },
        None,
    ),
    "kdistill.losses": (
        {
            "AttentionTransferLoss",
            "CosineLoss",
            "DKDLoss",
            "EnsembleLogitsDistillationLoss",
            "HintLoss",
            "HybridULDLoss",
            "JSDLoss",
            "LMHeadCrossTokenizerLoss",
            "LMHeadDistillationLoss",
            "LogitDivergenceLoss",
            "LogitsDistillationLoss",
            "MFTLoss",
            "MGDLoss",
            "PKTLoss",
            "RKDLoss",
            "ReverseKLLoss",
            "SimilarityPreservingLoss",
            "SkewKLLoss",
            "SkewReverseKLLoss",
            "TVDLoss",
            "TopKLogitsKLLoss",
            "TopKTeacher",
            "ULDLoss",
            "get_loss",
            "get_loss_recipe",
            "list_losses",
            "register_loss",
            "register_loss_recipe",
        },
        None,
    ),
    "kdistill.teachers": (
        {
            "MAX_TEACHERS",
            "MAX_TEACHER_NAME_CHARS",
            "TeacherDict",
            "describe_names",
            "teacher_layer_problem",
            "teacher_name_problem",
        },
        None,
    ),
    "kdistill.testing": (
        {
            "BalancerContract",
            "BalancerRecipe",
            "ContractOptOut",
            "LossContract",
            "LossInputs",
            "LossRecipe",
            "TinyCNN",
            "TinyMLP",
            "balancer_recipe",
            "cross_vocab_logit_inputs",
            "ensemble_logit_inputs",
            "feature_inputs",
            "labelled_logit_inputs",
            "logit_inputs",
            "loss_recipe",
            "register_balancer_recipe",
            "register_loss_recipe",
            "tiny_cnn",
            "tiny_mlp",
        },
        None,
    ),
    "kdistill.onpolicy": (
        {
            "CompletionSource",
            "Completions",
            "OnPolicyDistiller",
            "OnPolicyStep",
            "PromptCollator",
            "SamplingConfig",
            "choose_source",
            "completion_kd_loss",
            "filter_logits",
            "find_lm_head",
            "gkd_completions",
            "pack_tokens",
            "sample_completions",
            "skip_lm_head",
        },
        None,
    ),
    "kdistill.xtoken": (
        {
            "AlignedBatch",
            "SharedVocabulary",
            "TokenAligner",
            "TokenAlignment",
            "align_offsets",
            "byte_tokenizer",
            "match_prefix_ends",
            "prefix_ends",
            "shared_vocabulary",
            "smollm2_tokenizer",
            "token_spellings",
            "train_bpe",
        },
        "transformers",  # its tokenizers are Hugging Face fast tokenizers
    ),
}


def _import(name: str):
    expected, needs = PUBLIC_MODULES[name]
    if needs is not None:
        pytest.importorskip(needs, reason=f"{name} needs the optional package {needs}")
    return importlib.import_module(name), expected


@pytest.mark.parametrize("name", sorted(PUBLIC_MODULES))
def test_all_matches_snapshot(name):
    module, expected = _import(name)
    assert len(module.__all__) == len(set(module.__all__)), f"{name}.__all__ repeats a name"
    assert set(module.__all__) == expected, (
        f"{name}.__all__ changed: added {sorted(set(module.__all__) - expected)}, removed "
        f"{sorted(expected - set(module.__all__))}. If intended, update PUBLIC_MODULES in {__file__}."
    )


@pytest.mark.parametrize("name", sorted(PUBLIC_MODULES))
def test_every_public_name_resolves(name):
    module, _ = _import(name)
    missing = [attr for attr in module.__all__ if not hasattr(module, attr)]
    assert not missing, f"{name}.__all__ names {missing}, which the module does not define"
    undocumented = [
        attr
        for attr in module.__all__
        if (inspect.isclass(obj := getattr(module, attr)) or inspect.isfunction(obj))
        and not (obj.__doc__ or "").strip()
    ]
    assert not undocumented, f"{name}: public callables without a docstring: {undocumented}"


def test_every_public_subpackage_is_listed():
    # a new public subpackage or module must get a snapshot here (private ones start with _)
    import pkgutil

    import kdistill

    public = {
        f"kdistill.{info.name}"
        for info in pkgutil.iter_modules(kdistill.__path__)
        if not info.name.startswith("_")
    }
    unlisted = public - set(PUBLIC_MODULES) - NOT_SNAPSHOTTED
    assert not unlisted, f"public modules without an __all__ snapshot: {sorted(unlisted)}"


# modules whose names are re-exported at the top level (snapshotted by test_public_api.py), the
# command line and the demos: not a library API of their own
NOT_SNAPSHOTTED = {
    "kdistill.checkpoint",
    "kdistill.cli",
    "kdistill.config",
    "kdistill.conversion",
    "kdistill.demo",
    "kdistill.inspect_model",
    "kdistill.model",
    "kdistill.modes",
}
