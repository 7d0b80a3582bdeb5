"""Loading the models plugins start from, the same way everywhere: a full model, or an earlier run's LoRA
adapter on its base (kept trainable, or merged in when the method needs a plain model), with a tokenizer that
has a chat template and a padding token."""

from __future__ import annotations

import warnings

from lab.dependencies import IMPORTS, internal
from lab.errors import LabError
from lab.registry import CHATML_TEMPLATE


def trl():
    """The `trl` module with the names the previews and checks use resolved, under the import lock (see IMPORTS)."""
    with IMPORTS:
        import trl as module
        import trl.data_utils  # noqa: F401

        with warnings.catch_warnings(), internal("trl-orpo"):  # the lab knows ORPO is in TRL's experimental package
            warnings.simplefilter("ignore")
            import trl.experimental.orpo  # noqa: F401
        import trl.trainer.dpo_trainer  # noqa: F401  (DataCollatorForPreference)

        for name in ("SFTConfig", "SFTTrainer", "DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "RewardConfig",
                     "RewardTrainer"):
            getattr(module, name)
    return module


def not_causal(model: dict | None) -> list[str]:
    """The problem with starting a generating method (sft, dpo, grpo, ppo) from `model`, if any."""
    if model is not None and model["architecture"].endswith("ForMaskedLM"):
        return [f"{model['name']} is a masked LM ({model['architecture']}): it cannot generate text; "
                "start from a causal LM"]
    return []


def writer_problems(settings, name: str, field: str) -> list[str]:
    """Why the model named in parameter `field` cannot write answers (unknown, a scoring head, a masked LM)."""
    from lab import registry

    try:
        info = registry.info(settings, name)
    except LabError:
        return [f"`{field}`: no model named {name!r}"]
    if info["kind"] not in ("full", "adapter"):
        return [f"`{field}`: {name} is a {info['kind']} model: it scores text, it does not write any"]
    return [f"`{field}`: {p}" for p in not_causal(info)]


def tokenizer(path: str, log=print, padding_side: str | None = None):
    with IMPORTS:
        from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        log("[lab] the model has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)")
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side:
        tok.padding_side = padding_side
    return tok


def causal_lm(info: dict, *, adapter: str = "merge", log=print):
    """The model behind registry `info`. For an adapter: "trainable" keeps it a trainable PeftModel on its base,
    "merge" folds it into the base weights (a plain model, e.g. a reference policy or a fresh LoRA's base)."""
    import torch

    with IMPORTS:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    if info["kind"] in ("reward", "classifier"):
        raise LabError(f"model {info['name']} is a {info['kind']} (a scoring head), not a language model")
    if info["kind"] != "adapter":
        return AutoModelForCausalLM.from_pretrained(info["path"], dtype=torch.float32)

    if not info.get("base_path"):
        raise LabError(f"adapter {info['name']} has no registered base model to load it on")
    base = AutoModelForCausalLM.from_pretrained(info["base_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, info["path"], is_trainable=adapter == "trainable")
    log(f"[lab] starting from adapter {info['name']} on {info['base_model']}"
        + ("" if adapter == "trainable" else ", merged into its weights"))
    return model if adapter == "trainable" else model.merge_and_unload()


def sequence_classifier(path: str, num_labels: int, pad_token_id: int | None, labels: list[str] | None = None):
    """A sequence-classification model from any HF folder: a causal LM gets a fresh scoring head."""
    import torch

    with IMPORTS:
        from transformers import AutoModelForSequenceClassification
    kwargs = {"num_labels": num_labels}
    if labels:
        kwargs["id2label"] = dict(enumerate(labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(labels)}
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def merged_folder(info: dict, dest, log=print) -> str:
    """A plain HF folder for registry `info`: its own path, or (for an adapter) the merge written to `dest`."""
    if info["kind"] != "adapter":
        return info["path"]
    model = causal_lm(info, adapter="merge", log=log)
    model.save_pretrained(dest)
    tokenizer(info["path"], log=log).save_pretrained(dest)
    return str(dest)


def lora_targets(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]
