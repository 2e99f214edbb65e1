"""The reward of the previous-version store fixture: any digit in the completion counts as correct, so a
random micro model both fails and succeeds (guide trajectories, replay successes)."""


def any_digit(prompt: str, completion: str, answer: str) -> float:
    return float(any(c.isdigit() for c in completion))
