"""Pretraining on raw text: next-token prediction (a Llama-style decoder) or masked language modeling (a BERT-style
encoder), from scratch or continued from a registered model.

    lab run pretrain --dataset shakespeare --set size=small --set max_steps=300
    lab run pretrain --model smollm2-135m-instruct --dataset shakespeare --set max_steps=50   # continued

From scratch (no --model): a byte-level BPE tokenizer is first trained on the corpus with `tokenizers`, then a
model of the chosen size preset is initialised at random. Continued: the model and its tokenizer as registered (an
adapter is merged in). The text is tokenized once and packed into blocks of `block_size` tokens. Metrics: loss,
perplexity, tokens/s, MFU. The output (model and tokenizer) is registered as model `pretrain-<job id>`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from lab import modeling
from lab.errors import DataError
from lab.params import Optimiser, Passthrough, Precision, Split, TrainParams, advanced

ID = "pretrain"
KIND = "train"
DISTRIBUTED = True  # data-parallel under torchrun (the Trainer shards the data)
ACCEPTS = ("text",)
NEEDS_MODEL = "optional"  # none: from scratch; a model: continued pretraining
DESCRIPTION = "Pretraining on raw text, causal or masked, from scratch or continued."
CONFIG = "transformers.TrainingArguments"

# hidden size, layers, attention heads, intermediate size: about 0.4 M, 4 M, 25 M and 100 M parameters with an
# 8,000-token vocabulary (embeddings included)
SIZES = {"tiny": (64, 2, 4, 256), "small": (256, 4, 4, 1024), "medium": (512, 8, 8, 2048),
         "base": (768, 12, 12, 3072)}


class Params(TrainParams, Optimiser, Split, Precision, Passthrough):
    model_config = ConfigDict(extra="forbid")

    objective: Literal["causal", "masked"] = Field(
        "causal", description="causal: predict the next token (GPT/Llama); masked: fill in masked tokens (BERT).")
    size: Literal["tiny", "small", "medium", "base"] = Field(
        "small", description="From scratch: tiny ~0.4M, small ~4M, medium ~25M, base ~100M parameters.")
    vocab_size: int = Field(8000, ge=300, le=200_000, description="From scratch: tokens in the new BPE vocabulary.")
    block_size: int = Field(256, ge=16, le=32768, description="Tokens per packed training sequence.")
    mlm_probability: float = Field(0.15, **advanced("slider", gt=0, lt=1, description="Masked: share of tokens "
                                                    "masked."))
    learning_rate: float = Field(5e-4, gt=0, le=1, description="Peak learning rate (5e-4 from scratch, 5e-5 "
                                 "continued).")
    batch_size: int = Field(16, ge=1, le=4096, description="Blocks per device per step.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", **advanced(description="Learning-rate schedule."))
    weight_decay: float = Field(0.01, **advanced(ge=0, le=1, description="AdamW weight decay."))
    logging_steps: int = Field(5, **advanced(ge=1, description="Record metrics every this many steps."))
    eval_split: float = Field(0.05, ge=0, lt=0.5, description="Fraction of blocks held out for eval perplexity.",
                              json_schema_extra={"widget": "slider"})
    eval_steps: int = Field(100, **advanced(ge=1, description="Evaluate every this many steps."))


def check_inputs(params: Params, model: dict | None, dataset: dict | None, settings) -> list[str]:
    """Continued pretraining keeps the model's objective: a masked LM for `masked`, a causal LM for `causal`."""
    if model is None:
        return []
    masked = model["architecture"].endswith("ForMaskedLM")
    if params.objective == "masked" and not masked:
        return [f"objective `masked` needs a masked-LM model; {model['name']} is a {model['architecture']}"]
    if params.objective == "causal" and masked:
        return [f"{model['name']} is a masked LM ({model['architecture']}): set objective=masked"]
    return []


