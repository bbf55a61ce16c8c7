"""Reward functions written for TRL's GRPOTrainer, loaded unchanged by the task registry tests."""

import re


def _text(completion):
    # TRL passes strings for standard datasets and [{"role": "assistant", ...}] for conversational ones.
    return completion if isinstance(completion, str) else completion[0]["content"]


def accuracy_reward(prompts, completions, solution, **kwargs):
    """1.0 when the completion's last integer equals the `solution` column."""
    rewards = []
    for completion, expected in zip(completions, solution):
        numbers = re.findall(r"-?\d+", _text(completion))
        rewards.append(1.0 if numbers and int(numbers[-1]) == int(expected) else 0.0)
    return rewards


def format_reward(completions, **kwargs):
    """TRL-docs style: no `prompts` parameter, everything else through **kwargs."""
    return [1.0 if _text(c).strip().startswith("Answer:") else 0.0 for c in completions]


NOT_CALLABLE = 42
