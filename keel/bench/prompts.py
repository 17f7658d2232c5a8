"""Random benchmark requests, drawn alike by `bench offline` and `bench serve`, so one seed gives both the same prompts."""

from __future__ import annotations

import random


def random_requests(rng: random.Random, num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    token_id_range: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request; lengths uniform in [MIN, MAX], ids below token_id_range."""
    return [([rng.randrange(token_id_range) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
            for _ in range(num)]
