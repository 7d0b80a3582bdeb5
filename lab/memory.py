"""What a training run needs in memory at its worst step, by part, before it starts: the process itself, the
weights, the gradients and optimizer state, the activations a step keeps for its backward pass, the attention
scores and the logits. Each part's shape follows from the model's config and how the method lays out a step
(flat padding-free sequences, chosen and rejected side by side, a reward model's single score); the constants
below were fitted on the peaks bench/memory.py measured (the job process's peak resident set, fp32, on CPU) and
are checked there against configurations left out of the fit."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
# fitted (least squares on the relative error) on bench/memory.py's first six configurations, fp32 on a 2-core
# AMD EPYC (AVX2), 2026-12-07; its three held-out configurations came within 1.00-1.15 of their measured peaks
PROCESS_BYTES = 836 * MIB  # Python, torch, transformers, TRL and the trainer's own working set, whatever the model
ACTIVATION_COPIES = 19.9  # values kept per token, layer and hidden unit for the backward pass
ATTENTION_COPIES = 0.28  # per head, layer and pair of positions (SDPA's math path keeps less than one full copy)
LOGIT_COPIES = 3.29  # per token and vocabulary entry (the logits, their log-softmax and its gradient)
FULL_STATE = 2  # per trainable weight in full fine-tuning: AdamW's two moments (the gradients fill in as the
# backward pass frees the activations, so at the peak they add little)
LORA_STATE = 4  # per LoRA weight: the weight, its gradient and the two moments, in fp32

MEASURED = ("sft", "dpo", "reward", "kto")  # the methods bench/memory.py measures: a launch of one is refused when it
# would not fit; the others get the estimate as a guide
PAIRED = ("dpo", "orpo", "reward")  # chosen and rejected go through the model side by side
SCORED = ("reward", "classify")  # a score head instead of the vocabulary's logits
FLAT = ("sft",)  # padding-free by default: a step's rows are one flat sequence


def _width(precision: str) -> int:
    """Bytes per weight and activation value."""
    return 2 if precision in ("bf16", "fp16") else 4


@dataclass(frozen=True)
class Step:
    """How the worst step of a method lays out its tokens: `sequences` sequences of `length` tokens that keep
    activations for the backward pass, or one flat sequence of them all."""
    sequences: int
    length: int
    flat: bool

    @property
    def tokens(self) -> int:
        return self.sequences * self.length

    @property
    def attention_pairs(self) -> int:
        """Pairs of positions whose attention scores are kept, over the step."""
        return self.tokens ** 2 if self.flat else self.sequences * self.length ** 2


def step_of(method: str, params: dict, longest: int) -> Step:
    """The worst step of `method` with these parameters, when the longest sequence of the data has `longest`
    tokens (packing fills every sequence to max_length)."""
    batch = int(params.get("batch_size", 1))
    max_length = int(params.get("max_length", 1024))
    length = max_length if params.get("packing") else min(max_length, max(1, longest))
    flat = method in FLAT and (bool(params.get("packing")) or params.get("batching", "padding_free") == "padding_free")
    return Step(batch * (2 if method in PAIRED else 1), length, flat)


def parts(config: dict, parameters: int, trainable: int, full: bool, method: str, step: Step,
          precision: str = "fp32", lora_dropout: float = 0.05) -> dict[str, float]:
    """Bytes by part for a run of the model `config` (its config.json) with `parameters` weights of which
    `trainable` are trained (LoRA on every linear layer unless `full`)."""
    width = _width(precision)
    hidden, layers = config.get("hidden_size", 0), config.get("num_hidden_layers", 0)
    heads, vocab = config.get("num_attention_heads", 1), config.get("vocab_size", 0)
    inter = config.get("intermediate_size", 4 * hidden)
    # LoRA's dropout keeps its own copy of each adapted layer's input, and its mask: q, k, v, o, gate and up read
    # a hidden-wide input, down an intermediate-wide one
    dropped = 0 if full or not lora_dropout else step.tokens * layers * (6 * hidden + inter) * (width + 1)
    return {
        "process": PROCESS_BYTES,
        "weights": parameters * width,
        "optimizer": trainable * 4 * (FULL_STATE if full else LORA_STATE),
        "activations": step.tokens * layers * hidden * width * ACTIVATION_COPIES + dropped,
        "attention": step.attention_pairs * layers * heads * 4 * ATTENTION_COPIES,
        "logits": 0 if method in SCORED else step.tokens * vocab * 4 * LOGIT_COPIES,
    }


def checkpointed(by_part: dict[str, float], config: dict, step: Step, precision: str = "fp32") -> dict[str, float]:
    """The parts with gradient checkpointing: each layer keeps only its input, and one layer's activations and
    attention scores are rebuilt at a time in the backward pass (not measured yet: bench/memory.py runs without)."""
    layers = max(1, config.get("num_hidden_layers", 1))
    width = _width(precision)
    boundaries = step.tokens * layers * config.get("hidden_size", 0) * width
    return {**by_part, "activations": boundaries + by_part["activations"] / layers,
            "attention": by_part["attention"] / layers}


FITS, TIGHT = 0.8, 1.0  # shares of the available memory: under the first it fits, up to the second it is tight
NAMES = {"process": "the process", "weights": "weights", "optimizer": "gradients and optimizer state",
         "activations": "activations", "attention": "attention scores", "logits": "logits"}


def verdict(need: float, available: float | None) -> str:
    """fits, tight, does not fit, or unknown (the available memory is not known here)."""
    if not available:
        return "unknown"
    share = need / available
    return "fits" if share < FITS else "tight" if share <= TIGHT else "does not fit"


def remedies(by_part: dict[str, float], method: str, full: bool, step: Step, checkpointing: bool = False) -> list[str]:
    """What to change to need less, the largest part first."""
    out = []
    for part in sorted(by_part, key=by_part.get, reverse=True):
        if by_part[part] <= 0:
            continue
        if part == "attention" and step.flat:
            out.append("batching=padded or a smaller batch_size (a flat step's attention grows with the square of "
                       "its tokens)")
        elif part in ("activations", "attention", "logits"):
            out.append("a smaller batch_size or max_length"
                       + ("" if checkpointing else ", or gradient_checkpointing=on"))
        elif part == "optimizer" and full:
            out.append("use_lora=true (full fine-tuning keeps a gradient and two optimizer moments per weight)")
    return list(dict.fromkeys(out))
