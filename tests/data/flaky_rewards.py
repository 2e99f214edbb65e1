"""Verifiers with bugs, for tests/test_verifier_failures.py: each misbehaves on the prompt "4+5=" alone."""

import os
import time

BAD = "4+5="


def raise_on_45(prompt: str, completion: str, answer: str) -> float:
    if prompt == BAD:
        raise ValueError("no reward for 4+5")
    return 1.0


def raise_on_two(prompt: str, completion: str, answer: str) -> float:
    if prompt in (BAD, "3+3="):
        raise ValueError(f"no reward for {prompt}")
    return 1.0


def hang_on_45(prompt: str, completion: str, answer: str) -> float:
    if prompt == BAD:
        time.sleep(1000)
    return 1.0


def string_reward(prompt: str, completion: str, answer: str):
    return "1.0"


def numpy_rewards(prompt: str, completion: str, answer: str):
    import numpy as np

    return {"f32": np.float32(0.5), "array": np.array(0.25), "bool": True, "int": 2}[completion]


def hang_after_pid(prompt: str, completion: str, answer: str) -> float:
    """Writes the calling process's pid to the file named by the prompt, then hangs."""
    with open(prompt, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(1000)
    return 1.0
