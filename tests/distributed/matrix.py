"""What tests/test_distributed.py trains under each engine and, in one process, as the reference: a tiny BERT
(hidden 32, 2 layers, no dropout), an adapter method, random token data, and the loop's options."""
import torch
from transformers import BertConfig, BertForSequenceClassification

import unipeft
from unipeft.train.trainer import LoopOptions

ENGINES = {"ddp": "ddp", "bf16": "ddp", "fsdp": "fsdp", "zero1": "configs/deepspeed/zero1.json",
           "zero2": "configs/deepspeed/zero2.json", "zero3": "configs/deepspeed/zero3.json"}
METHODS = ("lora", "ia3", "prefix", "full")
PER_PROCESS_BATCH, PROCESSES = 4, 2


def model_for(method: str):
    """The model to train, seeded: a PEFT model, or the BERT itself for full fine-tuning."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = BertForSequenceClassification(config)
    if method == "full":
        return bert.requires_grad_(True)
    configs = {
        "lora": lambda: unipeft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
        "ia3": lambda: unipeft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                         feedforward_modules=["output.dense"]),
        "prefix": lambda: unipeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    }
    return unipeft.get_peft_model(bert, configs[method]())


def examples(n: int, seed: int):
    """Random token ids; the label is whether the second token is in the upper half of the vocabulary."""
    ids = torch.randint(5, 100, (n, 8), generator=torch.Generator().manual_seed(seed))
    labels = (ids[:, 1] >= 52).long()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


TRAIN, HELD_OUT = examples(32, seed=1), examples(16, seed=2)  # 32 rows: 4 global batches of 8, none padded


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "labels")}


def held_out_loss(model) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**collate(HELD_OUT)).loss.item()
    model.train(was_training)
    return loss


def options(engine: str, processes: int) -> LoopOptions:
    """3 epochs of 4 optimizer steps of 8 rows, an evaluation every 3 steps (the best copy is tracked and
    reloaded); `engine` under several processes, the plain loop in one (the reference)."""
    return LoopOptions(epochs=3, batch_size=PER_PROCESS_BATCH * PROCESSES // processes, lr=2e-2, eval_every=3,
                       log_every=1, device="cpu", progress=False, engine=ENGINES[engine] if processes > 1 else None,
                       mixed_precision="bf16" if engine == "bf16" else "no")
