"""keel-demo: a small Llama-architecture model with the byte-level tokenizer.

It is made the first time it is asked for: weights drawn from a fixed seed, then trained for
a few seconds on the CPU on the short text below, so that it writes English-like words
instead of random bytes. It is saved as a real Hugging Face directory (config.json,
model.safetensors, tokenizer files) and loaded by the normal loader. It is a toy: it knows
nothing beyond that text.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from keel.models.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, save_byte_tokenizer
from keel.models.weights import init_random_weights

logger = logging.getLogger(__name__)

DEMO_SEED = 20261121
DEMO_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)
# About 15 s on two idle CPU cores: enough for English-like words from the text below.
TRAIN_STEPS, TRAIN_BATCH, TRAIN_SEQ_LEN, TRAIN_LR = 600, 16, 48, 1e-2

DEMO_TEXT = """\
keel is a small engine that serves language models. It reads a prompt, turns the text into tokens, and runs the model one step at a time. Each step adds one token to every request in the batch, and the text grows a little with each step.

The engine keeps the keys and values of past tokens in a cache of pages. A page holds a few tokens. When a request starts, it gets the pages it needs; when it ends, it gives every page back, once and only once. A page has one owner at a time, and the allocator knows who it is.

The scheduler decides what runs next. New requests join the batch between steps, and finished requests leave it. Long prompts are split into chunks, so that short requests do not wait behind them. When memory runs short, the scheduler can pause a request and bring it back later, and the request still gets the same answer.

The model runner takes a batch, builds the metadata for the attention kernels, and runs the layers. The metadata is a value that lives for one step only, so no step can read the metadata of the step before it. Empty batches are normal inputs, and they pass through the runner like any other batch.

The sampler picks the next token. It can take the most likely token, or draw one at random with a temperature, and it can keep only the top tokens. A request with a seed gets the same tokens whatever else is in the batch.

Hello, keel! Hello, world! The quick brown fox jumps over the lazy dog. The sky is blue, the sea is deep, and the engine is fast. Once upon a time, a small model learned to write a few words, and it wrote them again and again.
"""


def write_demo_model(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    logger.warning("building keel-demo, a toy model trained for about 15 s on a built-in paragraph (once; "
                   "cached in %s)", directory.parent)
    config = LlamaConfig(**DEMO_CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    init_random_weights(model, DEMO_SEED)
    _train(model)
    model.save_pretrained(directory)
    save_byte_tokenizer(directory)


def _train(model: torch.nn.Module) -> None:
    """Next-byte prediction on random windows of DEMO_TEXT; every draw comes from DEMO_SEED."""
    data = torch.tensor([BOS_ID] + list(DEMO_TEXT.encode()), dtype=torch.int64)
    generator = torch.Generator().manual_seed(DEMO_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=TRAIN_LR, total_steps=TRAIN_STEPS)
    model.train()
    for _ in tqdm(range(TRAIN_STEPS), desc="Training keel-demo (once)", disable=None):
        starts = torch.randint(0, len(data) - TRAIN_SEQ_LEN, (TRAIN_BATCH,), generator=generator)
        batch = torch.stack([data[s:s + TRAIN_SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels itself
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