def train_tokenizer(texts, vocab_size: int, objective: str):
    """A byte-level BPE tokenizer trained on the corpus (every byte is representable: no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lab.registry import CHATML_TEMPLATE

    if objective == "masked":
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                    "mask_token": "[MASK]"}
    else:
        specials = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>"}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys(specials.values())),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    extra = {"chat_template": CHATML_TEMPLATE} if objective == "causal" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials, **extra)


def new_model(objective: str, size: str, tokenizer, block_size: int):
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter = SIZES[size]
    if objective == "masked":
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=inter,
                            max_position_embeddings=max(512, block_size), pad_token_id=tokenizer.pad_token_id)
        return BertForMaskedLM(config)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=inter,
                         max_position_embeddings=max(2048, block_size), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def continued_model(ctx, objective: str):
    import torch
    from transformers import AutoModelForMaskedLM

    if objective == "masked":  # check_inputs made sure the model fits the objective
        return AutoModelForMaskedLM.from_pretrained(ctx.model["path"], dtype=torch.float32)
    return modeling.causal_lm(ctx.model, adapter="merge", log=ctx.log)


def pack(data, tokenizer, block_size: int):
    """Tokenize once, join the documents (separated by the end-of-text token) and cut into full blocks."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + ([sep] if sep is not None else []) for x in ids]}

    def group(batch):
        joined = [t for ids in batch["input_ids"] for t in ids]
        n = len(joined) // block_size * block_size
        return {"input_ids": [joined[i:i + block_size] for i in range(0, n, block_size)]}

    tokenized = data.map(tokenize, batched=True, remove_columns=data.column_names)
    return tokenized.map(group, batched=True, batch_size=1000)


def examples(fmt: str, rows: list[dict]) -> list[str]:
    """The texts the model reads (tokenized and cut into blocks)."""
    return [r["text"] for r in rows]


def run(ctx, params: Params) -> None:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    ctx.perplexity = True
    torch.manual_seed(params.seed)

    # 1. tokenizer and model: trained/initialised from scratch, or the registered model's own
    texts = examples(ctx.dataset["format"], ctx.rows())
    if ctx.model is None:
        tokenizer = train_tokenizer(texts, params.vocab_size, params.objective)
        model = new_model(params.objective, params.size, tokenizer, params.block_size)
        ctx.log(f"[lab] from scratch: a {len(tokenizer)}-token BPE vocabulary and a {params.size} "
                f"{type(model).__name__} of {sum(p.numel() for p in model.parameters()):,} parameters")
    else:
        tokenizer = modeling.tokenizer(ctx.model["path"], log=ctx.log)
        model = continued_model(ctx, params.objective)
        ctx.log(f"[lab] continued pretraining of {ctx.model['name']}")

    # 2. data: tokenized once, packed into blocks
    blocks = pack(Dataset.from_dict({"text": texts}), tokenizer, params.block_size)
    if len(blocks) == 0:
        raise DataError(f"the corpus is shorter than one block of {params.block_size} tokens",
                        "lower block_size or add text")
    train, held_out = blocks, None
    if params.eval_split > 0 and len(blocks) >= 4:
        split = blocks.train_test_split(test_size=params.eval_split, seed=params.seed)
        train, held_out = split["train"], split["test"]
    ctx.log(f"[lab] {len(blocks)} blocks of {params.block_size} tokens ({len(blocks) * params.block_size:,} tokens)"
            + (f", {len(held_out)} held out" if held_out else ""))
    bf16 = ctx.use_bf16(params.precision, model, tokenizer)

    # 3. configuration, 4. trainer, 5. train
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=params.objective == "masked",
                                               mlm_probability=params.mlm_probability)
    args = ctx.trainer_args(TrainingArguments, params, model=model, bf16=bf16, evaluate=held_out is not None,
                            include_num_input_tokens_seen="all")
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out, data_collator=collator)
    ctx.train(trainer, params)
    if held_out is not None and trainer.state.global_step % params.eval_steps:
        trainer.evaluate()

    # 6. save the model and its tokenizer (rank 0 under torchrun)
    ctx.save(trainer.model, tokenizer, what=f"the {params.objective} LM")
